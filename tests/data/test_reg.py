"""Regularization (prior-preservation) images: role = "reg" folders, kohya's reg_data_dir, their share of an
epoch, their loss weight, and reg_weight = 0 as a run without them."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.data.folders import DatasetFolder, scan_dataset
from dev2pro.data.loader import BucketBatchSampler, collate
from dev2pro.data.mixing import epoch_lines, role_counts
from dev2pro.data.prepare import FolderOptions, load_training_data


def _images(folder: Path, n: int, seed: int, size=(64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    return folder


@pytest.fixture
def reg_dir(tmp_path):
    """A kohya reg_data_dir: 2_person (2 images, 2 repeats) and 1_woman (1 image): 5 reg samples per epoch."""
    _images(tmp_path / "reg" / "2_person", 2, seed=1)
    _images(tmp_path / "reg" / "1_woman", 1, seed=2)
    return tmp_path / "reg"


def test_a_kohya_reg_data_dir_is_a_reg_folder_with_class_captions(reg_dir, sk_images):
    items = scan_dataset([DatasetFolder(sk_images, caption="ohwx"), DatasetFolder(reg_dir, role="reg")])
    assert [(i.role, i.repeats, i.caption) for i in items[-3:]] == [("reg", 1, "woman"), ("reg", 2, "person"),
                                                                    ("reg", 2, "person")]  # folders sorted
    assert {i.role for i in items[:-3]} == {"train"} and len(items) == 8


def test_reg_share_of_an_epoch_and_its_loss_weight(tmp_path, tiny_dev_dir, sk_images, reg_dir):
    folders = [DatasetFolder(sk_images, repeats=2), DatasetFolder(reg_dir, role="reg")]
    opts = FolderOptions("a photo", resolution=64, bucket_step=64, reg_weight=0.25)
    data = load_training_data(tiny_dev_dir, "cpu", folders=folders, cache_dir=tmp_path / "cache", options=opts)
    ds = data.dataset
    assert role_counts(ds.entries) == Counter(train=10, reg=5)
    sampler = BucketBatchSampler(ds.buckets(), 2, seed=0)
    for epoch in (0, 1):  # counted over what the sampler hands out
        seen = Counter(ds.entries[ds.index[i]].role for batch in sampler.epoch_batches(epoch) for i in batch)
        assert seen == Counter(train=10, reg=5)
    reg_i = next(i for i in range(len(ds)) if ds.entries[ds.index[i]].role == "reg")
    train_i = next(i for i in range(len(ds)) if ds.entries[ds.index[i]].role == "train")
    assert ds[reg_i]["weight"] == 0.25 and "weight" not in ds[train_i]
    assert ds[reg_i]["caption"] in ("person", "woman")
    batch = collate([ds[train_i], ds[reg_i]])
    assert torch.equal(batch["weights"], torch.tensor([1.0, 0.25]))
    assert "weights" not in collate([ds[train_i], ds[train_i]])
    assert any("reg: 5 reg samples per epoch of 15 (33%), loss weight 0.25" in line for line in epoch_lines(ds.entries))
    dropped = load_training_data(tiny_dev_dir, "cpu", folders=folders, cache_dir=tmp_path / "cache",
                                 options=FolderOptions("a photo", resolution=64, bucket_step=64, reg_weight=0))
    assert len(dropped.dataset) == 10 and {e.role for e in dropped.dataset.entries} == {"train"}
    assert not any("reg" in line for line in epoch_lines(dropped.dataset.entries))


def _cfg(tmp_path, model_dir, images, out, reg=None, reg_weight=1.0):
    from dev2pro.schemas import load_train_config
    from tiny_run import lora_run_toml

    extra = f'[[data.folders]]\npath = "{reg}"\nrole = "reg"\n' if reg else ""
    return load_train_config(lora_run_toml(tmp_path, model_dir, images, out, steps=3, seed=7, extra=extra,
                                           data=f"batch_size = 2\nreg_weight = {reg_weight}"))


def test_reg_weight_zero_is_the_run_without_reg_folders(tmp_path, tiny_dev_dir, sk_images, reg_dir, capsys):
    from dev2pro.recipes.train_lora import train
    from tiny_run import same_tensors

    without = train(_cfg(tmp_path, tiny_dev_dir, sk_images, "without"), progress=False)
    zero = train(_cfg(tmp_path, tiny_dev_dir, sk_images, "zero", reg_dir, 0.0), progress=False)
    assert zero["losses"] == without["losses"]  # bitwise
    assert same_tensors(tmp_path / "zero" / "lora.safetensors", tmp_path / "without" / "lora.safetensors")
    capsys.readouterr()
    mixed = train(_cfg(tmp_path, tiny_dev_dir, sk_images, "mixed", reg_dir, 0.5), progress=False)
    out = capsys.readouterr().out
    assert "reg: 5 reg samples per epoch of 10 (50%), loss weight 0.5 (data.reg_weight)" in out
    assert mixed["losses"] != without["losses"]
