"""Checks a run makes from headers and small files before it writes anything: a mismatch found after minutes of
caching (or after the run folder exists) is a worse answer than one line at the start.

- the training adapter fits the training base: every module it names is a Linear of the base with its shape (a
  FLUX.2 dev adapter on klein, or the reverse, reads as a LoRA of the same family but cannot attach);
- ``model.transformer`` is the model of the ``model.path`` folder (FLUX.1 / FLUX.2 klein / FLUX.2 dev), and the text
  stack the run will load is in that folder (``Family.check_folder``: FLUX.2 dev's Mistral3);
- `dev2pro cache` shards were encoded by this family's text stack (FLUX.1's T5 + CLIP records carry a pooled
  vector; FLUX.2 records are one stacked ``prompt_embeds`` as wide as the transformer's context);
- every path the run reads later exists (``check_paths_exist``: model.path, the inference base, the adapter, the
  teacher, the shards; ``check_data_folders``: each data folder, its masks and controls), named by its field;
- and that a ``--resume`` state is a state of this kind of run on this model (``check_resume``: its recorded run
  facts against the base's header; ``statefit.check_state_fits`` checks again on the loaded model).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors import safe_open

from ..choices import MAX_REFERENCES
from ..config import as_list
from ..errors import UserError
from ..flux.checkpoint import open_checkpoint
from ..flux.weightfiles import holds_pickle
from ..lora.adapter import linear_shapes
from ..lora.formats import load_lora

log = logging.getLogger(__name__)


def check_training_inputs(base: str, model_dir: str, *, adapter: str = "", inference_base: str = "", shards: str = "",
                          needs_text: bool = True, allow_pickle: bool = False, family: str | None = None,
                          text_dtype: str = "fp32", reference: str | Sequence[str] = "", teacher: str = "",
                          folders: Sequence = ()) -> None:
    """UserError (one line, naming the field and the fix) unless the run's inputs exist and fit each other
    (``reference``: ``sample.control``; ``teacher``: dedistill's, when its objective reads one; ``folders``: the
    ``[[data.folders]]`` entries)."""
    if adapter and inference_base:
        # one base in memory is the point of an adapter: samples with it off already are "the LoRA on dev". (Checked
        # here, not in validate(): the config editor probes every path field with a value at once.)
        raise UserError("model.adapter: set model.adapter or model.inference_base, not both (with an adapter the "
                        "training base is dev and samples are rendered on it with the adapter off)")
    check_data_folders(folders)
    if not base:
        return
    check_paths_exist(base, model_dir, needs_text, {"model.inference_base": inference_base, "model.adapter": adapter,
                                                    "model.teacher": teacher, "data.shards": shards})
    ckpt = open_checkpoint(base, allow_pickle=allow_pickle, family=family)
    check_text_dtype(text_dtype, ckpt.family, "model.text_encoder_dtype = ")
    if needs_text and Path(model_dir).is_dir():
        check_folder_model(base, model_dir, ckpt)
        ckpt.family.check_folder(Path(model_dir), ckpt.spec())
    if adapter:
        check_adapter(adapter, ckpt, base)
    if inference_base and Path(inference_base).exists():
        check_inference_base(inference_base, ckpt, base, allow_pickle)
    if shards:
        check_shards(shards, ckpt.family, ckpt.spec())
    if reference:
        check_reference(reference, ckpt.family, "sample.control")


def check_resume(resume: str | None, run, base: str, adapter_rank: int = 0, family: str | None = None) -> None:
    """A ``--resume`` state of another kind of run than ``run`` (a ``train.folder.RunFolder``: `train` trains a LoRA,
    `dedistill` an adapter of ``adapter_rank`` or every weight) or of another model than ``base``: one line before
    the run folder is written or any data cached, not after. A path that names no complete state is left to
    ``lifecycle.prepare_output_dir``'s own message; a pickled base is not opened for this (the check runs again
    once the model is loaded)."""
    if resume is None or not base or not Path(base).exists() or holds_pickle(base):
        return
    from .state import read_common, saved_shapes, state_folder
    from .statefit import check_state_fits, spec_facts

    try:
        folder, _ = state_folder(resume, run.state)
        saved = read_common(folder).get("run")
    except UserError:
        return
    ckpt = open_checkpoint(base, family=family)
    trains = "lora" if run.command == "train" else "adapter" if adapter_rank else "full"
    now = spec_facts(ckpt.family, ckpt.spec(), run.command, trains)
    check_state_fits(folder, saved, saved_shapes(folder), now, None)


_READ_LATER = {"model.inference_base": "the transformer the samples are rendered on (e.g. the FLUX.1-dev folder), "
                                       "or leave it empty to sample on the training base",
               "model.adapter": "the training adapter's LoRA file (`lora extract` or `dedistill` with "
                                "train.adapter_rank)",
               "model.teacher": "the teacher's transformer file or model folder",
               "data.shards": "the index.json `dev2pro cache` wrote"}


def check_paths_exist(base: str, model_dir: str, needs_text: bool, later: dict[str, str]) -> None:
    """Every path the run reads, checked before the run folder exists: one line naming the field (a missing
    model.path or inference base used to surface after the dataset scan or the caching, unnamed, with the run
    folder, its config and cache left behind). ``later``: field -> path of the ``_READ_LATER`` fields ("": unset)."""
    fields = {"model.path": model_dir, "model.transformer": base}
    if Path(base) == Path(model_dir) or not needs_text:  # no text stack or VAE to load: the folder is not read
        fields = {"model.path" if Path(base) == Path(model_dir) else "model.transformer": base}
    for field, path in fields.items():
        if not Path(path).exists():
            raise UserError(f"{field}: {path} does not exist; give " + (
                "the model folder (diffusers layout: FLUX.1-dev, FLUX.2 klein or dev)" if field == "model.path"
                else "the transformer file or folder"))
    for field, path in later.items():
        if path and not Path(path).exists():
            raise UserError(f"{field}: {path} does not exist; give {_READ_LATER[field]}")


def check_data_folders(folders: Sequence) -> None:
    """Each ``[[data.folders]]`` entry's folders exist -- its images, masks and controls -- before the run folder is
    written (the dataset scan found them missing after config.toml and the memory plan)."""
    for i, f in enumerate(folders):
        named = [("path", f.path, "the folder of images with same-stem .txt captions")]
        named += [("masks", f.masks, "the folder of loss masks named like the images, or remove masks")] * bool(f.masks)
        named += [("controls", c, "the folder of reference images named like the images") for c in as_list(f.controls)]
        for field, path, what in named:
            if not Path(path).expanduser().is_dir():
                where = "does not exist" if not Path(path).expanduser().exists() else "is not a folder"
                raise UserError(f"data.folders[{i}].{field}: {path} {where}; give {what}")


def check_folder_model(base: str, model_dir: str, ckpt, fields: tuple[str, str] = ("model.transformer", "model.path"),
                       ) -> None:
    """``model.transformer`` (``ckpt``: its header) of another model than the ``model.path`` folder it is trained with
    -- FLUX.1 and FLUX.2, FLUX.2 klein and dev (Qwen3 or Mistral3 text stacks), or another size (klein 4B and 9B: the
    folder's text encoder is as wide as its own transformer reads): one line naming both, before the folder's own
    check asks for components it never had. A folder whose pipeline is unknown is left to that check. ``fields``:
    the names of the transformer and the folder in the message (`sample`: --transformer, --model)."""
    from .. import families
    from ..families.flux2.text import wants_mistral

    index = Path(model_dir) / "model_index.json"
    if os.path.realpath(base) == os.path.realpath(model_dir) or not index.is_file():
        return
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    folder = next((f for f in families.families().values() if name in f.pipelines), None)
    if folder is None:
        return
    made = ckpt.family.title  # FLUX.2: the text stack its context width reads (as the folder check judges it)
    if ckpt.family.name == "flux2":
        made += " dev" if wants_mistral(ckpt.spec()) else " klein"
    where = {"Flux2Pipeline": "FLUX.2 dev", "Flux2KleinPipeline": "FLUX.2 klein"}.get(name, folder.title)
    tf, mf = fields
    if made == where:
        return _check_folder_width(base, model_dir, ckpt, fields)
    parts = "text encoder and VAE do" if folder.name != ckpt.family.name else "text encoder does"
    raise UserError(f"{tf} {base} is a {made} transformer, {mf} {model_dir} is a {where} folder "
                    f"({name}), whose {parts} not fit it: set {mf} to the {made} model folder the "
                    f"transformer belongs to, or {tf} to a {where} transformer")


def _check_folder_width(base: str, model_dir: str, ckpt, fields: tuple[str, str]) -> None:
    """The folder's text encoder feeds its own transformer (``transformer/config.json``): a transformer of the same
    kind reading text of another width (FLUX.2 klein 9B on the 4B folder) is another size of model."""
    config = Path(model_dir) / "transformer" / "config.json"
    if not config.is_file():
        return
    try:
        own = ckpt.family.spec_from_config(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable config is the folder check's (or the loader's) to report
    spec = ckpt.spec()
    width, wanted = getattr(own, "context_dim", None), getattr(spec, "context_dim", None)
    if width is None or width == wanted:
        return
    tf, mf = fields
    raise UserError(f"{tf} {base} is a {_describe(spec, ckpt.family)} transformer reading text {wanted} wide, "
                    f"{mf} {model_dir} holds a {_describe(own, ckpt.family)} model whose text encoder gives "
                    f"{width}: set {mf} to the model folder of the transformer's size, or {tf} to a transformer "
                    "of the folder's size")


def check_reference(paths: str | Sequence[str], family, field: str, size: tuple[int, int] | None = None) -> None:
    """UserError unless each of ``paths`` (one reference image, or several) is a readable image and ``family`` takes
    reference images (FLUX.2); ``size``: the (width, height) they are fitted to for sampling, >= 64 px a side as
    diffusers' reference preprocessing needs."""
    from ..data.folders import decoded_size

    if not family.references:
        raise UserError(f"{field}: {family.title} has no reference-image input (edit pairs are FLUX.2's); remove "
                        f"{field}")
    paths = [str(p) for p in as_list(paths)]
    if len(paths) > MAX_REFERENCES:
        raise UserError(f"{field}: {len(paths)} reference images; FLUX.2 takes at most {MAX_REFERENCES}")
    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise UserError(f"{field}: the same reference image is given twice ({', '.join(paths)}); give each once")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{field}: {path} does not exist; fix the path of the reference image")
        if (why := decoded_size(Path(path))[1]) is not None:  # decoded: a cut JPEG passes PIL's verify()
            raise UserError(f"{field}: {path} is not a usable image ({why}); give a PNG/JPEG/WebP reference image")
    if size is not None and min(size) < 64:
        raise UserError(f"{field}: FLUX.2's pipelines need a reference of >= 64 px a side and it is fitted to the "
                        f"image size {size[0]}x{size[1]}; sample at >= 64 px a side")


def check_inference_base(path: str, ckpt, base: str, allow_pickle: bool = False) -> None:
    """The LoRA trained on ``base`` must fit ``model.inference_base``: the same family, width and block counts
    (FLUX.1 dev2pro -> dev, klein Base -> the distilled klein of the same size; its guidance embedding may differ)."""
    from .. import families

    other = open_checkpoint(path, allow_pickle=allow_pickle)
    families.require_same(other.family, ckpt.family, f"model.inference_base {path}", f"the training base {base}")
    a, b = ckpt.spec(), other.spec()
    if (a.hidden, a.num_double, a.num_single) != (b.hidden, b.num_double, b.num_single):
        raise UserError(f"model.inference_base {path} is a {_describe(b, other.family)} model ({b.num_double} double "
                        f"+ {b.num_single} single blocks), the training base {base} a {_describe(a, ckpt.family)} "
                        f"one ({a.num_double} + {a.num_single}): a LoRA fits only the size it was trained on; use "
                        "the distilled model of the training base's size")


def check_text_dtype(text_dtype: str, family, field: str) -> None:
    """fp8 text encoders are FLUX.2's (Mistral 24B in ~25 GB); ``field`` names the setting in the message."""
    if text_dtype == "fp8" and family.name != "flux2":
        raise UserError(f"{field}\"fp8\" is for FLUX.2's text encoders; {family.title}'s T5 + CLIP take \"bf16\" "
                        "(or \"fp32\")")


def _describe(spec, family) -> str:
    if family.name != "flux2":
        return family.title
    kind = "klein" if spec.is_klein else "dev"
    size = spec.size_name.removeprefix("klein-")
    return f"FLUX.2 {kind} {size} {spec.hidden} wide" if spec.size_name != kind else f"FLUX.2 {kind}"


def check_adapter(path: str, ckpt, base: str) -> None:
    """The adapter's modules are Linears of the base with their (out, in) shapes."""
    lw = load_lora(path, family=ckpt.family, base=base)  # another family's LoRA: its own one-line error
    shapes = linear_shapes(ckpt.spec())
    bad = [n for n, m in lw.items() if shapes.get(n) != (m.up.shape[0], m.down.shape[1])]
    # at real sizes the shapes decide (klein 3072/4096 wide, dev 6144); a dev2pro export also records its base
    recorded = lw.metadata.get("dev2pro.base_guidance_embeds")
    guided = any("guidance" in n for n in lw) if recorded is None else recorded == "true"
    if not bad and (recorded is None or guided == bool(ckpt.spec().guidance_embeds)):
        return
    width = next((m.up.shape[0] for n, m in lw.items() if n == "x_embedder"), None)
    made_for = (f"{ckpt.family.title} {'dev' if guided else 'klein'}" if ckpt.family.name == "flux2"
                else ckpt.family.title) + (f" model {width} wide" if width else " model")
    misfit = f"; {len(bad)} of its {len(lw)} modules do not fit, e.g. {bad[0]}" if bad else ""
    raise UserError(f"model.adapter {path} was made for a {made_for}, not for the training base {base}, a "
                    f"{_describe(ckpt.spec(), ckpt.family)}{misfit}: use an adapter de-distilled from this base "
                    "(`dev2pro dedistill` with train.adapter_rank), or train on the base the adapter was made from")


def check_shards(index: str, family, spec) -> None:
    """The shards' empty-prompt record has this family's text tensors at the transformer's context width."""
    path = Path(index)
    if not path.is_file():
        return  # ShardDataset says what is missing, with the fix
    index_data = json.loads(path.read_text())
    pipeline = index_data.get("settings", {}).get("pipeline")
    if family.name == "flux2" and pipeline in ("Flux2Pipeline", "Flux2KleinPipeline"):
        from ..families.flux2.text import wants_mistral

        if (pipeline == "Flux2Pipeline") != wants_mistral(spec):  # equal widths (tiny, fine-tuned encoders)
            made = "FLUX.2 dev's Mistral3" if pipeline == "Flux2Pipeline" else "a FLUX.2 klein's Qwen3"
            raise UserError(f"data.shards {index} was encoded with {made} text encoder ({pipeline}), but the "
                            f"training base is {_describe(spec, family)}: encode the dataset again with `dev2pro "
                            "cache --model` this model's folder")
    empty = path.parent / index_data.get("empty", "empty.safetensors")
    if not empty.is_file():
        return
    with safe_open(str(empty), framework="pt") as f:
        keys = set(f.keys())
        width = f.get_slice("prompt_embeds").get_shape()[-1] if "prompt_embeds" in keys else None
    pooled_expected = family.name == "flux1"
    if ("pooled" in keys) != pooled_expected or width != spec.context_dim:
        made = "FLUX.1 text encoders (T5 + CLIP)" if "pooled" in keys else f"a text encoder {width} wide"
        raise UserError(f"data.shards {index} was encoded with {made}, but the training base is "
                        f"{_describe(spec, family)} (text context {spec.context_dim}): encode the dataset again "
                        f"with `dev2pro cache --model` this model's folder, or train with data.folders (cached per "
                        "family)")


def print_plan(inputs: Callable[[], object], vram: int | None) -> None:
    """The memory plan at the start (``inputs``: makes its ``plan.PlanInputs``): a failure to estimate never stops
    training, a plan no card holds does."""
    from ..plan import ImpossiblePlan, report as report_plan  # `sample`, `compare` and `cache` need no plan

    try:
        report_plan(inputs(), vram)
    except ImpossiblePlan:
        raise  # settings no card can run: refuse before the run starts
    except Exception as e:  # noqa: BLE001 -- an estimate must not cost the user their run
        log.warning("memory plan unavailable: %s", e)
