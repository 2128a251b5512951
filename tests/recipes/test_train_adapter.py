"""`dev2pro train` with model.adapter and `dev2pro sample --adapter` on the tiny family (recipe level)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dev2pro.errors import UserError
from dev2pro.flux.checkpoint import load_transformer
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.lora import adapter as A
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora
from dev2pro.lora.ops import apply_lora, lora_delta
from dev2pro.recipes import lora_tools as T
from dev2pro.recipes.sample import run_sample
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.data.folders import DatasetFolder
from dev2pro.data.prepare import FolderOptions, load_training_data
from dev2pro.train.model import load_base
from dev2pro.train.samples import GridSpec, LoraSampler

SAMPLE = dict(prompts=["a photo"], seeds=[0], steps=3, width=64, height=64, guidance=3.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dev_dir):
    """The tiny dev transformer as a BFL file, an adapter on every linear (kohya file), and the merged base."""
    tmp = tmp_path_factory.mktemp("adapter")
    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    base = tmp / "dev.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}, str(base))
    g = torch.Generator().manual_seed(5)
    lw = LoraWeights()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            lw[n] = LoraModule(torch.randn(4, m.in_features, generator=g) * 0.2,
                               torch.randn(m.out_features, 4, generator=g) * 0.2, 4.0)
    adapter = save_lora(lw, tmp / "adapter.safetensors", "kohya")
    merged = T.merge(str(base), [(str(adapter), 1.0)], str(tmp / "dev2pro.safetensors"))
    return base, adapter, merged, lw


def _cfg(tmp_path, model_dir, images, out, transformer, adapter=""):
    return load_train_config(None, data={
        "model": {"path": str(model_dir), "transformer": str(transformer), "adapter": str(adapter), "dtype": "fp32",
                  "gradient_checkpointing": False},
        "data": {"folders": [{"path": str(images)}], "default_caption": "a photo", "resolution": 64,
                 "bucket_step": 64, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4, "targets": "attention"},
        "train": {"steps": 10, "lr": 1e-2, "seed": 3},
        "sample": {**SAMPLE, "with_adapter": bool(adapter)},
        "save": {"output_dir": str(tmp_path / out), "every": 5, "formats": ["kohya", "diffusers"]},
    })


@pytest.mark.slow
def test_train_with_adapter_equals_merged_base_and_samples_are_the_lora_on_dev(tmp_path, tiny_dev_dir, sk_images,
                                                                               files):
    base, adapter, merged, adapter_lw = files
    side = train(_cfg(tmp_path, tiny_dev_dir, sk_images, "side", base, adapter), progress=False)
    ref = train(_cfg(tmp_path, tiny_dev_dir, sk_images, "merged", merged), progress=False)
    # the same training (fp32 round-off): the adapter side branch is the merged base
    np.testing.assert_allclose(side["losses"], ref["losses"], rtol=1e-5)
    assert len(side["losses"]) == 10
    for layout in ("", ".diffusers"):
        a = load_lora(tmp_path / "side" / f"lora{layout}.safetensors")
        b = load_lora(tmp_path / "merged" / f"lora{layout}.safetensors")
        assert set(a) == set(b) and len(a) < len(adapter_lw)  # no adapter modules in the files
        for n in a:
            torch.testing.assert_close(lora_delta(a[n]), lora_delta(b[n]), atol=1e-5, rtol=1e-4)
    raw = load_file(str(tmp_path / "side" / "lora.diffusers.safetensors"))
    assert not any(A.ADAPTER in k or "ff" in k for k in raw)
    state = next((tmp_path / "side" / "state").iterdir())
    assert not any(A.ADAPTER in k for f in state.glob("*.safetensors") for k in load_file(str(f)))
    # the grid with the adapter off is the LoRA on the plain base, bit for bit (same sampling code, same cached
    # prompt embeddings: a model with only the saved LoRA, no adapter, sampled by the recipe's LoraSampler)
    data = load_training_data(tiny_dev_dir, "cpu", folders=[DatasetFolder(sk_images)], cache_dir=tmp_path / "cache",
                              options=FolderOptions("a photo", resolution=64, bucket_step=64),
                              prompts=SAMPLE["prompts"])
    model, _ = load_base(str(base), torch.float32, "cpu", gradient_checkpointing=False)
    apply_lora(model, load_lora(tmp_path / "side" / "lora.diffusers.safetensors"), adapter_name="default")
    bar = type("Bar", (), {"image": lambda self, *a: None})()
    spec = GridSpec(SAMPLE["prompts"], SAMPLE["seeds"], data.sample_embeds, data.negative, SAMPLE["steps"], 64, 64)
    plain = LoraSampler(spec, data.components, "cpu", torch.float32, guidance=3.5, cfg=3.5).sample(
        model, 10, tmp_path / "p", bar)
    grid_off = np.asarray(Image.open(tmp_path / "side" / "samples" / "step000010.png"))
    grid_on = np.asarray(Image.open(tmp_path / "side" / "samples" / "step000010-adapter.png"))
    assert np.array_equal(grid_off, np.asarray(Image.open(plain)))
    assert np.abs(grid_on.astype(int) - grid_off.astype(int)).mean() > 1  # the adapter does something
    # dev + adapter = dev2pro, rendered as dev2pro is used: guidance input 1.0 with true CFG, not dev's 3.5
    on_guidance = json.loads(Image.open(tmp_path / "side" / "samples" / "step000010-adapter.png").text["guidance"])
    assert on_guidance["embedded"] == 1.0 and on_guidance["cfg"] > 1.0
    # `dev2pro sample --adapter`: dev + adapter + LoRA renders what the LoRA does on the merged dev2pro
    lora = str(tmp_path / "side" / "lora.diffusers.safetensors")
    opts = dict(loras=[lora], steps=SAMPLE["steps"], size=(64, 64), seeds=[0], guidance=3.5)
    on = run_sample(str(tiny_dev_dir), SAMPLE["prompts"], str(tmp_path / "on"), transformer=str(base), **opts,
                    adapter=f"{adapter}:1.0")[0]
    two = run_sample(str(tiny_dev_dir), SAMPLE["prompts"], str(tmp_path / "two"), transformer=str(merged), **opts)[0]
    assert np.abs(np.asarray(Image.open(on)).astype(int) - np.asarray(Image.open(two)).astype(int)).max() <= 1
    assert "Adapter: adapter.safetensors:1" in Image.open(on).text["parameters"]


def test_adapter_and_inference_base_are_exclusive(tmp_path, tiny_dev_dir, sk_images, files):
    base, adapter, merged, _ = files
    cfg = load_train_config(None, data={"model": {"path": str(tiny_dev_dir), "adapter": str(adapter),
                                                  "inference_base": str(base)},
                                        "data": {"folders": [{"path": str(sk_images)}]},
                                        "save": {"output_dir": str(tmp_path / "x")}})
    with pytest.raises(UserError, match="adapter or model.inference_base, not both"):
        train(cfg, progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_samples_of_a_dedistilled_export_trained_on_directly_use_true_cfg(tmp_path, tiny_dev_dir, sk_images, files):
    """A LoRA trained on a dev2pro de-distillation export itself (no inference_base): its grids render the export
    as it was de-distilled (guidance input 1.0 with true CFG sample.cfg), not at dev's embedded 3.5; on dev, 3.5."""
    from dev2pro.flux.convert import convert

    base = files[0]
    export = convert(base, tmp_path / "d2p.safetensors", extra_metadata={"dev2pro.recipe": "dedistill",
                                                                          "dev2pro.objective": "cfg_teacher"})
    for name, transformer, want in (("d2p", export, {"mode": "embedded", "embedded": 1.0, "cfg": 3.5}),
                                    ("dev", base, {"mode": "embedded", "embedded": 3.5, "cfg": 1.0})):
        cfg = _cfg(tmp_path, tiny_dev_dir, sk_images, name, transformer)
        cfg.train.steps, cfg.save.every = 2, 0
        train(cfg, progress=False)
        grid = next((tmp_path / name / "samples").glob("step*.png"))
        assert json.loads(Image.open(grid).text["guidance"]) == want, name
