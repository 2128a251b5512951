"""FLUX.1 (dev, schnell, pro-like de-distilled models): the family the rest of dev2pro was written for.

Its tables live in ``flux.keys`` (BFL <-> diffusers pieces) and ``flux.spec`` (sizes from shapes or config); this
module states them as a ``Family``. Markers: CLIP's pooled vector (``vector_in`` / ``time_text_embed.text_embedder``)
and per-block modulations (``img_mod`` / ``norm1.linear``), which FLUX.2 has neither of.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch

from ...flux import keys as keymod
from ...flux import spec as specmod
from ..family import Family, lazy

_MARKERS = ("vector_in.", "time_text_embed.")  # CLIP's pooled vector; FLUX.2 has time_guidance_embed
_BLOCK_MARKERS = re.compile(r"^(double_blocks\.\d+\.(img|txt)_mod\.lin|"
                            r"transformer_blocks\.\d+\.norm1(_context)?\.linear|single_blocks\.\d+\.modulation\.lin|"
                            r"single_transformer_blocks\.\d+\.norm\.linear)\.")


def claims(keys: Iterable[str]) -> bool:
    """FLUX.1's own keys: the pooled-text embedder, per-block modulations, or biases (FLUX.2 has none)."""
    return any(k.startswith(_MARKERS) or _BLOCK_MARKERS.match(k) or k in ("img_in.bias", "x_embedder.bias")
               for k in keys)


def spec_from_shapes(shapes: Mapping[str, Sequence[int]], layout: str, axes_dim: Sequence[int] | None = None):
    return (specmod.spec_from_bfl_shapes if layout == "bfl" else specmod.spec_from_diffusers_shapes)(shapes, axes_dim)


def blocks(model) -> list:
    """Double blocks, then single blocks (diffusers' execution order)."""
    model = getattr(model, "module", model)
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def model_inputs(x_t: torch.Tensor, sigmas: torch.Tensor, text: Mapping[str, torch.Tensor], h: int, w: int,
                 guidance: torch.Tensor | None, device, dtype) -> dict:
    """Keyword arguments of ``FluxTransformer2DModel.forward`` for packed tokens ``x_t`` (B, T, C*4) of a latent
    (h, w), sigmas (B,), T5 ``prompt_embeds`` (B, L, D) + CLIP ``pooled`` (B, P); ``guidance`` (B,) or None."""
    from ...flux.latents import image_ids, text_ids  # latents imports diffusers: not at `inspect`'s import time

    pe = text["prompt_embeds"]
    return dict(hidden_states=x_t.to(device, dtype), timestep=sigmas.to(device, dtype), guidance=guidance,
                pooled_projections=text["pooled"].to(device, dtype), encoder_hidden_states=pe.to(device, dtype),
                txt_ids=text_ids(pe.shape[1], device=device), img_ids=image_ids(h, w, device=device))


def describe_variant(spec) -> str:
    return ("guidance-distilled (guidance_in present): dev-like, sample with embedded guidance"
            if spec.guidance_embeds else
            "no guidance embedding: schnell or de-distilled without guidance, sample with true CFG")


def modelspec(spec) -> dict:
    return {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "flux-1-dev" if spec.guidance_embeds else "flux-1-dev/de-distilled",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux"}


def _text_settings(pipe, max_length: int) -> dict:
    return {"t5_max_length": max_length}


def _embeds_of(record: Mapping) -> tuple:
    return record["prompt_embeds"][None], record["pooled"][None]


def _build_pipeline(components: dict, transformer, distilled: bool = False, progress: bool = False):
    from .sampling import build_pipeline  # diffusers: not at `inspect`'s import time
    return build_pipeline(components, transformer, progress)


FAMILY = Family(
    name="flux1", title="FLUX.1",
    claims=claims,
    tensor_pieces=lambda shapes, layout: keymod.pieces_for_shapes(shapes, layout),
    plan=keymod.plan,
    spec_from_shapes=spec_from_shapes,
    spec_from_config=specmod.spec_from_diffusers_config,
    build_transformer=specmod.build_transformer,
    transformer_class="FluxTransformer2DModel", pipelines=("FluxPipeline",),
    blocks=blocks,
    model_inputs=model_inputs,
    describe_variant=describe_variant,
    modelspec=modelspec,
    load_text=lazy("dev2pro.text", "load_text_encoders"), text_encoder=lazy("dev2pro.text", "text_encoder"),
    text_settings=_text_settings, embeds_of=_embeds_of,
    load_vae=lazy("dev2pro.flux.latents", "load_vae"), encode_images=lazy("dev2pro.flux.latents", "encode_images"),
    lora_targets=lazy("dev2pro.lora.targets", "target_modules"),
    activation_units={"compute": (17.0, 17.0), "fp32": (29.0, 29.0)},
    build_pipeline=_build_pipeline, render=lazy("dev2pro.families.flux1.sampling", "render"),
    render_latents=lazy("dev2pro.families.flux1.sampling", "render_latents"),
)
