"""Results' "Get as": POST /api/lora/convert queues `dev2pro lora convert SRC DST --layout L` with DST the name
training gives that layout (``export.lora_paths``) and ``--family flux2`` for a FLUX.2 run; bad input is a 400
naming the field; the job's command, run here, writes the same LoRA, and the run's listings then show it."""

import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("starlette")

from dev2pro.cli import main  # noqa: E402
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora  # noqa: E402

J = {"Content-Type": "application/json"}
H = 8  # an attention-only LoRA on double block 0: its names and shapes fit FLUX.1 and FLUX.2 alike
NAMES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0")


def lora(seed=0) -> LoraWeights:
    g, lw = torch.Generator().manual_seed(seed), LoraWeights()
    for n in NAMES:
        lw[n] = LoraModule(torch.randn(2, H, generator=g), torch.randn(H, 2, generator=g), 3.0)
    return lw


@pytest.fixture
def app(web_app):
    """``web_app``'s finished run runs/r1 (a FLUX.1 config) with a real LoRA and a step checkpoint, and runs/f2 whose
    config names a FLUX.2 base (its keys tell: model.family is "auto", as a run's resolved config writes it)."""
    app, ws, _, ui = web_app
    r1 = ws / "runs" / "r1"
    save_lora(lora(), r1 / "lora.safetensors", "kohya", overwrite=True)
    save_lora(lora(1), r1 / "lora-step000010.safetensors", "kohya")
    save_lora(lora(2), r1 / "lora.comfy.safetensors", "comfy")
    save_file({"img_in.weight": torch.zeros(4, 4), "double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4)},
              str(r1 / "merged.safetensors"))  # a base model in a run folder (a de-distilled export)
    f2 = ws / "runs" / "f2"
    f2.mkdir()
    save_file({"img_in.weight": torch.zeros(4, 4), "single_stream_modulation.lin.weight": torch.zeros(12, 4)},
              str(ws / "models" / "klein.safetensors"))
    (f2 / "config.toml").write_text(f'[model]\npath = "{ws}/models/klein.safetensors"\nfamily = "auto"\n'
                                    f'[sample]\nprompts = ["a cat"]\nseeds = [1]\n')
    save_lora(lora(), f2 / "style.safetensors", "kohya")
    return app, ws, ui


def post(asgi, app, body):
    status, raw = asgi(app, "POST", "/api/lora/convert", json.dumps(body), J)
    return status, json.loads(raw)


def test_the_job_runs_lora_convert_into_the_name_training_gives(app, asgi):
    app, ws, ui = app
    status, job = post(asgi, app, {"lora": "runs/r1/lora.safetensors", "layout": "diffusers"})
    assert status == 200, job
    r1 = ws / "runs" / "r1"
    assert job["args"] == ["lora", "convert", str(r1 / "lora.safetensors"), str(r1 / "lora.diffusers.safetensors"),
                           "--layout", "diffusers"]  # a FLUX.1 run: no --family
    assert (job["kind"], job["out"], job["run_dir"]) == ("lora-convert", "runs/r1/lora.diffusers.safetensors",
                                                         "runs/r1")
    status, step = post(asgi, app, {"lora": "runs/r1/lora-step000010.safetensors", "layout": "comfy"})
    assert status == 200 and step["args"][3] == str(r1 / "lora-step000010.comfy.safetensors"), step
    status, back = post(asgi, app, {"lora": "runs/r1/lora.comfy.safetensors", "layout": "kohya"})
    assert status == 400 and "already exists: runs/r1/lora.safetensors" in back["error"], back
    status, f2 = post(asgi, app, {"lora": "runs/f2/style.safetensors", "layout": "comfy"})
    assert status == 200, f2
    assert f2["args"][-4:] == ["--layout", "comfy", "--family", "flux2"]  # read off the run's base model
    status, again = post(asgi, app, {"lora": "runs/r1/lora.safetensors", "layout": "diffusers"})
    assert status == 400 and again["error"].startswith("'layout': runs/r1/lora.diffusers.safetensors is already "
                                                       "being written"), again


@pytest.mark.parametrize("body,field,words", [
    ({"lora": "runs/r1/lora.safetensors", "layout": "peft"}, "'layout'", "kohya, comfy, diffusers"),
    ({"lora": "runs/r1/lora.safetensors"}, "'layout': is missing", "kohya, comfy, diffusers"),
    ({"lora": "loose.safetensors", "layout": "diffusers"}, "'lora'", "not in a run folder"),
    ({"lora": "runs/r1/config.toml", "layout": "diffusers"}, "'lora'", "not a .safetensors LoRA file"),
    ({"lora": "escape/canary.txt", "layout": "diffusers"}, "", "outside"),
    ({"lora": "runs/r1/merged.safetensors", "layout": "diffusers"}, "'lora'", "is a base model"),
    ({"lora": "runs/r1/lora.safetensors", "layout": "comfy"}, "'layout'", "comfy layout already exists: "
                                                                          "runs/r1/lora.comfy.safetensors"),
])
def test_refusals_name_the_field(app, asgi, body, field, words):
    app, ws, ui = app
    status, r = post(asgi, app, body)
    assert status == 400 and r["error"].startswith(field) and words in r["error"], r
    assert not ui.jobs.list()


def test_a_real_conversion_loads_as_the_source_and_is_listed(app, asgi):
    app, ws, ui = app
    status, before = asgi(app, "GET", "/api/lora/layouts?run=runs/r1")
    files = {f["lora"]: f for f in json.loads(before)["files"]}
    assert "runs/r1/merged.safetensors" not in files  # a base model: no "Get as"
    assert files["runs/r1/lora.safetensors"]["offers"] == {"diffusers": "runs/r1/lora.diffusers.safetensors"}
    assert files["runs/r1/lora.comfy.safetensors"]["layout"] == "comfy"
    _, job = post(asgi, app, {"lora": "runs/r1/lora.safetensors", "layout": "diffusers"})
    assert main(job["args"]) == 0  # the job's own command line, in this process
    src, dst = load_lora(ws / "runs/r1/lora.safetensors"), load_lora(ws / "runs/r1/lora.diffusers.safetensors")
    assert (src.layout, dst.layout) == ("kohya", "diffusers") and sorted(dst) == sorted(NAMES)
    for n in NAMES:
        assert torch.equal(src[n].down, dst[n].down) and torch.equal(src[n].up, dst[n].up), n
        assert src[n].alpha == dst[n].alpha == 3.0
    _, run = asgi(app, "GET", "/api/run?run=runs/r1")
    assert "runs/r1/lora.diffusers.safetensors" in json.loads(run)["loras"]
    _, after = asgi(app, "GET", "/api/lora/layouts?run=runs/r1")
    files = {f["lora"]: f for f in json.loads(after)["files"]}
    assert files["runs/r1/lora.diffusers.safetensors"] == {
        "lora": "runs/r1/lora.diffusers.safetensors", "layout": "diffusers", "offers": {}}
    assert files["runs/r1/lora.safetensors"]["offers"] == {}
    status, r = post(asgi, app, {"lora": "runs/r1/lora.safetensors", "layout": "diffusers"})
    assert status == 400 and "already exists" in r["error"]
