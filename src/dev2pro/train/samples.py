"""Sample grids during training: rows = prompts, columns = seeds, a title band, PNG metadata, TensorBoard.

``LoraSampler`` renders the current LoRA on the base it will be used with (``model.inference_base``, e.g. dev:
the Dev2Pro recipe samples there at guidance ~3.5), or on the training model (with a training adapter switched
off, which is the same thing). ``dedistill_grids`` renders a de-distilling student twice: at guidance 1.0 without
CFG and with true CFG. The guidance of every grid is resolved once (``sampling.resolve_guidance``) and that one
object drives the render, the title and the metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .. import families
from ..config import as_list
from ..flux.checkpoint import load_transformer
from ..flux.fp8 import Fp8Policy
from ..lora import adapter as adaptermod
from ..lora.ops import apply_lora, lora_from_peft_model
from ..sampling import (Guidance, dedistilled, make_labelled_grid, no_cfg, resolve_guidance, save_png, step_distilled,
                        unknown_variant_note)
from .blockswap import BlockSwap
from .progress import render_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSpec:
    """What every grid of a run shows: prompts (rows), seeds (columns), their embeddings, the render size."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    embeds: list
    negative: tuple | None
    steps: int
    width: int
    height: int
    control: str | list = ""  # reference image(s) every prompt is rendered from (FLUX.2 edit LoRAs)

    def references(self) -> list | None:
        """The reference image(s) fitted to the render size, once per prompt (``render``'s ``references``); None
        without."""
        if not self.control:
            return None
        from ..data.buckets import fitted_references

        return [fitted_references(self.control, (self.width, self.height))] * len(self.prompts)


def samples_line(sc, guidance: Guidance, where: str, out, edit: bool) -> str:
    """The startup line of a run's sample grids: what, how, on which base, and -- ``edit``: the data may hold edit
    pairs -- the reference they edit, or that they render text-to-image without ``sample.control``."""
    refs = ", ".join(map(str, as_list(sc.control)))
    note = (f"; each edits {refs}" if refs else
            "; text-to-image (for an edit LoRA set sample.control to a test image to see its edit)" if edit else "")
    return (f"  samples: {len(sc.prompts)} prompt(s) x {len(sc.seeds)} seed(s) at {guidance.describe()} on {where}, "
            + (f"every {sc.every} steps and " if sc.every else "") + f"at the end -> {out}" + note)


def write_grid(images: list, spec: GridSpec, title: str, path: Path, info: dict, bar=None, tag: str = "") -> Path:
    """The labelled grid of ``images`` (prompt-major) written with its metadata, and logged to TensorBoard."""
    rows, cols = [str(p) for p in spec.prompts], [f"seed {s}" for s in spec.seeds]
    grid = make_labelled_grid(images, rows, cols, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, {**info, "prompts": json.dumps(list(spec.prompts)), "seeds": json.dumps(list(spec.seeds)),
                          "title": title, "rows": json.dumps(rows), "cols": json.dumps(cols),
                          **({"reference": spec.control} if spec.control else {})}, overwrite=True)
    if bar is not None:
        bar.image(tag, grid, int(info.get("step", 0)))
    return path


def _grid_guidance(guidance_embeds: bool, guidance: float, cfg: float) -> Guidance:
    """`train`'s grids: ``sample.cfg`` is the true-CFG scale of bases WITHOUT a guidance embedding; a
    guidance-distilled base (dev) renders with its embedded guidance alone, as users run it (CFG on top doubled the
    guidance and the cost)."""
    return resolve_guidance(guidance_embeds, "auto", guidance, 1.0 if guidance_embeds else cfg)


def title_name(path: str) -> str:
    """A base's name in grid titles: its model folder's for the folder's ``transformer`` subfolder or a file inside
    one (``FLUX.2-klein-4B/transformer`` read "transformer"), else the file or folder name."""
    p = Path(path)
    if p.name == "transformer":
        return p.parent.name or p.name
    if p.parent.name == "transformer" and p.parent.parent.name:
        return p.parent.parent.name
    return p.name


def _variant_notes(training_spec, inference_base: str, samples: bool) -> None:
    """Start-up words on a FLUX.2 klein training base: distilled is not the model to train a LoRA on (a warning, not
    a refusal); a Base run sampled on itself shows Base, and says how to see the LoRA on the distilled model."""
    variant = getattr(training_spec, "variant", None)
    if variant == "klein-distilled":
        log.warning("the training base is FLUX.2 klein distilled, which is not the model to train a LoRA on (it is "
                    "step-distilled: a LoRA trained on it fits it poorly); train on klein Base (model.path = the "
                    "klein Base folder) and sample on distilled with model.inference_base = the klein distilled "
                    "folder's transformer")
    elif variant == "klein-base" and samples and not inference_base:
        log.warning("note: the samples show the LoRA on FLUX.2 klein Base (true CFG, sample.steps); to see it on the "
                    "distilled model it will be used with (its own few steps, no CFG), set model.inference_base = the "
                    "klein distilled folder's transformer (e.g. FLUX.2-klein-4B/transformer)")


