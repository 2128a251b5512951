"""Uploads are all-or-nothing and lose no file: every file is checked (decodes, safe name, no image of that name
already there) before any is written; names keep letters of any script; names that collide after sanitising, or
share one caption stem (cat.png + cat.jpg), are numbered within the batch and the reply names them as saved; an
existing image is replaced only with ``overwrite`` (the page's "replace files with the same name"). The dataset
listing flags images that share one caption file."""

import io
import json

import pytest
from PIL import Image

pytest.importorskip("starlette")

from dev2pro.errors import UserError  # noqa: E402
from dev2pro.ui.workspace import REPLACE_BOX, Workspace, safe_stem  # noqa: E402

from .test_convert_upload_web import multipart  # noqa: E402


def image(color, fmt="PNG", size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def pixel(path):
    with Image.open(path) as im:
        return im.convert("RGB").getpixel((0, 0))


def upload(asgi, app, folder: str, files, overwrite=False):
    parts = [("folder", None, folder.encode())] + ([("overwrite", None, b"1")] if overwrite else [])
    parts += [("files", name, data) for name, data in files]
    status, body = asgi(app, "POST", "/api/upload", *multipart(parts))
    return status, json.loads(body)


def test_names_keep_any_script_and_drop_only_what_is_unsafe():
    assert safe_stem("猫.png") == "猫" and safe_stem("фото кота.jpg") == "фото_кота"
    assert safe_stem("../../evil name.jpg") == "evil_name" and safe_stem("a\\b\\c d.png") == "c_d"
    assert safe_stem(".hidden.png") == "hidden" and safe_stem("-rf.png") == "rf" and safe_stem("?*.png") == "image"
    assert safe_stem("cafe\u0301.png") == "caf\u00e9"  # macOS sends decomposed (NFD) names: stored composed
    long = safe_stem("猫" * 200 + ".png")  # 3 bytes each: cut at whole characters, within a file name's 255 bytes
    assert long == "猫" * 50 and len(long.encode()) == 150


def test_colliding_names_are_numbered_and_reported_and_nothing_is_lost(web_app, asgi):
    app, ws, _, ui = web_app
    ui.max_files = 10
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200), (90, 90, 90)]
    files = [("猫.png", image(colors[0])), ("犬.png", image(colors[1])), ("my photo.png", image(colors[2])),
             ("my_photo.png", image(colors[3])), ("IMG_0001.JPG", image(colors[4], "JPEG")),
             ("IMG_0001.JPG", image(colors[5], "JPEG")), ("猫.jpg", image(colors[6], "JPEG"))]
    status, body = upload(asgi, app, "datasets/intl", files)
    assert status == 200, body
    want = ["猫.png", "犬.png", "my_photo.png", "my_photo-1.png", "IMG_0001.jpg", "IMG_0001-1.jpg", "猫-1.jpg"]
    assert body["saved"] == [f"datasets/intl/{n}" for n in want]
    assert body["renamed"] == [{"from": "my photo.png", "to": "my_photo.png"},
                               {"from": "my_photo.png", "to": "my_photo-1.png"},
                               {"from": "IMG_0001.JPG", "to": "IMG_0001.jpg"},
                               {"from": "IMG_0001.JPG", "to": "IMG_0001-1.jpg"}, {"from": "猫.jpg", "to": "猫-1.jpg"}]
    assert sorted(p.name for p in (ws / "datasets" / "intl").iterdir()) == sorted(want)  # no temp left
    for name, color in zip(want, colors):  # each file is the one uploaded under that name (JPEG: lossy)
        assert max(abs(a - b) for a, b in zip(pixel(ws / "datasets" / "intl" / name), color)) < 8, name


def test_an_existing_name_is_refused_before_anything_is_written_unless_replace_is_ticked(web_app, asgi):
    app, ws, _, _ = web_app
    (ws / "data" / "cat.jpg").write_bytes(image((1, 2, 3), "JPEG"))
    (ws / "data" / "cat.txt").write_text("a cat\n")
    before = {p.name: p.read_bytes() for p in (ws / "data").iterdir()}
    batch = [("new.png", image((9, 9, 9))), ("a.png", image((250, 0, 0))), ("Cat.png", image((0, 250, 0)))]
    status, body = upload(asgi, app, "data", batch)
    assert status == 400
    assert body["error"] == (f"data/a.png, data/cat.jpg (for 'Cat.png') already exist; rename the file(s) or tick "
                             f"'{REPLACE_BOX}'; nothing was saved")
    assert REPLACE_BOX == "replace files with the same name"  # the Dataset page's checkbox label (index.html)
    assert {p.name: p.read_bytes() for p in (ws / "data").iterdir()} == before  # new.png was not written either
    status, body = upload(asgi, app, "data", batch, overwrite=True)
    assert status == 200, body
    assert body["saved"] == ["data/new.png", "data/a.png", "data/Cat.png"]
    assert body["replaced"] == ["data/a.png", "data/cat.jpg"]
    assert pixel(ws / "data" / "a.png") == (250, 0, 0) and pixel(ws / "data" / "Cat.png") == (0, 250, 0)
    # cat.jpg was replaced by Cat.png: one image per caption, and the caption stays
    assert not (ws / "data" / "cat.jpg").exists() and (ws / "data" / "cat.txt").read_text() == "a cat\n"


def test_a_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    (tmp_path / "d").mkdir()
    plan = ws.plan_upload(tmp_path / "d", [("a.png", image((1, 1, 1))), ("b.png", image((2, 2, 2)))], 10**6)
    real, calls = type(tmp_path).write_bytes, []

    def full_disk(self, data):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(type(tmp_path), "write_bytes", full_disk)
    with pytest.raises(UserError, match="No space left on device.*nothing was saved"):
        ws.write_upload(plan)
    assert list((tmp_path / "d").iterdir()) == []


def test_dataset_listing_flags_images_that_share_a_caption(web_app, asgi):
    app, ws, _, _ = web_app
    (ws / "data" / "a.jpg").write_bytes(image((5, 5, 5), "JPEG"))  # beside a.png, which has a.txt
    status, body = asgi(app, "GET", "/api/dataset?folder=data")
    d = json.loads(body)
    assert status == 200 and d["caption_clashes"] == [{"caption": "data/a.txt", "images": ["a.jpg", "a.png"]}]
    flags = {im["name"]: im.get("shares_caption") for im in d["images"]}
    assert flags == {"a.jpg": ["a.png"], "a.png": ["a.jpg"], "b.png": None}
