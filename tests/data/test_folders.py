"""Dataset folder scanning on real images from scikit-image, plus the broken-input paths users hit."""

import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from dev2pro.data.folders import DatasetFolder, Item, add_trigger, scan_dataset
from dev2pro.errors import UserError

SK = Path(skdata.data_dir)


def copy(name, dst: Path, as_name=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SK / name, dst / (as_name or name)))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    copy("astronaut.png", d)
    copy("coffee.png", d, "Coffee.PNG")
    copy("rocket.jpg", d)
    (d / "astronaut.txt").write_text("  a woman in a space suit\n", encoding="utf-8")
    (d / "notes.md").write_text("not an image")
    return d


def test_captions_priority_order_repeats_and_sizes(folder):
    items = scan_dataset([DatasetFolder(folder, repeats=3, caption="a photo")], default_caption="unused")
    assert [i.path.name for i in items] == ["Coffee.PNG", "astronaut.png", "rocket.jpg"]  # sorted, case-insensitive ext
    assert [i.caption for i in items] == ["a photo", "a woman in a space suit", "a photo"]
    assert all(isinstance(i, Item) and i.repeats == 3 for i in items)
    assert items[1].size == (512, 512) and items[2].size == (640, 427)  # rocket.jpg is landscape


def test_default_caption_and_trigger(folder):
    items = scan_dataset([DatasetFolder(str(folder))], default_caption="a thing", trigger="ohwx")
    assert [i.caption for i in items] == ["ohwx, a thing", "ohwx, a woman in a space suit", "ohwx, a thing"]
    assert add_trigger("a photo of ohwx dog", "ohwx") == "a photo of ohwx dog"  # already present
    assert add_trigger("ohwxdog on grass", "ohwx") == "ohwx, ohwxdog on grass"  # only whole words count
    assert add_trigger("", "ohwx") == "ohwx"


def test_empty_txt_falls_back_and_bom_is_dropped(folder):
    (folder / "rocket.txt").write_text("   \n")
    (folder / "Coffee.txt").write_text("\ufeffa cup of coffee", encoding="utf-8")
    items = scan_dataset([DatasetFolder(folder, caption="folder caption")])
    assert [i.caption for i in items] == ["a cup of coffee", "a woman in a space suit", "folder caption"]


def test_broken_images_are_skipped_with_one_warning(folder, caplog):
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    Image.new("RGB", (8, 40)).save(folder / "tiny.png")
    with caplog.at_level(logging.WARNING, logger="dev2pro.data.folders"):
        items = scan_dataset([DatasetFolder(folder)], default_caption="x")
    assert [i.path.name for i in items] == ["Coffee.PNG", "astronaut.png", "rocket.jpg"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "3 image(s)" in text and "empty.png (empty file)" in text
    assert "garbage.jpg (unreadable" in text and "tiny.png (8x40 px, smaller than 16 px" in text


def test_strict_raises_listing_broken_images(folder):
    (folder / "empty.webp").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.webp \(empty file\)[\s\S]*fix or delete"):
        scan_dataset([DatasetFolder(folder)], default_caption="x", strict=True)


def test_truncated_png_is_unreadable(folder):
    data = (SK / "camera.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png \\(unreadable"):
        scan_dataset([DatasetFolder(folder)], default_caption="x", strict=True)


def test_missing_folder_and_file_instead_of_folder(tmp_path, folder):
    with pytest.raises(UserError, match=r"nope does not exist; fix the path"):
        scan_dataset([DatasetFolder(tmp_path / "nope")])
    with pytest.raises(UserError, match="is a file, not a folder"):
        scan_dataset([DatasetFolder(folder / "astronaut.png")])


def test_folder_without_images_and_nested_hint(tmp_path):
    outer = tmp_path / "outer"
    copy("chelsea.png", outer / "cats")
    with pytest.raises(UserError) as e:
        scan_dataset([DatasetFolder(outer)], default_caption="x")
    assert "has no images" in str(e.value) and "subfolders cats have images" in str(e.value)


def test_all_images_broken_is_an_empty_dataset(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="the dataset is empty"):
        scan_dataset([DatasetFolder(d)], default_caption="x")


def test_uncaptioned_images_error_lists_a_few_and_says_how_to_fix(tmp_path):
    d = tmp_path / "many"
    for i in range(7):
        copy("camera.png", d, f"img{i}.png")
    (d / "img0.txt").write_text("captioned")
    with pytest.raises(UserError) as e:
        scan_dataset([DatasetFolder(d)])
    msg = str(e.value)
    assert "6 image(s) have no caption" in msg and "img1.png" in msg and "... and 1 more" in msg
    assert ".txt" in msg and "default_caption" in msg


def test_bad_repeats(folder):
    with pytest.raises(UserError, match="repeats must be >= 1"):
        scan_dataset([DatasetFolder(folder, repeats=0)], default_caption="x")


def test_exif_rotation_swaps_reported_size(tmp_path):
    d = tmp_path / "exif"
    d.mkdir()
    im = Image.new("RGB", (64, 32))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(d / "phone.jpg", exif=exif)
    (item,) = scan_dataset([DatasetFolder(d)], default_caption="x")
    assert item.size == (32, 64)
