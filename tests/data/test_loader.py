"""Bucket batches, exact resume, caption dropout, and the cached dataset end to end with a DataLoader."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from dev2pro.data.cache import cache_text
from dev2pro.data.loader import BucketBatchSampler, CacheEntry, CachedDataset, collate
from dev2pro.errors import UserError

BUCKETS = ["a"] * 7 + ["b"] * 5 + ["c"] * 2 + ["a"] * 3  # interleaved on purpose


def take(sampler, n):
    """The next ``n`` batches, crossing epochs the way a training loop does (a fresh iter per epoch)."""
    out = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_batches_share_a_bucket_and_cover_each_index_once_per_epoch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0)
    assert len(sampler) == 4 + 2 + 1  # a: 10 -> 4, b: 5 -> 2, c: 2 -> 1
    epoch = list(sampler)
    assert len(epoch) == len(sampler)
    assert all(len({BUCKETS[i] for i in batch}) == 1 and 1 <= len(batch) <= 3 for batch in epoch)
    assert sorted(itertools.chain(*epoch)) == list(range(len(BUCKETS)))
    assert list(sampler) != epoch  # next epoch is reshuffled
    assert BucketBatchSampler(BUCKETS, 3, seed=0).epoch_batches(0) == epoch  # deterministic from (seed, epoch)
    assert BucketBatchSampler(BUCKETS, 3, seed=1).epoch_batches(0) != epoch


def test_drop_last_keeps_only_full_batches():
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0, drop_last=True)
    assert len(sampler) == 3 + 1
    assert all(len(b) == 3 for b in sampler.epoch_batches(5))
    with pytest.raises(UserError, match="largest bucket has 2 image"):
        BucketBatchSampler(["x", "x", "y"], batch_size=3, seed=0, drop_last=True)


@pytest.mark.parametrize("stop_after", [1, 6, 7, 7 + 3, 7 * 2])
def test_resume_continues_with_exactly_the_same_batches(stop_after):
    uninterrupted = take(BucketBatchSampler(BUCKETS, 3, seed=42), 30)
    first = BucketBatchSampler(BUCKETS, 3, seed=42)
    head = take(first, stop_after)
    state = first.state_dict()
    resumed = BucketBatchSampler(BUCKETS, 3, seed=0)  # seed comes from the saved state
    resumed.load_state_dict(state)
    assert head + take(resumed, 30 - stop_after) == uninterrupted


def test_leaving_an_epoch_after_its_last_batch_does_not_give_an_empty_epoch():
    sampler = BucketBatchSampler(BUCKETS, 3, seed=0)
    take(sampler, len(sampler))  # breaks out right after the last batch, generator never finishes
    assert list(sampler) == sampler.epoch_batches(1)


def test_resume_from_consumed_count_with_prefetching_workers_semantics():
    uninterrupted = take(BucketBatchSampler(BUCKETS, 3, seed=3), 20)
    sampler = BucketBatchSampler(BUCKETS, 3, seed=3)
    take(sampler, 12)  # the sampler ran ahead of the loop, which only trained on 9
    resumed = BucketBatchSampler(BUCKETS, 3, seed=3)
    resumed.load_state_dict(sampler.state_dict(batches_done=9))
    assert take(resumed, 11) == uninterrupted[9:]


def test_resume_refuses_a_changed_dataset():
    state = BucketBatchSampler(BUCKETS, 3, seed=0).state_dict()
    with pytest.raises(UserError, match="dataset changed since the checkpoint"):
        BucketBatchSampler(BUCKETS + ["a"], 3, seed=0).load_state_dict(state)


def test_ranks_split_the_epoch_evenly():
    ranks = [BucketBatchSampler(BUCKETS, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    a, b = (r.epoch_batches(0) for r in ranks)
    assert not set(itertools.chain(*a)) & set(itertools.chain(*b))


def item(value, caption):
    return {
        "latents": torch.full((16, 4, 6), value),
        "prompt_embeds": torch.full((5, 8), value),
        "pooled": torch.full((3,), value),
        "caption": caption,
    }


def test_collate_shapes():
    out = collate([item(1.0, "one"), item(2.0, "two")])
    assert out["latents"].shape == (2, 16, 4, 6)
    assert out["prompt_embeds"].shape == (2, 5, 8) and out["pooled"].shape == (2, 3)
    assert out["captions"] == ["one", "two"] and out["pooled"][1].eq(2.0).all()


def test_cached_dataset_with_dataloader(tmp_path):
    from safetensors.torch import save_file

    def encode(captions):
        n = torch.tensor([float(len(c)) for c in captions])
        return {"prompt_embeds": n[:, None, None].expand(-1, 5, 8).clone(), "pooled": n[:, None].repeat(1, 3)}

    captions = ["a cat", "a tall dog", "sky"]
    text = cache_text(captions + [""], encode, "enc", {}, tmp_path)
    entries = []
    for i, (caption, (h, w)) in enumerate(zip(captions, [(4, 6), (6, 4), (4, 6)])):
        path = tmp_path / f"lat{i}.safetensors"
        save_file({"latents": torch.full((16, h, w), float(i))}, path)
        entries.append(CacheEntry(path, text[caption], caption, repeats=2 if i == 0 else 1))
    ds = CachedDataset(entries)
    assert len(ds) == 4 and ds.buckets() == [(4, 6), (4, 6), (6, 4), (4, 6)]
    assert ds[2]["caption"] == "a tall dog" and ds[2]["pooled"].tolist() == [10.0] * 3

    sampler = BucketBatchSampler(ds.buckets(), batch_size=2, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = []
    for batch in loader:
        assert batch["latents"].shape[1:] in {(16, 4, 6), (16, 6, 4)}
        assert batch["prompt_embeds"].shape[1:] == (5, 8)
        seen += batch["captions"]
    assert sorted(seen) == sorted(["a cat", "a cat", "a tall dog", "sky"])
    assert sampler.state_dict()["epoch"] == 1


def test_folder_to_training_batch_pipeline(tmp_path):
    """scan -> bucket -> cache latents (real encode_images on a tiny Flux-shaped VAE) and text -> batches."""
    import shutil
    from functools import partial
    from pathlib import Path

    from diffusers import AutoencoderKL
    from skimage import data as skdata

    from dev2pro.data.buckets import assign_bucket, make_buckets
    from dev2pro.data.cache import cache_latents
    from dev2pro.data.folders import DatasetFolder, scan_dataset
    from dev2pro.flux.latents import encode_images, pack

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png", "chelsea.png"):
        shutil.copy(Path(skdata.data_dir) / name, folder / name)
    items = scan_dataset([DatasetFolder(folder, repeats=2)], default_caption="a picture", trigger="ohwx")
    buckets = make_buckets(64 * 64)
    sizes = [assign_bucket(*item.size, buckets) for item in items]
    assert sizes == [(64, 64), (64, 64), (80, 48), (80, 48), (80, 48)]  # astronaut, camera, chelsea, coffee, rocket

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    latent_paths = cache_latents(
        [(i.path, s) for i, s in zip(items, sizes)], partial(encode_images, vae), "tiny-vae", tmp_path / "c", 2
    )

    def encode_text(captions):
        return {"prompt_embeds": torch.randn(len(captions), 7, 8), "pooled": torch.randn(len(captions), 3)}

    text = cache_text([i.caption for i in items] + [""], encode_text, "tiny-te", {"max_length": 7}, tmp_path / "c")
    ds = CachedDataset([CacheEntry(lp, text[i.caption], i.caption, i.repeats) for lp, i in zip(latent_paths, items)])
    assert len(ds) == 10
    sampler = BucketBatchSampler(ds.buckets(), batch_size=3, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["captions"]) for b in batches) == 10
    for b in batches:
        _, c, h, w = b["latents"].shape
        assert c == 16 and (h, w) in {(8, 8), (6, 10)}
        assert pack(b["latents"]).shape[1:] == (h // 2 * w // 2, 64)
        assert all(cap in ("", "ohwx, a picture") for cap in b["captions"])


def test_a_restart_on_a_changed_dataset_begins_a_fresh_epoch_and_resumes_exactly_after():
    """--resume-changed-data: the saved run was at epoch 1, batch 2 (after 9 batches of 7 per epoch); on a dataset
    with one more item it starts epoch 2 of the new dataset; a state saved later resumes that order exactly."""
    old = BucketBatchSampler(BUCKETS, 3, seed=3)
    saved = old.state_dict(batches_done=len(old) + 2)
    assert saved["batches"] == len(old) + 2 and (saved["epoch"], saved["position"]) == (1, 2)
    grown = BUCKETS + ["a"]
    new = BucketBatchSampler(grown, 3, seed=3)
    new.restart(saved, saved["batches"])
    assert take(new, len(new)) == new.epoch_batches(2)
    continued = BucketBatchSampler(grown, 3, seed=3)
    continued.restart(saved, saved["batches"])
    take(continued, 4)
    later = continued.state_dict(batches_done=saved["batches"] + 4)
    assert (later["epoch"], later["position"], later["origin"]) == (2, 4, [saved["batches"], 2])
    again = BucketBatchSampler(grown, 3, seed=3)
    again.load_state_dict(later)
    assert take(again, 10) == take(continued, 10)
