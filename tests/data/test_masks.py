"""Loss masks: discovery, the image's transform, the latent grid, the cache, the weighted loss, and a tiny run."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dev2pro.data.buckets import fit_image
from dev2pro.data.cache import cache_latents
from dev2pro.data.folders import DatasetFolder, scan_dataset
from dev2pro.data.loader import CacheEntry, CachedDataset, collate
from dev2pro.data.masks import find_mask, latent_mask, load_mask
from dev2pro.errors import UserError
from dev2pro.flow import flow_loss
from dev2pro.flux.latents import pack, unpack
from dev2pro.objectives import ModelInputs, Noised, flow_objective, predict


def _img(path: Path, size=(96, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size, left_white: bool | None = None) -> Path:
    """A mask: all white (``left_white`` None), or white on the left half only."""
    a = np.full((size[1], size[0]), 255, np.uint8)
    if left_white is not None:
        a[:, size[0] // 2:] = 0
    Image.fromarray(a).save(path)
    return path


def test_masks_are_found_beside_or_in_a_masks_folder_and_never_trained_on(tmp_path, caplog):
    d, masks = tmp_path / "imgs", tmp_path / "masks"
    d.mkdir(), masks.mkdir()
    for i, n in enumerate(("a", "b", "c")):
        _img(d / f"{n}.png", seed=i)
    _mask(d / "a.mask.png", (96, 64))
    _mask(masks / "b.png", (96, 64))
    items = scan_dataset([DatasetFolder(d, caption="x")])
    assert [i.path.name for i in items] == ["a.png", "b.png", "c.png"]  # a.mask.png is no training image
    assert [i.mask.name if i.mask else None for i in items] == ["a.mask.png", None, None]
    with caplog.at_level(logging.WARNING):
        items = scan_dataset([DatasetFolder(d, caption="x", masks=masks)])
    assert [i.mask for i in items] == [d / "a.mask.png", masks / "b.png", None]
    assert "1 image(s) have no mask" in caplog.text and str(d / "c.png") in caplog.text
    assert str(d / "b.png") not in caplog.text
    assert find_mask(d / "c.png", "c", None) is None


def test_a_mask_that_is_not_an_image_is_one_line_naming_the_file(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _img(d / "a.png")
    (d / "a.mask.png").write_text("not a png")
    with pytest.raises(UserError, match=r"mask .*a\.mask\.png is not a readable image.*greyscale PNG") as e:
        scan_dataset([DatasetFolder(d, caption="x")])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="masks folder .*nope does not exist"):
        scan_dataset([DatasetFolder(d, caption="x", masks=tmp_path / "nope")])


def test_the_mask_follows_the_image_crop_and_a_wrong_size_mask_is_resized(tmp_path):
    # a 96x64 image to a 64x64 bucket: scaled to cover (already 64 high), 16 px cut on each side
    right = _mask(tmp_path / "right.png", (96, 64), left_white=True)
    small = _mask(tmp_path / "small.png", (48, 32), left_white=True)  # half the image's size
    m = load_mask(right, (96, 64), (64, 64))
    assert m.shape == (1, 64, 64) and m.dtype == torch.float32
    expected = np.array(fit_image(Image.open(right).convert("L"), (64, 64)), np.float32) / 255
    assert torch.equal(m[0], torch.from_numpy(expected))  # exactly the image's cover + centre crop
    assert m[0, :, :32].min() == 1 and m[0, :, 32:].max() == 0  # white 48 of 96 px -> 32 of the kept 64
    resized = load_mask(small, (96, 64), (64, 64))
    assert resized.shape == (1, 64, 64)
    assert (resized - m).abs().mean() < 0.02 and resized[0, :, :28].min() > 0.99 and resized[0, :, 36:].max() < 0.01


def test_latent_mask_is_the_area_average_over_each_latent_pixel():
    m = torch.zeros(1, 32, 32)
    m[0, :8, :4] = 1  # covers half of latent pixel (0, 0)
    m[0, 8:16, 8:16] = 1  # all of latent pixel (1, 1)
    m[0, 24:, 24:] = 0.25
    lat = latent_mask(m, (4, 4))
    assert lat.shape == (1, 4, 4)
    want = torch.zeros(4, 4)
    want[0, 0], want[1, 1], want[3, 3] = 0.5, 1.0, 0.25
    assert torch.equal(lat[0], want)
    with pytest.raises(ValueError, match="evenly"):
        latent_mask(m, (5, 5))


def _encode(px):  # a stand-in VAE: /8 area average, 16 channels
    return torch.nn.functional.avg_pool2d(px, 8).repeat(1, 6, 1, 1)[:, :16]


def test_masks_are_cached_with_the_latents_keyed_by_their_bytes(tmp_path):
    img = _img(tmp_path / "a.png", (64, 64))
    half = _mask(tmp_path / "half.png", (64, 64), left_white=True)
    white = _mask(tmp_path / "white.png", (40, 40))  # all white, and the wrong size
    cache = tmp_path / "cache"
    none, masked, ones = cache_latents([(img, (64, 64)), (img, (64, 64), half), (img, (64, 64), white)],
                                       _encode, "vae:test", cache)
    assert len({none, masked, ones}) == 3  # the mask's hash is part of the key
    assert set(load_file(str(none))) == {"latents"} and set(load_file(str(ones))) == {"latents"}
    assert torch.equal(load_file(str(ones))["latents"], load_file(str(none))["latents"])
    stored = load_file(str(masked))["mask"]
    assert stored.shape == (1, 8, 8) and stored[0, :, :4].min() == 1 and stored[0, :, 4:].max() == 0
    _mask(half, (64, 64), left_white=None)  # the mask file is edited: another key, recomputed
    (again,) = cache_latents([(img, (64, 64), half)], _encode, "vae:test", cache)
    assert again != masked and "mask" not in load_file(str(again))
    # the dataset hands the mask on; a batch without any mask has no mask key at all
    text = tmp_path / "t.safetensors"
    from safetensors.torch import save_file
    save_file({"prompt_embeds": torch.zeros(3, 4)}, str(text))
    ds = CachedDataset([CacheEntry(none, text), CacheEntry(masked, text)])
    assert "mask" not in collate([ds[0], ds[0]])
    both = collate([ds[0], ds[1]])
    assert both["mask"].shape == (2, 1, 8, 8) and both["mask"][0].min() == 1 and torch.equal(both["mask"][1],
                                                                                               stored)
    assert "weights" not in both


def test_weighted_loss_is_the_mean_over_the_white_part():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    err = (pred - target) ** 2
    w = torch.zeros(2, 16, 1)
    w[0, :4], w[1, 10:] = 1, 0.5
    want = (err[0, :4].mean() + err[1, 10:].mean()) / 2
    assert flow_loss(pred, target, token_weights=w).item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(flow_loss(pred, target), err.mean())  # no weights: the plain mean, bitwise
    both = flow_loss(pred, target, torch.tensor([1.0, 3.0]), w)
    assert both.item() == pytest.approx(((err[0, :4].mean() + 3 * err[1, 10:].mean()) / 2).item(), rel=1e-6)


def test_half_mask_zeroes_the_gradient_on_the_masked_tokens(tiny_dev_dir):
    from dev2pro.flux.checkpoint import load_transformer

    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    model.requires_grad_(True)  # loaded frozen; the prediction must be part of a graph
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    text = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, :, 4:] = 0  # sample 0: right half masked out; sample 1: whole
    batch = Noised(x0, noise, torch.tensor([0.3, 0.8]), text["prompt_embeds"], text["pooled"], torch.ones(2),
                   mask=mask)
    pred = predict(model, ModelInputs.of(batch), 1.0, "cpu", torch.float32)
    loss = flow_loss(pred, batch.target, token_weights=batch.token_weights)
    (grad,) = torch.autograd.grad(loss, pred)
    grid = unpack(grad, 8, 8)  # back on the latent grid (B, C, h, w)
    assert torch.count_nonzero(grid[0, :, :, 4:]) == 0  # nothing learnt from the masked half
    assert torch.count_nonzero(grid[0, :, :, :4]) == grid[0, :, :, :4].numel()
    assert torch.count_nonzero(grid[1]) == grid[1].numel()
    err = (pred.detach() - batch.target) ** 2
    kept = unpack(err, 8, 8)[0, :, :, :4].mean()
    assert loss.item() == pytest.approx(((kept + err[1].mean()) / 2).item(), rel=1e-6)
    same, _ = flow_objective(model, batch, 1.0, "cpu", torch.float32)  # the one call site applies it
    assert same.item() == pytest.approx(loss.item(), rel=1e-6)
    plain = Noised(x0, noise, batch.sigmas, batch.prompt_embeds, batch.pooled, batch.w)
    assert flow_objective(model, plain, 1.0, "cpu", torch.float32)[0].item() != pytest.approx(loss.item())
    assert torch.equal(pack(mask.expand(-1, 16, -1, -1)), batch.token_weights)


def _train_cfg(tmp_path, model_dir, images, out, steps=4, data="batch_size = 2"):
    from dev2pro.schemas import load_train_config
    from tiny_run import lora_run_toml

    return load_train_config(lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=5, data=data,
                                           cache=f"cache-{out}"))


def test_all_white_masks_train_bitwise_as_no_masks_and_a_half_mask_does_not(tmp_path, tiny_dev_dir, sk_images,
                                                                             capsys):
    from dev2pro.recipes.train_lora import train
    from tiny_run import same_tensors

    white, half = tmp_path / "white", tmp_path / "half"
    shutil.copytree(sk_images, white)
    shutil.copytree(sk_images, half)
    for p in sorted(sk_images.glob("*.*")):
        if p.suffix != ".txt":
            with Image.open(p) as im:
                size = im.size
            _mask(white / f"{p.stem}.mask.png", (size[0] // 3, size[1] // 3))  # the wrong size: resized
            _mask(half / f"{p.stem}.mask.png", size, left_white=True)
    plain = train(_train_cfg(tmp_path, tiny_dev_dir, sk_images, "plain"), progress=False)
    ones = train(_train_cfg(tmp_path, tiny_dev_dir, white, "ones"), progress=False)
    capsys.readouterr()
    halved = train(_train_cfg(tmp_path, tiny_dev_dir, half, "halved"), progress=False)
    assert "; 5 with a loss mask\n" in capsys.readouterr().out  # the start-up's data line says they were found
    assert ones["losses"] == plain["losses"]  # bitwise
    assert same_tensors(tmp_path / "ones" / "lora.safetensors", tmp_path / "plain" / "lora.safetensors")
    assert halved["losses"][0] != plain["losses"][0]
    cached = [load_file(str(f)) for f in (tmp_path / "cache-halved" / "latents").glob("*.safetensors")]
    assert len(cached) == 5 and all(c["mask"].shape == (1, 8, 8) for c in cached)


def test_dev2pro_cache_shards_say_that_masks_are_not_stored(tmp_path, caplog):
    from dev2pro.data.shards import collect_sources

    d = tmp_path / "imgs"
    d.mkdir()
    _img(d / "a.png"), _img(d / "b.png", seed=1)
    _mask(d / "a.mask.png", (96, 64), left_white=True)
    with caplog.at_level(logging.WARNING):
        good, _ = collect_sources([d], default_caption="x")
    assert [s.path for s, _ in good] == [str(d / "a.png"), str(d / "b.png")]  # the mask is no sample
    assert "1 loss mask(s) are not stored in shards" in caplog.text and "a.mask.png" in caplog.text
