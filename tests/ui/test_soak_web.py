"""Acceptance soak for issue 18: 200 seeded, well-formed but hostile requests over every route of the web app
(fuzzed JSON bodies; ``../``, absolute, symlinked and ``%2e%2e`` paths, huge numbers, unicode, newlines and NULs in
every field; uploads with hostile names and contents), in-process through the ASGI app. With a canary file outside
the workspace: no response ever contains it, its bytes and mtime never change, nothing appears outside the
workspace, no response is a 500, every queued job and written config names only workspace paths, and the
process RSS stays under 1 GB. Reproducible: DEV2PRO_SOAK_SEED / DEV2PRO_SOAK_N pick the seed and the count
(default 18, 200); DEV2PRO_SOAK_SHOW=1 prints every answer that is not 200/400/404/413."""

import io
import json
import os
import random
import sys
import time

import psutil
import pytest
from PIL import Image

pytest.importorskip("starlette")

from dev2pro.ui import routes_data  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEED, REQUESTS = int(os.environ.get("DEV2PRO_SOAK_SEED", 18)), int(os.environ.get("DEV2PRO_SOAK_N", 200))


def hostile_strings(ws, out) -> list[str]:
    canary = str(out / "canary.txt")
    return ["../outside/canary.txt", "../../", "..", canary, "/etc/passwd", "escape/canary.txt", "mixed/b.txt",
            "%2e%2e/outside/canary.txt", "data/%2e%2e/%2e%2e/outside", "data/../../outside/canary.txt",
            "..\\..\\outside", "data/a.png\x00.txt", "~/x", "C:/Windows", "file://" + canary, "/" + canary,
            "data", "mixed", "data/a.png", "mixed/c.png", "models/flux", "models/linked", "models/alias", "runs/r1",
            "runs/r1/lora.safetensors", "loose.safetensors", ".dev2pro-ui/jobs", ".dev2pro-ui/settings.json",
            "configs", "", ".", "./", "a" * 5000, "données/ñ/💥", "a\nb", "line\r\n../x", " ../x ", "\t", "-rf",
            "--out=/tmp/x", "runs/new", "runs/x/../../..", "data/bomb.png", "$(touch /tmp/p)", "`id`", "%00",
            str(ws), str(ws / "data"), str(out)]


def hostile_values(rng, strings) -> list:
    return strings + [None, True, False, 0, -1, 10**30, -(10**30), 2**63, 1e308, -1e-308, 3.5, "NaN", "1e999",
                      "9" * 5000, [], {}, [rng.choice(strings)], {"path": rng.choice(strings)}, ["data", 5, None],
                      [[["deep"]]]]


def make_bomb(path):
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())


def snapshot(tmp_path, ws) -> dict:
    """Every file outside the workspace under the test folder: (bytes, mtime_ns)."""
    out = {}
    for root, dirs, files in os.walk(tmp_path):
        if os.path.realpath(root).startswith(str(ws)):
            dirs[:] = []
            continue
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                out[p] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def multipart(rng, strings) -> tuple[list[bytes], dict]:
    boundary = "----soak%d" % rng.randrange(10**6)
    parts = [("folder", None, rng.choice(strings).encode("utf-8", "replace"))]
    for _ in range(rng.randint(0, 3)):
        content = rng.choice([b"\x89PNG not really", png_bytes(), b"<?php ?>", b"\0" * 30_000])
        parts.append(("files", rng.choice(strings + ["x.png", "../../../evil.png"])[:200], content))
    if rng.random() < 0.2:
        parts.append((rng.choice(["overwrite", "bogus", "../x"]), None, b"1"))
    body = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode("utf-8", "replace") + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    chunked = rng.random() < 0.5
    chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)] if chunked else body
    return chunks, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def fuzz_train_values(rng, keys, values) -> dict:
    v = {"model.path": "models/flux", "data.folders": [{"path": "data"}], "save.output_dir": "runs/soak%d"
         % rng.randrange(10**6)}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys + ["data.folders", "save.name", "save.output_dir", "save.name", "bogus.key"])
        v[key] = [{"path": rng.choice(values), "caption": rng.choice(values)}] if key == "data.folders" \
            else rng.choice(values)
    if rng.random() < 0.3:
        v["save.overwrite"] = True
    return v


