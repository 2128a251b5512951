"""Judges for the demo's generated digits: metrics fitted on the toy world itself, no downloaded network.

The demo compares LoRA arms by what their samples look like, so every metric is a small scikit-learn model fitted
on the world's TRAIN split only (evaluation uses the holdout split and generated images):

- style fidelity: a binary classifier whose positives are ``styled`` digits and whose negatives are the world's
  ``near_misses`` (plain digits, orange on black, white on blue, half-way blends, the inverted palette); so a
  LoRA that learned the palette only in part is not counted in style. It judges colours, not shapes; whether the
  image is a legible digit is the next metric's job.
- digit accuracy: a 10-class classifier trained on ``styled`` digits, scored against the digit named in the
  prompt; it measures prompt adherence inside the concept (a LoRA can nail the style and lose the digit).
- Frechet distance in a fixed 16-dimensional PCA space (fitted on styled + plain train images): the Gaussian
  FID recipe without Inception. Distance to real styled data rewards quality AND diversity. Guidance above 1
  lowers diversity (samples crowd around the modes), so distance to real data alone favours low guidance; that
  is why the demo also reports distance to the oracle arm's samples at the same guidance.
- guidance integrity: how much of dev's response to its guidance input survives the LoRA (1 = intact,
  0 = the guidance input no longer does anything).
- ``mean_ci``: Student-t confidence intervals over seeds, so arm differences come with their noise.

Scores depend on the images only (issue 18, item 9): the classifiers are fitted to their optimum, not to where
round-off stopped them (``_classifier``); each image is scored on its own in float64 with fixed-order sums
(``_affine``), never by a BLAS matrix product, whose blocking and threading change the round-off with the batch,
the thread count and the CPU; fits and Frechet distances run on one thread (``threads.one_thread``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.linalg import sqrtm
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from dev2pro.lab.threads import one_thread
from dev2pro.lab.world import World, near_misses, plain, styled


@dataclass(frozen=True)
class Judges:
    """Fitted scikit-learn models: ``style`` (binary), ``digit`` (10-class) and ``pca`` (feature space)."""

    style: Any
    digit: Any
    pca: Any


def _flat(rgb) -> np.ndarray:
    a = np.asarray(rgb, dtype=np.float32)
    if a.ndim != 4 or a.shape[1:] != (8, 8, 3):
        raise ValueError(f"expected (N, 8, 8, 3) images, got shape {a.shape}")
    return a.reshape(len(a), -1)


def fit_judges(world: World, seed: int = 0) -> Judges:
    """Fit the style judge, digit judge and PCA feature space on ``world``'s train split (about a second)."""
    # One thread: the same fit at any core count; these matrices are tiny, so more threads only add hand-off
    # cost (30x slower on two busy cores).
    with one_thread():
        return _fit(world, seed)


def _fit(world: World, seed: int) -> Judges:
    x, y = world.train_images, world.train_labels
    pos = _flat(styled(x)).astype(np.float64)
    # Near misses are negatives too: being in style needs the whole palette, not a step towards it.
    # Uniform noise too: an image in the palette's colours but without a digit's structure is not in style.
    noise = np.random.default_rng(seed).uniform(size=(len(x), 8, 8, 3)).astype(np.float32)
    neg = np.concatenate([_flat(v) for v in near_misses(x).values()] + [_flat(noise)]).astype(np.float64)
    style = _classifier(seed)
    style.fit(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(np.int64))
    # Linear on 192 pixels already reaches ~0.97 holdout accuracy; an MLP gains ~0.02 for 40x the fit time.
    digit = _classifier(seed)
    digit.fit(pos, y)
    pca = PCA(n_components=16, random_state=seed)
    pca.fit(np.concatenate([pos, _flat(plain(x))]))
    return Judges(style=style, digit=digit, pca=pca)


def _classifier(seed: int) -> LogisticRegression:
    """A logistic regression fitted to its optimum, so the judge is a function of the data, not of round-off.

    The default (float32 data, L-BFGS, tol 1e-4) stopped the digit judge on a flat stretch wherever round-off
    led it: 84 or 128 iterations, coefficients 0.08 apart, at 2 or 1 threads; a one-ulp nudge of the images
    still moved a float64 L-BFGS fit by 0.03. Any other arithmetic (core count, a CPU's BLAS kernel, a library
    build) moved the judge: the 2-thread fit relabels ~40 of a default demo's 1800 samples per guidance.
    Newton-CG on float64 data converges in ~12 steps to the unique (L2-regularised) optimum: the same nudge
    moves it by 2e-7."""
    return LogisticRegression(solver="newton-cg", tol=1e-8, max_iter=200, random_state=seed)


