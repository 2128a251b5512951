"""What an epoch is made of: every image at every resolution it is trained at, and the reg images beside them.

- Multi-resolution: ``data.resolution = [512, 768, 1024]`` (or a folder's own ``resolution``) buckets each image
  once per listed resolution, so each image appears once per resolution (times its repeats) per epoch; every
  (image, resolution) is its own cache entry (the bucket is part of the latent cache key).
- Regularization (prior preservation, DreamBooth's class images): images of folders with ``role = "reg"`` are
  samples like the others, in the same buckets and batches, with loss weight ``reg_weight`` (kohya's
  ``prior_loss_weight``); their share of an epoch is their repeats' share. ``reg_weight = 0`` drops them before
  anything is scanned, so such a run is the run without them. (kohya also repeats or truncates reg images to the
  number of train images; here the folders' repeats say it, explicitly.)
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from .buckets import assign_bucket, make_buckets
from .folders import DatasetFolder, Item


def resolution_list(resolution: int | Sequence[int]) -> tuple[int, ...]:
    """``512`` or ``[512, 768]`` -> (512,) / (512, 768): distinct values, in the order given."""
    values = (resolution,) if isinstance(resolution, int) else tuple(resolution)
    return tuple(dict.fromkeys(int(r) for r in values))


def active_folders(folders: Sequence[DatasetFolder], reg_weight: float) -> list[DatasetFolder]:
    """The folders a run reads: reg folders only when ``reg_weight`` > 0."""
    return [f for f in folders if f.role != "reg" or reg_weight > 0]


def largest_resolution(resolution: int | Sequence[int], folders: Sequence[DatasetFolder] = ()) -> int:
    """The largest resolution any image of ``folders`` (none: the dataset's) is trained at: what the memory plan
    prices."""
    each = [f.resolutions or resolution_list(resolution) for f in folders] or [resolution_list(resolution)]
    return max(max(r) for r in each)


def bucketed(items: Sequence[Item], resolution: int | Sequence[int], step: int,
             size_of=lambda item: item.size) -> list[tuple[Item, int, tuple[int, int]]]:
    """(item, resolution, (width, height) bucket) for every item at every resolution it trains at (its folder's,
    else ``resolution``): items in scan order, each at its resolutions in the order given."""
    buckets: dict[int, list] = {}
    out = []
    for item in items:
        for res in resolution_list(item.resolutions or resolution):
            if res not in buckets:
                buckets[res] = make_buckets(res * res, step=step)
            out.append((item, res, assign_bucket(*size_of(item), buckets[res])))
    return out


def bucket_counts(entries) -> dict[int, Counter]:
    """resolution -> Counter of (width, height) pixel buckets over one epoch (repeats included), for
    ``loader.CacheEntry``-like entries (``resolution``, ``repeats``, ``bucket``)."""
    counts: dict[int, Counter] = {}
    for e in entries:
        counts.setdefault(e.resolution, Counter())[e.bucket] += e.repeats
    return dict(sorted(counts.items()))


def role_counts(entries) -> Counter:
    """role -> samples per epoch (repeats included)."""
    counts: Counter = Counter()
    for e in entries:
        counts[e.role] += e.repeats
    return counts


def epoch_lines(entries) -> list[str]:
    """Start-up lines: the images, the bucket counts per resolution, and the reg samples' share of an epoch."""
    images = len({e.image for e in entries})
    lines = [f"  buckets at {res}px: {len(counts)} bucket(s): " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in
                                                                         counts.most_common())
             for res, counts in bucket_counts(entries).items()]
    if len(lines) > 1:
        lines.insert(0, f"  multi-resolution: each of {images} images once per resolution per epoch (x repeats)")
    roles = role_counts(entries)
    if roles["reg"]:
        weight = next(e.weight for e in entries if e.role == "reg")
        lines.append(f"  reg: {roles['reg']} reg samples per epoch of {sum(roles.values())} "
                     f"({roles['reg'] / sum(roles.values()):.0%}), loss weight {weight:g} (data.reg_weight)")
    return lines
