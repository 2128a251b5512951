"""The Dataset page's edit pairs (``GET /api/dataset?folder=after&controls=before``): each image's reference as
training finds and judges it (the scanner's own lookup, decode and aspect rules, checked side by side), a pair
summary with the references no image uses, the controls folder confined to the workspace, and a reference that is
a symlink out named but never read. Real photos from scikit-image's data folder; requests go straight into the
ASGI app (``web_app``, ``asgi``: conftest)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

pytest.importorskip("starlette")

from dev2pro.data.folders import DatasetFolder, Scanner  # noqa: E402
from dev2pro.ui import pairs as pairs_module  # noqa: E402

CANARY = "CANARY-3b1f-do-not-read"
SK = Path(__import__("skimage").__file__).parent / "data"


def _before(name: str) -> Image.Image:
    """The 'before' of a photo: its mirrored greyscale version, same size."""
    with Image.open(SK / name) as im:
        return ImageOps.mirror(ImageOps.grayscale(im).convert("RGB"))


@pytest.fixture
def app(web_app):
    """The hostile workspace (conftest) plus after/ and before/: one photo per case, and two unused references."""
    app, ws, out, ui = web_app
    after, before = ws / "after", ws / "before"
    after.mkdir()
    before.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg"):
        shutil.copy(SK / name, after / name)
    shutil.copy(SK / "astronaut.png", after / "linked.png")
    _before("astronaut.png").save(before / "astronaut.jpg")  # paired, another suffix
    # coffee: no reference at all
    _before("chelsea.png").save(before / "chelsea.gif")  # a format we do not train on
    data = (SK / "rocket.jpg").read_bytes()
    (before / "camera.jpg").write_bytes(data[: len(data) // 2])  # a cut JPEG: its header reads, its pixels do not
    _before("rocket.jpg").transpose(Image.Transpose.ROTATE_90).save(before / "rocket.png")  # 427x640 for 640x427
    (out / "ref.png").write_text(CANARY)  # outside the workspace: never opened
    os.symlink(out / "ref.png", before / "linked.png")
    _before("camera.png").save(before / "unused.png")
    _before("coffee.png").save(before / "zz-spare.webp")
    return app, ws, out, ui


def _get(asgi, app, query: str) -> dict:
    status, body = asgi(app, "GET", "/api/dataset?" + query)
    assert status == 200, body
    assert CANARY.encode() not in body
    return json.loads(body)


def test_each_image_gets_its_reference_as_training_judges_it(app, asgi, monkeypatch):
    app, ws, out, ui = app
    decoded = []
    real = pairs_module.decoded_size
    monkeypatch.setattr(pairs_module, "decoded_size", lambda p: decoded.append(Path(p)) or real(p))
    d = _get(asgi, app, "folder=after&controls=before")
    refs = {im["name"]: im["references"][0] for im in d["images"]}
    assert refs["astronaut.png"] == {"path": "before/astronaut.jpg", "size": [512, 512], "status": "paired",
                                     "problem": None}
    assert refs["coffee.png"]["path"] is None and refs["coffee.png"]["status"] == "missing"
    assert refs["coffee.png"]["problem"] == "no reference: no before/coffee.* in .png/.jpg/.jpeg/.webp/.bmp"
    assert refs["chelsea.png"]["path"] == "before/chelsea.gif" and refs["chelsea.png"]["status"] == "unusable"
    assert refs["chelsea.png"]["problem"].startswith(".gif is a format we do not train on: convert it to .png")
    assert refs["camera.png"]["path"] == "before/camera.jpg" and refs["camera.png"]["status"] == "unusable"
    assert refs["camera.png"]["problem"].startswith("unreadable: OSError") and refs["camera.png"]["size"] is None
    assert refs["rocket.jpg"] == {"path": "before/rocket.png", "size": [427, 640], "status": "cropped",
                                  "problem": "another aspect ratio: 427x640 px for a 640x427 image: 45% of it kept "
                                             "(cropped to the image's bucket)"}
    assert refs["linked.png"] == {"path": "before/linked.png", "size": None, "status": "unusable",
                                  "problem": "a symlink out of the workspace (not read)"}
    assert out / "ref.png" not in [p.resolve() for p in decoded]  # the symlink out is never decoded
    assert d["pairs"] == [{"controls": "before", "paired": 2, "cropped": 1, "missing": 1, "problem": 3,
                           "unused": ["before/unused.png", "before/zz-spare.webp"], "unused_count": 2}]
    assert d["pairs_complete"] == 2 and all(len(im["references"]) == 1 for im in d["images"])
    # the same verdicts as training's scanner on the same folders (its lookup, decode and aspect rules)
    scanner = Scanner(default_caption="edit")
    items = {it.path.name: (it.controls or (None,))[0] for it, _ in scanner.folders([DatasetFolder(ws / "after",
                                                                                  controls=ws / "before")])}
    assert items["astronaut.png"] == ws / "before" / "astronaut.jpg" and items["rocket.jpg"] == ws / "before" / \
        "rocket.png"
    refused = sorted(Path(line.split(" (")[0]).name for line in scanner.uncontrolled)
    assert refused == sorted(n for n, r in refs.items() if r["status"] in ("missing", "unusable"))
    assert [Path(line.split(" (")[0]).name for line in scanner.reference_crops] == ["rocket.png"]


def test_without_controls_the_page_is_unchanged(app, asgi):
    app = app[0]
    d = _get(asgi, app, "folder=after")
    assert "pairs" not in d and all("references" not in im for im in d["images"])
    assert [im["name"] for im in d["images"]] == ["astronaut.png", "camera.png", "chelsea.png", "coffee.png",
                                                   "linked.png", "rocket.jpg"]
    assert _get(asgi, app, "folder=after&controls=") == d  # an empty field: no pairs


def test_kohya_parent_looks_in_controls_n_name_then_controls(app, asgi):
    """``refs/10_cat/001.*`` first, then ``refs/001.*``; one reference claimed by images of two kohya folders is
    refused for the second, as training refuses it."""
    app, ws, out, ui = app
    parent, refs = ws / "kohya", ws / "refs"
    for sub in ("10_cat", "5_dog"):
        (parent / sub).mkdir(parents=True)
    for img in ("10_cat/001.png", "10_cat/003.png", "5_dog/001.png", "5_dog/002.png", "5_dog/003.png"):
        shutil.copy(SK / "camera.png", parent / img)
    (refs / "10_cat").mkdir(parents=True)
    for ref in ("10_cat/001.png", "001.png", "003.jpg", "10_cat/old.png"):
        _before("camera.png").save(refs / ref)
    d = _get(asgi, app, "folder=kohya&controls=refs")
    got = {im["name"]: (im["references"][0]["path"], im["references"][0]["status"]) for im in d["images"]}
    assert got == {"10_cat/001.png": ("refs/10_cat/001.png", "paired"), "10_cat/003.png": ("refs/003.jpg", "paired"),
                   "5_dog/001.png": ("refs/001.png", "paired"), "5_dog/002.png": (None, "missing"),
                   "5_dog/003.png": ("refs/003.jpg", "unusable")}
    by_name = {im["name"]: im for im in d["images"]}
    assert by_name["5_dog/002.png"]["path"] == "kohya/5_dog/002.png"
    assert by_name["5_dog/002.png"]["references"][0]["problem"].startswith("no reference: no refs/5_dog/002.* or "
                                                                       "refs/002.* in .png")
    assert by_name["5_dog/003.png"]["references"][0]["problem"].startswith("also kohya/10_cat/003.png's reference")
    assert d["pairs"][0]["unused"] == ["refs/10_cat/old.png"] and d["pairs"][0]["paired"] == 3
    scanner = Scanner(default_caption="edit")
    items = {it.path.relative_to(parent).as_posix(): (it.controls or (None,))[0]
             for it, _ in scanner.folders([DatasetFolder(parent, controls=refs)])}
    assert {k: v.relative_to(ws).as_posix() for k, v in items.items() if k != "5_dog/002.png"} == \
        {k: p for k, (p, _) in got.items() if p}
    assert sorted(line.split(" (")[0] for line in scanner.uncontrolled) == [str(parent / "5_dog" / "002.png"),
                                                                             str(parent / "5_dog" / "003.png")]


@pytest.mark.parametrize("controls, says", [("escape", b"leads outside the workspace"), ("..", b"contains '..'"),
                                            ("/etc", b"is absolute"), ("nope", b"does not exist"),
                                            ("data/a.png", b"is a file, not a folder")])
def test_a_controls_folder_outside_the_workspace_or_not_a_folder_is_refused(app, asgi, controls, says):
    app = app[0]
    status, body = asgi(app, "GET", f"/api/dataset?folder=after&controls={controls}")
    assert status == 400 and b"reference folder" in body and says in body, body
    assert CANARY.encode() not in body


def test_a_kohya_subfolder_of_references_symlinked_out_is_not_looked_into(app, asgi):
    app, ws, out, ui = app
    (ws / "k" / "10_cat").mkdir(parents=True)
    shutil.copy(SK / "camera.png", ws / "k" / "10_cat" / "001.png")
    (ws / "krefs").mkdir()
    (out / "cat").mkdir()
    _before("camera.png").save(out / "cat" / "001.png")
    os.symlink(out / "cat", ws / "krefs" / "10_cat")
    d = _get(asgi, app, "folder=k&controls=krefs")
    assert d["images"][0]["references"] == [{"path": "krefs/10_cat", "size": None, "status": "unusable",
                                            "problem": "a symlink out of the workspace (not read)"}]
    assert d["pairs"][0]["unused"] == []  # the folder out is not listed either


def test_a_huge_reference_is_judged_from_its_header(app, asgi, monkeypatch):
    """Over MAX_CHECK_PIXELS: flagged as the image listing flags one, never decoded by the request."""
    app, ws, out, ui = app
    Image.new("1", (8000, 6000)).save(ws / "before" / "coffee.png")  # 48 MP, a small file
    decoded = []
    real = pairs_module.decoded_size
    monkeypatch.setattr(pairs_module, "decoded_size", lambda p: decoded.append(Path(p).name) or real(p))
    d = _get(asgi, app, "folder=after&controls=before")
    ref = next(im["references"][0] for im in d["images"] if im["name"] == "coffee.png")
    assert ref["status"] == "unusable" and ref["problem"].startswith("8000x6000 px is over 40 megapixels")
    assert "coffee.png" not in decoded and "astronaut.jpg" in decoded


def test_several_reference_folders_give_each_image_one_reference_per_folder(app, asgi):
    """``controls = ["before", "scene"]`` as training reads it: per image its references in folder order, a pair
    summary per folder, and the images training would pair (a usable reference in every folder), matching the
    scanner's verdicts on the same folders; repeated ``controls`` params and one folder per line are the same."""
    app, ws, out, ui = app
    (ws / "scene").mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        _before(name).save(ws / "scene" / (Path(name).stem + ".png"))
    d = _get(asgi, app, "folder=after&controls=before&controls=scene")
    assert _get(asgi, app, "folder=after&controls=before%0Ascene%0A") == d
    got = {im["name"]: [(r["path"], r["status"]) for r in im["references"]] for im in d["images"]}
    assert got["astronaut.png"] == [("before/astronaut.jpg", "paired"), ("scene/astronaut.png", "paired")]
    assert got["coffee.png"] == [(None, "missing"), ("scene/coffee.png", "paired")]
    assert got["rocket.jpg"] == [("before/rocket.png", "cropped"), ("scene/rocket.png", "paired")]
    assert got["chelsea.png"] == [("before/chelsea.gif", "unusable"), (None, "missing")]
    assert [p["controls"] for p in d["pairs"]] == ["before", "scene"]
    assert d["pairs"][0] == _get(asgi, app, "folder=after&controls=before")["pairs"][0]  # each folder as alone
    assert {k: d["pairs"][1][k] for k in ("paired", "missing", "problem", "unused_count")} == \
        {"paired": 3, "missing": 3, "problem": 0, "unused_count": 0}
    assert d["pairs_complete"] == 2  # astronaut and rocket: usable in both folders
    scanner = Scanner(default_caption="edit")
    items = {it.path.name: it.controls for it, _ in scanner.folders([DatasetFolder(
        ws / "after", controls=[ws / "before", ws / "scene"])])}
    paired = {n: [ws / p for p, _ in refs] for n, refs in got.items() if all(s in ("paired", "cropped")
                                                                          for _, s in refs)}
    assert {n: list(c) for n, c in items.items() if c} == paired
    refused = sorted(Path(line.split(" (")[0]).name for line in scanner.uncontrolled)
    assert refused == sorted(set(got) - set(paired))


