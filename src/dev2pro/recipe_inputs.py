"""The config -> library translations the recipes need (kept out of ``schemas``, which only describes configs):
a ``--vram`` preset applied to a loaded train config, the memory plan's inputs, the data source of a ``[data]``
section, and the LoRA rank checked against the layers it trains. Torch-free at import: what needs torch or a
checkpoint header is imported when a recipe calls it. ``cfg`` is a ``schemas.TrainConfig`` (``data`` its
``DataSection``): ``schemas``' loader calls in here, so this module does not import it back."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import as_list
from .errors import UserError
from .flux.weightfiles import holds_pickle


def check_rank_fits(cfg) -> None:
    """``lora.rank`` against the widths of the layers it trains, once the checkpoint's header is readable (a
    missing or unreadable model is reported where it is loaded; pickles -- files or a diffusers folder of ``.bin``
    weights -- are not opened just for this)."""
    m = cfg.model
    src = m.transformer or m.path
    if not src or not Path(src).exists() or holds_pickle(src):
        return
    from .plan import check_rank  # torch: only when a recipe runs (the CLI imports us)

    try:
        inputs = plan_inputs(cfg)
    except Exception:  # noqa: BLE001 -- only the rank is judged here; the model's own errors come when it loads
        return
    check_rank(inputs)


def apply_sample_guidance_default(cfg, explicit: set[str] = frozenset(), dedistill: bool = False) -> None:
    """``sample.guidance`` / ``sample.cfg`` not in ``explicit`` (the keys the user wrote): what the training base's
    own pipeline samples at -- embedded 4.0 for FLUX.2 dev (``Flux2Pipeline``), true CFG 4.0 for klein Base
    (``Flux2KleinPipeline``), FLUX.1's 3.5 (the schema defaults) otherwise. A ``dedistill`` config's true-CFG grid
    takes the base's own scale too (FLUX.2 dev: 4.0, as `dev2pro sample` renders the export). Only the header is
    read; an unreadable model keeps the defaults (it is reported where it is loaded)."""
    m = cfg.model
    src = m.transformer or m.path
    if not src or not Path(src).exists() or holds_pickle(src):
        return
    from .flux.checkpoint import open_checkpoint  # torch: only when a recipe runs (the CLI imports us)

    from .guidance_defaults import dedistilled

    try:
        ckpt = open_checkpoint(src, family=m.family)
        sampling = getattr(ckpt.spec(), "sampling", None)
    except (UserError, OSError, ValueError):
        return
    if sampling is not None and sampling.guidance != "embedded" and "sample.guidance" in explicit and not dedistill:
        logging.getLogger(__name__).warning(
            "sample.guidance = %g is not read: %s has no guidance input (FLUX.2 klein); its samples' scale is "
            "sample.cfg (true CFG on Base, none on the distilled model): set sample.cfg instead", cfg.sample.guidance,
            src)
    if sampling is None or sampling.guidance == "none":  # FLUX.1 (the schema defaults) or a step-distilled base
        return
    if not dedistill and sampling.guidance == "embedded" and "sample.guidance" not in explicit:
        cfg.sample.guidance = float(sampling.scale)
    # a de-distilled FLUX.2 dev export renders with true CFG at dev's own scale (``train.samples``)
    true_cfg = dedistill or sampling.guidance == "true-cfg" or dedistilled(ckpt.metadata)
    if true_cfg and "sample.cfg" not in explicit:
        cfg.sample.cfg = float(sampling.scale)


def apply_vram_preset(cfg, explicit: set[str]) -> dict[str, object]:
    """Set the ``cfg.model.vram`` preset's values on every field not in ``explicit``; returns what it chose. A
    preset depends on the model's family and size: with ``model.path`` / ``model.transformer`` missing none is
    applied or printed (FLUX.1's table used to be printed, even for klein, before the missing-path error); `train`'s
    preflight and `plan` then refuse the path, naming the field. The printed line ends with the host RAM peak."""
    gb = cfg.model.vram
    if not gb:
        return {}
    from .families import of_spec  # torch: only when a recipe runs (the CLI imports us)
    from .plan import VRAM_PRESETS
    from .presets import clamp_blocks_to_swap, fit_preset, vram_preset

    m = cfg.model
    if not all(Path(p).exists() for p in (m.transformer, m.path) if p):
        return {}
    try:
        inputs = plan_inputs(cfg)
    except (UserError, OSError, ValueError):
        inputs = None  # an unreadable model is reported where it is loaded; FLUX.1's table needs no header
    notes = []
    if inputs is not None and of_spec(inputs.spec).name != "flux1":
        # computed from the plan for this model: the table below was measured for FLUX.1's 12B
        fit = fit_preset(inputs, gb, fixed=explicit)
        every = fit.values()
        chosen = {k: v for k, v in every.items() if k not in explicit}
        kept = [k for k in every if k in explicit]
        what = f" (computed from the plan for this {of_spec(inputs.spec).title} model)"
        notes.append(fit.host_note())
        if fit.no_bitsandbytes and "train.optimizer" in chosen:
            notes.append("adamw8bit would save more but needs bitsandbytes (not installed)")
    else:
        chosen, kept = vram_preset(gb, explicit)
        what = ""
        if chosen.get("train.optimizer") != VRAM_PRESETS[gb]["train"]["optimizer"] and "train.optimizer" in chosen:
            notes.append("the preset's adamw8bit needs bitsandbytes (not installed): fell back to adamw")
    for name, value in chosen.items():
        sec, key = name.split(".")
        setattr(getattr(cfg, sec), key, value)
    if "model.blocks_to_swap" in chosen and not what:  # the table's count is for FLUX.1's 57 blocks: clamp
        n = clamp_blocks_to_swap(cfg.model.blocks_to_swap, cfg.model.transformer or cfg.model.path,
                                 cfg.model.allow_pickle)
        cfg.model.blocks_to_swap = chosen["model.blocks_to_swap"] = n
    if inputs is not None and not what:
        notes.append(_host_peak(cfg))
    print(f"--vram {gb} preset{what}: " + ", ".join(f"{k} = {v}" for k, v in chosen.items())
          + (f" (kept your {', '.join(kept)})" if kept else "") + "".join(f"; {n}" for n in notes if n), flush=True)
    return chosen


def _host_peak(cfg) -> str:
    """"host RAM peak ~N GB" of the config's plan ("" when it cannot be made)."""
    from .plan import estimate, fmt_gb

    try:
        return f"host RAM peak ~{fmt_gb(estimate(plan_inputs(cfg)).host_ram)}"
    except Exception:  # noqa: BLE001 -- a note only
        return ""


def attention_backend(cfg, model, device) -> str:
    """``train.attention_backend`` for this run: "auto" is probed on the card (``train/attention.py``) at the
    largest bucket's token count, once per card and model shape; any other value as written."""
    if cfg.train.attention_backend != "auto":
        return cfg.train.attention_backend
    from .train.attention import candidates, choose, model_config  # torch: only when a recipe runs (the CLI imports us)

    if not candidates(device):
        return ""  # no CUDA: PyTorch SDPA, nothing to probe
    inp = plan_inputs(cfg)
    return choose(model_config(model), (max(inp.image_tokens), inp.text_tokens), device)


def plan_inputs(cfg):
    """PlanInputs for a train (or dedistill) config; the spec comes from the checkpoint header only."""
    from dataclasses import replace

    from .flux.checkpoint import open_checkpoint  # torch: only when a recipe runs (the CLI imports us)
    from .plan import PlanInputs, adapter_params_in_file, card_bytes, checkpointing_choice, encoder_params

    m = cfg.model
    spec = open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle, family=m.family).spec()
    from .data.buckets import reference_size
    from .data.folders import control_dirs
    from .data.mixing import active_folders, largest_resolution

    folders = active_folders([_folder(f) for f in cfg.data.folders], cfg.data.reg_weight)
    shard_refs, shard_res = shard_facts(cfg.data.shards)
    res = shard_res or largest_resolution(cfg.data.resolution, folders)  # the largest is what the peak sees
    sample = cfg.sample.width * cfg.sample.height if cfg.sample.prompts else 0
    per_image = 1 + max([len(control_dirs(f)) for f in folders] + [shard_refs])  # edit pairs: references ride along
    ref_w, ref_h = reference_size((res, res))  # each at most 1 MP
    ref_tokens = (ref_w // 16) * (ref_h // 16)
    inp = PlanInputs(spec, m.dtype, fp8_storage=m.fp8_storage, fp8_keep=tuple(m.fp8_keep),
                     blocks_to_swap=m.blocks_to_swap,
                     rank=cfg.lora.rank, targets=cfg.lora.targets, extra_targets=tuple(cfg.lora.extra_targets),
                     lora_type=cfg.lora.type, lokr_factor=cfg.lora.lokr_factor,
                     lokr_decompose_both=cfg.lora.lokr_decompose_both,
                     optimizer=cfg.train.optimizer, batch_size=cfg.data.batch_size,
                     image_tokens=((res // 16) ** 2 + (per_image - 1) * ref_tokens,), images_per_sample=per_image,
                     reference_tokens=ref_tokens,
                     text_tokens=m.t5_max_length, sample_pixels=sample,
                     sample_references=len(as_list(getattr(cfg.sample, "control", ""))) if sample else 0,
                     inference_base=bool(m.inference_base and cfg.sample.prompts), vae_tiling=m.vae_tiling,
                     sample_prompts=len(cfg.sample.prompts),
                     adapter_params=adapter_params_in_file(getattr(m, "adapter", "")),
                     text_encoder=m.text_encoder, text_encoder_dtype=m.text_encoder_dtype,
                     **{f"{k}_params": v for k, v in encoder_params(m.path, spec).items()},
                     gradient_checkpointing=m.gradient_checkpointing is not False,  # "auto": decided below
                     lora_dtype=getattr(cfg.train, "lora_dtype", "fp32"))  # dedistill's adapter LoRA: fp32
    if m.gradient_checkpointing == "auto":
        inp = replace(inp, gradient_checkpointing=checkpointing_choice(inp, card_bytes(m.vram or None)[0]))
    return inp


def gradient_checkpointing(cfg) -> bool:
    """``model.gradient_checkpointing`` as the run applies it: "auto" is the plan's choice for this card (on when
    the plan cannot be made: an estimate must not cost a run its memory)."""
    if cfg.model.gradient_checkpointing != "auto":
        return bool(cfg.model.gradient_checkpointing)
    try:
        return plan_inputs(cfg).gradient_checkpointing
    except Exception:  # noqa: BLE001
        return True


def dedistill_plan_inputs(cfg):
    """PlanInputs for an adapter de-distillation config (``train.adapter_rank`` > 0): the frozen base (fp8, swap) with
    a LoRA on every Linear, AdamW, an EMA copy; ``cfg_teacher`` runs the student on caption + empty prompt in one
    batch (2x), the teacher is the same weights with the LoRA off (no second base)."""
    from .flux.checkpoint import open_checkpoint  # torch: only when a recipe runs (the CLI imports us)
    from .plan import PlanInputs, encoder_params

    m, tc = cfg.model, cfg.train
    if not tc.adapter_rank:
        raise UserError("dev2pro plan covers adapter de-distillation (train.adapter_rank > 0); a full fine-tune's "
                        "state (~20 bytes per parameter, sharded by FSDP) is in the README's cost table")
    spec = open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle, family=m.family).spec()
    res, sc = cfg.data.resolution, cfg.sample
    res = max(res) if isinstance(res, list) else res  # the largest is what the memory peak sees
    return PlanInputs(spec, "fp32" if tc.mixed_precision == "no" else tc.mixed_precision, fp8_storage=m.fp8_storage,
                      gradient_checkpointing=m.gradient_checkpointing is not False, blocks_to_swap=m.blocks_to_swap,
                      rank=tc.adapter_rank, targets="every_linear", optimizer="adamw",
                      batch_size=cfg.data.batch_size * (2 if cfg.objective == "cfg_teacher" else 1),
                      image_tokens=((res // 16) ** 2,), text_tokens=m.t5_max_length,
                      sample_pixels=sc.width * sc.height if sc.every and sc.prompts else 0,
                      sample_prompts=len(sc.prompts) if sc.every else 0, ema=tc.ema_decay > 0,
                      text_encoder=m.text_encoder, text_encoder_dtype=m.text_encoder_dtype,
                      **{f"{k}_params": v for k, v in encoder_params(m.path, spec).items()})


def data_source(data, out: Path) -> dict:
    """``data.prepare.load_training_data``'s source arguments (folders or shards, folder rules, cache folder) from
    a ``[data]`` section; the cache defaults to ``<output_dir>/cache``."""
    from .data.prepare import FolderOptions  # torch: only when a recipe runs (the CLI imports us)

    return {"folders": [_folder(f) for f in data.folders],
            "shards": data.shards, "cache_dir": Path(data.cache_dir) if data.cache_dir else out / "cache",
            "options": FolderOptions(data.default_caption, data.trigger, data.min_size, data.strict,
                                     _resolutions(data.resolution), data.bucket_step, data.reg_weight)}


def _resolutions(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else () if value == 0 else (value,)


def references_per_image(cfg) -> int:
    """Reference images per training image of a train config: its controls folders, or its shard index's (0: a
    text-to-image run)."""
    return max([len(as_list(f.controls)) for f in cfg.data.folders] + [shard_facts(cfg.data.shards)[0]])


def shard_facts(index: str) -> tuple[int, int | None]:
    """(reference images per sample, bucket resolution) of a `dev2pro cache` index: what its latents were made at,
    whatever data.resolution says; (0, None) without one."""
    import json

    try:
        data = json.loads(Path(index).read_text()) if index else {}
        return int(data.get("references", 0)), data.get("settings", {}).get("resolution")
    except (OSError, ValueError, AttributeError):
        return 0, None  # a missing or broken index is reported where the data loads


def _folder(f):
    """A ``[[data.folders]]`` table -> ``data.folders.DatasetFolder``."""
    from .data.folders import DatasetFolder  # torch-free, but only recipes need it

    return DatasetFolder(Path(f.path), f.repeats, f.caption or None, f.recursive, Path(f.masks) if f.masks else None,
                         f.role, _resolutions(f.resolution), tuple(Path(c) for c in as_list(f.controls)))


# ------------------------------------------------------------------------------------------------ compare
