"""Issue 18, the web app's half: names are paths too, no read follows a symlink out, GETs are bounded, each queued
run trains its own config, bad input is a 4xx with the reason (never 500), unknown form keys are refused and an
upload is refused while it streams. Requests go straight into the ASGI app (``asgi`` fixture, conftest)."""

import io
import json
import os

import pytest
from PIL import Image

pytest.importorskip("starlette")

from dev2pro.ui.workspace import PathRefused, Workspace  # noqa: E402

CANARY = "CANARY-3b1f-do-not-read"  # conftest.make_workspace's file outside the workspace
J = {"Content-Type": "application/json"}
RUN_TOML = """[model]\npath = "{ws}/models/flux"\n[sample]\nprompts = ["a cat"]\nseeds = [1]\nsteps = 2
width = 64\nheight = 64\nguidance = 3.5\n[train]\nsteps = 10\n"""


@pytest.fixture
def app(web_app):
    return web_app


def train_values(**extra):
    # data/b.png has no caption: a default caption, or the start is refused for it (as the plan refuses it)
    return {"model.path": "models/flux", "data.folders": [{"path": "data"}], "save.output_dir": "runs/new",
            "data.default_caption": "a photo", **extra}


# ------------------------------------------------------------------------------------------------ item 2: names
def test_save_name_and_other_names_cannot_leave_the_workspace(app, asgi, tmp_path):
    app, ws_dir, out, ui = app
    for name in ["../../../x", "../x", "a/b", "..", ".hidden", "x\ny", "/etc/x"]:
        for route in ("/api/train/preview", "/api/train/start"):
            status, body = asgi(app, "POST", route, json.dumps({"values": train_values(**{"save.name": name})}), J)
            assert status == 400 and b"save.name" in body, (name, route, status, body)
    assert not list(tmp_path.glob("**/x.safetensors")) and ui.jobs.list() == []
    # a LoRA file name that exists as a symlink out of the run folder is refused too
    (ws_dir / "runs" / "new").mkdir()
    os.symlink(out / "canary.txt", ws_dir / "runs" / "new" / "evil.safetensors")
    status, body = asgi(app, "POST", "/api/train/preview", json.dumps({"values": train_values(**{
        "save.name": "evil"})}), J)
    assert status == 400 and b"outside" in body
    (ws_dir / "runs" / "new" / "evil.safetensors").unlink()
    status, body = asgi(app, "POST", "/api/train/preview", json.dumps({"values": train_values(**{
        "save.name": "my-lora_v2"})}), J)
    assert status == 200 and 'name = "my-lora_v2"' in json.loads(body)["toml"]
    ws = Workspace(ws_dir)
    with pytest.raises(PathRefused, match="plain file name"):
        ws.name(ws.root / "runs", "a/../../b", "save.name")
    os.symlink(out / "canary.txt", ws_dir / "runs" / "a" / "evil.safetensors")
    with pytest.raises(PathRefused, match="outside"):  # the name's own check, before any folder scan
        ws.name(ws.root / "runs" / "a", "evil", "save.name", (".safetensors",))


def test_config_folder_symlinked_out_is_refused(app, asgi):
    app, ws_dir, out, ui = app
    os.symlink(out, ws_dir / "configs")
    status, body = asgi(app, "POST", "/api/train/start", json.dumps({"values": train_values()}), J)
    assert status == 400 and b"outside the workspace" in body
    assert sorted(p.name for p in out.iterdir()) == ["canary.txt", "model", "pic.png"]


# ------------------------------------------------------------------------------------------------ items 3 + 7: reads
def test_no_read_follows_a_symlink_out_and_listings_survive_one(app, asgi):
    app, ws_dir, out, ui = app
    status, body = asgi(app, "GET", "/api/dataset?folder=mixed")
    assert status == 200, body
    d = json.loads(body)
    assert CANARY.encode() not in body
    by_name = {i["name"]: i for i in d["images"]}
    assert set(by_name) == {"a.png", "b.png"}  # c.png (a symlink out) is left out, the rest listed
    assert by_name["a.png"]["caption"] == "a blue square" and by_name["b.png"]["has_caption"] is False
    assert [s["name"] for s in d["skipped"]] == ["c.png"]
    assert d["folders"] == ["data", "mixed"]  # escape/ (a symlinked image folder out of the workspace) is not listed
    for url in ["/api/thumb?path=mixed/c.png", "/files/mixed/b.txt", "/files/mixed/c.png", "/api/dataset?folder=escape"]:
        status, body = asgi(app, "GET", url)
        assert status in (400, 404) and CANARY.encode() not in body, (url, status)
    status, body = asgi(app, "GET", "/api/models")
    assert status == 200, body
    m = json.loads(body)
    assert m["flux"] == ["models/flux"]  # the inside alias resolves to the same folder: listed once
    assert {s["path"] for s in m["skipped"]} >= {"models/linked"}
    # writing a caption through a symlink out is refused; the canary is untouched
    status, body = asgi(app, "POST", "/api/caption", json.dumps({"image": "mixed/b.png", "text": "x"}), J)
    assert status == 400 and (out / "canary.txt").read_text() == CANARY


