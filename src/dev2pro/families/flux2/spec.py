"""What a FLUX.2 transformer *is*: its sizes and variant, from a preset or read off tensor shapes.

FLUX.2 keeps FLUX.1's double/single-stream design but drops every bias, replaces the per-block modulations by three
shared ones at the top level (``double_stream_modulation_img/txt``, ``single_stream_modulation``), feeds the text
stream with three hidden layers of an LLM stacked along the feature axis (Qwen3 for klein, Mistral-Small-3.x for
dev), uses 4-axis RoPE ids (t, h, w, l) and a 32-channel VAE packed 2x2 into 128 channels per token.

What the weights tell (``detect``): block counts, hidden size, heads (from the q-norm), text width, MLP ratio, and
whether a guidance embedding exists (``guidance_in`` / ``guidance_embedder``): with it the model is FLUX.2 dev
(guidance-distilled), without it a klein model. What they do *not* tell: klein Base and klein distilled have the
identical architecture, so the weights alone never say which one a file is. The variant comes from outside:
``model_index.json``'s ``is_distilled`` (read by ``Flux2KleinPipeline``), our own safetensors metadata key
(``VARIANT_METADATA_KEY``), or the user. Until then a klein spec has the variant ``"klein"`` (unknown) and no
sampling defaults. The RoPE split and theta are not stored either: BFL's (32, 32, 32, 32) and 2000 at head dim 128.

Family markers (``family_of``): FLUX.2 has the shared ``single_stream_modulation`` (diffusers' own FLUX.2 marker);
FLUX.1 has per-block modulations (``img_mod``/``norm1.linear``), ``vector_in``/``time_text_embed`` (the CLIP
pooled path FLUX.2 lacks) and biases. A key set with markers of both, or of neither, is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

import torch

from ...errors import CheckpointError
from ...flux.keys import block_counts

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("transformer.",)
VARIANT_METADATA_KEY = "dev2pro.flux2_variant"  # written by dev2pro next to BFL-layout files it saves
VARIANTS = ("klein-base", "klein-distilled", "dev")
KLEIN_UNKNOWN = "klein"  # a klein architecture whose Base/distilled variant nobody has told us yet


@dataclass(frozen=True)
class Sampling:
    """How a variant is sampled: steps and the meaning of its guidance number."""

    steps: int
    guidance: str  # "true-cfg" (two forwards), "embedded" (guidance_embedder input), "none" (distilled, CFG 1)
    scale: float


SAMPLING = {
    "klein-base": Sampling(steps=50, guidance="true-cfg", scale=4.0),  # BFL: "for fine-tuning and LoRA training"
    "klein-distilled": Sampling(steps=4, guidance="none", scale=1.0),  # step- and guidance-distilled
    "dev": Sampling(steps=50, guidance="embedded", scale=4.0),  # Flux2Pipeline's defaults
}

# Text encoders by the width of their 3 stacked layers (= FLUX.2's context dim): name, layers stacked.
TEXT_ENCODERS = {
    7680: ("Qwen3-4B", (9, 18, 27)),
    12288: ("Qwen3-8B", (9, 18, 27)),
    15360: ("Mistral-Small-3.2-24B", (10, 20, 30)),
}


@dataclass(frozen=True)
class Flux2Spec:
    """Sizes of a FLUX.2 transformer (BFL naming in comments) plus its variant and text stack."""

    family: ClassVar[str] = "flux2"  # the ``families`` entry that builds and maps it

    hidden: int = 6144  # img_in out / inner dim
    num_heads: int = 48
    num_double: int = 8  # double_blocks / transformer_blocks
    num_single: int = 48  # single_blocks / single_transformer_blocks
    in_channels: int = 128  # 32 latent channels x 2x2 packing
    context_dim: int = 15360  # txt_in input: 3 stacked text-encoder layers
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE over (t, h, w, l)
    theta: int = 2000
    mlp_ratio: float = 3.0  # SwiGLU: the in-projection emits 2 x mlp_hidden
    timestep_channels: int = 256  # sinusoidal timestep width (BFL hard-codes 256)
    guidance_embeds: bool = True
    variant: str = "dev"  # klein-base | klein-distilled | dev | klein (unknown)
    text_layers: tuple[int, ...] = (10, 20, 30)  # hidden_states indices stacked into the context

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if self.variant not in VARIANTS + (KLEIN_UNKNOWN,):
            raise ValueError(f"unknown FLUX.2 variant {self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.guidance_embeds != (self.variant == "dev"):
            raise ValueError(f"variant {self.variant!r} contradicts guidance_embeds={self.guidance_embeds}: only "
                             "FLUX.2 dev has a guidance embedding")
        if self.context_dim % len(self.text_layers):
            raise ValueError(f"context_dim {self.context_dim} is not {len(self.text_layers)} stacked layers")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def text_hidden(self) -> int:
        """Hidden size of the text encoder (one of the stacked layers)."""
        return self.context_dim // len(self.text_layers)

    @property
    def text_encoder(self) -> str:
        return TEXT_ENCODERS.get(self.context_dim, (f"custom ({self.text_hidden} wide)",))[0]

    @property
    def is_klein(self) -> bool:
        return not self.guidance_embeds

    @property
    def size_name(self) -> str:
        """'klein-4b', 'klein-9b', 'dev' for the published sizes, else 'custom'."""
        for name, preset in (("klein-4b", KLEIN_4B), ("klein-9b", KLEIN_9B), ("dev", DEV)):
            if self.architecture() == preset.architecture():
                return name
        return "custom"

    @property
    def sampling(self) -> Sampling:
        """Default steps and guidance of the variant. A klein whose variant is unknown is sampled as Base (50 steps,
        true CFG 4: it runs on either; the distilled model's 4 steps without CFG would ruin a Base's image), with a
        note from ``sampling.unknown_variant_note``."""
        return SAMPLING[self.variant if self.variant in SAMPLING else "klein-base"]

    def architecture(self) -> tuple:
        """Everything the weights fix (the variant and text layers excluded): equal for klein Base and distilled."""
        return (self.hidden, self.num_heads, self.num_double, self.num_single, self.in_channels, self.context_dim,
                self.mlp_ratio, self.timestep_channels, self.guidance_embeds)

    def with_variant(self, variant: str) -> "Flux2Spec":
        """The same architecture with a (known) variant: the override for what the keys cannot tell."""
        if variant == "dev" and self.is_klein or variant != "dev" and not self.is_klein:
            kind = "a klein (no guidance embedding)" if self.is_klein else "a FLUX.2 dev (guidance embedding)"
            raise CheckpointError(f"variant {variant!r} does not fit this checkpoint: it is {kind} model")
        return replace(self, variant=variant)

    def with_(self, **changes) -> "Flux2Spec":
        return replace(self, **changes)

    def without_guidance(self) -> "Flux2Spec":
        """The same model without its guidance embedding. FLUX.2's name for an undistilled model sampled with true
        CFG is Base, so the variant becomes "klein-base" (the guidance embedding is the dev/klein marker)."""
        return replace(self, guidance_embeds=False, variant="klein-base")

    def with_guidance(self) -> "Flux2Spec":
        """The same model with a guidance embedding: FLUX.2 dev's form (guidance-distilled)."""
        return replace(self, guidance_embeds=True, variant="dev")

    def diffusers_config(self) -> dict:
        """kwargs for diffusers ``Flux2Transformer2DModel``."""
        return dict(
            patch_size=1, in_channels=self.in_channels, out_channels=None, num_layers=self.num_double,
            num_single_layers=self.num_single, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim, timestep_guidance_channels=self.timestep_channels,
            mlp_ratio=self.mlp_ratio, axes_dims_rope=tuple(self.axes_dim), rope_theta=self.theta,
            guidance_embeds=self.guidance_embeds,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"], d["text_layers"] = list(self.axes_dim), list(self.text_layers)
        return d


DEV = Flux2Spec()
KLEIN_4B = Flux2Spec(hidden=3072, num_heads=24, num_double=5, num_single=20, context_dim=7680,
                     guidance_embeds=False, variant="klein-distilled", text_layers=(9, 18, 27))
KLEIN_4B_BASE = KLEIN_4B.with_variant("klein-base")
KLEIN_9B = KLEIN_4B.with_(hidden=4096, num_heads=32, num_double=8, num_single=24, context_dim=12288)
KLEIN_9B_BASE = KLEIN_9B.with_variant("klein-base")
# Tiny: the real structure (2 double + 4 single blocks, 4-axis RoPE, SwiGLU, 3 stacked text layers, 128 input
# channels for the real VAE's 32 latent channels, BFL's hard-coded 256 timestep channels), small widths.
TINY_KLEIN = KLEIN_4B.with_(hidden=64, num_heads=4, num_double=2, num_single=4, context_dim=96, axes_dim=(4, 4, 4, 4))
TINY_KLEIN_BASE = TINY_KLEIN.with_variant("klein-base")
TINY_DEV = DEV.with_(hidden=64, num_heads=4, num_double=2, num_single=4, context_dim=96, axes_dim=(4, 4, 4, 4))

PRESETS: dict[str, Flux2Spec] = {
    "flux2-dev": DEV, "flux2-klein-4b": KLEIN_4B, "flux2-klein-4b-base": KLEIN_4B_BASE, "flux2-klein-9b": KLEIN_9B,
    "flux2-klein-9b-base": KLEIN_9B_BASE, "tiny-klein": TINY_KLEIN, "tiny-klein-base": TINY_KLEIN_BASE,
    "tiny-dev": TINY_DEV,
}


def default_axes_dim(head_dim: int) -> tuple[int, int, int, int]:
    """RoPE split over (t, h, w, l): BFL's four equal quarters (32 each at head dim 128)."""
    if head_dim % 8:
        raise ValueError(f"cannot split head dim {head_dim} into 4 even RoPE axes; pass axes_dim explicitly")
    return (head_dim // 4,) * 4


# ---------------------------------------------------------------------------------------------- family markers
_FLUX2_MARKERS = ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight",
                  "double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")
_FLUX1_MARKERS = ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight",
                  "double_blocks.0.img_mod.lin.weight", "transformer_blocks.0.norm1.linear.weight",
                  "single_blocks.0.modulation.lin.weight", "single_transformer_blocks.0.norm.linear.weight",
                  "img_in.bias", "x_embedder.bias")


