"""Aspect-ratio buckets: train on many image shapes at roughly one pixel budget, without padding or squashing.

A bucket is a (width, height) with both sides multiples of ``step`` (16 px: the VAE divides by 8 and Flux packs
2x2 latent patches, so 16 is the smallest side unit that packs cleanly) and an area at most ``target_area``.
For each width we take the tallest height that stays within the area, then add the transposed shape, so the set
is symmetric in portrait/landscape. An image goes to the bucket whose aspect ratio is nearest in log space (so
2:1 and 1:2 are equally far from square), is scaled to cover it and centre-cropped: at most a thin strip is lost.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dev2pro.errors import ConfigError


def make_buckets(
    target_area: int,
    step: int = 16,
    min_side: int | None = None,
    max_side: int | None = None,
    max_ratio: float = 3.0,
) -> list[tuple[int, int]]:
    """Sorted (width, height) buckets with area <= ``target_area``, sides multiples of ``step`` within
    [``min_side``, ``max_side``] (default: ``step`` and unbounded) and long/short side ratio <= ``max_ratio``."""
    if step <= 0 or step % 16:
        raise ConfigError(f"bucket step must be a positive multiple of 16 px (VAE /8 then 2x2 packing), got {step}")
    if max_ratio < 1:
        raise ConfigError(f"bucket max_ratio must be >= 1 (long side / short side), got {max_ratio}")
    min_side = step if min_side is None else min_side
    # no side can exceed sqrt(area * ratio) without breaking the ratio limit
    longest = int(math.sqrt(target_area * max_ratio)) if max_side is None else max_side
    buckets = set()
    for w in range(step, longest + 1, step):
        h = min(target_area // w // step * step, longest // step * step)
        if h < min_side or w < min_side:
            continue
        if max(w, h) / min(w, h) <= max_ratio:
            buckets.update({(w, h), (h, w)})
    if not buckets:
        raise ConfigError(
            f"no {step}-px buckets fit area {target_area} with sides in [{min_side}, {longest}] and ratio <= "
            f"{max_ratio}; raise the resolution or relax min_side/max_side"
        )
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest in log aspect ratio; ties go to the larger area (less upscaling)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB without surprises: transparency over white, 16-bit greyscale scaled rather than clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.convert("I").point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit; convert() would clip
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def fit_image(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``im`` to cover ``size`` = (width, height) and centre-crop to exactly that size."""
    w, h = size
    scale = max(w / im.width, h / im.height)
    # ceil so rounding never leaves the covered side a pixel short of the bucket
    new_w, new_h = max(w, math.ceil(im.width * scale - 1e-6)), max(h, math.ceil(im.height * scale - 1e-6))
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return im.crop((left, top, left + w, top + h))


def open_rgb(path: Path | str) -> Image.Image:
    """Image file -> RGB PIL image as training sees it: EXIF-rotated upright, transparency over white, 16-bit
    greyscale scaled (the one opening shared by training, references and ``dev2pro caption``)."""
    with Image.open(path) as im:
        return _to_rgb(ImageOps.exif_transpose(im))


def open_fitted(path: Path | str, size: tuple[int, int]) -> Image.Image:
    """Image file -> RGB PIL image of ``size`` = (width, height), opened by ``open_rgb``, covered and cropped."""
    return fit_image(open_rgb(path), size)


# FLUX.2's pipelines shrink a reference image above 1 MP to 1 MP (``Flux2KleinPipeline.__call__``), so a larger
# reference is never what the model sees at inference: training fits references to the same capped size
MAX_REFERENCE_PIXELS = 1024 * 1024


def reference_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an edit's reference image is fitted to beside an image of ``size``: the same size up to
    1 MP, above that shrunk to 1 MP at the same aspect ratio with sides floored to 16 px, as diffusers'
    ``Flux2ImageProcessor._resize_to_target_area`` and the pipeline's multiple-of-16 rounding do."""
    w, h = size
    if w * h <= MAX_REFERENCE_PIXELS:
        return w, h
    scale = math.sqrt(MAX_REFERENCE_PIXELS / (w * h))
    return int(w * scale) // 16 * 16, int(h * scale) // 16 * 16


def fitted_references(paths, size: tuple[int, int]):
    """An edit's reference image(s) for a render of ``size``, fitted as training fits them beside an image of that
    bucket (``reference_size``: at most 1 MP, so the pipeline passes them on unchanged): one path -> one PIL
    image, a list -> a list of them (``Flux2Pipeline``'s ``image``), "" / None / [] -> None."""
    if not paths:
        return None
    if isinstance(paths, (list, tuple)):
        return [open_fitted(p, reference_size(size)) for p in paths]
    return open_fitted(paths, reference_size(size))


def load_and_fit(path: Path | str, size: tuple[int, int]) -> torch.Tensor:
    """Image file -> (3, height, width) float32 tensor in [-1, 1], EXIF-rotated, covered and centre-cropped."""
    pixels = np.array(open_fitted(path, size), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1  # (3, H, W)
