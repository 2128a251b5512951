import math
import time

import numpy as np
import pytest

from dev2pro.lab import judges as jd
from dev2pro.lab import world as w


@pytest.fixture(scope="module")
def world():
    return w.load_digits_world()


@pytest.fixture(scope="module")
def judges(world):
    t = time.perf_counter()
    j = jd.fit_judges(world, seed=0)
    print(f"fit_judges: {time.perf_counter() - t:.2f}s")
    return j


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(123).uniform(size=(300, 8, 8, 3)).astype(np.float32)


def test_style_judge_accepts_only_the_full_concept(judges, world, noise):
    h = world.holdout_images
    assert jd.style_fidelity(judges, w.styled(h)) > 0.9
    assert jd.style_fidelity(judges, w.plain(h)) < 0.1
    for name, miss in w.near_misses(h).items():
        assert jd.style_fidelity(judges, miss) < 0.1, name
    assert jd.style_fidelity(judges, noise) < 0.1


def test_digit_judge(judges, world, noise):
    h, y = world.holdout_images, world.holdout_labels
    assert jd.digit_accuracy(judges, w.styled(h), y) > 0.85
    assert jd.digit_accuracy(judges, noise, np.arange(300) % 10) < 0.3
    # wrong prompts score low: adherence is measured against the label, not just legibility
    assert jd.digit_accuracy(judges, w.styled(h), (y + 1) % 10) < 0.1
    with pytest.raises(ValueError):
        jd.digit_accuracy(judges, w.styled(h), y[:10])


def test_features_shape_and_validation(judges, world):
    f = jd.features(judges, w.styled(world.holdout_images[:7]))
    assert f.shape == (7, 16)
    with pytest.raises(ValueError):
        jd.features(judges, world.holdout_images)  # grayscale (N, 8, 8) is not an RGB batch


def test_frechet_distance(judges, world, noise):
    ref = jd.features(judges, w.styled(world.train_images))
    sh = w.styled(world.holdout_images)
    fs = jd.features(judges, sh)
    assert jd.frechet_distance(fs, fs) < 1e-6
    same = jd.frechet_distance(fs, ref)
    other = jd.frechet_distance(jd.features(judges, w.plain(world.holdout_images)), ref)
    assert same / other < 0.2
    blends = [jd.frechet_distance(jd.features(judges, (1 - t) * sh + t * noise), ref) for t in (0, 0.25, 0.5, 0.75, 1)]
    assert all(a < b for a, b in zip(blends, blends[1:])), blends
    # a mode-collapsed arm (one image repeated) is far from the data even though each image is real
    collapsed = jd.features(judges, np.repeat(sh[:1], 300, axis=0))
    assert jd.frechet_distance(collapsed, ref) > 3 * same
    print(f"FD styled-holdout {same:.3f}, plain-holdout {other:.3f}, blends {[round(b, 3) for b in blends]}")


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 2)) * [1.0, 2.0]
    b = rng.standard_normal((20000, 2)) * [3.0, 2.0] + [1.0, 0.0]
    # |mu|^2 = 1; trace term per dim: (s_a - s_b)^2 = 4 and 0
    assert jd.frechet_distance(a, b) == pytest.approx(5.0, rel=0.05)


def test_guidance_integrity():
    rng = np.random.default_rng(0)
    ref_lo, ref_hi = rng.uniform(size=(2, 4, 8, 8, 3))
    lo = rng.uniform(size=(4, 8, 8, 3))
    assert jd.guidance_integrity(lo, lo + (ref_hi - ref_lo), ref_lo, ref_hi) == pytest.approx(1.0)
    assert jd.guidance_integrity(lo, lo, ref_lo, ref_hi) == 0.0
    assert jd.guidance_integrity(lo, lo + 0.5 * (ref_hi - ref_lo), ref_lo, ref_hi) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        jd.guidance_integrity(lo, lo, ref_lo, ref_lo)
    with pytest.raises(ValueError):
        jd.guidance_integrity(lo[:2], lo[:2], ref_lo, ref_hi)


def test_mean_ci():
    d = jd.mean_ci([1.0, 1.0, 1.0])
    assert d["mean"] == 1.0 and d["half"] == 0.0 and d["n"] == 3
    d = jd.mean_ci([1, 2, 3])
    assert d["mean"] == 2.0
    assert d["half"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert d["lo"] == pytest.approx(2 - d["half"]) and d["hi"] == pytest.approx(2 + d["half"])
    assert jd.mean_ci([1, 2, 3], confidence=0.9)["half"] == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)
    one = jd.mean_ci([0.7])
    assert one["mean"] == 0.7 and one["n"] == 1 and math.isnan(one["half"])
    with pytest.raises(ValueError):
        jd.mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        jd.mean_ci([])


def test_format_ci():
    assert jd.format_ci({"mean": 0.9124, "half": 0.0309}) == "0.912 ± 0.031"
    assert jd.format_ci(jd.mean_ci([1, 2, 3]), digits=2) == "2.00 ± 2.48"
