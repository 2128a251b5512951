"""The Train page's server side (issue 23): the annotated schema (Basics, labels in words, groups), the plan before
Start (`/api/train/plan`: the CLI loader's message and the field it names, the fit verdict against a card, the
preset's choices, the caption count), and its gates (the same workspace rules as preview/start)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dev2pro.ui import trainform
from dev2pro.ui.jobs import JobManager

SRC = str(Path(__file__).resolve().parents[2] / "src")


class QueueOnly(JobManager):  # jobs are recorded, never started
    def _start(self, job):
        pass


def png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    """A workspace with a tiny FLUX.1 folder and two captioned images (module scope: init-tiny takes seconds)."""
    ws = tmp_path_factory.mktemp("plan") / "ws"
    (ws / "models").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "dev2pro.cli", "init-tiny", str(ws / "models" / "tiny")],
                         env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (ws / "data").mkdir()
    for name in ("a", "b"):
        (ws / "data" / f"{name}.png").write_bytes(png((64, 64)))
        (ws / "data" / f"{name}.txt").write_text("a photo")
    (ws / "bare").mkdir()
    (ws / "bare" / "c.png").write_bytes(png((64, 64)))  # no caption
    return ws.resolve()


@pytest.fixture
def app(tiny_ws):
    from dev2pro.ui.app import UIContext, build_app
    from dev2pro.ui.workspace import Workspace

    ws = Workspace(tiny_ws)
    return build_app(UIContext(ws, QueueOnly(ws.state, ws.root)), hosts={"127.0.0.1"})


BASICS = {"model.path": "models/tiny", "data.folders": [{"path": "data"}], "train.steps": "10", "lora.rank": "4",
          "model.vram": "24", "sample.prompts": "a cat", "save.output_dir": "runs/x", "data.trigger": "sks"}


def plan(app, asgi, values, card=24):
    status, body = asgi(app, "POST", "/api/train/plan", json.dumps({"values": values, "card": card}))
    assert status == 200, body
    return json.loads(body)


def test_schema_has_basics_labels_and_groups(app, asgi):
    status, body = asgi(app, "GET", "/api/schema")
    r = json.loads(body)
    basics = [f for f in r["fields"] if f["basic"]]
    assert {f["key"] for f in basics} == set(trainform.BASICS) and len(basics) <= 12
    assert all(f["label"] and "_" not in f["label"] for f in r["fields"]), [f["label"] for f in r["fields"]]
    assert {f["group"] for f in r["fields"]} == {title for _, title in trainform.GROUPS}
    assert r["models"] == ["models/tiny"] and "data" in r["datasets"]


def test_plan_fits_and_names_the_preset(app, asgi):
    r = plan(app, asgi, BASICS)
    assert r["ok"], r
    p = r["plan"]
    assert p["fits"] is True and p["can_start"] and p["message"].startswith("fits")
    assert p["preset"]["model.fp8_storage"] is True and p["vram"] == 24
    assert p["dataset"] == {"images": 2, "captioned": 2, "shards": False, "samples": 2}
    assert p["need_gb"] > p["peak_gb"] > 0 and p["host_ram_gb"] > 0


def test_plan_refuses_start_when_it_cannot_fit_or_lacks_captions(app, asgi):
    r = plan(app, asgi, BASICS, card=1)  # the tiny run needs ~2 GB with the CUDA context
    assert r["ok"], r
    p = r["plan"]
    assert p["fits"] is False and not p["can_start"] and "needs" in p["reasons"][0]
    p = plan(app, asgi, {**BASICS, "data.folders": [{"path": "bare"}]})["plan"]
    assert not p["can_start"] and "1 of 1 images have no caption" in p["reasons"][0]
    p = plan(app, asgi, {**BASICS, "data.folders": [{"path": "bare"}], "data.default_caption": "a photo"})["plan"]
    assert p["can_start"], p["reasons"]


def test_plan_answers_with_the_loaders_message_and_field(app, asgi):
    r = plan(app, asgi, {**BASICS, "train.steps": "twenty"})
    assert not r["ok"] and "must be an integer" in r["error"] and r["field"] == "train.steps"
    r = plan(app, asgi, {**BASICS, "lora.rank": "0"})
    assert not r["ok"] and r["field"] == "lora.rank"
    r = plan(app, asgi, {**BASICS, "lora.rank": "1000"})  # above the tiny layers' width: the plan's own refusal
    assert not r["ok"] and "narrowest layer" in r["error"] and r["field"] == "lora.rank"


@pytest.mark.parametrize("values", [
    {**BASICS, "data.folders": [{"path": "../outside"}]},
    {**BASICS, "model.path": "/etc"},
    {**BASICS, "save.output_dir": "../../x"},
    {**BASICS, "no.such": "1"},
])
def test_plan_keeps_the_workspace_gates(app, asgi, values):
    r = plan(app, asgi, values)
    assert not r["ok"] and r["error"]


@pytest.mark.parametrize("body", ['{"values": {}, "card": "huge"}', '{"values": {}, "extra": 1}', '[]',
                                  '{"values": {}, "card": 1e400}'])
def test_plan_refuses_bad_bodies_with_4xx(app, asgi, body):
    status, _ = asgi(app, "POST", "/api/train/plan", body)
    assert 400 <= status < 500


def test_plan_needs_the_ui_header(app, asgi):
    status, _ = asgi(app, "POST", "/api/train/plan", json.dumps({"values": BASICS}), ui_header=False)
    assert status == 403


def test_error_field_finds_the_setting():
    keys = [f for f in trainform.BASICS] + ["train.lr", "sample.steps"]
    assert trainform.error_field("config: 'train.steps' must be an integer", keys) == "train.steps"
    assert trainform.error_field("'data.folders[].path': path '../x' contains '..'", keys) == "data.folders"
    assert trainform.error_field("something else entirely", keys) is None


def test_this_gpu_comes_from_nvidia_smi(tmp_path, monkeypatch):
    """"this GPU": name and memory from `nvidia-smi` (no CUDA context in the web app), the preset not above it."""
    from dev2pro.ui import planview

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(planview, "_gpu", None)
    monkeypatch.setattr(planview, "_gpu_done", planview.threading.Event())
    gpu = planview.detect_gpu()
    assert gpu["name"] == "NVIDIA GeForce RTX 4090" and gpu["preset"] == 24 and abs(gpu["gb"] - 24.0) < 0.1
    fake.write_text("#!/bin/sh\nexit 9\n")  # read once: later calls keep the first answer
    assert planview.detect_gpu() == gpu


def test_time_per_step_from_the_bench_for_full_size_flux1():
    """Without a finished run to measure, full-size FLUX.1 at 512/1024 with a preset gets the H200 bench's s/step."""
    from types import SimpleNamespace as NS

    from dev2pro.ui import planview

    cfg = NS(model=NS(vram=24), data=NS(batch_size=1, resolution=1024))
    flux1 = NS(hidden=3072, num_double=19, num_single=38)
    assert planview.bench_speed(cfg, flux1)["s_per_step"] == planview.BENCH_H200[24][1024]
    assert "H200" in planview.bench_speed(cfg, flux1)["source"]
    assert planview.bench_speed(cfg, NS(hidden=64, num_double=2, num_single=4)) is None  # a tiny model: none
    assert planview.bench_speed(NS(model=NS(vram=0), data=cfg.data), flux1) is None  # no preset: none


