"""The web-app audit's Train/Results fixes at the API: a Basics-only run saves and samples about every quarter of the
steps; the written config leaves the preset's choices to the preset (the CLI's line no longer says "kept your" for
settings nobody wrote); the plan and /api/train/start refuse what `dev2pro train`'s preflight refuses (an inference
base of another family) and uncaptioned images; Compare offers the run's own checkpoints and same-model LoRAs only,
at the slider's strength; the run list is newest first with a status and a date."""

import contextlib
import io
import json
import os
import shutil
import time

import pytest

from dev2pro.ui import trainform

J = {"Content-Type": "application/json"}


@pytest.fixture
def ws_app(tmp_path, tiny_dev_dir, klein_base_dir, klein_distilled_dir):
    from dev2pro.ui.app import UIContext, build_app
    from dev2pro.ui.workspace import Workspace

    from .conftest import png, queue_only_jobs

    root = tmp_path / "ws"
    for name, src in (("dev", tiny_dev_dir), ("klein", klein_base_dir), ("klein-distilled", klein_distilled_dir)):
        shutil.copytree(src, root / "models" / name)
    (root / "data").mkdir()
    for name in ("a", "b"):
        (root / "data" / f"{name}.png").write_bytes(png((64, 64)))
        (root / "data" / f"{name}.txt").write_text("a photo")
    (root / "bare").mkdir()
    (root / "bare" / "c.png").write_bytes(png((64, 64)))
    ws = Workspace(root.resolve())
    ui = UIContext(ws, queue_only_jobs(ws.state, ws.root))
    return build_app(ui, hosts={"127.0.0.1"}), ws.root, ui


BASICS = {"model.path": "models/dev", "data.folders": [{"path": "data"}], "train.steps": "1000", "lora.rank": "4",
          "model.vram": "24", "sample.prompts": "a cat", "save.output_dir": "runs/my-style", "data.trigger": "sks"}


def post(asgi, app, route, body):
    status, raw = asgi(app, "POST", route, json.dumps(body), J)
    return status, json.loads(raw)


def test_every_default_is_a_quarter_in_round_numbers():
    assert [trainform.every_default(n) for n in (1000, 3000, 1333, 400, 20, 10, 1, 0)] == \
        [250, 750, 350, 100, 5, 3, 1, 0]


def test_a_basics_only_run_saves_samples_and_names_its_lora(ws_app, asgi):
    import tomllib

    app, root, ui = ws_app
    status, r = post(asgi, app, "/api/train/preview", {"values": BASICS})
    assert status == 200, r
    cfg = tomllib.loads(r["toml"])
    assert cfg["save"]["every"] == 250 and cfg["sample"]["every"] == 250  # a crash loses at most a quarter
    assert cfg["save"]["name"] == "my-style"  # not lora.safetensors for every run
    no_prompts = {**BASICS, "sample.prompts": ""}  # sample.every needs prompts: the loader refuses it without
    cfg = tomllib.loads(post(asgi, app, "/api/train/preview", {"values": no_prompts})[1]["toml"])
    assert cfg["sample"]["every"] == 0 and cfg["save"]["every"] == 250
    # the form's own values win; the plan says when saving is off
    _, r = post(asgi, app, "/api/train/plan", {"values": {**BASICS, "save.every": "0", "save.name": "mine"},
                                               "card": 24})
    saving = r["plan"]["saving"]
    assert saving["save_every"] == 0 and saving["sample_every"] == 250
    assert "saving is off until the end" in saving["warnings"][0] and r["plan"]["can_start"]
    _, r = post(asgi, app, "/api/train/plan", {"values": BASICS, "card": 24})
    assert r["plan"]["saving"]["warnings"] == []
    status, r = post(asgi, app, "/api/train/start", {"values": {**BASICS, "save.name": "mine"}})
    assert status == 200 and 'name = "mine"' in (root / r["config"]).read_text()


def test_a_run_in_epochs_saves_and_samples_in_epochs(ws_app, asgi):
    """train.epochs from the form: the web app's cadence is a quarter of the epochs, never a step cadence beside an
    epoch one (the loader refuses both), and the plan's time is for the steps the images give."""
    import tomllib

    app, root, ui = ws_app
    assert [trainform.every_epochs_default(e) for e in (16, 10, 2, 0.5)] == [4, 3, 1, 1]
    values = {**BASICS, "train.steps": "1000", "train.epochs": "16"}
    status, r = post(asgi, app, "/api/train/preview", {"values": values})
    assert status == 200, r
    cfg = tomllib.loads(r["toml"])
    assert cfg["train"]["epochs"] == 16 and cfg["save"]["every_epochs"] == 4 and cfg["sample"]["every_epochs"] == 4
    assert cfg["save"].get("every", 0) == 0 and cfg["sample"].get("every", 0) == 0
    # the user's own epoch cadence wins, and no step cadence is added beside it
    r = post(asgi, app, "/api/train/preview", {"values": {**BASICS, "save.every_epochs": "2"}})[1]
    cfg = tomllib.loads(r["toml"])
    assert cfg["save"]["every_epochs"] == 2 and cfg["save"].get("every", 0) == 0 and cfg["sample"]["every"] == 250
    _, r = post(asgi, app, "/api/train/plan", {"values": values, "card": 24})
    sv = r["plan"]["saving"]
    assert sv["warnings"] == [] and sv["save_every_epochs"] == 4 and sv["epochs"] == 16
    assert r["plan"]["dataset"]["samples"] == 2
    from dev2pro.schemas import load_train_config
    from dev2pro.ui.planview import run_steps

    base = [f'model.path="{root}"', 'save.output_dir="out"', "data.batch_size=2", f'data.folders=[{{path="{root}"}}]']
    cfg = load_train_config(None, base + ["train.epochs=16"])
    assert run_steps(cfg, {"samples": 5}) == (48, True)  # 16 x ceil(5 / 2) batches
    assert run_steps(cfg, {"samples": 0}) == (1000, False)  # shards / nothing found: train.steps, not a guess
    assert run_steps(load_train_config(None, base), {"samples": 5}) == (1000, False)


