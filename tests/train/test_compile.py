"""Regional compile (train.compile = "blocks") on the tiny family: equal to eager to fp32 round-off, a bounded
number of compiled frames across steps and buckets, resume bit-identical with compile on."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dev2pro.data.cache import LATENT_NAME
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from tiny_run import lora_run_toml, same_tensors

# FLUX.1 has two repeated block classes (double, single); forward and backward of each, plus what dynamic shapes
# may add once (a first specialised frame, then the dynamic one): the bound the run must stay within
MAX_FRAMES = 8


def _toml(tmp_path, model_dir, images, out, compile_, steps):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=3, lr="5e-3", bucket_step=16,
                         train=f"compile = {compile_}")


@pytest.mark.slow
def test_compiled_blocks_equal_eager_bounded_recompiles_and_resume(tmp_path, tiny_dev_dir, sk_images):
    torch._dynamo.reset()
    eager = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "eager", "false", 8)), progress=False)
    comp = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "comp", '"blocks"', 8)), progress=False)
    stats = comp["compile"]
    print("compile stats:", stats)
    assert 2 <= stats["frames"] <= MAX_FRAMES, stats  # compiled once per block class, not per block or per step
    assert stats["seconds"] > 0
    np.testing.assert_allclose(comp["losses"], eager["losses"], rtol=1e-5)
    a, b = load_file(str(tmp_path / "eager" / "lora.safetensors")), load_file(str(tmp_path / "comp" /
                                                                                       "lora.safetensors"))
    diff = sum((b[k].double() - a[k].double()).norm() ** 2 for k in a) ** 0.5
    assert diff / sum(a[k].double().norm() ** 2 for k in a) ** 0.5 < 1e-5  # fp32 round-off through 8 Adam steps
    # resume with compile on (true: the older spelling of "blocks"), in the same process: no new frames either
    half = _toml(tmp_path, tiny_dev_dir, sk_images, "half", "true", 4)
    first = train(load_train_config(half), progress=False)
    rest = train(load_train_config(half, ["train.steps=8"]), resume="latest", progress=False)
    assert first["losses"] + rest["losses"] == comp["losses"]
    assert same_tensors(tmp_path / "half" / "lora.safetensors", tmp_path / "comp" / "lora.safetensors")
    assert rest["compile"]["frames"] <= MAX_FRAMES, rest["compile"]
    shapes = {tuple(load_file(str(p))[LATENT_NAME].shape) for p in Path(tmp_path / "cache").rglob("*.safetensors")
              if LATENT_NAME in load_file(str(p))}
    assert len(shapes) >= 2, shapes  # the run crossed buckets (token counts) without a recompile per bucket
