"""Latent and text caches: hits are not recomputed, any changed input misses, corrupt files are rebuilt."""

import shutil
from pathlib import Path

import pytest
import torch
from skimage import data as skdata

from dev2pro.data.buckets import load_and_fit
from dev2pro.data.cache import cache_latents, cache_text, load_cached

SK = Path(skdata.data_dir)


class CountingVAE:
    """Stands in for a VAE: /8 average pool to 16 channels; records the batch sizes it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, pixels):
        self.calls.append(tuple(pixels.shape))
        z = torch.nn.functional.avg_pool2d(pixels, 8)  # (B, 3, h/8, w/8)
        return z.repeat(1, 6, 1, 1)[:, :16]  # (B, 16, h/8, w/8)

    @property
    def images(self):
        return sum(c[0] for c in self.calls)


class CountingText:
    def __init__(self, seq=4, dim=8):
        self.seen, self.seq, self.dim = [], seq, dim

    def __call__(self, captions):
        self.seen.extend(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {
            "prompt_embeds": lengths[:, None, None].expand(-1, self.seq, self.dim).clone(),  # (B, seq, D)
            "pooled": lengths[:, None].expand(-1, 3).clone(),  # (B, 3)
        }


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return [Path(shutil.copy(SK / n, d / n)) for n in ("astronaut.png", "coffee.png", "rocket.jpg", "camera.png")]


def test_latents_computed_once_then_reused(images, tmp_path):
    items = [(images[0], (64, 64)), (images[1], (96, 64)), (images[2], (96, 64)), (images[3], (64, 64))]
    vae = CountingVAE()
    paths = cache_latents(items, vae, "vae-a", tmp_path / "cache", batch_size=2)
    assert vae.images == 4 and len(set(paths)) == 4
    assert sorted(vae.calls) == [(2, 3, 64, 64), (2, 3, 64, 96)]  # batches never mix buckets
    z = load_cached(paths[1])["latents"]
    assert z.shape == (16, 8, 12)
    torch.testing.assert_close(z, vae(load_and_fit(images[1], (96, 64))[None])[0])

    again = CountingVAE()
    assert cache_latents(items, again, "vae-a", tmp_path / "cache", batch_size=2) == paths
    assert again.calls == []


def test_latent_key_follows_content_not_name(images, tmp_path):
    cache = tmp_path / "cache"
    base = cache_latents([(images[0], (64, 64))], CountingVAE(), "vae-a", cache)[0]
    renamed = images[0].with_name("renamed.png")
    shutil.copy(images[0], renamed)
    vae = CountingVAE()
    assert cache_latents([(renamed, (64, 64))], vae, "vae-a", cache) == [base] and vae.images == 0

    changes = {
        "bucket": lambda: cache_latents([(images[0], (64, 48))], vae, "vae-a", cache),
        "encoder": lambda: cache_latents([(images[0], (64, 64))], vae, "vae-b", cache),
        "settings": lambda: cache_latents([(images[0], (64, 64))], vae, "vae-a", cache, settings={"dtype": "bf16"}),
    }
    seen = {base}
    for name, run in changes.items():
        before = vae.images
        (path,) = run()
        assert path not in seen and vae.images == before + 1, name
        seen.add(path)
    renamed.write_bytes(images[1].read_bytes())  # same name, new content
    (path,) = cache_latents([(renamed, (64, 64))], vae, "vae-a", cache)
    assert path not in seen


def test_duplicate_images_encoded_once(images, tmp_path):
    vae = CountingVAE()
    paths = cache_latents([(images[0], (64, 64))] * 3, vae, "vae-a", tmp_path / "cache")
    assert vae.images == 1 and len(set(paths)) == 1 and len(paths) == 3


def test_corrupt_or_truncated_cache_file_is_recomputed(images, tmp_path, caplog):
    cache = tmp_path / "cache"
    items = [(images[0], (64, 64)), (images[1], (64, 64))]
    paths = cache_latents(items, CountingVAE(), "vae-a", cache)
    good = load_cached(paths[0])["latents"]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    paths[1].write_bytes(b"garbage")
    vae = CountingVAE()
    assert cache_latents(items, vae, "vae-a", cache) == paths
    assert vae.images == 2 and "recomputing" in caplog.text
    torch.testing.assert_close(load_cached(paths[0])["latents"], good)
    assert not list(cache.glob("latents/.*.tmp"))  # no temp files left behind


def test_encode_fn_batch_mismatch_is_reported(images, tmp_path):
    with pytest.raises(ValueError, match="returned 1 latents for 2 images"):
        cache_latents([(images[0], (64, 64)), (images[3], (64, 64))], lambda x: x[:1], "bad", tmp_path)


def test_text_cache_hits_misses_and_content(tmp_path):
    captions = ["a cat", "a dog", "a cat", ""]
    enc = CountingText()
    paths = cache_text(captions, enc, "t5+clip", {"max_length": 512}, tmp_path, batch_size=2)
    assert enc.seen == ["a cat", "a dog", ""] and set(paths) == {"a cat", "a dog", ""}
    cat = load_cached(paths["a cat"])
    assert cat["prompt_embeds"].shape == (4, 8) and cat["pooled"].tolist() == [5.0, 5.0, 5.0]

    enc2 = CountingText()
    more = cache_text(captions + ["a bird"], enc2, "t5+clip", {"max_length": 512}, tmp_path)
    assert enc2.seen == ["a bird"] and {c: more[c] for c in paths} == paths

    enc3 = CountingText()
    other = cache_text(["a cat"], enc3, "t5+clip", {"max_length": 256}, tmp_path)
    assert enc3.seen == ["a cat"] and other["a cat"] != paths["a cat"]
    enc4 = CountingText()
    assert cache_text(["a cat"], enc4, "other-t5", {"max_length": 512}, tmp_path)["a cat"] != paths["a cat"]
    assert enc4.seen == ["a cat"]


def test_corrupt_text_cache_is_recomputed(tmp_path):
    paths = cache_text(["hello"], CountingText(), "enc", {}, tmp_path)
    paths["hello"].write_bytes(b"\x00" * 10)
    enc = CountingText()
    assert cache_text(["hello"], enc, "enc", {}, tmp_path) == paths and enc.seen == ["hello"]
    assert load_cached(paths["hello"])["pooled"].tolist() == [5.0, 5.0, 5.0]
