"""One set of dataset rules for `train` (scan_dataset) and `cache` (collect_sources): the same items, the same
listed skips, the same caption errors; plus the kohya ``N_name/`` layout and opt-in recursion."""

import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from dev2pro.cli import main
from dev2pro.data.buckets import make_buckets
from dev2pro.data.folders import DatasetFolder, scan, scan_dataset
from dev2pro.data.shards import collect_sources
from dev2pro.errors import UserError

SK = Path(skdata.data_dir)
BUCKETS = make_buckets(64 * 64, step=16)  # ratios up to 3:1 (e.g. 96x32)


def copy(name, dst: Path, as_name=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SK / name, dst / (as_name or name)))


@pytest.fixture
def messy(tmp_path):
    """Good images next to every kind of input the two commands used to treat differently."""
    d = tmp_path / "messy"
    copy("astronaut.png", d)
    copy("rocket.jpg", d)
    (d / "astronaut.txt").write_bytes("\ufeffa woman in a space suit".encode("utf-8"))  # BOM
    Image.new("RGB", (1, 1), "red").save(d / "dot.png")  # 1x1
    Image.new("RGB", (4096, 16), "blue").save(d / "strip.png")  # 256:1, far beyond the 3:1 buckets
    Image.new("RGB", (200, 50), "green").save(d / "wide.png")  # 4:1, a little beyond: cropped, kept, listed
    Image.new("RGB", (32, 32), "white").save(d / "anim.gif")  # unsupported format
    (d / "notes.md").write_text("not an image, not listed")
    return d


def test_train_and_cache_keep_and_skip_the_same_images(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="dev2pro.data.folders"):
        items = scan_dataset([DatasetFolder(messy)], default_caption="x", buckets=BUCKETS)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert [i.path.name for i in items] == ["astronaut.png", "rocket.jpg", "wide.png"]
    assert items[0].caption == "a woman in a space suit"  # BOM stripped
    assert "anim.gif (unsupported format .gif" in text
    assert "dot.png (1x1 px, smaller than 16 px" in text
    assert "strip.png (4096x16 px: aspect ratio 256.0:1" in text
    assert "wide.png" in text and "notes.md" not in text

    good, skipped = collect_sources([messy], "x", buckets=BUCKETS)
    assert [s.key for s, _ in good] == ["astronaut", "rocket", "wide"]
    assert [s.caption for s, _ in good] == [i.caption for i in items]
    assert [size for _, size in good] == [i.size for i in items]
    assert sorted(Path(s.split(" (")[0]).name for s in skipped) == ["anim.gif", "dot.png", "strip.png"]


def test_tar_members_follow_the_same_rules(messy, tmp_path):
    import tarfile

    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w") as t:
        for p in sorted(messy.iterdir()):
            t.add(p, arcname=p.name)
    good, skipped = collect_sources([tar], "x", buckets=BUCKETS)
    assert [s.key for s, _ in good] == ["astronaut", "rocket", "wide"]
    assert good[0][0].caption == "a woman in a space suit"
    assert sorted(s.split("::")[1].split(" (")[0] for s in skipped) == ["anim.gif", "dot.png", "strip.png"]


