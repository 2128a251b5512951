"""The demo's arms after training: samples files (one key per guidance) and the job runner."""

import os
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from dev2pro.lab import arms, dataset


def test_sample_key_and_samples_file(tmp_path):
    assert arms.sample_key(3.5) == "g3.5" and arms.sample_key(1.0) == "g1.0" and arms.sample_key(4) == "g4"
    a = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "s.npz", **{arms.sample_key(2.0): a})
    got = arms.load_samples(tmp_path / "s.npz")
    assert list(got) == ["g2.0"] and np.array_equal(got["g2.0"], a)


def test_run_jobs_in_process_sorted_by_seed_then_arm():
    jobs = [{"seed": 1, "arm": "B"}, {"seed": 0, "arm": "C"}, {"seed": 1, "arm": "A"}, {"seed": 0, "arm": "ref"}]
    got = arms.run_jobs(dict, jobs, workers=1, progress=False)
    assert [(r["seed"], r["arm"]) for r in got] == [(0, "C"), (0, "ref"), (1, "A"), (1, "B")]


def test_run_jobs_in_spawned_workers_with_an_initializer():
    jobs = [{"seed": s, "arm": "A"} for s in (2, 0, 1)]
    got = arms.run_jobs(dict, jobs, workers=2, progress=False, initializer=os.getpid)
    assert got == sorted(jobs, key=lambda r: r["seed"])
    with pytest.raises(BrokenProcessPool):  # the initializer does run in the workers: a failing one breaks them
        arms.run_jobs(dict, jobs, workers=2, progress=False, initializer=dict.fromkeys)


def test_sample_arm_writes_one_array_per_guidance_and_reuses_it(tmp_path, tiny_pro_dir):
    prompts = dataset.write_prompts(dataset.load_text_encoder(tiny_pro_dir), [f"digit {k}" for k in range(10)],
                                    tmp_path / "prompts.safetensors")

    def sample(run, seed):
        run.mkdir(exist_ok=True)
        return arms.sample_arm(run, tiny_pro_dir, {"none": None}, prompts, tiny_pro_dir, seed=seed, per_class=2,
                               steps=2, guidances=(2.0, 1.0), size=dataset.SIZE)

    files = sample(tmp_path / "a", seed=0)
    assert list(files) == ["none"]
    s = arms.load_samples(files["none"])
    assert list(s) == ["g2.0", "g1.0"]
    for rgb in s.values():
        assert rgb.shape == (20, 8, 8, 3) and rgb.dtype == np.float32 and 0.0 <= rgb.min() <= rgb.max() <= 1.0
    assert np.abs(s["g2.0"] - s["g1.0"]).mean() > 1e-4  # pro has no guidance input: true CFG makes the difference
    stamp = os.stat(files["none"]).st_mtime_ns
    assert sample(tmp_path / "a", seed=5) == files and os.stat(files["none"]).st_mtime_ns == stamp  # reused
    again = arms.load_samples(sample(tmp_path / "b", seed=0)["none"])
    other = arms.load_samples(sample(tmp_path / "c", seed=1)["none"])
    assert all(np.array_equal(again[k], s[k]) for k in s)  # seeded: the same run twice gives the same images
    assert np.abs(other["g1.0"] - s["g1.0"]).mean() > 1e-4
