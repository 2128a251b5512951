"""Image metrics that need no downloaded network, for side-by-side comparisons of sampling arms.

They do not say which image is *better*; they say what changed, cheaply and reproducibly:
- pixel statistics (mean, std, per-channel means) catch washed-out, over-saturated or colour-shifted outputs, the
  classic symptoms of a LoRA used at the wrong guidance or on the wrong base;
- high-frequency energy (mean squared Laplacian of the luma) tracks detail and noise: under-denoised or
  over-sharpened images score high, blurry ones low;
- mean absolute pixel distance between two arms on the same prompt and seed (same starting noise) measures how far
  a change moved the result, 0 for identical arms;
- diversity is the mean distance between images of one arm that share a prompt but not a seed: a collapsed model
  (every seed gives the same picture) scores near 0.
All values are on a 0..1 pixel scale. Images are compared as RGB; aligned lists must have equal sizes.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence

import numpy as np


def to_array(image) -> np.ndarray:
    """PIL image -> float64 [H, W, 3] in 0..1."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def high_frequency_energy(arr: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of the luma (Rec. 601), interior pixels only."""
    y = arr @ np.array([0.299, 0.587, 0.114])
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.mean(lap ** 2)) if lap.size else 0.0


def pixel_stats(images: Sequence) -> dict[str, float]:
    """Mean over images of: mean, std, per-channel means, high-frequency energy."""
    rows = []
    for im in images:
        a = to_array(im)
        rows.append([a.mean(), a.std(), *a.reshape(-1, 3).mean(0), high_frequency_energy(a)])
    m = np.mean(rows, axis=0)
    return dict(zip(("mean", "std", "mean_r", "mean_g", "mean_b", "hf_energy"), map(float, m)))


def mean_abs_distance(a, b) -> float:
    """Mean absolute pixel difference of two equally sized images (0 = identical, 1 = black vs white)."""
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape[:2]} vs {y.shape[:2]}")
    return float(np.abs(x - y).mean())


def pairwise_distances(arms: Mapping[str, Sequence]) -> dict[str, dict[str, float]]:
    """For aligned image lists (same prompt+seed at each index): arm -> arm -> mean distance over the pairs."""
    names = list(arms)
    lengths = {len(v) for v in arms.values()}
    if len(lengths) > 1:
        raise ValueError(f"arms have different numbers of images: {lengths}")
    out = {n: {n: 0.0} for n in names}
    for a, b in combinations(names, 2):
        d = float(np.mean([mean_abs_distance(x, y) for x, y in zip(arms[a], arms[b])]))
        out[a][b] = out[b][a] = d
    return out


def diversity(images: Sequence, groups: Sequence) -> float | None:
    """Mean distance between images in the same group (same prompt, different seeds); None with no pairs."""
    by_group: dict = {}
    for im, g in zip(images, groups):
        by_group.setdefault(g, []).append(im)
    dists = [mean_abs_distance(a, b) for ims in by_group.values() for a, b in combinations(ims, 2)]
    return float(np.mean(dists)) if dists else None
