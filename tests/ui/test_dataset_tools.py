"""The Dataset page's tools: bulk caption edits (``POST /api/captions/bulk``: prepend, append, replace, remove; a dry
run that writes nothing; the undo of the last edit, byte for byte) and removing images into ``FOLDER/.removed/``
(``POST /api/dataset/remove`` / ``restore``: caption, mask and reference moved along, a numbered name on a clash,
restore refused while the name is taken, files byte-identical after the round trip, and training's scanner no
longer sees a removed image). Real photos from scikit-image's data folder in the hostile workspace of conftest
(``web_app``); requests go straight into the ASGI app (``asgi``)."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from dev2pro.data.folders import DatasetFolder, scan  # noqa: E402

SK = Path(__import__("skimage").__file__).parent / "data"
CANARY = "CANARY-3b1f-do-not-read"


@pytest.fixture
def ds(web_app):
    """ds/: four photos; astronaut's caption has a BOM and no final newline, coffee's ends with the trigger and has
    a mask, chelsea's starts with it, camera has none; before/coffee.png: coffee's reference (an edit pair)."""
    app, ws, out, ui = web_app
    folder, before = ws / "ds", ws / "before"
    folder.mkdir()
    before.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png"):
        shutil.copy(SK / name, folder / name)
    (folder / "astronaut.txt").write_bytes("\ufeffan astronaut in a suit".encode())
    (folder / "coffee.txt").write_text("a cup of coffee, sks\n")
    (folder / "chelsea.txt").write_text("sks, a cat on a rug\n")
    shutil.copy(SK / "camera.png", folder / "coffee.mask.png")
    shutil.copy(SK / "moon.png", before / "coffee.png")
    return app, ws


def post(asgi, app, path: str, body: dict) -> tuple[int, dict]:
    status, raw = asgi(app, "POST", path, json.dumps(body), {"content-type": "application/json"})
    assert CANARY.encode() not in raw
    return status, json.loads(raw)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".dev2pro-ui" not in p.parts}


def captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8-sig") for p in sorted(folder.glob("*.txt"))}


def test_prepend_preview_apply_and_undo(ds, asgi):
    app, ws = ds
    before = snapshot(ws)
    status, preview = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "prepend", "text": " sks ",
                                                             "dry_run": True})
    assert status == 200, preview
    assert preview["counts"] == {"changed": 2, "created": 1, "unchanged": 1, "skipped": 0, "captions": 4}
    got = {f["caption"]: (f["status"], f["before"], f["after"]) for f in preview["files"]}
    assert got == {"ds/astronaut.txt": ("changed", "an astronaut in a suit", "sks, an astronaut in a suit"),
                   "ds/camera.txt": ("created", None, "sks"),
                   "ds/coffee.txt": ("changed", "a cup of coffee, sks", "sks, a cup of coffee, sks")}
    assert snapshot(ws) == before and preview["undo"] is False  # a dry run writes nothing
    status, done = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "prepend", "text": "sks",
                                                          "dry_run": False})
    assert status == 200 and done["counts"] == preview["counts"] and done["undo"] is True
    assert captions(ws / "ds") == {"astronaut.txt": "sks, an astronaut in a suit\n", "camera.txt": "sks\n",
                                   "chelsea.txt": "sks, a cat on a rug\n",
                                   "coffee.txt": "sks, a cup of coffee, sks\n"}
    again = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "prepend", "text": "sks", "dry_run": True})
    assert again[1]["counts"]["changed"] == 0 and again[1]["counts"]["unchanged"] == 4  # never "sks, sks, ..."
    status, undone = post(asgi, app, "/api/captions/undo", {"folder": "ds"})
    assert status == 200 and undone["restored"] == 3 and undone["deleted"] == 1 and undone["changed_since"] == []
    assert snapshot(ws) == before  # every byte back (the BOM, the missing newline), camera.txt gone again
    status, none = post(asgi, app, "/api/captions/undo", {"folder": "ds"})
    assert status == 400 and none["error"] == "no bulk caption edit of ds to undo"


def test_append_replace_remove_and_selected_files(ds, asgi):
    app, ws = ds
    folder = ws / "ds"
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "append", "text": "sks", "dry_run": False})
    assert status == 200 and r["counts"] == {"changed": 2, "created": 1, "unchanged": 1, "skipped": 0, "captions": 4}
    assert captions(folder)["coffee.txt"] == "a cup of coffee, sks\n"  # ends with it already
    assert captions(folder)["chelsea.txt"] == "sks, a cat on a rug, sks\n"
    # plain text, whole words: the "a" of "cat" and "an" stays; "." is not a regex
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "replace", "find": "a", "text": "one",
                                                       "dry_run": False})
    assert status == 200 and r["counts"]["changed"] == 3 and r["counts"]["created"] == 0
    assert captions(folder)["chelsea.txt"] == "sks, one cat on one rug, sks\n"
    assert captions(folder)["astronaut.txt"] == "an astronaut in one suit, sks\n"
    assert captions(folder)["coffee.txt"] == "one cup of coffee, sks\n"
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "replace", "find": "o", "text": "0",
                                                       "whole_word": False, "dry_run": True})
    assert {f["caption"]: f["after"] for f in r["files"]}["ds/coffee.txt"] == "0ne cup 0f c0ffee, sks"
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "remove", "text": "sks",
                                                       "dry_run": False})
    assert status == 200 and r["counts"]["changed"] == 4 and r["emptied"] == ["ds/camera.txt"]
    assert captions(folder) == {"astronaut.txt": "an astronaut in one suit\n", "camera.txt": "\n",
                                "chelsea.txt": "one cat on one rug\n", "coffee.txt": "one cup of coffee\n"}
    # only the selected images; replace and remove never create a caption file
    (folder / "camera.txt").unlink()
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "replace", "find": "one", "text": "a",
                                                       "files": ["ds/chelsea.png", "ds/camera.png"], "dry_run": False})
    assert status == 200 and r["counts"] == {"changed": 1, "created": 0, "unchanged": 1, "skipped": 0, "captions": 2}
    assert captions(folder) == {"astronaut.txt": "an astronaut in one suit\n", "chelsea.txt": "a cat on a rug\n",
                                "coffee.txt": "one cup of coffee\n"}
    status, u = post(asgi, app, "/api/captions/undo", {"folder": "ds"})  # the last edit only
    assert u["restored"] == 1 and captions(folder)["chelsea.txt"] == "one cat on one rug\n"


def test_shared_caption_is_edited_once_and_undo_keeps_later_hand_edits(ds, asgi):
    app, ws = ds
    folder = ws / "ds"
    shutil.copy(SK / "rocket.jpg", folder / "coffee.jpg")  # coffee.png and coffee.jpg both read coffee.txt
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "replace", "find": "cup",
                                                       "text": "big cup", "dry_run": False})
    assert status == 200 and r["counts"]["changed"] == 1 and r["counts"]["captions"] == 4
    assert r["files"][0]["images"] == ["ds/coffee.jpg", "ds/coffee.png"]
    assert captions(folder)["coffee.txt"] == "a big cup of coffee, sks\n"  # not "big big cup"
    post(asgi, app, "/api/captions/bulk", {"folder": "ds", "op": "remove", "text": "sks", "dry_run": False})
    status, _ = post(asgi, app, "/api/caption", {"image": "ds/chelsea.png", "text": "typed by hand"})
    assert status == 200
    status, u = post(asgi, app, "/api/captions/undo", {"folder": "ds"})
    assert u["restored"] == 1 and u["changed_since"] == ["ds/chelsea.txt"]
    assert captions(folder)["chelsea.txt"] == "typed by hand\n"
    assert captions(folder)["coffee.txt"] == "a big cup of coffee, sks\n"


@pytest.mark.parametrize("body, says", [
    ({"op": "prepend", "text": "  "}, "'text' is empty"),
    ({"op": "replace", "find": "", "text": "x"}, "'find' is empty"),
    ({"op": "replace", "find": "cat", "text": ""}, "'text' is empty"),
    ({"op": "prepend", "text": "x", "find": "y"}, "'find' is only for op 'replace'"),
    ({"op": "shout", "text": "x"}, "'op' 'shout' is not one of"),
    ({"op": "prepend", "text": "x", "folder": "escape"}, "'folder': path 'escape' leads outside the workspace"),
    ({"op": "prepend", "text": "x", "folder": "../outside"}, "'folder': path '../outside' contains '..'"),
    ({"op": "prepend", "text": "x", "folder": "/tmp"}, "'folder': path '/tmp' is absolute"),
    ({"op": "prepend", "text": "x", "folder": ""}, "'folder' is missing or empty"),
    ({"op": "prepend", "text": "x", "files": ["data/a.png"]}, "'files': data/a.png is not an image in ds"),
    ({"op": "prepend", "text": "x", "files": ["escape/pic.png"]}, "leads outside the workspace"),
    ({"op": "prepend", "text": "x", "dry_run": "no"}, "'dry_run' must be true or false"),
    ({"op": "prepend", "text": "x", "regex": True}, "unknown field 'regex'"),
])
def test_bulk_refusals_name_the_field_and_change_nothing(ds, asgi, body, says):
    app, ws = ds
    before = snapshot(ws)
    status, r = post(asgi, app, "/api/captions/bulk", {"folder": "ds", "dry_run": False, **body})
    assert status == 400 and says in r["error"], r
    assert snapshot(ws) == before


def test_remove_and_restore_round_trip(ds, asgi):
    app, ws = ds
    folder = ws / "ds"
    original = snapshot(ws)
    listing = json.loads(asgi(app, "GET", "/api/dataset?folder=ds")[1])  # the mask is no image (as in training)
    assert [im["name"] for im in listing["images"]] == ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]
    status, r = post(asgi, app, "/api/dataset/remove", {"folder": "ds", "files": ["ds/coffee.png"],
                                                        "controls": "before"})
    assert status == 200, r
    assert r["moved"][0]["path"] == "ds/.removed/coffee.png" and r["moved"][0]["original"] == "ds/coffee.png"
    assert r["moved"][0]["files"] == [["ds/coffee.png", "ds/.removed/coffee.png"],
                                      ["ds/coffee.txt", "ds/.removed/coffee.txt"],
                                      ["ds/coffee.mask.png", "ds/.removed/coffee.mask.png"],
                                      ["before/coffee.png", "before/.removed/coffee.png"]]
    assert sorted(p.name for p in folder.iterdir()) == [".removed", "astronaut.png", "astronaut.txt", "camera.png",
                                                        "chelsea.png", "chelsea.txt"]
    # training no longer reads it (a folder's own files; dot-folders skipped when recursive), nor does the page
    for recursive in (False, True):
        items = scan([DatasetFolder(folder, recursive=recursive)], default_caption="x").items
        assert sorted(it.path.name for it in items) == ["astronaut.png", "camera.png", "chelsea.png"]
    status, raw = asgi(app, "GET", "/api/dataset?folder=ds")
    listing = json.loads(raw)
    assert [im["name"] for im in listing["images"]] == ["astronaut.png", "camera.png", "chelsea.png"]
    assert [(x["path"], x["name"], x["files"]) for x in listing["removed"]] == [("ds/.removed/coffee.png",
                                                                                "coffee.png", 4)]
    assert "ds/.removed" not in listing["folders"]
    # a new coffee.png: restoring the old one is refused; removing the new one numbers it
    shutil.copy(SK / "chelsea.png", folder / "coffee.png")
    (folder / "coffee.txt").write_text("the second coffee\n")
    status, e = post(asgi, app, "/api/dataset/restore", {"folder": "ds", "files": ["ds/.removed/coffee.png"]})
    assert status == 400 and e["error"] == "'files': ds/coffee.png, ds/coffee.txt exist again; rename or remove " \
        "them first; nothing was restored", e
    assert (folder / ".removed" / "coffee.png").read_bytes() == original["ds/coffee.png"]
    status, r = post(asgi, app, "/api/dataset/remove", {"folder": "ds", "files": ["ds/coffee.png"]})
    assert status == 200 and [f[1] for f in r["moved"][0]["files"]] == ["ds/.removed/coffee-1.png",
                                                                     "ds/.removed/coffee-1.txt"]
    status, r = post(asgi, app, "/api/dataset/restore", {"folder": "ds", "files": ["ds/.removed/coffee.png"]})
    assert status == 200 and r["restored"][0]["path"] == "ds/coffee.png"
    after = snapshot(ws)
    for name, data in original.items():  # every file back byte-identical, the reference included
        assert after[name] == data, name
    assert not (ws / "before" / ".removed" / "coffee.png").exists()
    listing = json.loads(asgi(app, "GET", "/api/dataset?folder=ds")[1])
    assert [(x["path"], x["name"]) for x in listing["removed"]] == [("ds/.removed/coffee-1.png", "coffee.png")]
    status, e = post(asgi, app, "/api/dataset/restore", {"folder": "ds", "files": ["ds/.removed/coffee-1.png"]})
    assert status == 400 and "ds/coffee.png" in e["error"] and "nothing was restored" in e["error"]


def test_remove_keeps_a_caption_another_image_uses(ds, asgi):
    app, ws = ds
    folder = ws / "ds"
    shutil.copy(SK / "rocket.jpg", folder / "coffee.jpg")  # shares coffee.txt and coffee.mask.png
    status, r = post(asgi, app, "/api/dataset/remove", {"folder": "ds", "files": ["ds/coffee.jpg"]})
    assert status == 200 and [f[0] for f in r["moved"][0]["files"]] == ["ds/coffee.jpg"]
    assert r["kept"] == ["ds/coffee.mask.png", "ds/coffee.txt"]
    assert (folder / "coffee.txt").read_text() == "a cup of coffee, sks\n"
    assert (ws / "before" / "coffee.png").exists()  # no controls named: the reference stays


@pytest.mark.parametrize("path, body, says", [
    ("/api/dataset/remove", {"files": []}, "'files' must be a non-empty list"),
    ("/api/dataset/remove", {"files": ["data/a.png"]}, "'files': data/a.png is not an image in ds"),
    ("/api/dataset/remove", {"files": ["ds/astronaut.txt"]}, "'files': ds/astronaut.txt is not an image in ds"),
    ("/api/dataset/remove", {"files": ["ds/coffee.png"], "folder": "escape"}, "'folder': path 'escape' leads"),
    ("/api/dataset/remove", {"files": ["ds/coffee.png"], "controls": "escape"}, "leads outside the workspace"),
    ("/api/dataset/restore", {"files": ["ds/astronaut.png"]}, "'files': ds/astronaut.png is not an image removed"),
    ("/api/dataset/restore", {"files": "ds/.removed/x.png"}, "'files' must be a non-empty list"),
])
def test_remove_and_restore_refusals(ds, asgi, path, body, says):
    app, ws = ds
    before = snapshot(ws)
    status, r = post(asgi, app, path, {"folder": "ds", **body})
    assert status == 400 and says in r["error"], r
    assert snapshot(ws) == before


def test_kohya_parent_images_go_to_their_own_folders_removed(ds, asgi):
    """In a kohya parent (10_cat/, 5_dog/) an image goes to its own N_name/.removed/ (a training folder's own
    files are read, never its subfolders), and the parent's listing and restore find it there."""
    app, ws = ds
    for sub in ("10_cat", "5_dog"):
        (ws / "kohya" / sub).mkdir(parents=True)
        shutil.copy(SK / "chelsea.png", ws / "kohya" / sub / "001.png")
        (ws / "kohya" / sub / "001.txt").write_text(f"{sub} one\n")
    original = snapshot(ws)
    status, r = post(asgi, app, "/api/dataset/remove", {"folder": "kohya", "files": ["kohya/5_dog/001.png"]})
    assert status == 200 and r["moved"][0]["path"] == "kohya/5_dog/.removed/001.png"
    items = scan([DatasetFolder(ws / "kohya")], default_caption="x").items
    assert [it.path.relative_to(ws).as_posix() for it in items] == ["kohya/10_cat/001.png"]
    listing = json.loads(asgi(app, "GET", "/api/dataset?folder=kohya")[1])
    assert [im["name"] for im in listing["images"]] == ["10_cat/001.png"]
    assert [(x["path"], x["name"]) for x in listing["removed"]] == [("kohya/5_dog/.removed/001.png", "5_dog/001.png")]
    status, r = post(asgi, app, "/api/dataset/restore", {"folder": "kohya", "files": ["kohya/5_dog/.removed/001.png"]})
    assert status == 200 and {k: v for k, v in snapshot(ws).items() if ".removed" not in k} == original