def strip_prefix(keys: Iterable[str]) -> tuple[str, str]:
    """(layout 'bfl' | 'diffusers', prefix) of a FLUX.2 transformer's keys; CheckpointError if neither."""
    keys = set(keys)
    for layout, prefixes, probe in (("bfl", BFL_PREFIXES + ("",), "img_in.weight"),
                                    ("diffusers", DIFFUSERS_PREFIXES + ("",), "x_embedder.weight")):
        for prefix in prefixes:
            if prefix + probe in keys:
                return layout, prefix
    raise CheckpointError("not a FLUX.2 transformer checkpoint: neither 'img_in.weight' (BFL/ComfyUI layout) nor "
                          "'x_embedder.weight' (diffusers layout) is present")


def family_of(keys: Iterable[str]) -> str | None:
    """'flux1', 'flux2' or None (not a Flux transformer) from a transformer's keys, any prefix or layout.

    Raises CheckpointError for a mixture (markers of both families), e.g. a FLUX.2 LoRA merged into FLUX.1.
    """
    keys = set(keys)
    try:
        _, prefix = strip_prefix(keys)
    except CheckpointError:
        return None
    flux2 = [m for m in _FLUX2_MARKERS if prefix + m in keys]
    flux1 = [m for m in _FLUX1_MARKERS if prefix + m in keys]
    if flux1 and flux2:
        raise CheckpointError(f"this checkpoint mixes FLUX.1 keys ({flux1[0]}) and FLUX.2 keys ({flux2[0]}): it is "
                              "neither model")
    return "flux2" if flux2 else "flux1" if flux1 else None