def request_for(rng, strings, values, keys, job_ids):
    """One random (method, url, body, headers) over every route."""
    s, v = (lambda: rng.choice(strings)), (lambda: rng.choice(values))
    q = lambda x: str(x).replace("%", "%25").replace("&", "%26").replace("#", "%23").replace(" ", "%20")  # noqa
    raw = lambda x: str(x).replace("#", "").replace("?", "")  # noqa: E731 -- unencoded, as an attacker types it
    j = lambda d: ("POST", d[0], json.dumps(d[1]), {"Content-Type": "application/json"})  # noqa: E731
    pick = rng.randrange(24)
    if pick == 0:
        return "GET", "/files/" + raw(s()).lstrip("/"), b"", {}
    if pick == 1:
        return "GET", f"/api/thumb?path={q(s())}&size={q(v())}", b"", {}
    if pick == 2:
        return "GET", f"/api/dataset?folder={q(s())}&resolution={q(v())}&bucket_step={q(v())}&min_size={q(v())}", \
            b"", {}
    if pick == 3:
        return "GET", f"/api/dataset?folder=data&resolution={q(v())}", b"", {}
    if pick == 4:
        return "GET", rng.choice(["/api/models", "/api/jobs", "/api/runs", "/api/compares", "/api/schema", "/",
                                  "/static/app.js", "/static/train.js", "/static/" + raw(s())]), b"", {}
    if pick == 5:
        return "GET", f"/api/run?run={q(s())}", b"", {}
    if pick == 6:
        job = rng.choice(job_ids + [raw(s())]) if job_ids else raw(s())
        return "GET", f"/api/jobs/{job}?lines={q(v())}", b"", {}
    if pick == 7:
        job = rng.choice(job_ids + [raw(s())]) if job_ids else raw(s())
        return "POST", f"/api/jobs/{job}/stop", b"", {}
    if pick == 8:
        return j(("/api/settings", {rng.choice(["dataset", "trigger", "train_base", "bogus"]): v()}))
    if pick == 9:
        return j(("/api/inspect", {"path": v()}))
    if pick == 10:
        return j(("/api/convert", {"src": v(), "dst": v(), "dtype": rng.choice(["fp8", v()])}))
    if pick in (11, 12):
        chunks, headers = multipart(rng, strings)
        return "POST", "/api/upload", chunks, headers
    if pick == 13:
        return j(("/api/caption", {"image": rng.choice(["data/a.png", s()]), "text": v()}))
    if pick == 14:
        return j(("/api/autocaption", {"folder": rng.choice(["data", s()]), "model": rng.choice(["models/flux", s()]),
                                       "prompt": v(), "trigger": v(), "max_length": v(), "batch_size": v(),
                                       "files": rng.choice([[s()], v(), ["data/a.png"]]), "overwrite": v()}))
    if pick in (15, 16, 17):
        route = rng.choice(["/api/train/preview", "/api/train/start", "/api/train/plan"])
        body = {"values": fuzz_train_values(rng, keys, values) if rng.random() < 0.9 else v()}
        if route == "/api/train/plan" and rng.random() < 0.7:
            body["card"] = rng.choice(["gpu", 24, v()])
        return j((route, body))
    if pick == 18:
        return j(("/api/train/resume", {"run": v()}))
    if pick in (19, 20):
        return j(("/api/sample", {"lora": rng.choice(["runs/r1/lora.safetensors", s()]), "strength": v(),
                                  "prompt": v()}))
    if pick == 21:
        return j(("/api/compare", {"lora": rng.choice(["runs/r1/lora.safetensors", s()]), "other": v(),
                                   "steps": v()}))
    if pick == 22:  # raw garbage bodies on a JSON route
        route = rng.choice(["/api/sample", "/api/caption", "/api/train/start", "/api/settings"])
        body = rng.choice([b"{", b"[]", b"null", b'"x"', b"\xff\xfe\x00", b"[" * 50_000, b'{"a": 1e999}',
                           b'{"values": {"train.steps": NaN}}', json.dumps({"values": {"x": "\x00"}}).encode()])
        return "POST", route, body, {"Content-Type": "application/json"}
    return "POST", rng.choice(["/api/train/preview", "/api/caption"]), b"x" * 1_100_000, \
        {"Content-Type": "application/json"}  # over the JSON body limit