class LoraSampler:
    """Grids of the current LoRA on the inference base (``inference_base``) or the training model.

    The inference transformer lives on the CPU and visits the device only while sampling, so a 24 GB card does
    not hold two bases at once; the current LoRA weights are copied into it as a peft adapter each time.

    A step-distilled inference base (FLUX.2 klein distilled) is sampled as it is used -- its own step count, no
    CFG -- and the training base (klein Base) gets a ``-base`` grid beside it with the configured steps and CFG:
    the LoRA where it will be used, next to where it was trained.
    """

    def __init__(self, spec: GridSpec, components: dict, device, dtype, *, guidance: float, cfg: float,
                 inference_base: str = "", training_guidance_embeds: bool | None = None, adapter: str = "",
                 with_adapter: bool = False, fp8_storage: bool = False, fp8_keep: Sequence[str] = (),
                 blocks_to_swap: int = 0, vae_tiling: bool = False, allow_pickle: bool = False,
                 family: str = "flux1", training_metadata: Mapping[str, str] | None = None, training_spec=None):
        """``training_spec``: the training base's spec (its variant: a klein distilled base trained on directly is
        sampled as it is used, as `dev2pro sample` renders it; its guidance embedding, unless
        ``training_guidance_embeds`` says)."""
        if training_guidance_embeds is None:
            training_guidance_embeds = getattr(training_spec, "guidance_embeds", True)
        self.spec, self.components, self.device, self.dtype = spec, components, device, dtype
        self.adapter, self.with_adapter, self.vae_tiling = adapter, with_adapter, vae_tiling
        self.model, self.swap, self.distilled = None, None, False
        self.family = families.get(family)
        self.references = spec.references() if spec.prompts else None
        inference_spec = training_spec
        _variant_notes(training_spec, inference_base, bool(spec.prompts))
        if inference_base and spec.prompts:
            self.model, ckpt = load_transformer(inference_base, dtype=dtype, fp8_storage=fp8_storage,
                                                policy=Fp8Policy.from_names(fp8_keep), allow_pickle=allow_pickle)
            families.require_same(ckpt.family, self.family, f"model.inference_base {inference_base}",
                                  "the training base")
            inference_spec = ckpt.spec()
            if note := unknown_variant_note(inference_spec, inference_base):
                log.warning("model.inference_base: %s", note.removeprefix("note: "))
            if blocks_to_swap:
                self.swap = BlockSwap(self.model, blocks_to_swap, device)  # placed while sampling only
        embeds = self.model.config.guidance_embeds if self.model is not None else training_guidance_embeds
        self.guidance: Guidance = _grid_guidance(embeds, guidance, cfg)
        # dev + adapter = dev2pro, which is used as it was de-distilled: guidance input 1.0, true CFG on top
        self.adapter_guidance = resolve_guidance(embeds, "auto", 1.0, max(cfg, 1.0))
        # so is a de-distilled export trained on directly (``sampling.dedistilled``): its embedded 3.5 is noise
        own = (resolve_guidance(training_guidance_embeds, "auto", 1.0, max(cfg, 1.0))
               if dedistilled(training_metadata or {}) else
               _grid_guidance(training_guidance_embeds, guidance, cfg))
        if self.model is None:
            self.guidance = own
        self.base_guidance = self.guidance
        self.steps = spec.steps
        self.distilled = inference_spec is not None and step_distilled(inference_spec)  # `dev2pro sample`'s rule
        if self.distilled:  # as it is used: its own steps, no CFG; the training base keeps the configured ones
            self.base_guidance = own
            self.guidance = no_cfg()
            self.steps = inference_spec.sampling.steps
        self.base = inference_base or "training base"

    def describe(self) -> str:
        """What one round of samples renders, for the console (a step-distilled base at its own step count)."""
        n = len(self.spec.embeds) * len(self.spec.seeds)
        grids = [f"{n} image(s) at {self.steps} steps"]
        if self.distilled and self.model is not None:
            grids.append(f"{n} on the training base at {self.spec.steps} steps")
        if self.adapter and self.with_adapter:
            grids.append(f"{n} with the adapter on")
        return ", ".join(grids)

    def sample(self, train_model, step: int, folder: Path, bar, progress: bool = False) -> Path:
        """Render the grid; with a training adapter on the training model with the adapter off (= the LoRA on
        dev), and with ``with_adapter`` a second grid with it on. Returns the (first) grid's path."""
        if self.distilled and self.model is not None:  # the LoRA on the training base too, where it was trained
            self._sample(train_model, step, folder, bar, progress, suffix="-base", on_training_base=True)
        if not self.adapter:
            return self._sample(train_model, step, folder, bar, progress)
        with adaptermod.disabled(train_model):
            path = self._sample(train_model, step, folder, bar, progress)
        if self.with_adapter:
            self._sample(train_model, step, folder, bar, progress, suffix="-adapter", guidance=self.adapter_guidance)
        return path

    def _target(self, train_model):
        if self.model is None:
            return train_model
        target = self.model if self.swap else self.model.to(self.device)
        if "sample" in getattr(target, "peft_config", {}):
            target.delete_adapters("sample")
        apply_lora(target, lora_from_peft_model(train_model, "default"), 1.0, adapter_name="sample")
        if self.swap:
            self.swap.place()  # after apply_lora, so the new LoRA weights go to the device too
        return target

    def _sample(self, train_model, step: int, folder: Path, bar, progress: bool = False, suffix: str = "",
                on_training_base: bool = False, guidance: Guidance | None = None) -> Path:
        target, spec = train_model if on_training_base else self._target(train_model), self.spec
        guidance = guidance or (self.base_guidance if on_training_base else self.guidance)
        steps = spec.steps if on_training_base else self.steps
        was_training = target.training
        target.eval()
        vae = self.components["vae"].to(self.device)
        if self.vae_tiling:
            vae.enable_tiling()
        pipe = self.family.build_pipeline({**self.components, "vae": vae}, target,
                                          distilled=self.distilled and not on_training_base)
        with torch.no_grad():  # prompt-major: one grid row per prompt, one column per seed
            images = render_each(self.family.render, pipe, spec.embeds, [int(s) for s in spec.seeds],
                                 f"samples {step}", progress, guidance=guidance, negative=spec.negative, steps=steps,
                                 width=spec.width, height=spec.height, references=self.references)
        target.train(was_training)
        if not on_training_base:  # the inference base goes back to host RAM (the training model stays)
            if self.swap:
                self.swap.unplace()
            elif self.model is not None:
                self.model.to("cpu")
        self.components["vae"].to("cpu")
        base = "training base" if on_training_base else self.base
        name = base if on_training_base else title_name(base)
        if self.adapter:
            extra = f" + adapter {Path(self.adapter).name}" if suffix else " without the adapter"
            base, name = base + extra, name + extra
        title = f"step {step}  |  {guidance.describe()}, {steps} steps  |  {name}" if self.distilled \
            else f"step {step}  |  {guidance.describe()}  |  {name}"
        info = {"step": str(step), "guidance": json.dumps(guidance.to_dict()), "base": base}
        return write_grid(images, spec, title, folder / f"step{step:06d}{suffix}.png", info, bar, "samples" + suffix)