def test_the_written_config_leaves_the_presets_choices_to_the_preset(ws_app, asgi):
    """A UI run's config loaded by the CLI: the preset chooses the same values and the line names no 'kept your'
    setting the user never wrote; one the user did write is still 'kept'."""
    from dev2pro.schemas import load_train_config

    app, root, ui = ws_app
    status, r = post(asgi, app, "/api/train/start", {"values": BASICS})
    assert status == 200, r
    config = root / r["config"]
    text = config.read_text()
    assert "# fp8_storage = true  (the model.vram preset's choice" in text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cfg = load_train_config(str(config))
    assert "--vram 24 preset" in out.getvalue() and "kept your" not in out.getvalue(), out.getvalue()
    _, plan = post(asgi, app, "/api/train/plan", {"values": BASICS, "card": 24})
    for key, value in plan["plan"]["preset"].items():  # the same values as the plan showed
        sec, name = key.split(".")
        got = getattr(getattr(cfg, sec), name)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert cfg.save.every == 250 and cfg.model.vram == 24
    status, r = post(asgi, app, "/api/train/start", {"values": {**BASICS, "save.output_dir": "runs/b",
                                                                "model.vae_tiling": True}})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_train_config(str(root / r["config"]))
    assert "(kept your model.vae_tiling)" in out.getvalue()


def test_plan_and_start_refuse_what_the_clis_preflight_refuses(ws_app, asgi):
    app, root, ui = ws_app
    klein = {**BASICS, "model.path": "models/klein", "save.output_dir": "runs/k"}
    _, r = post(asgi, app, "/api/train/plan", {"values": {**klein, "model.inference_base": "models/dev"},
                                               "card": 24})
    p = r["plan"]
    assert not p["can_start"] and "model.inference_base" in p["reasons"][0] and "FLUX.1" in p["reasons"][0]
    status, r = post(asgi, app, "/api/train/start", {"values": {**klein, "model.inference_base": "models/dev"}})
    assert status == 400 and "model.inference_base" in r["error"] and ui.jobs.list() == []
    _, r = post(asgi, app, "/api/train/plan", {"values": {**klein, "model.inference_base": "models/klein-distilled"},
                                               "card": 24})
    assert r["plan"]["can_start"], r["plan"]["reasons"]
    # uncaptioned images: the plan's reason, now enforced by the start too
    status, r = post(asgi, app, "/api/train/start", {"values": {**BASICS, "data.folders": [{"path": "bare"}]}})
    assert status == 400 and "1 of 1 images have no caption" in r["error"] and ui.jobs.list() == []
    status, r = post(asgi, app, "/api/train/start", {"values": BASICS, "card": 1})  # the page's card: the fit too
    assert status == 400 and "needs" in r["error"]


def make_run(root, name, model, files, when):
    run = root / "runs" / name
    (run / "logs").mkdir(parents=True)
    (run / "config.toml").write_text(f'[model]\npath = "{root}/models/{model}"\n[sample]\nprompts = ["a cat"]\n'
                                     f'seeds = [1]\nsteps = 2\nwidth = 64\nheight = 64\n[train]\nsteps = 20\n')
    for f in files:
        (run / f).write_bytes(b"\0" * 16)
    for p in (run, run / "config.toml"):
        os.utime(p, (when, when))
    return run


def test_compare_offers_own_checkpoints_and_same_model_loras_at_the_sliders_strength(ws_app, asgi):
    import tomllib

    app, root, ui = ws_app
    now = time.time()
    make_run(root, "dev1", "dev", ["dev1.safetensors", "dev1-step000010.safetensors",
                                   "dev1.diffusers.safetensors"], now - 300)
    make_run(root, "dev2", "dev", ["dev2.safetensors"], now - 200)
    make_run(root, "klein1", "klein", ["klein1.safetensors"], now - 100)
    status, raw = asgi(app, "GET", "/api/compare/candidates?lora=runs/dev1/dev1.safetensors")
    assert status == 200, raw
    assert json.loads(raw)["candidates"] == ["runs/dev1/dev1-step000010.safetensors", "runs/dev2/dev2.safetensors"]
    status, r = post(asgi, app, "/api/compare", {"lora": "runs/dev1/dev1.safetensors",
                                                 "other": "runs/klein1/klein1.safetensors"})
    assert status == 400 and "'other'" in r["error"] and "FLUX.2" in r["error"] and "FLUX.1" in r["error"]
    status, r = post(asgi, app, "/api/compare", {"lora": "runs/dev1/dev1.safetensors", "strength": 0.7,
                                                 "other": "runs/dev1/dev1-step000010.safetensors"})
    assert status == 200, r
    arms = tomllib.loads((root / r["config"]).read_text())["arms"]
    assert [a["loras"][0].rsplit(":", 1)[1] for a in arms if a["loras"]] == ["0.7", "0.7"]
    assert r["title"].endswith("x0.7")
    # the run list: newest first, each with its status and when it last changed
    _, raw = asgi(app, "GET", "/api/runs")
    runs = json.loads(raw)["runs"]
    assert [x["run"] for x in runs] == ["runs/klein1", "runs/dev2", "runs/dev1"]
    assert all(x["status"] == "no UI job" and x["modified"] > now - 400 for x in runs)
