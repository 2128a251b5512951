"""Loss masks: which pixels of a training image the loss learns from (white = learn, black = ignore).

A mask is a greyscale image beside its image (``cat.png`` -> ``cat.mask.png``) or, for a folder that declares
``masks = "path"``, a same-stem image in that folder (``masks/cat.png``). It goes through exactly the image's
transform -- EXIF rotation, resized to the image's size when it was saved at another one, then the same
cover-and-centre-crop to the bucket (``buckets.fit_image``) -- and is then area-averaged to the latent grid, as
the VAE's /8 downsampling sees the image: a latent pixel half covered by white weighs 0.5. The loss reads it per
packed token (``objectives.Noised.token_weights``). A mask that is white everywhere is no mask: it is not stored,
so such an image trains bitwise as one without a mask.

Torch is imported inside the tensor functions: ``folders`` imports this module, and the CLI's ``--help`` imports
``folders`` without torch.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dev2pro.errors import UserError

MASK_SUFFIXES = (".png", ".webp", ".bmp", ".jpg", ".jpeg")  # in order of preference (lossless first)
MASK_MARK = ".mask"  # cat.mask.png is cat.png's mask, never a training image
PREPROCESS_VERSION = "mask-v1"  # bump when load_mask / latent_mask change their output (it keys the cache)


def is_mask_file(path: Path) -> bool:
    """``NAME.mask.png`` (any case, any mask suffix): a mask beside its image, not an image to train on."""
    return path.suffix.lower() in MASK_SUFFIXES and path.stem.lower().endswith(MASK_MARK)


def find_mask(image: Path, key: str, masks_dir: Path | str | None) -> Path | None:
    """The mask of ``image``: ``NAME.mask.*`` beside it, else ``KEY.*`` / ``KEY.mask.*`` in ``masks_dir`` (``key``:
    the image's path below its folder without suffix), else None. A mask found is checked (``check_mask``)."""
    candidates = [image.with_name(image.stem + MASK_MARK + s) for s in MASK_SUFFIXES]
    if masks_dir:
        base = Path(masks_dir).expanduser()
        if not base.is_dir():
            raise UserError(f"masks folder {base} does not exist or is not a folder; fix the folder's masks path")
        candidates += [base / f"{key}{mark}{s}" for mark in ("", MASK_MARK) for s in MASK_SUFFIXES]
    for c in candidates:
        if c.is_file():
            check_mask(c)
            return c
    return None


def check_mask(path: Path) -> None:
    """One-line UserError unless ``path`` is a readable image."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise UserError(f"mask {path} is not a readable image ({type(e).__name__}); save it as a greyscale PNG "
                        "(white = learn, black = ignore) or delete it") from None


def oriented_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of an image after EXIF rotation, from its header."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # orientations that swap sides


def load_mask(path: Path | str, image_size: tuple[int, int], bucket: tuple[int, int]):
    """Mask file -> (1, height, width) float32 tensor in [0, 1] at ``bucket`` = (width, height): EXIF-rotated,
    resized to ``image_size`` (the image's oriented size) if it differs, then the image's bucket transform."""
    import numpy as np
    import torch

    from .buckets import fit_image, open_rgb

    grey = open_rgb(path).convert("L")  # EXIF-rotated, transparency over white: opened as images are
    if grey.size != tuple(image_size):
        grey = grey.resize(tuple(image_size), Image.Resampling.LANCZOS)
    pixels = np.array(fit_image(grey, bucket), dtype=np.float32) / 255  # (H, W); LANCZOS can ring past [0, 1]
    return torch.from_numpy(pixels).clamp_(0, 1)[None]  # (1, H, W)


def latent_mask(mask, latent_hw: tuple[int, int]):
    """(..., H, W) pixel mask -> (..., h, w): the mean over each latent pixel's H/h x W/w pixel area."""
    import torch.nn.functional as F

    (H, W), (h, w) = mask.shape[-2:], latent_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"mask {W}x{H} does not downsample evenly to the latent grid {w}x{h}")
    lead = mask.shape[:-2]
    pooled = F.avg_pool2d(mask.reshape(-1, 1, H, W).float(), H // h)
    return pooled.reshape(*lead, h, w)
