"""FLUX.2 latents in the layout the rest of dev2pro already trains on.

``AutoencoderKLFlux2`` encodes an image to 32 channels at 1/8 size; ``Flux2Pipeline`` then *patchifies* 2x2 to
128 channels at 1/16, normalises each of those 128 channels with the VAE's batch-norm statistics, and flattens to
tokens. FLUX.1's ``pack`` does the same 2x2 patching, with the same channel order (c, dy, dx) and the same
row-major token order, directly from 16 channels at 1/8.

So we store FLUX.2 latents *un-patchified after normalising*: ``unpatchify(bn(patchify(z)))``, 32 channels at 1/8.
FLUX.1's ``pack`` of that tensor is exactly the token sequence ``Flux2Pipeline`` builds; buckets, noise, the flow
maths, the cache and the loop need no FLUX.2 branch. Only the ids differ (4 axes: t, h, w, layer), which the
family's ``model_inputs`` builds.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_vae(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """The folder's ``vae/`` (AutoencoderKLFlux2), offline, in eval mode."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2.from_pretrained(str(Path(model_dir) / "vae"), torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel (c, dy, dx) -- ``Flux2Pipeline._patchify_latents``."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(p: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify``."""
    b, c4, h, w = p.shape
    return p.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 32, H/8, W/8) training latents (see the module docstring). The
    posterior mode, as ``Flux2Pipeline`` encodes reference images, unless a ``generator`` asks for a sample."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    p = patchify(z)
    mean, std = _bn(vae, p)
    return unpatchify((p - mean) / std)


def to_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Training latents -> what ``vae.decode`` reads (the batch-norm undone)."""
    p = patchify(latents)
    mean, std = _bn(vae, p)
    return unpatchify(p * std + mean)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, 32, H/8, W/8) training latents -> (B, 3, H, W) pixels in [-1, 1]."""
    z = to_vae_latents(vae, latents.to(device=vae.device, dtype=vae.dtype))
    return vae.decode(z, return_dict=False)[0].clamp(-1, 1)


REFERENCE_T = 10  # time coordinate of the first reference image (Flux2Pipeline._prepare_image_ids: 10 + 10 i)


def image_ids(h: int, w: int, batch: int, device=None, t: int = 0) -> torch.Tensor:
    """(B, h/2 * w/2, 4) position ids (t, row, column, layer=0) of the tokens of an (h, w) latent, as
    ``Flux2Pipeline._prepare_latent_ids`` builds them (t=0) and ``_prepare_image_ids`` for reference images."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.zeros(h // 2 * (w // 2), 4, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows.reshape(-1), cols.reshape(-1)
    return ids.to(device).unsqueeze(0).expand(batch, -1, -1)