def inside(path: str, ws) -> bool:
    real = os.path.realpath(path)
    return real == str(ws) or real.startswith(str(ws) + os.sep)


def path_strings(node, args: bool = False):
    """Every string in a (TOML/JSON) tree; ``args``: command arguments, with flags' values split off
    (``--out=/x`` -> ``/x``; ``--lora PATH:1.0`` -> ``PATH``)."""
    if isinstance(node, dict):
        for x in node.values():
            yield from path_strings(x, args)
    elif isinstance(node, list):
        for x in node:
            yield from path_strings(x, args)
    elif isinstance(node, str):
        yield from (node, node.split("=", 1)[-1], node.rsplit(":", 1)[0]) if args else (node,)


def test_soak_hostile_requests(web_app, asgi, tmp_path, monkeypatch):
    app, ws, out, ui = web_app
    make_bomb(ws / "data" / "bomb.png")
    inspected = []

    async def fake_inspect(*argv, **kwargs):  # `inspect` imports torch in a subprocess: record what it would read
        inspected.append(argv[4])

        class Proc:
            returncode = 1

            async def communicate(self):
                return b"", b"error: not a checkpoint (soak stand-in)\n"
        return Proc()
    monkeypatch.setattr(routes_data.asyncio, "create_subprocess_exec", fake_inspect)
    rng = random.Random(SEED)
    strings = hostile_strings(ws, out)
    values = hostile_values(rng, strings)
    status, body = asgi(app, "GET", "/api/schema")
    keys = [f["key"] for f in json.loads(body)["fields"] if f["kind"] != "section"]
    before = snapshot(tmp_path, ws)
    canary = (out / "canary.txt").read_bytes()
    # growth, not the absolute size: the suite's earlier tests leave torch and friends in this process (~1.3 GB);
    # a decoded bomb (20k x 20k) would add 400 MB to 1.2 GB
    proc, statuses, started = psutil.Process(), {}, time.time()
    rss0 = max_rss = proc.memory_info().rss
    for i in range(REQUESTS):
        method, url, body, headers = request_for(rng, strings, values, keys, [j["id"] for j in ui.jobs.list()])
        status, text = asgi(app, method, url, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        if os.environ.get("DEV2PRO_SOAK_SHOW") and status not in (200, 400, 404, 413):
            print(status, method, url, str(body)[:200], text[:300])
        assert status != 500 and status is not None, (i, method, url, str(body)[:300], text[:500])
        assert canary not in text, (i, method, url)
        max_rss = max(max_rss, proc.memory_info().rss)
        assert max_rss - rss0 < 2**28, (i, method, url, max_rss, rss0)
    after = snapshot(tmp_path, ws)
    assert after == before  # the canary (bytes and mtime) and every other file outside: unchanged, none added
    assert (out / "canary.txt").read_bytes() == canary
    # what would run: every queued job's paths and every written config's paths are inside the workspace
    jobs = ui.jobs.list()
    for job in jobs:
        for arg in path_strings([a for a in job["args"] if not a.startswith("--prompt=")], args=True):
            assert not arg.startswith("/") or inside(arg, ws), (job["id"], arg)
    for cfg in (ws / "configs").glob("*.toml") if (ws / "configs").is_dir() else []:
        for value in path_strings(tomllib.loads(cfg.read_text())):
            assert not value.startswith("/") or inside(value, ws), (cfg.name, value)
    assert all(inside(p, ws) for p in inspected)
    print(f"soak: {REQUESTS} requests in {time.time() - started:.1f} s, statuses {dict(sorted(statuses.items()))}, "
          f"{len(jobs)} jobs queued, max RSS {max_rss / 2**20:.0f} MiB")
    assert sum(n for s, n in statuses.items() if s == 200) >= 10  # the soak reached the routes' real work too
