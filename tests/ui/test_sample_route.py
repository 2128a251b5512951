"""The web app's "sample this LoRA" job renders the base as the run's own samples did: klein distilled at its own
steps without CFG, klein Base at the run's true-CFG scale, a dev-like base at its embedded guidance."""

import json
import shutil

import pytest

from .conftest import queue_only_jobs

RUN = """[model]
path = "{path}"
inference_base = "{inference}"
[sample]
prompts = ["a cat"]
seeds = [1, 2]
steps = 7
width = 64
height = 64
guidance = 3.5
cfg = 4.5
[train]
steps = 10
"""


@pytest.fixture
def klein_ws(tmp_path, klein_base_dir, klein_distilled_dir, tiny_dev_dir):
    from dev2pro.ui.app import UIContext, build_app
    from dev2pro.ui.workspace import Workspace

    ws = tmp_path / "ws"
    for name, src in (("klein-base", klein_base_dir), ("klein", klein_distilled_dir), ("flux1", tiny_dev_dir)):
        shutil.copytree(src, ws / "models" / name)
    for run, (path, inference) in {"on-distilled": ("klein-base", "klein/transformer"),
                                   "on-base": ("klein-base", ""), "flux1": ("flux1", "")}.items():
        (ws / "runs" / run).mkdir(parents=True)
        (ws / "runs" / run / "config.toml").write_text(RUN.format(
            path=ws / "models" / path, inference=ws / "models" / inference if inference else ""))
        (ws / "runs" / run / "lora.safetensors").write_bytes(b"\0" * 16)
    w = Workspace(ws)
    ui = UIContext(w, queue_only_jobs(w.state, w.root))
    return build_app(ui, hosts={"127.0.0.1"}), ui


@pytest.mark.parametrize("run,expected", [
    ("on-distilled", []),  # klein distilled: its own 4 steps, no CFG (`dev2pro sample`'s defaults for it)
    ("on-base", ["--steps", "7", "--guidance", "4.5"]),  # klein Base: true CFG at sample.cfg
    ("flux1", ["--steps", "7", "--guidance", "3.5"]),  # FLUX.1 dev: embedded guidance sample.guidance
])
def test_sample_job_renders_the_base_as_the_runs_samples(klein_ws, asgi, run, expected):
    app, ui = klein_ws
    status, body = asgi(app, "POST", "/api/sample", json.dumps({"lora": f"runs/{run}/lora.safetensors",
                                                                "strength": 1.5}))
    assert status == 200, body
    args = ui.jobs.get(json.loads(body)["id"])["args"]
    grid = [a for i, a in enumerate(args) if a in ("--steps", "--guidance") or
            (i and args[i - 1] in ("--steps", "--guidance"))]
    assert grid == expected, args
    assert "--lora" in args and args[args.index("--lora") + 1].endswith("lora.safetensors:1.5")


@pytest.mark.parametrize("run,expected", [("on-distilled", None), ("on-base", 4.5), ("flux1", 3.5)])
def test_compare_job_renders_the_base_as_the_runs_samples(klein_ws, asgi, run, expected):
    """The compare config's arms carry the same guidance rule (none for klein distilled: its own, no CFG)."""
    import tomllib

    app, ui = klein_ws
    status, body = asgi(app, "POST", "/api/compare", json.dumps({"lora": f"runs/{run}/lora.safetensors"}))
    assert status == 200, body
    arms = tomllib.loads((ui.ws.root / json.loads(body)["config"]).read_text())["arms"]
    assert [a.get("guidance") for a in arms] == [expected] * len(arms)


def test_an_edit_run_samples_and_compares_on_its_reference(klein_ws, asgi):
    """A run with sample.control (an edit-pair LoRA): the sample job edits that image (--image), and so does every
    arm of its compare (the config's ``image``), instead of rendering the LoRA as text-to-image."""
    import tomllib

    from PIL import Image

    app, ui = klein_ws
    run = ui.ws.root / "runs" / "on-distilled"
    Image.new("RGB", (64, 64), "red").save(ui.ws.root / "ref.png")
    config = run / "config.toml"
    config.write_text(config.read_text().replace("[sample]\n", f'[sample]\ncontrol = "{ui.ws.root / "ref.png"}"\n'))
    status, body = asgi(app, "POST", "/api/sample", json.dumps({"lora": "runs/on-distilled/lora.safetensors"}))
    assert status == 200, body
    args = ui.jobs.get(json.loads(body)["id"])["args"]
    assert args[args.index("--image") + 1] == str((ui.ws.root / "ref.png").resolve())
    status, body = asgi(app, "POST", "/api/compare", json.dumps({"lora": "runs/on-distilled/lora.safetensors"}))
    assert status == 200, body
    config = tomllib.loads((ui.ws.root / json.loads(body)["config"]).read_text())
    assert config["image"] == str((ui.ws.root / "ref.png").resolve())