def _affine(x: np.ndarray, weight, bias) -> np.ndarray:
    """``x @ weight.T + bias`` in float64, each row of ``x`` on its own: a product then numpy's pairwise sum over
    the 192 pixels, whose order depends on the row length only, so a score is the same in any batch, at any
    thread count. (A BLAS product picks kernels and splits by batch size and threads, moving the round-off.)"""
    w = np.asarray(weight, dtype=np.float64)
    out = np.empty((len(x), len(w)))
    for lo in range(0, len(x), 256):  # bounded temporaries: 256 x classes x 192 doubles
        out[lo:lo + 256] = (x[lo:lo + 256, None, :].astype(np.float64) * w[None]).sum(axis=-1)
    return out + np.asarray(bias, dtype=np.float64)


def _predict(clf, rgb) -> np.ndarray:
    """``clf.predict`` of a fitted linear classifier, per image and in float64 (``_affine``)."""
    scores = _affine(_flat(rgb), clf.coef_, clf.intercept_)
    picks = (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else scores.argmax(axis=1)
    return clf.classes_[picks]


def style_fidelity(j: Judges, rgb) -> float:
    """Fraction of images (N, 8, 8, 3) the style judge calls in style."""
    return float(np.mean(_predict(j.style, rgb) == 1))


def digit_accuracy(j: Judges, rgb, labels) -> float:
    """Fraction of images whose digit-judge prediction equals the prompted ``labels``."""
    labels = np.asarray(labels)
    if labels.shape != (len(rgb),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(rgb)} images")
    return float(np.mean(_predict(j.digit, rgb) == labels))


def features(j: Judges, rgb) -> np.ndarray:
    """Images (N, 8, 8, 3) -> (N, 16) coordinates in the judges' fixed PCA space (per image, float64)."""
    x = _flat(rgb).astype(np.float64) - np.asarray(j.pca.mean_, dtype=np.float64)
    return _affine(x, j.pca.components_, 0.0)


def frechet_distance(a_feats, b_feats) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(Ca + Cb - 2 sqrt(Ca Cb))."""
    a, b = np.asarray(a_feats, dtype=np.float64), np.asarray(b_feats, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    eye = 1e-6 * np.eye(a.shape[1])  # keeps sqrtm stable when a covariance is (near) singular
    with one_thread():  # np.cov and sqrtm call BLAS/LAPACK
        ca, cb = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
        covmean = np.real(sqrtm(ca @ cb))
    d = float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean))
    return max(d, 0.0)  # round-off can leave a tiny negative for identical sets


def guidance_integrity(lo, hi, ref_lo, ref_hi) -> float:
    """mean|hi - lo| / mean|ref_hi - ref_lo| over aligned images (same prompts and seeds).

    ``lo``/``hi``: dev + LoRA sampled at guidance 1.0 / 3.5; ``ref_lo``/``ref_hi``: dev without the LoRA.
    ~1 means the LoRA left dev's guidance response intact, ~0 that the guidance input no longer does anything.
    """
    arrs = [np.asarray(a, dtype=np.float64) for a in (lo, hi, ref_lo, ref_hi)]
    if len({a.shape for a in arrs}) != 1:
        raise ValueError(f"guidance_integrity needs aligned arrays, got shapes {[a.shape for a in arrs]}")
    ref = float(np.mean(np.abs(arrs[3] - arrs[2])))
    if ref == 0.0:
        raise ValueError("reference images do not change with guidance; integrity is undefined")
    return float(np.mean(np.abs(arrs[1] - arrs[0]))) / ref


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean with a Student-t interval: dict(mean, lo, hi, half, n).

    With n == 1 the sample standard deviation is undefined, so ``half`` (and lo/hi) are nan rather than a
    misleading 0. Non-finite values raise ValueError.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"mean_ci got non-finite values: {v.tolist()}")
    n, mean = int(v.size), float(v.mean())
    half = float("nan") if n == 1 else float(stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half, "n": n}


def format_ci(d: dict, digits: int = 3) -> str:
    """``mean_ci`` result as text, e.g. ``"0.912 ± 0.031"``."""
    return f"{d['mean']:.{digits}f} ± {d['half']:.{digits}f}"