def test_jobs_never_read_through_a_symlink_out(app, asgi):
    """A folder a job would read (dataset, model, captioner, convert source) holding a symlink out is refused
    with the entries named; nothing is queued."""
    app, ws_dir, out, ui = app
    status, body = asgi(app, "POST", "/api/train/preview", json.dumps({"values": train_values(**{
        "data.folders": [{"path": "mixed"}]})}), J)
    assert status == 400 and b"mixed/b.txt" in body and b"mixed/c.png" in body, body
    os.symlink(out / "canary.txt", ws_dir / "models" / "flux" / "transformer" / "weights.safetensors")
    for route, payload in [("/api/train/start", {"values": train_values()}),
                           ("/api/autocaption", {"folder": "mixed", "model": "models/alias"}),
                           ("/api/autocaption", {"folder": "data", "model": "models/flux"}),
                           ("/api/convert", {"src": "models/flux", "dst": "x.safetensors"}),
                           ("/api/inspect", {"path": "models/alias"}),
                           ("/api/sample", {"lora": "runs/r1/lora.safetensors"})]:
        status, body = asgi(app, "POST", route, json.dumps(payload), J)
        assert status == 400 and b"outside the workspace" in body, (route, status, body)
    assert ui.jobs.list() == []


def test_run_pages_read_nothing_through_symlinks_out(app, asgi):
    app, ws_dir, out, ui = app
    os.symlink(out / "canary.txt", ws_dir / "runs" / "r1" / "summary.json")
    os.symlink(out / "pic.png", ws_dir / "runs" / "r1" / "leak.safetensors")
    os.symlink(ws_dir, ws_dir / "runs" / "loop")  # a symlink loop: listings stay bounded
    status, body = asgi(app, "GET", "/api/runs")
    assert status == 200 and [r["run"] for r in json.loads(body)["runs"]] == ["runs/r1"]
    status, body = asgi(app, "GET", "/api/models")
    assert status == 200 and json.loads(body)["flux"] == ["models/flux"]
    status, body = asgi(app, "GET", "/api/run?run=runs/r1")
    assert status == 200, body
    info = json.loads(body)
    assert info["summary"] is None and info["loras"] == ["runs/r1/lora.safetensors"] and info["total_steps"] == 10


# ------------------------------------------------------------------------------------------------ item 4: bounds
@pytest.mark.parametrize("query", ["resolution=1000000000", "resolution=-5", "resolution=1e9", "bucket_step=1",
                                   "bucket_step=100000", "min_size=99999999", "resolution=" + "9" * 5000])
def test_dataset_query_is_range_checked_before_any_work(app, asgi, query):
    app = app[0]
    status, body = asgi(app, "GET", f"/api/dataset?folder=data&{query}")
    assert status == 400 and (b"out of range" in body or b"integer" in body), body


def test_thumbnail_of_a_decompression_bomb_is_a_4xx(app, asgi):
    app, ws_dir, _, _ = app
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")  # 400 MP, a few kB on disk
    (ws_dir / "data" / "bomb.png").write_bytes(buf.getvalue())
    status, body = asgi(app, "GET", "/api/thumb?path=data/bomb.png")
    assert status == 413 and (b"megapixels" in body or b"decompression" in body), (status, body)
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # 64 MP: under PIL's own bomb limit, over the page's
    (ws_dir / "data" / "big.png").write_bytes(buf.getvalue())
    status, body = asgi(app, "GET", "/api/dataset?folder=data")  # both listed, flagged from their headers
    items = {i["name"]: i for i in json.loads(body)["images"]}
    assert status == 200 and items["big.png"]["size"] is None and "megapixels" in items["big.png"]["bad"]
    assert "DecompressionBomb" in items["bomb.png"]["bad"]
    assert asgi(app, "GET", "/api/thumb?path=data/big.png")[0] == 413
    assert asgi(app, "GET", "/api/thumb?path=data/a.png&size=99999")[0] == 400
    assert asgi(app, "GET", "/api/thumb?path=data/a.png")[0] == 200