def _require_flux2(keys: set[str]) -> None:
    family = family_of(keys)
    if family == "flux1":
        raise CheckpointError("this is a FLUX.1 transformer (per-block modulations, CLIP pooled input), not FLUX.2")
    if family is None:
        raise CheckpointError("not a FLUX.2 transformer: no shared 'single_stream_modulation' / "
                              "'double_stream_modulation_img' weights")


# ------------------------------------------------------------------------------------------------- detection
def detect(shapes: Mapping[str, Sequence[int]], variant: str | None = None,
           axes_dim: Sequence[int] | None = None) -> Flux2Spec:
    """Flux2Spec from a transformer state dict's ``{key: shape}`` in BFL (bare, ``model.diffusion_model.`` or
    ``diffusion_model.``) or diffusers (bare or ``transformer.``) layout.

    ``variant`` records what the keys cannot tell (klein-base / klein-distilled); without it a klein model gets the
    variant 'klein' (unknown). A FLUX.1 state dict raises CheckpointError.
    """
    layout, prefix = strip_prefix(shapes)
    s = {k[len(prefix):]: tuple(int(n) for n in v) for k, v in shapes.items() if k.startswith(prefix)}
    _require_flux2(set(s))
    n_double, n_single = block_counts(s, layout)
    if layout == "bfl":
        names = dict(x="img_in.weight", ctx="txt_in.weight", time="time_in.in_layer.weight",
                     guidance="guidance_in.in_layer.weight", qnorm=("double_blocks.0.img_attn.norm.query_norm.scale",
                                                                    "single_blocks.0.norm.query_norm.scale"),
                     mlp_in="double_blocks.0.img_mlp.0.weight", single_in="single_blocks.0.linear1.weight")
    else:
        names = dict(x="x_embedder.weight", ctx="context_embedder.weight",
                     time="time_guidance_embed.timestep_embedder.linear_1.weight",
                     guidance="time_guidance_embed.guidance_embedder.linear_1.weight",
                     qnorm=("transformer_blocks.0.attn.norm_q.weight",
                            "single_transformer_blocks.0.attn.norm_q.weight"),
                     mlp_in="transformer_blocks.0.ff.linear_in.weight",
                     single_in="single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight")
    hidden, in_channels = s[names["x"]]
    qnorm = next((k for k in names["qnorm"] if k in s), None)
    if qnorm is None:
        raise CheckpointError("FLUX.2 checkpoint has no blocks (no q-norm weight): it is incomplete")
    head_dim = s[qnorm][0]
    if names["mlp_in"] in s:
        mlp_hidden = s[names["mlp_in"]][0] // 2  # SwiGLU: gate and value halves
    else:
        mlp_hidden = (s[names["single_in"]][0] - 3 * hidden) // 2
    guidance = names["guidance"] in s
    context_dim = s[names["ctx"]][1]
    spec = Flux2Spec(
        hidden=hidden, num_heads=hidden // head_dim, num_double=n_double, num_single=n_single,
        in_channels=in_channels, context_dim=context_dim,
        axes_dim=tuple(axes_dim) if axes_dim else default_axes_dim(head_dim), mlp_ratio=mlp_hidden / hidden,
        timestep_channels=s[names["time"]][1], guidance_embeds=guidance,
        variant="dev" if guidance else KLEIN_UNKNOWN, text_layers=_text_layers(context_dim, guidance),
    )
    return spec.with_variant(variant) if variant else spec


