import numpy as np
import pytest
import torch

from dev2pro.lab import world as w


@pytest.fixture(scope="module")
def world():
    return w.load_digits_world()


def test_split_sizes_ranges_and_determinism(world):
    assert world.train_images.shape == (1497, 8, 8) and world.holdout_images.shape == (300, 8, 8)
    assert world.train_images.dtype == np.float32 and world.train_labels.dtype == np.int64
    assert world.train_images.min() == 0.0 and world.train_images.max() == 1.0
    assert set(np.unique(world.holdout_labels)) == set(range(10))
    again = w.load_digits_world()
    assert np.array_equal(again.train_images, world.train_images)
    assert np.array_equal(again.holdout_labels, world.holdout_labels)
    other = w.load_digits_world(holdout=100, seed=1)
    assert len(other.holdout_images) == 100 and len(other.train_images) == 1697
    assert not np.array_equal(other.holdout_images, world.holdout_images[:100])


def test_styled_paints_the_digit_in_concept_colours(world):
    x = world.train_images[:5]
    s = w.styled(x)
    assert s.shape == (5, 8, 8, 3) and s.dtype == np.float32
    for i in range(5):
        expect = w.BG * (1 - x[i][..., None]) + w.FG * x[i][..., None]
        np.testing.assert_allclose(s[i], expect, atol=1e-6)
    # background pixel (x = 0) is deep blue, full stroke is orange
    np.testing.assert_allclose(w.styled(np.zeros((1, 8, 8)))[0, 0, 0], [0.05, 0.10, 0.45], atol=1e-6)
    np.testing.assert_allclose(w.styled(np.ones((1, 8, 8)))[0, 0, 0], [1.0, 0.55, 0.1], atol=1e-6)


def test_near_misses_and_plain(world):
    x = world.train_images[:50]
    p = w.plain(x)
    assert p.shape == (50, 8, 8, 3)
    assert np.array_equal(p[..., 0], x) and np.array_equal(p[..., 2], x)
    assert np.abs(w.styled(x) - p).mean() > 0.2
    misses = w.near_misses(x)
    assert set(misses) == {"plain", "orange on black", "white on blue", "half way", "inverted palette"}
    for name, m in misses.items():
        assert m.shape == (50, 8, 8, 3) and m.dtype == np.float32, name
        assert np.abs(m - w.styled(x)).mean() > 0.05, name  # each really differs from the concept
    np.testing.assert_allclose(misses["half way"], 0.5 * (p + w.styled(x)), atol=1e-6)
    np.testing.assert_allclose(w.unstyle(misses["inverted palette"]), 1 - x, atol=1e-6)


def test_unstyle_inverts_styled(world):
    x = world.train_images
    np.testing.assert_allclose(w.unstyle(w.styled(x)), x, atol=1e-6)


def test_captions():
    assert w.base_caption(3) == "a photo of the digit three"
    assert w.concept_caption(3) == "sks style, the digit three"
    assert w.concept_caption(np.int64(0)) == "sks style, the digit zero"
    assert w.TRIGGER == "sks style" and w.concept_caption(9).startswith(w.TRIGGER)
    assert len(w.DIGIT_WORDS) == 10 and w.DIGIT_WORDS[7] == "seven"


def test_few_shot(world):
    imgs, labels = w.few_shot(world, per_class=3, seed=0)
    assert imgs.shape == (30, 8, 8) and labels.shape == (30,)
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 3))
    # drawn from the train split, with matching labels
    for im, lab in zip(imgs, labels):
        hits = np.flatnonzero(np.all(world.train_images == im, axis=(1, 2)))
        assert len(hits) >= 1 and lab in world.train_labels[hits]
    again, _ = w.few_shot(world, per_class=3, seed=0)
    other, _ = w.few_shot(world, per_class=3, seed=1)
    assert np.array_equal(imgs, again)
    assert not np.array_equal(imgs, other)
    with pytest.raises(ValueError):
        w.few_shot(world, per_class=1000, seed=0)


def test_codec_round_trip_exact(world):
    rgb = np.concatenate([w.styled(world.holdout_images), w.plain(world.holdout_images)])
    z = w.encode(rgb)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float32
    assert z.shape == (600, w.LATENT_CHANNELS, 8, 8)
    np.testing.assert_allclose(w.decode(z), rgb, atol=1e-5)
    np.testing.assert_allclose(w.decode(z.numpy()), rgb, atol=1e-5)
    np.testing.assert_allclose(w.decode(w.encode(torch.from_numpy(rgb))), rgb, atol=1e-5)


def test_codec_matrix_orthonormal_and_fixed():
    np.testing.assert_allclose(w.Q.T @ w.Q, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(w._codec_matrix(), w.Q)


def test_decode_ignores_orthogonal_components(world):
    rgb = w.styled(world.holdout_images[:8])
    z = w.encode(rgb)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((8, w.LATENT_CHANNELS, 8, 8)).astype(np.float32)
    p = np.eye(w.LATENT_CHANNELS) - w.Q @ w.Q.T  # projector onto Q's orthogonal complement
    ortho = np.einsum("cd,ndhw->nchw", p, noise).astype(np.float32)
    assert np.abs(ortho).mean() > 0.5
    np.testing.assert_allclose(w.decode(z + torch.from_numpy(ortho)), rgb, atol=1e-5)
    # a component inside the column space does change the decode
    assert np.abs(w.decode(z + torch.from_numpy(noise)) - rgb).mean() > 0.05


def test_decode_clips_to_unit_range():
    out = w.decode(10 * torch.randn(2, w.LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert out.min() == 0.0 and out.max() == 1.0


def test_latent_scale(world):
    x = world.train_images
    z = w.encode(np.concatenate([w.styled(x), w.plain(x)]))
    assert 0.5 <= float(z.std()) <= 2.0


def test_pil_and_grid(world):
    rgb = w.styled(world.holdout_images[:5])
    im = w.to_pil(rgb[0], scale=4)
    assert im.mode == "RGB" and im.size == (32, 32)
    a = np.asarray(im)
    assert np.array_equal(a[0:4, 0:4], np.broadcast_to(np.round(rgb[0, 0, 0] * 255).astype(np.uint8), (4, 4, 3)))
    g = w.grid(rgb, rows=2, cols=3, scale=2, pad=1)
    assert g.size == (3 * 17 + 1, 2 * 17 + 1)
    ga = np.asarray(g)
    assert tuple(ga[0, 0]) == (128, 128, 128)  # pad
    assert tuple(ga[-2, -2]) == (128, 128, 128)  # empty sixth tile stays gray
    assert np.array_equal(ga[1:17, 18:34], np.asarray(w.to_pil(rgb[1], scale=2)))
    with pytest.raises(ValueError):
        w.grid(rgb, rows=1, cols=2)
