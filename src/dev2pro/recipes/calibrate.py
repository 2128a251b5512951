"""Recipe for `dev2pro calibrate`: the strength at which a LoRA does on the model you use (e.g. FLUX.2 klein
distilled) what it does at 1.0 on the model it was trained on (klein Base) -- measured (``strength``), no judge.

The story: check inputs; encode the prompts once with the model folder's text stack and free it; for the reference
model, then the target: load it with the LoRA as a peft adapter, render the fixed prompts x seeds at strength 0
and at each strength the search asks for (each model with its own sampling settings: by default its variant's --
Base 50 steps with true CFG 4, distilled 4 steps without CFG), measure the effect; print the table, write a JSON
report, and with ``write=True`` record the recommendation in the LoRA file's metadata (tensors untouched).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .. import families
from .. import sampling as S
from ..arguments import check_size, model_name
from .. import strength as ST
from ..config import parse_size
from ..errors import UserError
from ..flux.checkpoint import open_checkpoint
from ..lora.formats import edit_references
from ..outputs import save_safetensors, write_json


def _settings(spec, metadata, steps: int | None, cfg: float | None) -> tuple[int, float, float]:
    """(steps, guidance value, true CFG) for a model: given ones win, else its own (``sampling.own_settings``);
    ``cfg`` is the model's scale: its guidance, or a de-distilled export's true CFG at guidance 1
    (``sampling.default_guidance``)."""
    guidance, true_cfg = S.default_guidance(spec, metadata, scale=float(cfg) if cfg else None)
    return int(steps) if steps else S.own_settings(spec)[0], guidance, true_cfg


def _model_runner(family, components, path: str, lora: str, spec, steps: int, scale: tuple[float, float], embeds,
                  seeds, negative, width: int, height: int, device, dtype):
    """latents_at(strength) for one model with the LoRA attached once (strength changes only the adapter scale)."""
    model, _ = S.load_base(path, [(lora, 1.0)], dtype)
    model.to(device)
    distilled = S.step_distilled(spec)
    pipe = family.build_pipeline(components, model, distilled=distilled)
    guidance = S.resolve_guidance(spec.guidance_embeds, "auto", *scale)  # (guidance, true CFG)
    flat_embeds = [e for e in embeds for _ in seeds]
    flat_seeds = [s for _ in embeds for s in seeds]

    def latents_at(strength: float) -> torch.Tensor:
        ST.set_strength(model, "lora0", strength)
        return family.render_latents(pipe, flat_embeds, flat_seeds, guidance, negative=negative, steps=steps,
                                     width=width, height=height)
    return model, latents_at, guidance


def run_calibrate(model: str, lora: str, target: str, prompts: Sequence[str], *, reference: str | None = None,
                  seeds: Sequence[int] = (0, 1), size: str | tuple[int, int] = (512, 512),
                  reference_steps: int | None = None, reference_cfg: float | None = None, steps: int | None = None,
                  cfg: float | None = None, strengths: Sequence[float] = ST.DEFAULT_STRENGTHS,
                  report: str | None = None, write: bool = False, max_sequence_length: int = 512) -> dict:
    """Calibrate ``lora`` from ``reference`` (default: the model folder's transformer) to ``target``; returns the
    report dict. ``*_steps`` / ``*_cfg``: sampling of each model (default: its variant's)."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts:
        raise UserError("give a prompt (--prompt TEXT) or a prompts file (--prompts FILE)")
    width, height = check_size(*(parse_size(size) if isinstance(size, str) else size))
    reference = reference or model
    S.check_inputs_exist(model, reference, [(lora, 1.0)])
    S.check_inputs_exist(model, target, [])
    ref_ckpt, tgt_ckpt = open_checkpoint(reference), open_checkpoint(target)
    if reference != model:  # the target is checked against the reference below
        S.check_folder_family(model, reference, ref_ckpt, "--reference")
    families.require_same(tgt_ckpt.family, ref_ckpt.family, f"target {target}", f"reference {reference}")
    family = ref_ckpt.family
    ref_spec, tgt_spec = ref_ckpt.spec(), tgt_ckpt.spec()
    for spec, path in ((ref_spec, reference), (tgt_spec, target)):
        if note := S.unknown_variant_note(spec, path):
            print(note)
    _check_direction(lora, getattr(ref_spec, "variant", ""), getattr(tgt_spec, "variant", ""))
    ref_steps, *ref_scale = _settings(ref_spec, ref_ckpt.metadata, reference_steps, reference_cfg)
    tgt_steps, *tgt_scale = _settings(tgt_spec, tgt_ckpt.metadata, steps, cfg)

    device, dtype = S.default_device(), S.default_dtype(S.default_device())
    components, embeds, negative = S.prepare_family(model, family, prompts, "", device, dtype, max_sequence_length)
    components["vae"].to(device)
    common = dict(embeds=embeds, seeds=seeds, negative=negative, width=width, height=height, device=device,
                  dtype=dtype)

    ref_model, ref_at, ref_g = _model_runner(family, components, reference, lora, ref_spec, ref_steps, ref_scale,
                                             **common)
    base = ref_at(0.0)
    ref_effect = ST.effect(ref_at(1.0), base)
    del ref_model, ref_at
    gc.collect()

    tgt_model, tgt_at, tgt_g = _model_runner(family, components, target, lora, tgt_spec, tgt_steps, tgt_scale,
                                             **common)
    tgt_base = tgt_at(0.0)
    cal = ST.calibrate(ref_effect, lambda s, at=tgt_at: ST.effect(at(s), tgt_base), strengths)
    del tgt_model, tgt_at
    gc.collect()

    result = {"lora": str(lora), "reference": str(reference), "target": str(target), "family": family.name,
              "reference_sampling": {"steps": ref_steps, "guidance": ref_g.to_dict(),
                                     "variant": getattr(ref_spec, "variant", "")},
              "target_sampling": {"steps": tgt_steps, "guidance": tgt_g.to_dict(),
                                  "variant": getattr(tgt_spec, "variant", "")},
              "prompts": prompts, "seeds": seeds, "width": width, "height": height, **cal.to_dict()}
    _print(result)
    if report:
        write_json(Path(report), result)
    if write:
        if cal.strength is None:
            raise UserError(f"no strength recommended ({cal.note}); nothing written to {lora}")
        _write_metadata(Path(lora), result)
    return result


def _check_direction(lora: str, reference: str, target: str) -> None:
    """A LoRA calibrated *to* the variant its file says it was trained on (``dev2pro.train_base_variant``), from
    another one, is the pair backwards: refused. An edit LoRA (``dev2pro.references``) gets a note: the effect is
    measured text to image."""
    try:
        with safe_open(str(lora), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 -- unreadable here: the LoRA load below says why
        return
    trained = meta.get("dev2pro.train_base_variant", "")
    if trained and trained == target != reference:
        raise UserError(f"{lora} was trained on {trained}, the --target here, and calibrate measures its strength "
                        f"from the model it was trained on to another one: swap them (--model/--reference the "
                        f"{trained} model, --target the {reference or 'other'} one)")
    if refs := edit_references(meta):
        print(f"note: {Path(lora).name} is an edit LoRA ({refs} reference image(s) per edit); calibrate measures its "
              f"effect text to image, without a reference, so the strength for edits may differ")


def _print(r: dict) -> None:
    print(f"reference: {model_name(r['reference'])} ({r['reference_sampling']['variant'] or '?'}, "
          f"{r['reference_sampling']['steps']} steps) -- effect of the LoRA at 1.0: {r['reference_effect']:.5g}")
    print(f"target:    {model_name(r['target'])} ({r['target_sampling']['variant'] or '?'}, "
          f"{r['target_sampling']['steps']} steps)")
    print("  strength  effect   (x reference)")
    for s, e in r["points"]:
        print(f"  {s:8.3f}  {e:.5g}  ({e / r['reference_effect']:.3f})")
    if r["recommended_strength"] is None:
        print(f"no recommendation: {r['note']}")
    else:
        print(f"recommended strength on the target: {r['recommended_strength']:.3f}")


def _write_metadata(path: Path, result: dict) -> None:
    """Rewrite ``path`` -- and the other layouts of the same save beside it (``NAME[.comfy|.diffusers]
    .safetensors``: the same ``modelspec.date`` and rank) -- atomically with the recommendation in its metadata;
    the tensors are copied unchanged."""
    record = json.dumps({"strength": round(result["recommended_strength"], 4), "target": model_name(result["target"]),
                         "target_variant": result["target_sampling"]["variant"],
                         "reference": Path(result["reference"]).name, "reference_effect": result["reference_effect"]})
    for target in [path] + _same_save(path):
        with safe_open(str(target), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_safetensors(tensors, target, {**meta, ST.METADATA_KEY: record}, overwrite=True, what="LoRA")
        print(f"wrote the recommendation into {target}'s metadata ({ST.METADATA_KEY})")


def _same_save(path: Path) -> list[Path]:
    """The other layout files a training save wrote beside ``path`` (kohya, comfy, diffusers of one LoRA)."""
    from ..train.export import LORA_SUFFIXES

    stem = path.name.removesuffix(".safetensors")
    for tag in LORA_SUFFIXES.values():
        if tag and stem.endswith(tag):
            stem = stem.removesuffix(tag)
    ident = _save_identity(path)
    siblings = [path.with_name(f"{stem}{tag}.safetensors") for tag in LORA_SUFFIXES.values()]
    return [p for p in siblings if p != path and p.is_file() and ident and _save_identity(p) == ident]


def _save_identity(path: Path) -> tuple | None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    ident = meta.get("modelspec.date"), meta.get("ss_network_dim")
    return ident if all(ident) else None
