"""What `dev2pro inspect` reports about an opened checkpoint: layout, variant, sizes, dtypes per tensor group and
the transformer tensors a complete model would have that the file lacks."""

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


def describe(ckpt: Checkpoint) -> dict:
    """Everything ``dev2pro inspect`` reports, as a JSON-able dict."""
    spec = ckpt.spec()
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
        "variant_detail": ckpt.family.describe_variant(spec),
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


