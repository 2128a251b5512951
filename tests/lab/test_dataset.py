"""The demo's data on disk: captioned image folders -> shards whose latents decode back to the images."""

import numpy as np
import pytest
import torch

from dev2pro.data.shards import ShardDataset
from dev2pro.lab import dataset
from dev2pro.lab.world import concept_caption, decode, few_shot, load_digits_world, styled


@pytest.fixture(scope="module")
def world():
    return load_digits_world(seed=0)


def test_encode_pixels_is_the_codec_on_block_means():
    rgb = torch.rand(2, 3, 8, 8)
    pixels = rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3) * 2 - 1  # (2, 3, 64, 64) in [-1, 1]
    z = dataset.encode_pixels(pixels)
    assert z.shape == (2, 16, 8, 8)
    np.testing.assert_allclose(decode(z), rgb.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _fake_text(captions):
    """Stands in for CLIP/T5: the caption's length as a number, so rows can be checked."""
    n = torch.tensor([float(len(c)) for c in captions])
    return {"prompt_embeds": n[:, None, None].expand(-1, dataset.T5_LEN, 4).clone(), "pooled": n[:, None] * 1.0}


def test_folder_to_shards_round_trip(tmp_path, world):
    images, labels = few_shot(world, per_class=1, seed=3)
    folder = dataset.write_folder(tmp_path / "concept", images, labels, concept_caption, styled)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["00000.png", "00000.txt"]
    assert (folder / "00003.txt").read_text() == concept_caption(int(labels[3]))
    index = dataset.write_demo_shards(folder, tmp_path / "shards", _fake_text)
    data = ShardDataset(index)
    assert len(data) == 10
    want = np.round(styled(images) * 255) / 255  # the PNGs hold 8-bit pixels
    captions = [concept_caption(int(y)) for y in labels]  # one shot per class: unique
    for i in range(len(data)):
        item = data[i]
        k = captions.index(item["caption"])
        assert item["latents"].shape == (16, 8, 8)
        np.testing.assert_allclose(decode(item["latents"][None])[0], want[k], atol=1e-5)
        assert float(item["pooled"]) == len(item["caption"])
    assert data.index["settings"] == {"codec": dataset.CODEC, "t5_max_length": dataset.T5_LEN}


def test_prompts_file(tmp_path):
    path = dataset.write_prompts(_fake_text, ["ab", "abcd"], tmp_path / "prompts.safetensors")
    t = dataset.load_prompts(path)
    assert t["prompt_embeds"].shape == (2, dataset.T5_LEN, 4) and t["pooled"].tolist() == [[2.0], [4.0]]
    assert t["empty_embeds"].shape == (dataset.T5_LEN, 4) and t["empty_pooled"].tolist() == [0.0]