def dedistill_guidances(guidance_embeds: bool, cfg_scale: float) -> dict[str, Guidance]:
    """The two grids of a de-distillation run, resolved once: ``g1`` at guidance 1.0 without CFG, ``cfg`` with
    true CFG at ``cfg_scale`` (a guidance embedding, if the student has one, gets 1.0 in both)."""
    return {"g1": resolve_guidance(guidance_embeds, "auto", 1.0, 1.0),
            "cfg": resolve_guidance(guidance_embeds, "auto", 1.0, float(cfg_scale))}


def dedistill_grids(model, spec: GridSpec, components: dict, guidances: dict[str, Guidance], step: int,
                    folder: Path, bar, main: bool, autocast, device) -> list[Path]:
    """One grid per ``dedistill_guidances`` entry, ``stepNNNNNN-<tag>.png``.

    Every rank renders (under FSDP each forward needs all ranks' shards; under DDP it costs no extra wall time);
    the main process writes the grids and logs them to TensorBoard.
    """
    vae = components["vae"].to(device)
    family = families.of_model(model)
    pipe = family.build_pipeline({**components, "vae": vae}, model)
    paths = []
    for tag, guidance in guidances.items():
        with autocast():  # the training forward's precision (FSDP's bf16 shards need it)
            images = family.render(pipe, spec.embeds, [int(s) for s in spec.seeds], guidance, negative=spec.negative,
                            steps=spec.steps, width=spec.width, height=spec.height)
        if main:
            title = f"step {step}  |  {guidance.describe()}"
            info = {"step": str(step), "guidance": json.dumps(guidance.to_dict())}
            paths.append(write_grid(images, spec, title, folder / f"step{step:06d}-{tag}.png", info, bar,
                                    f"samples/{tag}"))
    vae.to("cpu")
    return paths