# ------------------------------------------------------------------------------------------------ item 5: configs
def test_each_queued_run_has_its_own_immutable_config(app, asgi):
    app, ws_dir, _, ui = app
    configs = []
    for run, steps in (("runs/a/same", "11"), ("runs/b/same", "22")):
        status, body = asgi(app, "POST", "/api/train/start", json.dumps({"values": train_values(**{
            "save.output_dir": run, "train.steps": steps})}), J)
        assert status == 200, body
        configs.append(ws_dir / json.loads(body)["config"])
    assert configs[0] != configs[1]
    import tomllib
    first, second = (tomllib.loads(c.read_text()) for c in configs)
    assert (first["train"]["steps"], second["train"]["steps"]) == (11, 22)
    assert first["save"]["output_dir"].endswith("runs/a/same") and second["save"]["output_dir"].endswith("runs/b/same")
    jobs = {j["run_dir"]: j for j in ui.jobs.list()}
    assert jobs["runs/a/same"]["args"] == ["train", str(configs[0])] and jobs["runs/a/same"]["status"] == "queued"
    before = configs[0].read_bytes()
    # the same run again while queued: refused, its config untouched
    status, _ = asgi(app, "POST", "/api/train/start", json.dumps({"values": train_values(**{
        "save.output_dir": "runs/a/same", "train.steps": "33"})}), J)
    assert status == 400 and configs[0].read_bytes() == before


# ------------------------------------------------------------------------------------------------ item 7/8: 4xx
def test_sample_and_compare_answer_bad_input_with_a_4xx(app, asgi):
    app, ws_dir, out, ui = app
    cases = [("/api/sample", {"lora": "loose.safetensors"}, b"not in a run folder"),
             ("/api/compare", {"lora": "loose.safetensors"}, b"not in a run folder"),
             ("/api/sample", {"lora": "runs/r1"}, b"not a .safetensors"),
             ("/api/sample", {"lora": 5}, b"must be a string"),
             ("/api/sample", {"lora": "runs/r1/lora.safetensors", "strength": "nan"}, b"strength"),
             ("/api/sample", {"lora": "runs/r1/lora.safetensors", "strength": 1e400}, b"finite"),
             ("/api/compare", {"lora": "runs/r1/lora.safetensors", "steps": 10**30}, b"out of range"),
             ("/api/compare", {"lora": "runs/r1/lora.safetensors", "other": "data/a.png"}, b"not a .safetensors"),
             ("/api/sample", [1, 2], b"JSON object"),
             ("/api/caption", {"image": "data/a.png", "text": "x\x00y"}, b"NUL")]
    for route, payload, reason in cases:
        body = json.dumps(payload) if not (isinstance(payload, dict) and payload.get("strength") == 1e400) \
            else '{"lora": "runs/r1/lora.safetensors", "strength": 1e400}'
        status, text = asgi(app, "POST", route, body, J)
        assert 400 <= status < 500 and reason in text, (route, payload, status, text)
    for bad in [b"{not json", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"1" * 5000]:
        status, text = asgi(app, "POST", "/api/sample", bad, J)
        assert 400 <= status < 500, (bad[:20], status, text)
    # a run config naming a model outside the workspace: refused, nothing queued
    (ws_dir / "runs" / "r1" / "config.toml").write_text(RUN_TOML.format(ws=out))
    status, text = asgi(app, "POST", "/api/sample", json.dumps({"lora": "runs/r1/lora.safetensors"}), J)
    assert status == 400 and b"outside the workspace" in text and ui.jobs.list() == []
    (ws_dir / "runs" / "r1" / "config.toml").write_text(RUN_TOML.format(ws=ws_dir))
    status, text = asgi(app, "POST", "/api/sample", json.dumps({"lora": "runs/r1/lora.safetensors",
                                                                 "prompt": "--out=/tmp/x\na dog"}), J)
    assert status == 200, text
    args = json.loads(text)["args"]
    assert "--prompt=--out=/tmp/x" in args and "--prompt=a dog" in args


def test_unknown_form_keys_are_refused_not_dropped(app, asgi):
    app = app[0]
    status, body = asgi(app, "POST", "/api/train/preview", json.dumps({"values": train_values(**{
        "train.stepz": "5"})}), J)
    assert status == 400 and b"train.stepz" in body and b"train.steps" in body
    status, body = asgi(app, "POST", "/api/train/preview", json.dumps({"values": train_values(**{
        "data.folders": [{"path": "data", "bogus": 1}]})}), J)
    assert status == 400 and b"bogus" in body
    for route, payload in [("/api/sample", {"lora": "runs/r1/lora.safetensors", "strenght": "2"}),
                           ("/api/train/preview", {"values": train_values(), "overwrite": True}),
                           ("/api/caption", {"image": "data/a.png", "text": "x", "path": "y"})]:
        status, body = asgi(app, "POST", route, json.dumps(payload), J)
        assert status == 400 and b"unknown field" in body, (route, body)


