"""Flux latent plumbing: VAE normalisation, 2x2 packing into tokens, and the position ids RoPE reads.

The Flux VAE maps an image (3, H, W) in [-1, 1] to 16 latent channels at H/8 x W/8. The transformer works on the
*normalised* latents ``(z - shift_factor) * scaling_factor`` (FLUX.1: 0.1159, 0.3611), cut into 2x2 patches:
each patch becomes one token of 16 * 4 = 64 values, so an H x W image is (H/16) * (W/16) tokens. Every token
carries a 3-axis position id ``(0, row, col)`` on the packed grid; text tokens get all-zero ids.

The packing helpers are diffusers' own ``FluxPipeline`` static methods, so our tokens are bit-identical to what
its pipelines and training scripts feed the model; we only give them latent-sized arguments and shape checks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from ..errors import UserError


def load_vae(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The Flux VAE of a FLUX.1-dev-layout folder (``vae/``), frozen, in eval mode, offline."""
    try:
        vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {Path(model_dir) / 'vae'} as AutoencoderKL: {e}") from None
    return vae.to(device).eval().requires_grad_(False)


def check_image_size(pipe, width: int, height: int) -> int:
    """Image sides must be positive multiples of the pipeline's VAE factor x 2 (2x2 latent packing); returns that
    multiple."""
    multiple = pipe.vae_scale_factor * 2
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise UserError(f"image size {width}x{height} must be positive multiples of {multiple}")
    return multiple


def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 (image sides must be multiples of 16 px)")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens."""
    b, c, h, w = latents.shape
    _check_even(h, w)
    return FluxPipeline._pack_latents(latents, b, c, h, w)  # (B, T, C*4)


def pack_references(control: torch.Tensor) -> torch.Tensor:
    """Reference latents (B, n, C, H, W) -- or (B, C, H, W), one reference -- -> their tokens one after another
    (B, n * H/2 * W/2, C*4), the order ``Flux2Pipeline`` appends its ``image`` list in."""
    if control.ndim == 4:
        return pack(control)
    b, n = control.shape[:2]
    return pack(control.flatten(0, 1)).reshape(b, n * (control.shape[-2] // 2) * (control.shape[-1] // 2), -1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, C*4) tokens -> (B, C, h, w) latents, for a latent height ``h`` and width ``w``."""
    _check_even(h, w)
    if tokens.shape[1] != (h // 2) * (w // 2):
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {h}x{w} latent ({(h // 2) * (w // 2)} expected)")
    # diffusers takes pixel sizes and divides by 2 * vae_scale_factor; factor 1 makes it take latent sizes.
    return FluxPipeline._unpack_latents(tokens, h, w, 1)  # (B, C, h, w)


def image_ids(h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids ``(0, row, col)`` of the packed grid of an ``h`` x ``w`` latent."""
    _check_even(h, w)
    return FluxPipeline._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype)  # (T, 3)


def text_ids(seq_len: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(seq_len, 3) zeros: text tokens carry no position in Flux's RoPE."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def _factors(vae) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return (0.0 if shift is None else shift), vae.config.scaling_factor  # SD-style VAEs have no shift


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8) normalised latents.

    Uses the posterior mode (deterministic, what a cache wants) unless a ``generator`` asks for a sample.
    """
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    shift, scale = _factors(vae)
    return (z - shift) * scale


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) normalised latents -> (B, 3, 8h, 8w) pixels, roughly in [-1, 1] (not clamped)."""
    shift, scale = _factors(vae)
    z = latents.to(device=vae.device, dtype=vae.dtype) / scale + shift
    return vae.decode(z).sample