def test_an_edit_run_with_two_references_samples_and_compares_on_both(klein_ws, asgi):
    """sample.control = [a, b]: the sample job gets --image a --image b, in order, and the compare config
    ``image = [a, b]``; a run config whose control is no path (5, [""]) is refused by name, not a TypeError."""
    import re
    import tomllib

    from PIL import Image

    app, ui = klein_ws
    refs = [ui.ws.root / "a.png", ui.ws.root / "b.png"]
    for ref, colour in zip(refs, ("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(ref)
    config = ui.ws.root / "runs" / "on-distilled" / "config.toml"
    text = config.read_text()
    config.write_text(text.replace("[sample]\n", f'[sample]\ncontrol = ["{refs[0]}", "{refs[1]}"]\n'))
    status, body = asgi(app, "POST", "/api/sample", json.dumps({"lora": "runs/on-distilled/lora.safetensors"}))
    assert status == 200, body
    args = ui.jobs.get(json.loads(body)["id"])["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--image"] == [str(r.resolve()) for r in refs]
    status, body = asgi(app, "POST", "/api/compare", json.dumps({"lora": "runs/on-distilled/lora.safetensors"}))
    assert status == 200, body
    assert tomllib.loads((ui.ws.root / json.loads(body)["config"]).read_text())["image"] == [
        str(r.resolve()) for r in refs]
    for bad in ("5", "[5]", '[""]'):
        config.write_text(re.sub(r"control = .*", f"control = {bad}", config.read_text()))
        for route in ("/api/sample", "/api/compare"):
            status, body = asgi(app, "POST", route, json.dumps({"lora": "runs/on-distilled/lora.safetensors"}))
            assert status == 400 and b"sample.control in the run's config is not a path" in body, (bad, body)


def test_caption_count_leaves_the_references_out(tmp_path):
    """A recursive dataset folder with its controls folder inside: the references are not uncaptioned images."""
    from PIL import Image

    from dev2pro.schemas import load_train_config
    from dev2pro.ui.planview import caption_count
    from dev2pro.ui.workspace import Workspace

    data = tmp_path / "data"
    for refs in ("before", "style"):
        (data / refs).mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("make it red")
        for refs in ("before", "style"):
            Image.new("RGB", (64, 64)).save(data / refs / f"{name}.png")
    for controls in (f'"{data / "before"}"', f'["{data / "before"}", "{data / "style"}"]'):  # one, or several
        cfg = load_train_config(None, [f'model.path="{tmp_path}"', 'save.output_dir="out"',
                                       f'data.folders=[{{path="{data}", controls={controls}, recursive=true}}]'])
        n = 2 + 2 * (controls.startswith('"'))
        expected = {"images": n, "captioned": 2, "shards": False, "samples": n}
        assert caption_count(cfg, Workspace(tmp_path)) == expected


def test_caption_count_leaves_every_reference_folder_out(tmp_path):
    """controls = [a, b] in a recursive folder (or a kohya parent): neither folder is counted, and the list is no
    Path (it was a TypeError the Train page showed as 'the plan could not read the model')."""
    from PIL import Image

    from dev2pro.schemas import load_train_config
    from dev2pro.ui.planview import caption_count
    from dev2pro.ui.workspace import Workspace

    data = tmp_path / "data"
    for refs in ("before", "before2"):
        (data / refs).mkdir(parents=True)
        for name in ("a", "b"):
            Image.new("RGB", (64, 64)).save(data / refs / f"{name}.png")
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("make it red")
    (data / ".removed").mkdir()  # the Dataset page's removed images: training skips dot-folders, so does the count
    Image.new("RGB", (64, 64)).save(data / ".removed" / "c.png")
    controls = f'["{data / "before"}", "{data / "before2"}"]'
    cfg = load_train_config(None, [f'model.path="{tmp_path}"', 'save.output_dir="out"',
                                   f'data.folders=[{{path="{data}", controls={controls}, recursive=true}}]'])
    assert caption_count(cfg, Workspace(tmp_path)) == {"images": 2, "captioned": 2, "shards": False, "samples": 2}


def test_models_page_pairs_klein_base_with_its_distilled_model(klein_ws, asgi, tmp_path):
    """A klein Base folder is offered the distilled folder of the same architecture as inference base."""
    app, ui = klein_ws
    other = ui.ws.root / "models" / "klein-9b-ish"  # distilled, but another architecture: not a partner
    shutil.copytree(ui.ws.root / "models" / "klein", other)
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    status, body = asgi(app, "GET", "/api/models")
    assert status == 200
    assert json.loads(body)["distilled_partner"] == {"models/klein-base": "models/klein/transformer"}
