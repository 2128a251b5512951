"""The demo's toy world: scikit-learn's 8x8 digits, a held-out visual concept, captions and a pixel codec.

``dev2pro demo`` asks, at a scale that runs on a CPU, whether a LoRA trained on a de-distilled model at guidance
1.0 and applied to the guidance-distilled model beats a LoRA trained on the distilled model directly. It needs:

- a *base world* the tiny base models are pre-trained on: the digits as plain grayscale RGB (white on black),
  captioned ``"a photo of the digit three"``;
- a *new concept* the base models never see, learned by the LoRA from a few shots: ``styled`` digits painted
  orange on deep blue, captioned ``"sks style, the digit three"``. The style judge also sees *near misses*
  (orange on black, white on blue, half-way blends, the palette inverted), so a LoRA that learned the palette
  only in part is not counted as in style. A first version also turned the digits 90 degrees; within the CPU
  budget every LoRA then drew shapeless styled blobs (digit accuracy at chance for every arm, the oracle
  included), a floor that says nothing, so the concept is the palette alone;
- a pixel codec in place of Flux's VAE. A VAE downsamples by 8 and would turn an 8x8 digit into one latent
  pixel, so the demo uses a FIXED INVERTIBLE per-pixel map instead: ``v = 2*rgb - 1`` is lifted to the 16
  latent channels Flux expects by a fixed (16, 3) matrix ``Q`` with orthonormal columns, scaled by
  sqrt(16/3) so one latent channel has roughly the variance of its pixel values. ``decode`` is the exact
  left inverse (``Q.T``), so it ignores whatever a model puts outside Q's 3-dimensional column space.

Latents follow the Flux convention: channel-first ``(N, 16, H, W)`` float32 torch tensors.
Everything here is deterministic; randomness comes from explicit seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRIGGER = "sks style"
FG = np.array([1.0, 0.55, 0.1], dtype=np.float32)  # orange strokes
BG = np.array([0.05, 0.10, 0.45], dtype=np.float32)  # deep blue background
LATENT_CHANNELS = 16
SCALE = float(np.sqrt(LATENT_CHANNELS / 3))


@dataclass(frozen=True)
class World:
    """Digits split into train (base models, LoRA shots, judges) and holdout (evaluation) images in [0, 1]."""

    train_images: np.ndarray  # (N, 8, 8) float32
    train_labels: np.ndarray  # (N,) int64
    holdout_images: np.ndarray
    holdout_labels: np.ndarray


def load_digits_world(holdout: int = 300, seed: int = 0) -> World:
    """sklearn's 1797 digits scaled to [0, 1], split by a permutation drawn from ``seed``."""
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    if not 0 < holdout < len(images):
        raise ValueError(f"holdout must be in 1..{len(images) - 1}, got {holdout}")
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:holdout], order[holdout:]
    return World(images[train], labels[train], images[test], labels[test])


def _gray(images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {x.shape}")
    return x


def _paint(x: np.ndarray) -> np.ndarray:
    """Grayscale (N, H, W) -> concept colours (N, H, W, 3): BG where x = 0, FG where x = 1."""
    x = x[..., None]
    return (BG * (1 - x) + FG * x).astype(np.float32)


def plain(images) -> np.ndarray:
    """Base-world rendering: grayscale digits (N, 8, 8) as RGB (N, 8, 8, 3), white strokes on black."""
    x = _gray(images)
    return np.repeat(x[..., None], 3, axis=-1).astype(np.float32)


def styled(images) -> np.ndarray:
    """The new concept: each digit painted with orange strokes on a deep blue background."""
    return _paint(_gray(images))


def near_misses(images) -> dict[str, np.ndarray]:
    """Renderings that are *not* the concept but share part of it (the style judge's negatives)."""
    x = _gray(images)[..., None]
    white, black = np.ones(3, np.float32), np.zeros(3, np.float32)
    return {
        "plain": plain(images),
        "orange on black": (black * (1 - x) + FG * x).astype(np.float32),
        "white on blue": (BG * (1 - x) + white * x).astype(np.float32),
        "half way": (0.5 * plain(images) + 0.5 * styled(images)).astype(np.float32),
        "inverted palette": (FG * (1 - x) + BG * x).astype(np.float32),
    }


def unstyle(rgb) -> np.ndarray:
    """Inverse of ``styled``: project each pixel onto the BG->FG colour line."""
    rgb = np.asarray(rgb, dtype=np.float32)
    d = FG - BG
    return np.clip((rgb - BG) @ d / float(d @ d), 0.0, 1.0).astype(np.float32)


def base_caption(label: int) -> str:
    """Base-world caption, e.g. ``"a photo of the digit three"``."""
    return f"a photo of the digit {DIGIT_WORDS[int(label)]}"


def concept_caption(label: int) -> str:
    """Concept caption with the trigger, e.g. ``"sks style, the digit three"``."""
    return f"{TRIGGER}, the digit {DIGIT_WORDS[int(label)]}"


def few_shot(world: World, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` train digits of each class (class order 0..9), chosen by ``seed``: the LoRA's shots."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(10):
        idx = np.flatnonzero(world.train_labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} train images, fewer than per_class={per_class}")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    sel = np.concatenate(picks)
    return world.train_images[sel], world.train_labels[sel]


def _codec_matrix() -> np.ndarray:
    """Fixed (16, 3) matrix with orthonormal columns; R's diagonal made positive so the signs are reproducible."""
    a = np.random.default_rng(1234).standard_normal((LATENT_CHANNELS, 3))
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diag(r))).astype(np.float32)


Q = _codec_matrix()


def encode(rgb):
    """RGB (N, H, W, 3) in [0, 1] (numpy or torch) -> latents (N, 16, H, W) float32 torch tensor."""
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().to("cpu", torch.float32)
    else:
        rgb = torch.from_numpy(np.asarray(rgb, dtype=np.float32))
    v = 2.0 * rgb - 1.0
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {tuple(v.shape)}")
    z = SCALE * torch.einsum("cj,nhwj->nchw", torch.from_numpy(Q), v)
    return z.contiguous()


def decode(z) -> np.ndarray:
    """Latents (N, 16, H, W) (numpy or torch) -> RGB (N, H, W, 3) float32 in [0, 1]; exact left inverse of encode."""
    if isinstance(z, torch.Tensor):
        z = z.detach().to("cpu", torch.float32).numpy()
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected (N, {LATENT_CHANNELS}, H, W) latents, got shape {z.shape}")
    v = np.einsum("cj,nchw->nhwj", Q, z) / SCALE
    return np.clip((v + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def to_pil(rgb_one, scale: int = 4):
    """One RGB image (H, W, 3) in [0, 1] -> PIL image upscaled ``scale`` times with NEAREST (crisp pixels)."""
    a = np.clip(np.asarray(rgb_one, dtype=np.float32), 0.0, 1.0)
    im = Image.fromarray(np.round(a * 255).astype(np.uint8))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def grid(rgb, rows: int, cols: int, scale: int = 4, pad: int = 1):
    """Up to rows*cols images (N, H, W, 3) as one PIL image, row-major tiles on a gray pad (``pad`` pixels)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if len(rgb) > rows * cols:
        raise ValueError(f"{len(rgb)} images do not fit a {rows}x{cols} grid")
    h, w = rgb.shape[1] * scale, rgb.shape[2] * scale
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (128, 128, 128))
    for i, img in enumerate(rgb):
        r, c = divmod(i, cols)
        canvas.paste(to_pil(img, scale), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas
