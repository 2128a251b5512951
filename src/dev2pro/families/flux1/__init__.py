"""FLUX.1 (dev, schnell, pro-like de-distilled models): the family the rest of dev2pro was written for.

Its tables live in ``flux.keys`` (BFL <-> diffusers pieces) and ``flux.spec`` (sizes from shapes or config); this
module states them as a ``Family``. Markers: CLIP's pooled vector (``vector_in`` / ``time_text_embed.text_embedder``)
and per-block modulations (``img_mod`` / ``norm1.linear``), which FLUX.2 has neither of.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ...flux import keys as keymod
from ...flux import spec as specmod
from .. import Family

_MARKERS = ("vector_in.", "time_text_embed.text_embedder.", "time_text_embed.timestep_embedder.", "time_in.")
_BLOCK_MARKERS = (".img_mod.lin.", ".norm1.linear.", ".modulation.lin.", ".norm.linear.")


def claims(keys: Iterable[str]) -> bool:
    """FLUX.1's own keys: the pooled-text/time embedders or per-block modulations."""
    for k in keys:
        if k.startswith(_MARKERS) or k.startswith(("double_blocks.", "transformer_blocks.", "single_blocks.",
                                                   "single_transformer_blocks.")) and any(m in k for m in
                                                                                          _BLOCK_MARKERS):
            return True
    return False


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
)
