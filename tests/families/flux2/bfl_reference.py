"""BFL-layout FLUX.2 state dicts written from BFL's ``src/flux2/model.py`` naming, independent of our key maps."""

import torch


def bfl_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of BFL's ``Flux2`` module for a spec (no biases; klein has no ``guidance_in``)."""
    h, mlp, t = spec.hidden, spec.mlp_hidden, spec.timestep_channels
    s = {
        "img_in.weight": (h, spec.in_channels),
        "txt_in.weight": (h, spec.context_dim),
        "time_in.in_layer.weight": (h, t),
        "time_in.out_layer.weight": (h, h),
        "double_stream_modulation_img.lin.weight": (6 * h, h),
        "double_stream_modulation_txt.lin.weight": (6 * h, h),
        "single_stream_modulation.lin.weight": (3 * h, h),
        "final_layer.linear.weight": (spec.in_channels, h),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
    }
    if spec.guidance_embeds:
        s["guidance_in.in_layer.weight"], s["guidance_in.out_layer.weight"] = (h, t), (h, h)
    for i in range(spec.num_double):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}_"
            s[b + "attn.qkv.weight"] = (3 * h, h)
            s[b + "attn.norm.query_norm.scale"] = (spec.head_dim,)
            s[b + "attn.norm.key_norm.scale"] = (spec.head_dim,)
            s[b + "attn.proj.weight"] = (h, h)
            s[b + "mlp.0.weight"] = (2 * mlp, h)
            s[b + "mlp.2.weight"] = (h, mlp)
    for i in range(spec.num_single):
        b = f"single_blocks.{i}."
        s[b + "linear1.weight"] = (3 * h + 2 * mlp, h)
        s[b + "linear2.weight"] = (h, h + mlp)
        s[b + "norm.query_norm.scale"] = (spec.head_dim,)
        s[b + "norm.key_norm.scale"] = (spec.head_dim,)
    return s


def random_bfl_state_dict(spec, seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(shape, generator=g) * 0.1 for k, shape in bfl_shapes(spec).items()}
