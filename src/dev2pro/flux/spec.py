"""What a Flux transformer *is*: its sizes, derived from a preset or read off tensor shapes.

A FLUX.1 checkpoint carries no config. Every size we need is recoverable from the shapes of a few tensors
(``img_in`` gives hidden and input channels, ``txt_in`` the T5 width, a q-norm scale the head dim, ...), and the
variant is a fact about the keys, never about the file name: ``guidance_in.*`` present means guidance-distilled
(FLUX.1-dev, Flux-Dev2Pro), absent means schnell or a de-distilled model that needs true CFG.
The only size not stored in weights is the RoPE axes split; full-size heads (128) use BFL's (16, 56, 56) and
smaller heads use the same proportions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Mapping, Sequence

import torch


@dataclass(frozen=True)
class FluxSpec:
    """Sizes of a Flux transformer (BFL naming in comments)."""

    family: ClassVar[str] = "flux1"  # the ``families`` entry that builds and maps it
    hidden: int = 3072  # img_in out / inner dim
    num_heads: int = 24
    num_double: int = 19  # double_blocks / transformer_blocks
    num_single: int = 38  # single_blocks / single_transformer_blocks
    in_channels: int = 64  # 16 latent channels x 2x2 packing
    context_dim: int = 4096  # T5-XXL width (txt_in input)
    pooled_dim: int = 768  # CLIP-L pooled width (vector_in input)
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    guidance_embeds: bool = True
    mlp_ratio: float = 4.0
    theta: int = 10000

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """'dev' (guidance-distilled, has guidance embedding) or 'pro' (no guidance embedding)."""
        return "dev" if self.guidance_embeds else "pro"

    def diffusers_config(self) -> dict:
        """kwargs for diffusers ``FluxTransformer2DModel`` (which fixes mlp_ratio at 4)."""
        if self.mlp_ratio != 4.0:
            raise ValueError(f"diffusers' FluxTransformer2DModel only supports mlp_ratio 4, got {self.mlp_ratio}")
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=None,
            num_layers=self.num_double,
            num_single_layers=self.num_single,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim,
            pooled_projection_dim=self.pooled_dim,
            guidance_embeds=self.guidance_embeds,
            axes_dims_rope=list(self.axes_dim),
        )

    def with_(self, **changes) -> "FluxSpec":
        return replace(self, **changes)

    def without_guidance(self) -> "FluxSpec":
        """The same model without its guidance embedding (pro-like: sampled with true CFG)."""
        return replace(self, guidance_embeds=False)

    def with_guidance(self) -> "FluxSpec":
        """The same model with a guidance embedding (dev-like)."""
        return replace(self, guidance_embeds=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


FLUX_DEV = FluxSpec()
FLUX_SCHNELL = FLUX_DEV.with_(guidance_embeds=False)
# The tiny family: same classes and code paths as FLUX.1, small dims (about 0.6M parameters).
TINY = FluxSpec(
    hidden=64, num_heads=4, num_double=2, num_single=4, in_channels=64, context_dim=32, pooled_dim=32,
    axes_dim=(4, 6, 6),
)

PRESETS: dict[str, FluxSpec] = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "tiny": TINY}

# T5 sequence length BFL uses per variant; de-distilled bases keep dev's 512 (kohya's schnell 256 is a trap).
T5_MAX_LENGTH_DEV = 512
T5_MAX_LENGTH_SCHNELL = 256


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes split for a head dim: BFL's (16, 56, 56) at 128, the same proportions (even sizes) below."""
    if head_dim == 128:
        return (16, 56, 56)
    side = max(2, int(head_dim * 56 / 128) // 2 * 2)
    first = head_dim - 2 * side
    if first <= 0 or first % 2:
        raise ValueError(f"cannot derive a RoPE axes split for head dim {head_dim}; pass axes_dim explicitly")
    return (first, side, side)


def spec_from_diffusers_config(config: Mapping) -> FluxSpec:
    """FluxSpec from a diffusers transformer ``config.json`` dict."""
    heads = int(config.get("num_attention_heads", 24))
    head_dim = int(config.get("attention_head_dim", 128))
    return FluxSpec(
        hidden=heads * head_dim,
        num_heads=heads,
        num_double=int(config.get("num_layers", 19)),
        num_single=int(config.get("num_single_layers", 38)),
        in_channels=int(config.get("in_channels", 64)),
        context_dim=int(config.get("joint_attention_dim", 4096)),
        pooled_dim=int(config.get("pooled_projection_dim", 768)),
        axes_dim=tuple(config.get("axes_dims_rope", default_axes_dim(head_dim))),
        guidance_embeds=bool(config.get("guidance_embeds", False)),
    )


def _block_count(keys: Sequence[str], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if idx and idx != set(range(max(idx) + 1)):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise ValueError(f"blocks {prefix}{missing} are missing: the checkpoint is incomplete")
    return max(idx) + 1 if idx else 0


def spec_from_bfl_shapes(shapes: Mapping[str, Sequence[int]], axes_dim: Sequence[int] | None = None) -> FluxSpec:
    """FluxSpec from BFL-layout tensor shapes (keys without any ``model.diffusion_model.`` prefix)."""
    keys = list(shapes)
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if "double_blocks.0.img_attn.norm.query_norm.scale" in shapes \
        else shapes["single_blocks.0.norm.query_norm.scale"][0]
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] if "double_blocks.0.img_mlp.0.weight" in shapes \
        else shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    return FluxSpec(
        hidden=int(hidden),
        num_heads=int(hidden) // int(head_dim),
        num_double=_block_count(keys, "double_blocks."),
        num_single=_block_count(keys, "single_blocks."),
        in_channels=int(in_channels),
        context_dim=int(shapes["txt_in.weight"][1]),
        pooled_dim=int(shapes["vector_in.in_layer.weight"][1]),
        axes_dim=tuple(axes_dim) if axes_dim else default_axes_dim(int(head_dim)),
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
        mlp_ratio=int(mlp_hidden) / int(hidden),
    )


def spec_from_diffusers_shapes(shapes: Mapping[str, Sequence[int]], axes_dim: Sequence[int] | None = None) -> FluxSpec:
    """FluxSpec from diffusers-layout tensor shapes."""
    keys = list(shapes)
    hidden, in_channels = shapes["x_embedder.weight"]
    norm_q = "transformer_blocks.0.attn.norm_q.weight"
    head_dim = shapes[norm_q][0] if norm_q in shapes else shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
    mlp_key = "transformer_blocks.0.ff.net.0.proj.weight"
    mlp_hidden = shapes[mlp_key][0] if mlp_key in shapes else shapes["single_transformer_blocks.0.proj_mlp.weight"][0]
    return FluxSpec(
        hidden=int(hidden),
        num_heads=int(hidden) // int(head_dim),
        num_double=_block_count(keys, "transformer_blocks."),
        num_single=_block_count(keys, "single_transformer_blocks."),
        in_channels=int(in_channels),
        context_dim=int(shapes["context_embedder.weight"][1]),
        pooled_dim=int(shapes["time_text_embed.text_embedder.linear_1.weight"][1]),
        axes_dim=tuple(axes_dim) if axes_dim else default_axes_dim(int(head_dim)),
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        mlp_ratio=int(mlp_hidden) / int(hidden),
    )


def build_transformer(spec: FluxSpec, device: str = "cpu", dtype=None, seed: int | None = None):
    """A diffusers FluxTransformer2DModel with this spec (``device='meta'`` allocates nothing)."""
    # lazy: diffusers takes seconds to import and flux.checkpoint (inspect, convert, plan) needs only the tables
    from diffusers import FluxTransformer2DModel

    if device == "meta":
        with torch.device("meta"):
            model = FluxTransformer2DModel(**spec.diffusers_config())
    else:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = FluxTransformer2DModel(**spec.diffusers_config())
    if dtype is not None:
        model = model.to(dtype)
    return model


def param_count(spec: FluxSpec) -> int:
    """Parameter count of a transformer with this spec (built on the meta device)."""
    return sum(p.numel() for p in build_transformer(spec, device="meta").parameters())