def _text_layers(context_dim: int, guidance: bool) -> tuple[int, ...]:
    """Stacked layers of a known text encoder, else the family default (klein: Qwen3's, dev: Mistral's)."""
    known = TEXT_ENCODERS.get(context_dim)
    return known[1] if known else DEV.text_layers if guidance else KLEIN_4B.text_layers


def detect_state_dict(sd: Mapping[str, torch.Tensor], variant: str | None = None) -> Flux2Spec:
    return detect({k: tuple(v.shape) for k, v in sd.items()}, variant=variant)


def spec_from_diffusers_config(config: Mapping, variant: str | None = None) -> Flux2Spec:
    """Flux2Spec from a diffusers transformer ``config.json`` dict (defaults are diffusers' = FLUX.2 dev)."""
    heads, head_dim = int(config.get("num_attention_heads", 48)), int(config.get("attention_head_dim", 128))
    guidance = bool(config.get("guidance_embeds", True))
    context_dim = int(config.get("joint_attention_dim", 15360))
    spec = Flux2Spec(
        hidden=heads * head_dim, num_heads=heads, num_double=int(config.get("num_layers", 8)),
        num_single=int(config.get("num_single_layers", 48)), in_channels=int(config.get("in_channels", 128)),
        context_dim=context_dim, axes_dim=tuple(config.get("axes_dims_rope", default_axes_dim(head_dim))),
        theta=int(config.get("rope_theta", 2000)), mlp_ratio=float(config.get("mlp_ratio", 3.0)),
        timestep_channels=int(config.get("timestep_guidance_channels", 256)), guidance_embeds=guidance,
        variant="dev" if guidance else KLEIN_UNKNOWN, text_layers=_text_layers(context_dim, guidance),
    )
    return spec.with_variant(variant) if variant else spec


def variant_from_folder(folder: str | Path) -> str | None:
    """The klein variant a diffusers folder records (``model_index.json``'s ``is_distilled``), or None."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    data = json.loads(index.read_text())
    if data.get("_class_name") == "Flux2Pipeline":
        return "dev"
    if "is_distilled" not in data:  # Flux2KleinPipeline then defaults to False: Base semantics (true CFG at 4.0),
        return None  # even for a distilled model, so a folder without the flag is reported unknown, not guessed
    return "klein-distilled" if data["is_distilled"] else "klein-base"


def spec_from_folder(folder: str | Path, variant: str | None = None) -> Flux2Spec:
    """Flux2Spec of a diffusers model folder (or a bare ``transformer/`` folder): sizes from ``config.json``, the
    variant from ``variant``, else ``model_index.json`` (klein stays 'klein' when the folder does not say)."""
    folder = Path(folder)
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no transformer/config.json: not a diffusers model folder")
    return spec_from_diffusers_config(json.loads(config.read_text()), variant=variant or variant_from_folder(folder))


def variant_from_metadata(metadata: Mapping[str, str] | None) -> str | None:
    """The variant recorded in a safetensors header's metadata by dev2pro (``VARIANT_METADATA_KEY``), or None."""
    value = (metadata or {}).get(VARIANT_METADATA_KEY)
    return value if value in VARIANTS else None


def build_transformer(spec: Flux2Spec, device: str = "cpu", dtype=None, seed: int | None = None):
    """A diffusers Flux2Transformer2DModel with this spec (``device='meta'`` allocates nothing)."""
    from diffusers import Flux2Transformer2DModel  # lazy: seconds to import; the tables above need no diffusers

    if seed is not None and device != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = Flux2Transformer2DModel(**spec.diffusers_config())
    return model.to(dtype) if dtype is not None else model


def param_count(spec: Flux2Spec) -> int:
    return sum(p.numel() for p in build_transformer(spec, device="meta").parameters())
