"""`dev2pro cache`: folders and webdataset tars -> identical sharded samples; corrupt images skipped; resumable."""

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dev2pro.data.shards import ShardDataset
from dev2pro.recipes.cache import cache

SK_IMAGES = ["astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import skimage

    src = Path(skimage.__file__).parent / "data"
    d = tmp_path_factory.mktemp("imgs")
    for name in SK_IMAGES:
        shutil.copy(src / name, d / name)
        (d / name).with_suffix(".txt").write_text(f"a photo of {Path(name).stem}")
    return d


def _tar(folder, path, corrupt=False):
    with tarfile.open(path, "w") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=p.name)
        if corrupt:
            broken = path.parent / "broken.png"
            broken.write_bytes(b"\x89PNG not really an image")
            tar.add(broken, arcname="broken.png")
    return path


def _samples(index):
    ds = ShardDataset(index)
    return [ds[i] for i in range(len(ds))]


def test_folder_and_tar_give_identical_samples(tmp_path, tiny_dev_dir, folder):
    kw = dict(model_dir=str(tiny_dev_dir), per_shard=2, resolution=64, bucket_step=64, t5_max_length=16)
    a = cache([str(folder)], out_dir=str(tmp_path / "from-folder"), **kw)
    tar = _tar(folder, tmp_path / "data-000.tar", corrupt=True)
    b = cache([str(tar)], out_dir=str(tmp_path / "from-tar"), **kw)
    assert a["samples"] == b["samples"] == 5 and a["skipped"] == []
    assert len(b["skipped"]) == 1 and "::broken.png (unreadable: " in b["skipped"][0]  # listed, the rest kept
    assert len(list((tmp_path / "from-tar").glob("shard-*.safetensors"))) == 3  # 2 + 2 + 1
    sa, sb = _samples(a["index"]), _samples(b["index"])
    for x, y in zip(sa, sb):
        assert x["caption"] == y["caption"] and set(x) == set(y)
        assert all(torch.equal(x[k], y[k]) for k in x if k != "caption")
    assert sa[0]["latents"].shape == (16, 8, 8) and sa[0]["caption"] == "a photo of astronaut"
    ds = ShardDataset(a["index"])
    assert ds.buckets() == [(8, 8)] * 5 and set(ds.empty_text()) == {"prompt_embeds", "pooled"}


def test_rerun_skips_complete_shards(tmp_path, tiny_dev_dir, folder):
    kw = dict(model_dir=str(tiny_dev_dir), per_shard=2, resolution=64, bucket_step=64, t5_max_length=16)
    out = tmp_path / "out"
    cache([str(folder)], out_dir=str(out), **kw)
    shard1 = out / "shard-00001.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    shard1.write_bytes(shard1.read_bytes()[:100])  # a shard cut short by a kill
    cache([str(folder)], out_dir=str(out), **kw)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]  # skipped
    assert after["shard-00002.safetensors"] == before["shard-00002.safetensors"]
    assert len(ShardDataset(out / "index.json")) == 5 and ShardDataset(out / "index.json")[2]["latents"].numel()


def test_dedistill_trains_from_shards(tmp_path, tiny_dev_dir, folder):
    from dev2pro.recipes.dedistill import dedistill
    from dev2pro.schemas import load_dedistill_config

    idx = cache([str(folder)], str(tiny_dev_dir), str(tmp_path / "shards"), per_shard=2, resolution=64,
                t5_max_length=16)["index"]
    cfg = load_dedistill_config(None, [f'model.path="{tiny_dev_dir}"', f'data.shards="{idx}"',
                                       f'save.output_dir="{tmp_path / "run"}"', "train.steps=3",
                                       'train.mixed_precision="no"', "model.gradient_checkpointing=false",
                                       "model.t5_max_length=16", "sample.every=3", 'sample.prompts=["a cat"]',
                                       "sample.seeds=[0, 1]", "sample.steps=2", "sample.width=32",
                                       "sample.height=32"])
    summary = dedistill(cfg, progress=False)
    assert len(summary["losses"]) == 3 and (tmp_path / "run" / "dev2pro.safetensors").exists()
    # shards carry no sample-prompt embeddings: the text encoders of model.path were loaded for them
    from PIL import Image

    from dev2pro.sampling import LABEL_FONT_SIZE

    band = LABEL_FONT_SIZE + 6  # labelled grid: title and seed bands, a prompt band over the one row
    for tag in ("g1", "cfg"):
        assert Image.open(tmp_path / "run" / "samples" / f"step000003-{tag}.png").size == (64, 32 + 3 * band)


def test_tar_is_opened_once_however_many_members(tmp_path, folder, monkeypatch):
    """Reading N members must not reopen (and rescan) the tar per member: that was O(N^2) in tar headers."""
    import io

    from PIL import Image

    from dev2pro.data import shards

    n = 40
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32 + i, 32), (i * 6, 100, 200)).save(buf, format="PNG")
            for name, data in ((f"s{i:03d}.png", buf.getvalue()), (f"s{i:03d}.txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    opens = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    samples, bad = shards.collect_sources([path])
    assert len(samples) == n and bad == [] and samples[7][0].caption == "sample 7" and samples[7][1] == (39, 32)

    def encode_latents(px):  # (B, 3, H, W) -> (B, 16, H/8, W/8): the pixel mean, enough to tell images apart
        return px.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 16, px.shape[2] // 8, px.shape[3] // 8)

    def encode_text(captions):
        return {"prompt_embeds": torch.zeros(len(captions), 4, 8), "pooled": torch.zeros(len(captions), 8)}

    for _ in range(2):  # the second pass fingerprints every shard (reads every image again) and skips them
        shards.write_shards(samples, tmp_path / "out", 16, [(32, 32)], encode_latents, encode_text, {})
    assert len(opens) == 1, f"{len(opens)} tarfile.open calls for one tar of {n} images"
    ds = ShardDataset(tmp_path / "out" / "index.json")
    means = [ds[i]["latents"][0, 0, 0].item() for i in range(n)]
    assert len(set(means)) == n  # each sample got its own member's bytes


def test_compressed_tar_is_refused_with_a_clear_error(tmp_path, folder):
    from dev2pro.data.shards import collect_sources
    from dev2pro.errors import UserError

    path = tmp_path / "data.tar"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "coffee.png", arcname="coffee.png")
    with pytest.raises(UserError, match="uncompressed tar"):
        collect_sources([path])
