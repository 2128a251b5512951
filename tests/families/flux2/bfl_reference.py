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


# ------------------------------------------------------------------------------------------------------------------
# A functional forward of BFL's ``Flux2`` (src/flux2/model.py) straight from a BFL-layout state dict: the reference that
# checks our key maps (and diffusers' converter) against BFL's own semantics, e.g. the final adaLN's (shift, scale).
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402


def _timestep(t, dim, max_period=10000, factor=1000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rope(pos, dim, theta):
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()  # (B, L, dim/2, 2, 2)


def _embed(ids, spec):
    return torch.cat([_rope(ids[..., i], d, spec.theta) for i, d in enumerate(spec.axes_dim)], dim=-3).unsqueeze(1)


def _attention(q, k, v, pe):
    def rot(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)

    out = F.scaled_dot_product_attention(rot(q), rot(k), v)  # (B, H, L, D)
    return out.permute(0, 2, 1, 3).flatten(2)


def bfl_forward(sd, spec, x, x_ids, t, ctx, ctx_ids, guidance=None):
    """BFL's Flux2.forward: x (B, N, in_channels), ids (B, N, 4), t and guidance in [0, 1] / as-is, (B,)."""
    h, heads, mlp = spec.hidden, spec.num_heads, spec.mlp_hidden

    def lin(name, v):
        return v @ sd[name + ".weight"].T

    def embedder(name, v):
        return lin(name + ".out_layer", F.silu(lin(name + ".in_layer", v)))

    def ln(v):
        return F.layer_norm(v, (h,), eps=1e-6)

    def rms(v, name):
        return (v.float() * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(v) * sd[name]

    def heads_of(qkv):  # "B L (K H D) -> K B H L D"
        return qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)

    def swiglu(v):
        a, b = v.chunk(2, dim=-1)
        return F.silu(a) * b

    vec = embedder("time_in", _timestep(t, spec.timestep_channels))
    if guidance is not None:
        vec = vec + embedder("guidance_in", _timestep(guidance, spec.timestep_channels))
    mod_img, mod_txt, mod_single = (lin(n + ".lin", F.silu(vec))[:, None].chunk(c, dim=-1) for n, c in (
        ("double_stream_modulation_img", 6), ("double_stream_modulation_txt", 6), ("single_stream_modulation", 3)))
    img, txt = lin("img_in", x), lin("txt_in", ctx)
    pe = torch.cat((_embed(ctx_ids, spec), _embed(x_ids, spec)), dim=2)
    n_txt = txt.shape[1]
    for i in range(spec.num_double):
        b = f"double_blocks.{i}."
        qs, ks, vs, streams = [], [], [], ((txt, mod_txt, "txt"), (img, mod_img, "img"))
        for stream, m, side in streams:
            q, k, v = heads_of(lin(b + side + "_attn.qkv", (1 + m[1]) * ln(stream) + m[0]))
            qs.append(rms(q, b + side + "_attn.norm.query_norm.scale"))
            ks.append(rms(k, b + side + "_attn.norm.key_norm.scale"))
            vs.append(v)
        attn = _attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), pe)
        out = []
        for (stream, m, side), a in zip(streams, (attn[:, :n_txt], attn[:, n_txt:])):
            stream = stream + m[2] * lin(b + side + "_attn.proj", a)
            stream = stream + m[5] * lin(b + side + "_mlp.2", swiglu(lin(b + side + "_mlp.0",
                                                                          (1 + m[4]) * ln(stream) + m[3])))
            out.append(stream)
        txt, img = out
    joint = torch.cat((txt, img), dim=1)
    shift, scale, gate = mod_single
    for i in range(spec.num_single):
        b = f"single_blocks.{i}."
        qkv, hidden = lin(b + "linear1", (1 + scale) * ln(joint) + shift).split([3 * h, 2 * mlp], dim=-1)
        q, k, v = heads_of(qkv)
        attn = _attention(rms(q, b + "norm.query_norm.scale"), rms(k, b + "norm.key_norm.scale"), v, pe)
        joint = joint + gate * lin(b + "linear2", torch.cat((attn, swiglu(hidden)), dim=2))
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=-1)
    return lin("final_layer.linear", (1 + scale[:, None]) * ln(joint[:, n_txt:]) + shift[:, None])