def test_non_utf8_caption_is_the_same_clear_error_in_both(messy, capsys, tiny_dev_dir, tmp_path):
    (messy / "rocket.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError) as a:
        scan_dataset([DatasetFolder(messy)], default_caption="x")
    with pytest.raises(UserError) as b:
        collect_sources([messy], "x")
    assert str(a.value) == str(b.value) == f"caption file {messy / 'rocket.txt'} is not UTF-8 text; re-save it " \
                                           "with UTF-8 encoding"
    assert main(["cache", str(messy), "--model", str(tiny_dev_dir), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err


def test_empty_caption_file_gets_the_right_advice(tmp_path):
    d = tmp_path / "d"
    copy("camera.png", d)
    (d / "camera.txt").write_text("  \n")
    with pytest.raises(UserError) as e:
        scan_dataset([DatasetFolder(d)])
    msg = str(e.value)
    assert "empty caption file" in msg and "camera.txt" in msg and "write the caption into it" in msg
    assert "add a .txt file" not in msg
    with pytest.raises(UserError, match="empty caption file"):
        collect_sources([d], "")


def test_kohya_parent_folder(tmp_path, caplog):
    root = tmp_path / "train"
    copy("chelsea.png", root / "10_ohwx cat")
    copy("coffee.png", root / "10_ohwx cat")
    (root / "10_ohwx cat" / "coffee.txt").write_text("ohwx cat next to a coffee cup")
    copy("camera.png", root / "2_man")
    copy("rocket.jpg", root / "rockets")  # no N_ prefix: listed, not used
    (root / "3_empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="dev2pro.data.folders"):
        items = scan_dataset([DatasetFolder(root)])
    got = [(i.path.parent.name, i.path.name, i.caption, i.repeats) for i in items]
    assert got == [("10_ohwx cat", "chelsea.png", "ohwx cat", 10),
                   ("10_ohwx cat", "coffee.png", "ohwx cat next to a coffee cup", 10),
                   ("2_man", "camera.png", "man", 2)]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "rockets" in text and "N_name" in text
    # the cache reads the same layout: repeats are kept per sample
    good, _ = collect_sources([root], "")
    assert [(s.key, s.caption, s.repeats) for s, _ in good] == [
        ("10_ohwx cat/chelsea", "ohwx cat", 10), ("10_ohwx cat/coffee", "ohwx cat next to a coffee cup", 10),
        ("2_man/camera", "man", 2)]


def test_recursion_is_opt_in(tmp_path):
    d = tmp_path / "d"
    copy("camera.png", d)
    copy("chelsea.png", d / "more" / "deeper")
    assert [i.path.name for i in scan_dataset([DatasetFolder(d)], default_caption="x")] == ["camera.png"]
    items = scan_dataset([DatasetFolder(d, recursive=True)], default_caption="x")
    assert [i.path.relative_to(d).as_posix() for i in items] == ["camera.png", "more/deeper/chelsea.png"]
    good, _ = collect_sources([d], "x", recursive=True)
    assert [s.key for s, _ in good] == ["camera", "more/deeper/chelsea"]


def test_scan_reports_skips_for_the_index(messy):
    result = scan([DatasetFolder(messy)], default_caption="x", buckets=BUCKETS)
    assert len(result.items) == 3 and len(result.skipped) == 3
    assert any("wide.png" in c for c in result.cropped)


def test_cached_kohya_repeats_expand_in_the_shard_dataset(tmp_path):
    import torch

    from dev2pro.data.shards import ShardDataset, write_shards

    root = tmp_path / "train"
    copy("chelsea.png", root / "3_cat")
    copy("camera.png", root / "1_man")
    good, skipped = collect_sources([root], "")

    def encode_latents(px):
        return px.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 16, px.shape[2] // 8, px.shape[3] // 8)

    def encode_text(captions):
        return {"prompt_embeds": torch.zeros(len(captions), 4, 8), "pooled": torch.zeros(len(captions), 8)}

    index = write_shards(good, tmp_path / "out", 8, [(32, 32)], encode_latents, encode_text, {})
    ds = ShardDataset(index)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["man", "cat", "cat", "cat"]  # 1_man sorts first


def test_strict_refuses_the_same_skips_in_both(messy):
    with pytest.raises(UserError, match=r"3 image\(s\) cannot be used[\s\S]*anim\.gif[\s\S]*fix or delete") as a:
        scan_dataset([DatasetFolder(messy)], default_caption="x", buckets=BUCKETS, strict=True)
    with pytest.raises(UserError) as b:
        collect_sources([messy], "x", buckets=BUCKETS, strict=True)
    assert str(a.value) == str(b.value)


def test_an_image_enlarged_more_than_twice_is_listed(tmp_path, caplog):
    """A 24x20 image in 64x64-area buckets is enlarged ~3x (training sees it soft): kept and listed with the factor;
    a 40x40 one (1.6x) and the photos (shrunk) are not."""
    d = tmp_path / "small"
    copy("astronaut.png", d)
    Image.new("RGB", (24, 20), "red").save(d / "tiny.png")
    Image.new("RGB", (40, 40), "red").save(d / "small.png")
    with caplog.at_level(logging.WARNING, logger="dev2pro.data.folders"):
        items = scan_dataset([DatasetFolder(d)], default_caption="x", buckets=BUCKETS)
    assert sorted(i.path.name for i in items) == ["astronaut.png", "small.png", "tiny.png"]
    warned = [r.getMessage() for r in caplog.records if "enlarged" in r.getMessage()]
    assert len(warned) == 1 and "1 image(s) are much smaller than their bucket" in warned[0], warned
    assert "tiny.png (24x20 px: enlarged 3.2x to 64x64)" in warned[0] and "small.png" not in warned[0]
