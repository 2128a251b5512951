"""What `dev2pro inspect` reports about an opened checkpoint: layout, variant, sizes, dtypes per tensor group and
the transformer tensors a complete model would have that the file lacks. A dev2pro de-distillation export is said
to be one (its ``dev2pro.*`` metadata: objective, steps, start), with the guidance `dev2pro sample` renders it at:
its keys alone make a flow/cfg_teacher export look like dev, which is sampled with embedded guidance instead."""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
GROUPS = ("embedders", "modulation", "attention", "mlp", "norms", "final", "biases")


def tensor_group(key: str) -> str:
    """Coarse group of a BFL- or diffusers-named tensor, for inspect's dtype table."""
    if key.endswith(".bias"):
        return "biases"
    if key.endswith(".scale") or "norm_q" in key or "norm_k" in key or "norm_added" in key:
        return "norms"
    if key.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "x_embedder", "context_embedder",
                       "time_text_embed", "time_guidance_embed")):
        return "embedders"
    if key.startswith(("final_layer", "norm_out", "proj_out")):
        return "final"
    if "_mod." in key or "modulation" in key or ".norm1" in key or ".norm.linear" in key:
        return "modulation"
    if "mlp" in key or ".ff" in key:
        return "mlp"
    return "attention"


def missing_summary(missing: list[str], limit: int = 4) -> str:
    """'final_layer.linear, final_layer.adaLN_modulation.1 (4 tensors)': modules rather than every tensor."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] if k.endswith((".weight", ".bias", ".scale")) else k
                                 for k in missing))
    shown = ", ".join(modules[:limit]) + (f" and {len(modules) - limit} more modules" if len(modules) > limit else "")
    return f"{shown} ({len(missing)} tensor{'s' if len(missing) != 1 else ''})"


def dedistillation(ckpt: Checkpoint, spec) -> dict | None:
    """A dev2pro de-distillation export's own account (``dev2pro.recipe = dedistill``): objective, training steps,
    start weights and, for a flow / cfg_teacher export (``sampling.dedistilled``: trained at guidance 1), the
    guidance and true-CFG scale `dev2pro sample` gives it by default (``sampling.default_guidance``). None for
    any other file."""
    meta = ckpt.metadata
    if meta.get("dev2pro.recipe") != "dedistill":
        return None
    from ..guidance_defaults import dedistilled, default_guidance

    steps = meta.get("dev2pro.steps", "")
    out = {"objective": meta.get("dev2pro.objective") or "unknown", "steps": int(steps) if steps.isdigit() else None,
           "start": meta.get("dev2pro.start") or None, "dedistilled": dedistilled(meta)}
    if out["dedistilled"]:
        guidance, cfg = default_guidance(spec, meta)
        out.update(trained_guidance=1.0, sample_guidance=guidance if spec.guidance_embeds else None, sample_cfg=cfg)
    return out


def _dedistill_detail(d: dict, plain: str) -> str:
    """``variant_detail`` for a de-distillation export; ``plain`` is what its keys alone say."""
    made = f"objective {d['objective']}" + (f", {d['steps']} steps" if d["steps"] is not None else "") + \
        (f" from {d['start']}" if d["start"] else "")
    if not d["dedistilled"]:  # guidance_distill: a dev-like student, sampled as dev
        return f"dev2pro de-distillation export ({made}): {plain}"
    at = f" at guidance {d['sample_guidance']:g}" if d["sample_guidance"] is not None else \
        " (no guidance embedding)"
    return (f"dev2pro de-distillation ({made}), trained at guidance 1: sample with true CFG {d['sample_cfg']:g}{at}, "
            f"as `dev2pro sample` does by default (not with dev's embedded guidance)")


def describe(ckpt: Checkpoint) -> dict:
    """Everything ``dev2pro inspect`` reports, as a JSON-able dict."""
    spec = ckpt.spec()
    dedistill = dedistillation(ckpt, spec)
    detail = ckpt.family.describe_variant(spec)
    missing = ckpt.missing()
    groups: dict[str, dict[str, int]] = {}
    for k, d in ckpt.dtypes.items():
        g = groups.setdefault(tensor_group(k), {})
        name = DTYPE_NAMES.get(d, str(d).replace("torch.", ""))
        g[name] = g.get(name, 0) + 1
    return {
        "path": str(ckpt.path),
        "layout": ckpt.layout,
        "key_prefix": ckpt.prefix,
        "family": ckpt.family.name,
        "variant": spec.variant,
        "variant_detail": _dedistill_detail(dedistill, detail) if dedistill else detail,
        **({"dedistill": dedistill} if dedistill else {}),
        "guidance_embeds": spec.guidance_embeds,
        "double_blocks": spec.num_double,
        "single_blocks": spec.num_single,
        "hidden": spec.hidden,
        "heads": spec.num_heads,
        "fp8": ckpt.fp8_format,
        "dtypes": groups,
        "params": ckpt.num_params(),
        "size_bytes": ckpt.size_bytes(),
        "other_component_keys_ignored": ckpt.ignored,
        "complete": not missing,
        "missing": missing,
        "metadata": dict(ckpt.metadata),
        "spec": spec.to_dict(),
    }