@pytest.mark.parametrize("controls, says", [
    ("controls=before&controls=before/", "controls of after: before and before are the same folder; list each "
                                         "reference folder once (one reference per image from each)"),
    ("controls=before&controls=alias", "controls of after: before and alias are the same folder"),
    ("controls=before%0Aafter", "controls of after: after is the dataset folder itself or holds it; put the "
                                "reference images in a folder of their own"),
    ("controls=.", "controls of after: . is the dataset folder itself or holds it"),
    ("controls=before&controls=escape", "reference folder (controls): path 'escape' leads outside the workspace"),
    ("controls=" + "%0A".join(["before"] * 11), "11 reference folders; check at most 10 at a time"),
])
def test_reference_folders_are_refused_as_training_refuses_them(app, asgi, controls, says):
    """Training's own checks (``data.folders``): one folder listed twice under any spelling, or the dataset folder
    (or one holding it) as a reference folder; in workspace paths, before any image is read."""
    app, ws, out, ui = app
    os.symlink(ws / "before", ws / "alias")
    status, body = asgi(app, "GET", f"/api/dataset?folder=after&{controls}")
    assert status == 400, body
    assert says in json.loads(body)["error"] and str(ws) not in json.loads(body)["error"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_dataset_page_shows_each_reference_beside_its_image(tmp_path, ui_server, browser_page):
    """In Chromium: the reference folder typed on the Dataset page; a paired image shows its reference's thumbnail,
    one without a reference says so, and the summary counts both."""
    ws = tmp_path / "ws"
    (ws / "after").mkdir(parents=True)
    (ws / "before").mkdir()
    for name in ("astronaut.png", "coffee.png"):
        shutil.copy(SK / name, ws / "after" / name)
    _before("astronaut.png").save(ws / "before" / "astronaut.jpg")
    page = browser_page
    page.goto(ui_server.start(ws))
    page.click("#tab-dataset")
    # the page's first load (the workspace's first image folder) ends before the fields are filled: no race
    page.wait_for_function("document.getElementById('bucket-preview').textContent.includes('images;')")
    assert page.inner_text("#pair-summary") == "" and page.locator("#thumbs .pair").count() == 0
    page.fill("#dataset-folder", "after")
    page.fill("#dataset-controls", "before")
    page.click("#load-folder")
    page.wait_for_function("document.getElementById('pair-summary').textContent"
                           ".startsWith('1 pair, 1 without a usable reference')")
    paired = page.locator("#thumbs .thumb[data-path='after/astronaut.png'] img.ref")
    assert paired.get_attribute("src") == "/api/thumb?path=before%2Fastronaut.jpg"
    page.wait_for_function("document.querySelector(\"#thumbs .thumb[data-path='after/astronaut.png'] img.ref\")"
                           ".naturalWidth > 0")  # the thumbnail loaded
    missing = page.locator("#thumbs .thumb[data-path='after/coffee.png']")
    assert missing.get_attribute("data-reference") == "missing"
    assert missing.locator(".ref.none").inner_text() == "no reference"
    assert "no reference: no before/coffee.*" in missing.locator(".flag").inner_text()
    # two reference folders, one per line: each image shows one reference per folder, flags name the folder
    (ws / "scene").mkdir()
    _before("astronaut.png").save(ws / "scene" / "astronaut.png")
    page.fill("#dataset-controls", "before\nscene")
    page.click("#load-folder")
    page.wait_for_function("document.getElementById('pair-summary').textContent"
                           ".startsWith('1 of 2 images have a usable reference in every folder · before: 1 pair')")
    assert page.locator("#thumbs .thumb[data-path='after/astronaut.png'] img.ref").count() == 2
    assert missing.get_attribute("data-reference") == "missing missing"
    assert [f.startswith(("before: no reference", "scene: no reference")) for f in
            missing.locator(".flag").all_inner_texts()] == [True, True]
    if os.environ.get("DEV2PRO_UI_SCREENSHOTS"):  # for a look at the page
        Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]) / "dataset-pairs.png"), full_page=True)
