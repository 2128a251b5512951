"""Bucket generation, assignment and image fitting on real scikit-image pictures."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from dev2pro.data.buckets import assign_bucket, fit_image, load_and_fit, make_buckets
from dev2pro.errors import ConfigError

SK = Path(skdata.data_dir)


def test_buckets_are_multiples_of_16_within_area_ratio_and_symmetric():
    buckets = make_buckets(512 * 512)
    assert (512, 512) in buckets and buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= 512 * 512 and w * h > 0.9 * 512 * 512  # close to the pixel budget
        assert max(w, h) / min(w, h) <= 3.0
        assert (h, w) in buckets


def test_bucket_limits():
    buckets = make_buckets(1024 * 1024, step=64, min_side=768, max_side=1344, max_ratio=2.0)
    assert all(768 <= s <= 1344 and s % 64 == 0 for b in buckets for s in b)
    assert (1024, 1024) in buckets and (768, 1344) in buckets
    assert make_buckets(32 * 32) == [(16, 48), (32, 32), (48, 16)]


def test_bucket_config_errors():
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_buckets(512 * 512, step=8)
    with pytest.raises(ConfigError, match="no 16-px buckets fit area 100"):
        make_buckets(100)
    with pytest.raises(ConfigError, match="max_ratio must be >= 1"):
        make_buckets(512 * 512, max_ratio=0.5)


def test_assign_bucket_nearest_log_ratio():
    buckets = [(512, 512), (640, 384), (384, 640), (768, 320)]
    assert assign_bucket(512, 512, buckets) == (512, 512)
    assert assign_bucket(640, 427, buckets) == (640, 384)  # rocket.jpg, 1.50 -> 1.67 (not 1.0)
    assert assign_bucket(427, 640, buckets) == (384, 640)
    assert assign_bucket(3000, 1000, buckets) == (768, 320)
    # log distance: 2:1 is equally far from 4:1 and 1:1; tie -> larger area
    assert assign_bucket(2, 1, [(64, 16), (48, 48), (32, 32)]) == (48, 48)


def test_load_and_fit_colour_photo():
    pixels = load_and_fit(SK / "rocket.jpg", (384, 256))  # 640x427 -> scale 0.6 -> 384x257 -> crop 1 row
    assert pixels.shape == (3, 256, 384) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.9 and pixels.max() > 0.9
    with Image.open(SK / "rocket.jpg") as im:
        expected = np.asarray(im.convert("RGB").resize((384, 257), Image.Resampling.LANCZOS))[0:256]
    torch.testing.assert_close(pixels, torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)


def test_load_and_fit_centre_crops_the_long_side():
    pixels = load_and_fit(SK / "coffee.png", (256, 256))  # 600x400 -> 384x256 -> crop 64 px each side
    with Image.open(SK / "coffee.png") as im:
        expected = np.asarray(im.resize((384, 256), Image.Resampling.LANCZOS))[:, 64:320]
    torch.testing.assert_close(pixels, torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)


def test_greyscale_becomes_rgb_and_upscales_to_cover():
    pixels = load_and_fit(SK / "camera.png", (1024, 768))  # 512x512 L -> 1024x1024 -> crop rows
    assert pixels.shape == (3, 768, 1024)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_transparency_goes_over_white(tmp_path):
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    im.save(tmp_path / "clear.png")
    assert load_and_fit(tmp_path / "clear.png", (32, 32)).eq(1.0).all()
    horse = load_and_fit(SK / "horse.png", (400, 320))  # real RGBA
    assert horse.shape == (3, 320, 400)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((16, 16), 32768, dtype=np.uint16)  # mid-grey in 16 bit
    Image.fromarray(arr).save(tmp_path / "grey16.png")
    pixels = load_and_fit(tmp_path / "grey16.png", (16, 16))
    torch.testing.assert_close(pixels, torch.full((3, 16, 16), 128.0) / 127.5 - 1)


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: blue ends on top
    im.save(tmp_path / "phone.png", exif=exif)
    pixels = load_and_fit(tmp_path / "phone.png", (32, 64))
    assert pixels.shape == (3, 64, 32)
    assert pixels[2, :16].mean() > 0.9 and pixels[0, 48:].mean() > 0.9


def test_fit_image_exact_sizes_for_every_bucket():
    with Image.open(SK / "chelsea.png") as im:
        im.load()
        for size in make_buckets(256 * 256):
            assert fit_image(im, size).size == size