def test_models_page_says_where_models_and_captioners_come_from(app, asgi):
    status, body = asgi(app, "GET", "/api/models")
    r = json.loads(body)
    assert r["captioners"] == [] and "hf download" in r["captioner_help"]["command"]
    assert f"--local-dir {r['workspace']}/models/" in r["captioner_help"]["command"]
    assert any("Florence-2" in f for f in r["captioner_help"]["families"]) and "hf download" in r["model_help"]
    assert "black-forest-labs/FLUX.1-dev" in r["model_help"] and "FLUX.2-klein-base-4B" in r["model_help"]
    assert "data" in r["datasets"]


def test_plan_says_when_the_output_name_is_taken(app, asgi, tiny_ws):
    (tiny_ws / "runs" / "taken").mkdir(parents=True)
    (tiny_ws / "runs" / "taken" / "config.toml").write_text("")
    # a start that failed before its first save: the folder is reused, as the CLI reuses it
    assert plan(app, asgi, {**BASICS, "save.output_dir": "runs/taken"})["plan"]["can_start"]
    (tiny_ws / "runs" / "taken" / "summary.json").write_text("{}")  # a run that finished
    p = plan(app, asgi, {**BASICS, "save.output_dir": "runs/taken"})["plan"]
    assert not p["can_start"] and "runs/taken already holds a run" in p["reasons"][0]
    assert plan(app, asgi, {**BASICS, "save.output_dir": "runs/taken", "save.overwrite": True})["plan"]["can_start"]
    (tiny_ws / "runs" / "photos").mkdir()
    (tiny_ws / "runs" / "photos" / "me.png").write_bytes(b"x")
    p = plan(app, asgi, {**BASICS, "save.output_dir": "runs/photos", "save.overwrite": True})["plan"]
    assert not p["can_start"] and "runs/photos holds other files" in " ".join(p["reasons"])
