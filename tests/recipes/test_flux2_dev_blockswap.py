"""Block swap over FLUX.2's block lists (2 double + 4 single blocks in the tiny dev): `train` and adapter
`dedistill` with ``model.blocks_to_swap`` on the CPU compute what they compute without it, bit for bit."""

import pytest

from dev2pro.errors import UserError
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config
from tiny_run import model_and_data, same_tensors

from .test_dedistill import _toml


def _train(tmp_path, model_dir, images, out, swap):
    toml = tmp_path / f"{out}.toml"
    toml.write_text(model_and_data(model_dir, images, tmp_path / "cache", checkpointing=True,
                                   model=f'dtype = "fp32"\nblocks_to_swap = {swap}') + f"""
[lora]
rank = 4
[train]
steps = 3
lr = 1e-2
seed = 1
[save]
output_dir = "{tmp_path / out}"
formats = ["diffusers"]
""")
    return train(load_train_config(toml), progress=False)


def _swapped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("block swap:")]


def test_lora_training_with_swapped_flux2_blocks_is_unchanged(tmp_path, flux2_dev_dir, sk_images, caplog):
    caplog.set_level("INFO", logger="dev2pro")
    plain = _train(tmp_path, flux2_dev_dir, sk_images, "plain", 0)
    assert _swapped(caplog) == []
    swapped = _train(tmp_path, flux2_dev_dir, sk_images, "swapped", 5)  # 2 double + 3 of the 4 single blocks
    assert len(_swapped(caplog)) == 1 and "5 blocks" in _swapped(caplog)[0]  # the swap was in place
    assert swapped["losses"] == plain["losses"] and len(plain["losses"]) == 3
    assert same_tensors(tmp_path / "plain" / "lora.diffusers.safetensors",
                        tmp_path / "swapped" / "lora.diffusers.safetensors")


def test_adapter_dedistill_with_swapped_blocks_is_unchanged(tmp_path, flux2_dev_dir, sk_images, caplog):
    caplog.set_level("INFO", logger="dev2pro")
    runs = {}
    for n in (0, 4):
        path = _toml(tmp_path, flux2_dev_dir, sk_images, out=f"swap{n}", steps=3, objective="cfg_teacher",
                     checkpointing=True)
        cfg = load_dedistill_config(path, ["train.adapter_rank=4", f"model.blocks_to_swap={n}"])
        runs[n] = dedistill(cfg, progress=False)
    assert len(_swapped(caplog)) == 1 and "4 blocks" in _swapped(caplog)[0]
    assert runs[4]["losses"] == runs[0]["losses"]
    assert same_tensors(tmp_path / "swap0" / "dev2pro-adapter.safetensors",
                        tmp_path / "swap4" / "dev2pro-adapter.safetensors")


def test_swap_needs_a_frozen_base_and_a_valid_count(tmp_path, flux2_dev_dir, sk_images):
    path = _toml(tmp_path, flux2_dev_dir, sk_images, out="bad", steps=1)
    with pytest.raises(UserError, match="only a frozen base can be swapped"):
        load_dedistill_config(path, ["model.blocks_to_swap=2"])
    cfg = load_dedistill_config(path, ["train.adapter_rank=4", "model.blocks_to_swap=7"])
    with pytest.raises(UserError, match=r"this model has 6 blocks; use 0\.\.6"):
        dedistill(cfg, progress=False)
