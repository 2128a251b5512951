"""The demo's numbers depend on its seeds only (issue 18, item 9): not on thread counts or batch composition."""

import json
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from dev2pro.lab import arms, dataset, report
from dev2pro.lab import judges as jd
from dev2pro.lab import world as w
from dev2pro.lab.threads import one_thread

THREADS = (1, 2, 4)  # 4 oversubscribes a 2-core machine on purpose: another BLAS split of the same products


@contextmanager
def caller_threads(n):
    """A caller whose torch and BLAS/OpenMP pools run ``n`` threads (as a demo on an n-core machine would)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return w.load_digits_world()


@pytest.fixture(scope="module")
def judges(world):
    return jd.fit_judges(world, seed=0)


def blurred(world, n, seed, t=0.55):
    """Class-major styled holdout digits half drowned in noise: ambiguous images, many near-ties for the judges."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(world.holdout_labels == k), n) for k in range(10)])
    noise = rng.uniform(size=(len(idx), 8, 8, 3)).astype(np.float32)
    return ((1 - t) * w.styled(world.holdout_images[idx]) + t * noise).astype(np.float32)


def test_one_thread_pins_and_restores():
    with caller_threads(2):
        before = [p["num_threads"] for p in threadpool_info()]
        with one_thread():
            assert torch.get_num_threads() == 1 and all(p["num_threads"] == 1 for p in threadpool_info())
        assert torch.get_num_threads() == 2 and [p["num_threads"] for p in threadpool_info()] == before


def test_judges_score_each_image_alone(judges, world):
    x = np.concatenate([blurred(world, 30, seed=0), w.styled(world.holdout_images)])
    perm = np.random.default_rng(1).permutation(len(x))
    for clf in (judges.style, judges.digit):
        batch = jd._predict(clf, x)
        assert np.array_equal(jd._predict(clf, x[perm]), batch[perm])
        assert np.array_equal(np.concatenate([jd._predict(clf, x[i:i + 1]) for i in range(len(x))]), batch)
    f = jd.features(judges, x)
    assert f.dtype == np.float64 and np.array_equal(jd.features(judges, x[perm]), f[perm])
    assert np.array_equal(np.concatenate([jd.features(judges, x[i:i + 1]) for i in range(len(x))]), f)
    # the same decisions as scikit-learn's own predict on clear images (ours only fixes the arithmetic's order)
    clear = np.concatenate([w.styled(world.holdout_images), w.plain(world.holdout_images)])
    for clf in (judges.style, judges.digit):
        assert np.array_equal(jd._predict(clf, clear), clf.predict(jd._flat(clear)))


def test_judges_same_numbers_at_any_thread_count(judges, world):
    x = blurred(world, 6, seed=2)
    labels = np.repeat(np.arange(10), 6)
    real = jd.features(judges, w.styled(world.holdout_images))
    got = []
    for n in THREADS:
        with caller_threads(n):
            f = jd.features(judges, x)
            got.append((jd.style_fidelity(judges, x), jd.digit_accuracy(judges, x, labels), f.tobytes(),
                        jd.frechet_distance(f, real)))
    assert all(g == got[0] for g in got[1:])


def test_fitted_judges_same_at_any_thread_count(world):
    fits = []
    for n in (1, 2):
        with caller_threads(n):
            j = jd.fit_judges(world, seed=0)
        fits.append([np.asarray(a).tobytes() for a in (j.style.coef_, j.digit.coef_, j.pca.components_)])
    assert fits[0] == fits[1]


def test_fitted_judges_are_their_optimum_not_their_round_off(world, judges):
    """A one-ulp nudge of the train images (what another CPU's or library's arithmetic amounts to) leaves the
    judges where they were: each fit reaches its unique optimum (a float32 L-BFGS fit moved by 0.08)."""
    nudged = jd.fit_judges(replace(world, train_images=np.nextafter(world.train_images, np.float32(2))), seed=0)
    for name in ("style", "digit"):
        assert np.abs(getattr(nudged, name).coef_ - getattr(judges, name).coef_).max() < 1e-5, name
    assert np.abs(nudged.pca.components_ - judges.pca.components_).max() < 1e-5
    x = blurred(world, 30, seed=3)
    for clf, again in ((judges.style, nudged.style), (judges.digit, nudged.digit)):
        assert np.array_equal(jd._predict(clf, x), jd._predict(again, x))


def test_scoring_stage_same_table_at_one_and_two_threads(judges, world, tmp_path):
    """``report.evaluate`` (the demo's scoring stage) over fixed sample files: the same table, bit for bit."""
    per_class, seeds, names = 3, 3, ["A", "B", "C", "D"]
    results = []
    for s in range(seeds):
        for i, a in enumerate(["ref", *names]):
            files = {}
            for length in (["none"] if a == "ref" else ["short", "long"]):
                path = tmp_path / f"{a}-{s}-{length}.npz"
                np.savez(path, **{arms.sample_key(g): blurred(world, per_class, seed=100 * s + 10 * i + k, t=t)
                                  for k, (g, t) in enumerate(((3.5, 0.3), (1.0, 0.6)))})
                files[length] = str(path)
            results.append({"arm": a, "seed": s, "samples": files})
    tables = []
    for n in (1, 2):
        with caller_threads(n):
            t = report.evaluate(results, judges, world, arms=names, oracle="D", seeds=seeds, per_class=per_class,
                                guidances=(3.5, 1.0), main=("long", 3.5))
        tables.append(json.dumps(t, sort_keys=True))
    assert tables[0] == tables[1]


def test_sample_arm_same_images_at_one_and_two_threads(tmp_path, tiny_pro_dir):
    prompts = dataset.write_prompts(dataset.load_text_encoder(tiny_pro_dir), [f"digit {k}" for k in range(10)],
                                    tmp_path / "prompts.safetensors")
    got = []
    for n in (1, 2):
        run = tmp_path / f"t{n}"
        run.mkdir()
        with caller_threads(n):
            files = arms.sample_arm(run, tiny_pro_dir, {"none": None}, prompts, tiny_pro_dir, seed=0, per_class=2,
                                    steps=2, guidances=(2.0, 1.0), size=dataset.SIZE)
            assert torch.get_num_threads() == n  # the caller's thread count comes back
        got.append(arms.load_samples(files["none"]))
    assert got[0].keys() == got[1].keys() and all(np.array_equal(got[0][k], got[1][k]) for k in got[0])
