"""The web app's safety rules, without a browser: paths stay in the workspace, uploads must be images within the
size limit, requests need the UI header (CSRF) and a loopback Host (DNS rebinding), non-loopback binds need auth."""

import base64
import collections
import http.client
import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from dev2pro.cli import main  # noqa: E402
from dev2pro.errors import UserError  # noqa: E402
from dev2pro.ui.app import UIContext, build_app  # noqa: E402
from dev2pro.ui.command import check_bind  # noqa: E402
from dev2pro.ui.jobs import JobManager  # noqa: E402
from dev2pro.ui.workspace import PathRefused, Workspace, check_image  # noqa: E402


def png_bytes(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """A workspace with an image, and a secret outside it reachable by a symlink inside it."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "a.png").write_bytes(png_bytes())
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("TOP SECRET")
    os.symlink(secret, ws / "escape")
    os.symlink(ws / "data", ws / "inside")  # a symlink that stays inside is fine
    return ws, secret


def test_resolve_refuses_every_escape(tree):
    ws_dir, secret = tree
    ws = Workspace(ws_dir)
    for bad in ["../secret/key.txt", "data/../../secret/key.txt", "..", "/etc/passwd", str(secret / "key.txt"),
                "escape/key.txt", "escape", "data\\..\\..\\secret", "C:/Windows", "data/a.png\x00.txt",
                ".dev2pro-ui/jobs"]:
        with pytest.raises(PathRefused):
            ws.resolve(bad)
    assert ws.resolve("data/a.png") == ws_dir.resolve() / "data" / "a.png"
    assert ws.resolve("inside/a.png") == ws_dir.resolve() / "data" / "a.png"
    assert ws.resolve("") == ws_dir.resolve()
    with pytest.raises(PathRefused, match="does not exist"):
        ws.resolve("data/missing.png", must_exist=True)


def test_uploads_must_decode_as_images_within_the_limit(tree):
    ws = Workspace(tree[0])
    assert check_image(png_bytes()) == "PNG"
    for bad in [b"#!/bin/sh\nrm -rf /\n", b"", png_bytes()[:60], b"GIF89a" + b"\0" * 20]:
        with pytest.raises(UserError, match="not a readable image|is a GIF"):
            check_image(bad, "x.png")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    with pytest.raises(UserError, match="GIF image"):
        check_image(gif.getvalue(), "x.gif")
    bomb = io.BytesIO()  # a small file of many pixels: named as too many pixels, not as unreadable
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")
    with pytest.raises(UserError, match=r"more than \d+ million pixels.*downscale it"):
        check_image(bomb.getvalue(), "huge.png")
    with pytest.raises(UserError, match="limit"):
        ws.save_upload(ws.resolve("data"), "big.png", png_bytes((400, 400)), max_bytes=100)
    # names are reduced to a safe basename and get the decoded format's extension
    saved = ws.save_upload(ws.resolve("data"), "../../evil name.jpg", png_bytes(), max_bytes=10**6)
    assert saved == ws.resolve("data/evil_name.png")


def test_non_loopback_bind_needs_auth(tmp_path, capsys):
    assert check_bind("127.0.0.1", None) is None and check_bind("localhost", None) is None
    assert check_bind("::1", None) is None
    with pytest.raises(UserError, match="--auth"):
        check_bind("0.0.0.0", None)
    assert "warning" in check_bind("0.0.0.0", "me:pw")
    with pytest.raises(UserError, match="USER:PASS"):
        check_bind("0.0.0.0", "nopassword")
    # through the CLI: exits 2 with the reason, before binding anything
    assert main(["ui", "--workspace", str(tmp_path), "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--auth USER:PASS" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture
def server(tree):
    """The real app on a free port in a thread; yields request(method, path, body, headers) -> (status, bytes)."""
    ws = Workspace(tree[0])
    ui = UIContext(ws, JobManager(ws.state, ws.root), max_upload_bytes=20_000)
    servers = []

    def start(auth=None, hosts=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = build_app(ui, auth=auth, hosts=hosts if hosts is not None else {"127.0.0.1", "localhost"})
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=srv.run, daemon=True).start()
        servers.append(srv)
        while not srv.started:
            time.sleep(0.02)

        def request(method, path, body=None, headers=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, body=body, headers={"X-Dev2pro-UI": "1", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        return request
    yield start
    for srv in servers:
        srv.should_exit = True


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "----dev2protest"
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_http_routes_refuse_traversal_and_bad_uploads(server, tree):
    ws_dir, _ = tree
    req = server()
    assert req("GET", "/files/data/a.png")[0] == 200
    for path in ["/files/../secret/key.txt", "/files/%2e%2e/secret/key.txt", "/files/data/%2e%2e/%2e%2e/secret/key.txt",
                 "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/escape/key.txt", "/files/.dev2pro-ui/x",
                 "/api/thumb?path=%2Fetc%2Fpasswd", "/api/thumb?path=escape/key.txt",
                 "/api/dataset?folder=..", "/api/dataset?folder=escape", "/static/..%2Fapp.py", "/static/index.html"]:
        status, body = req("GET", path)
        assert status in (400, 404), (path, status)
        assert b"TOP SECRET" not in body and b"root:" not in body
    for route, payload in [("/api/caption", {"image": "../x.png", "text": "t"}),
                           ("/api/caption", {"image": "escape/key.txt", "text": "t"}),
                           ("/api/inspect", {"path": "/etc"}),
                           ("/api/settings", {"train_base": "../../"}),
                           ("/api/train/preview", {"values": {"model.path": "/etc", "save.output_dir": "runs/x"}}),
                           ("/api/train/preview", {"values": {"model.path": "data", "save.output_dir": "../out",
                                                              "data.folders": [{"path": "data"}]}})]:
        status, body = req("POST", route, json.dumps(payload), {"Content-Type": "application/json"})
        assert status == 400, (route, status, body)
        assert b"workspace" in body or b"absolute" in body
    # uploads: a script, a truncated PNG and an oversized image are refused and nothing is written
    before = sorted(p.name for p in (ws_dir / "data").iterdir())
    cases = [(b"data", [("files", "x.png", b"<?php system($_GET['c']); ?>")]),  # not an image
             (b"data", [("files", "ok.png", png_bytes()), ("files", "cut.png", png_bytes()[:50])]),  # truncated
             (b"data", [("files", "huge.png", png_bytes((500, 500)) + b"\0" * 30_000)]),  # over the limit
             (b"../outside", [("files", "x.png", png_bytes())]),  # a folder outside the workspace
             (b"escape", [("files", "x.png", png_bytes())])]  # ... or through a symlink
    for folder, files in cases:
        body, ctype = multipart([("folder", None, folder), *files])
        status, text = req("POST", "/api/upload", body, {"Content-Type": ctype})
        assert status in (400, 413), (folder, files[0][1], status, text)  # 413: over the size limit
    assert sorted(p.name for p in (ws_dir / "data").iterdir()) == before
    body, ctype = multipart([("folder", None, b"data"), ("files", "new photo.png", png_bytes())])
    status, text = req("POST", "/api/upload", body, {"Content-Type": ctype})
    assert status == 200 and json.loads(text)["saved"] == ["data/new_photo.png"]


def test_http_csrf_host_and_auth_rules(server):
    req = server()
    status, _ = req("POST", "/api/caption", json.dumps({"image": "data/a.png", "text": "x"}),
                    {"Content-Type": "application/json", "X-Dev2pro-UI": ""})
    assert status == 403  # a cross-site form cannot add the header
    assert req("GET", "/api/models", headers={"Host": "evil.example:80"})[0] == 421  # DNS rebinding
    authed = server(auth="me:pw")
    assert authed("GET", "/api/models")[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"me:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()}
    assert authed("GET", "/api/models", headers=bad)[0] == 401
    assert authed("GET", "/api/models", headers=good)[0] == 200


def test_dataset_api_flags_bad_images_and_previews_buckets(server, tree):
    ws_dir, _ = tree
    (ws_dir / "data" / "tall.png").write_bytes(png_bytes((48, 96)))
    (ws_dir / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (ws_dir / "data" / "tiny.png").write_bytes(png_bytes((8, 8)))
    (ws_dir / "data" / "a.txt").write_text("a red square\n")
    req = server()
    status, body = req("GET", "/api/dataset?folder=data&resolution=64&bucket_step=16")
    assert status == 200, body
    d = json.loads(body)
    by_name = {i["name"]: i for i in d["images"]}
    assert by_name["a.png"]["caption"] == "a red square" and by_name["a.png"]["size"] == [32, 24]
    assert by_name["broken.jpg"]["bad"].startswith("unreadable") and "smaller than 16" in by_name["tiny.png"]["bad"]
    # the buckets training would use (64^2 pixels, 16-px sides) for the two usable images
    from dev2pro.data.buckets import assign_bucket, make_buckets

    buckets = make_buckets(64 * 64, step=16)
    want = collections.Counter("%dx%d" % assign_bucket(w, h, buckets) for w, h in [(32, 24), (48, 96)])
    assert {b["bucket"]: b["images"] for b in d["buckets"]} == want and len(want) == 2
    status, body = req("POST", "/api/caption", json.dumps({"image": "data/tall.png", "text": " a tall one "}),
                       {"Content-Type": "application/json"})
    assert status == 200 and (ws_dir / "data" / "tall.txt").read_text() == "a tall one\n"
