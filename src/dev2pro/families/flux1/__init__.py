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
from .. import Family

_MARKERS = ("vector_in.", "time_text_embed.")  # CLIP's pooled vector; FLUX.2 has time_guidance_embed
_BLOCK_MARKERS = re.compile(r"^(double_blocks\.\d+\.(img|txt)_mod\.lin|transformer_blocks\.\d+\.norm1(_context)?\.linear|"
                            r"single_blocks\.\d+\.modulation\.lin|single_transformer_blocks\.\d+\.norm\.linear)\.")


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


def _load_text(model_dir, device="cpu", dtype=torch.float32):
    from ...text import load_text_encoders  # diffusers: not at `inspect`'s import time
    return load_text_encoders(model_dir, device, dtype)


def _text_encoder(pipe, device, max_length: int):
    from ...text import text_encoder
    return text_encoder(pipe, device, max_length)


def _text_settings(pipe, max_length: int) -> dict:
    return {"t5_max_length": max_length}


def _embeds_of(record: Mapping) -> tuple:
    return record["prompt_embeds"][None], record["pooled"][None]


def _load_vae(model_dir, device="cpu", dtype=torch.float32):
    from ...flux.latents import load_vae
    return load_vae(model_dir, device, dtype)


def _encode_images(vae, pixels):
    from ...flux.latents import encode_images
    return encode_images(vae, pixels)


def _lora_targets(*args, **kwargs):
    from ...lora.targets import target_modules
    return target_modules(*args, **kwargs)


def _build_pipeline(components: dict, transformer, distilled: bool = False, progress: bool = False):
    from ...sampling import build_pipeline
    return build_pipeline(components, transformer, progress)


def _render(*args, **kwargs):
    from ...sampling import render
    return render(*args, **kwargs)


def _render_latents(*args, **kwargs):
    from ...sampling import render_latents
    return render_latents(*args, **kwargs)


FAMILY = Family(
    name="flux1", title="FLUX.1",
    probes={"bfl": "img_in.weight", "diffusers": "x_embedder.weight"},
    claims=claims,
    tensor_pieces=lambda shapes, layout: keymod.pieces_for_shapes(shapes, layout),
    spec_from_shapes=spec_from_shapes,
    spec_from_config=specmod.spec_from_diffusers_config,
    build_transformer=specmod.build_transformer,
    transformer_class="FluxTransformer2DModel",
    blocks=blocks,
    model_inputs=model_inputs,
    describe_variant=describe_variant,
    modelspec=modelspec,
    load_text=_load_text, text_encoder=_text_encoder, text_settings=_text_settings, embeds_of=_embeds_of,
    load_vae=_load_vae, encode_images=_encode_images, lora_targets=_lora_targets,
    build_pipeline=_build_pipeline, render=_render, render_latents=_render_latents,
)
