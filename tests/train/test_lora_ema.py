"""LoRA EMA (``train.ema_decay``): the saved LoRA is the EMA of the trained weights -- checked against an EMA
computed by hand from the raw weights in the resumable states -- training itself is unchanged, and a run killed
and resumed is bit-identical (raw weights and EMA both in the state)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from tiny_run import lora_run_toml, run_killed, same_tensors


def _toml(tmp_path, model_dir, images, out, steps=3, ema=0.9, every=1):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=11, train=f"ema_decay = {ema}",
                         save=f'every = {every}\nkeep_last = 10\nformats = ["diffusers", "kohya"]')


def _state(run: Path, step: int) -> dict:
    return load_file(str(run / "state" / f"step-{step:06d}" / "rank-00000-of-00001.safetensors"))


def _file_key(peft_name: str) -> str:
    """``transformer_blocks.0.attn.to_q.lora_A.default.weight`` -> the diffusers-layout file's key."""
    return "transformer." + peft_name.replace(".default.", ".")


def test_saved_lora_is_the_hand_computed_ema(tmp_path, tiny_dev_dir, sk_images, capsys):
    raw = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "raw", ema=0.0)), progress=False)
    run = tmp_path / "ema"
    ema = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "ema", ema=0.9)), progress=False)
    assert ema["losses"] == raw["losses"]  # the EMA only watches: training is the same bit for bit
    assert "EMA: the LoRA files and samples hold the EMA" in capsys.readouterr().out
    steps = [{k[len("model/"):]: v.double() for k, v in _state(run, s).items() if k.startswith("model/")}
             for s in (1, 2, 3)]
    for s, w in zip((1, 2, 3), steps):  # the state keeps the raw weights: those of the run without EMA
        assert all(torch.equal(v.float(), _state(tmp_path / "raw", s)[f"model/{k}"]) for k, v in w.items())
    # the start: lora_B is zero and lora_A gets no gradient while B is zero, so step 1's A is the initial A
    w0 = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in steps[0].items()}
    assert all(not torch.equal(steps[0][k], w0[k]) for k in w0 if ".lora_B." in k)  # B did move
    shadow, expected = dict(w0), []
    for n, w in enumerate(steps):  # EMA with the warm-up min(decay, (1 + n) / (10 + n)), as in train/ema.py
        d = min(0.9, (1 + n) / (10 + n))
        shadow = {k: d * shadow[k] + (1 - d) * w[k] for k in shadow}
        expected.append(shadow)
    files = [run / "lora-step000001.diffusers.safetensors", run / "lora-step000002.diffusers.safetensors",
             run / "lora.diffusers.safetensors"]
    for f, want in zip(files, expected):
        got = load_file(str(f))
        assert len(got) == len(want)
        for k, v in want.items():
            torch.testing.assert_close(got[_file_key(k)].double(), v, rtol=1e-6, atol=1e-7)
        # and not the raw weights (the test could not tell them apart otherwise)
    last_raw = steps[-1]
    assert any(not torch.allclose(load_file(str(files[-1]))[_file_key(k)].double(), v, atol=1e-6)
               for k, v in last_raw.items())
    final = _state(run, 3)  # the state holds the EMA beside the raw weights
    got = load_file(str(files[-1]))
    assert all(torch.equal(final[f"ema/{k}"], got[_file_key(k)]) for k in last_raw)


@pytest.mark.slow  # ~20 s: a killed subprocess run and its resume
def test_ema_run_resumes_bit_identical_after_kill(tmp_path, tiny_dev_dir, sk_images):
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "full", steps=6, every=2)),
                 progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, "killed", steps=6, every=2)
    run_killed(cfg_path, 5)  # dies right after step 5 (state at 4)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    assert resumed["losses"] == full["losses"][4:]
    for name in ("lora.safetensors", "lora.diffusers.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "killed" / name)
    a, b = _state(tmp_path / "full", 6), _state(tmp_path / "killed", 6)
    assert any(k.startswith("ema/") for k in a) and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