def test_a_chunked_upload_is_refused_while_it_streams(app, asgi):
    app, ws_dir, _, _ = app
    boundary = "----b"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"folder\"\r\n\r\ndata\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n").encode()
    chunks = [head] + [b"\0" * 10_000] * 1000  # 10 MB, no Content-Length; the limit is 20 kB
    status, body = asgi(app, "POST", "/api/upload", chunks, {
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413 and b"big.png" in body
    assert not (ws_dir / "data" / "big.png").exists()


def test_upload_stops_reading_past_the_limit(app):
    """Count how much of a chunked body the app pulls before refusing it."""
    import asyncio

    app, _, _, _ = app
    boundary, pulled = "----b", []
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n").encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/upload", "raw_path": b"/api/upload", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"x-dev2pro-ui", b"1"),
                         (b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    status = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": head if len(pulled) == 1 else b"\0" * 10_000, "more_body": True}

    async def send(m):
        if m["type"] == "http.response.start":
            status.append(m["status"])
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))  # an endless body: must be refused, not read
    assert status == [413] and len(pulled) <= 4


def test_a_config_that_would_not_read_back_is_never_queued(app, asgi):
    """A newline in a text setting: the config is either written escaped (it reads back) or refused with the
    reason; a job never gets a config its command cannot load (issue 18 item 6, escaping: config.render_toml)."""
    import tomllib

    app, ws_dir, _, ui = app
    values = train_values(**{"data.trigger": "tok\nen", "sample.prompts": ["a\nb", 'quote " and \\ \x1b']})
    for route in ("/api/train/preview", "/api/train/start"):
        status, body = asgi(app, "POST", route, json.dumps({"values": values}), J)
        if status == 200:
            cfg = tomllib.loads(json.loads(body)["toml"] if route.endswith("preview") else
                                (ws_dir / json.loads(body)["config"]).read_text())
            assert cfg["data"]["trigger"] == "tok\nen"
        else:
            assert status == 400 and b"readable config" in body and ui.jobs.list() == [], body


def test_resume_runs_the_command_that_made_the_run_on_workspace_paths_only(app, asgi):
    """Monitor's resume: `dedistill --resume` for a de-distillation run (it ran `train`, which refused the config),
    and a run whose saved config names a path outside the workspace is refused, nothing queued."""
    app, ws_dir, out, ui = app
    run = ws_dir / "runs" / "r2"
    (run / "state" / "step-000002").mkdir(parents=True)
    body = (f'[model]\npath = "{ws_dir}/models/flux"\n[[data.folders]]\npath = "{ws_dir}/data"\n'
            f'[save]\noutput_dir = "{run}"\n')
    for config, command in ((body, "train"), ('objective = "flow"\n' + body.replace("[[data.folders]]", "[data]\n"
                                                                                     "[[data.folders]]"), "dedistill")):
        (run / "config.toml").write_text(config)
        status, text = asgi(app, "POST", "/api/train/resume", json.dumps({"run": "runs/r2"}), J)
        assert status == 200, text
        assert ui.jobs.get(json.loads(text)["job"]["id"])["args"] == [command, str(run / "config.toml"), "--resume"]
    n = len(ui.jobs.list())
    (run / "config.toml").write_text(body.replace(f"{ws_dir}/models/flux", f"{out}"))
    status, text = asgi(app, "POST", "/api/train/resume", json.dumps({"run": "runs/r2"}), J)
    assert status == 400 and b"'model.path'" in text and b"outside the workspace" in text
    assert len(ui.jobs.list()) == n


def test_a_start_that_failed_before_saving_does_not_block_its_folder(app, asgi):
    """The web app reuses a folder a failed start left (config.toml, logs: no state), as the CLI does."""
    app, ws_dir, _, ui = app
    (ws_dir / "runs" / "failed").mkdir()
    (ws_dir / "runs" / "failed" / "config.toml").write_text("")
    status, text = asgi(app, "POST", "/api/train/start", json.dumps({"values": train_values(**{
        "save.output_dir": "runs/failed"})}), J)
    assert status == 200, text
    (ws_dir / "runs" / "done").mkdir()
    (ws_dir / "runs" / "done" / "summary.json").write_text("{}")
    status, text = asgi(app, "POST", "/api/train/start", json.dumps({"values": train_values(**{
        "save.output_dir": "runs/done"})}), J)
    assert status == 400 and b"already holds a run" in text
