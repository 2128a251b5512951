"""The Models page's convert and the Dataset page's upload, straight into the ASGI app (``web_app``: jobs only
queue). Convert: a LoRA source is refused before a job is queued, naming `dev2pro lora convert`; an existing output
is refused unless ``overwrite`` is set, and then the job is run with --overwrite. Upload: no folder (missing, blank,
the workspace itself) is a 400 naming the field, and nothing lands in the workspace root."""

import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("starlette")

from dev2pro.lora.formats import save_lora  # noqa: E402
from dev2pro.lora.weights import LoraModule  # noqa: E402

from .conftest import png  # noqa: E402

J = {"Content-Type": "application/json"}
MODS = {"transformer_blocks.0.attn.to_out.0": LoraModule(torch.zeros(2, 8), torch.ones(8, 2), 2.0)}


@pytest.fixture
def app(web_app):
    app, ws_dir, _, ui = web_app
    # a base model file (BFL keys: img_in.weight) beside LoRA files in each layout dev2pro writes
    save_file({"img_in.weight": torch.zeros(4, 4), "double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4)},
              str(ws_dir / "models" / "base.safetensors"))
    for layout in ("kohya", "comfy", "diffusers"):
        save_lora(MODS, ws_dir / "models" / f"style-{layout}.safetensors", layout)
    (ws_dir / "models" / "peft").mkdir()  # a folder as diffusers' save_lora_weights writes it
    save_lora(MODS, ws_dir / "models" / "peft" / "pytorch_lora_weights.safetensors", "diffusers")
    return app, ws_dir, ui


def post(asgi, app, payload):
    status, body = asgi(app, "POST", "/api/convert", json.dumps(payload), J)
    return status, json.loads(body)


def test_convert_refuses_a_lora_before_queueing_and_names_the_lora_command(app, asgi):
    app, ws_dir, ui = app
    for src, layout in [("models/style-kohya.safetensors", "kohya"), ("models/style-comfy.safetensors", "comfy"),
                        ("models/style-diffusers.safetensors", "diffusers"),
                        ("models/peft", "diffusers")]:
        status, body = post(asgi, app, {"src": src, "dst": "models/out.safetensors"})
        assert status == 400, (src, body)
        err = body["error"]
        assert f"is a LoRA ({layout} layout), not a base model" in err, err
        assert "converts base models" in err and "dev2pro lora convert" in err and "--layout" in err, err
        assert "kohya|comfy|diffusers" in err
    assert "models/peft/pytorch_lora_weights.safetensors" in err  # the folder's LoRA file is named
    assert ui.jobs.list() == [] and not (ws_dir / "models" / "out.safetensors").exists()
    status, body = post(asgi, app, {"src": "models/base.safetensors", "dst": "models/out.safetensors"})
    assert status == 200, body
    assert body["kind"] == "convert" and body["args"][1:3] == [str(ws_dir / "models" / "base.safetensors"),
                                                                str(ws_dir / "models" / "out.safetensors")]
    assert "--overwrite" not in body["args"]


def test_convert_refuses_an_existing_output_unless_overwrite_is_ticked(app, asgi):
    app, ws_dir, ui = app
    out = ws_dir / "models" / "fp8.safetensors"
    out.write_bytes(b"earlier output")
    payload = {"src": "models/base.safetensors", "dst": "models/fp8.safetensors", "dtype": "fp8"}
    for extra in ({}, {"overwrite": False}):
        status, body = post(asgi, app, {**payload, **extra})
        assert status == 400, body
        assert body["error"] == ("output models/fp8.safetensors already exists; tick 'overwrite' (\"overwrite\": "
                                 "true) to replace it, or choose another output path")
    status, body = post(asgi, app, {**payload, "overwrite": "yes"})
    assert status == 400 and body["error"] == "'overwrite' must be true or false, not str"
    assert ui.jobs.list() == []
    status, body = post(asgi, app, {**payload, "overwrite": True})
    assert status == 200, body
    assert body["args"] == ["convert", str(ws_dir / "models" / "base.safetensors"), str(out), "--dtype", "fp8",
                            "--overwrite"]
    assert body["title"].endswith("(overwrite)") and len(ui.jobs.list()) == 1
    assert out.read_bytes() == b"earlier output"  # queued only: the job replaces it, not the route
    # the overwrite check comes after the LoRA check: a LoRA source is refused even with overwrite
    status, body = post(asgi, app, {"src": "models/style-kohya.safetensors", "dst": "models/fp8.safetensors",
                                    "overwrite": True})
    assert status == 400 and "dev2pro lora convert" in body["error"]


def multipart(parts):
    boundary = "----dev2protest"
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_upload_without_a_dataset_folder_is_refused_naming_the_field(app, asgi):
    app, ws_dir, _ = app
    before = sorted(p.name for p in ws_dir.iterdir())
    for folder in (None, b"", b"   ", b".", b"./"):
        parts = ([] if folder is None else [("folder", None, folder)]) + [("files", "photo.png", png())]
        status, body = asgi(app, "POST", "/api/upload", *multipart(parts))
        assert status == 400, (folder, body)
        err = json.loads(body)["error"]
        assert err.startswith("'folder'") and "choose the dataset folder to upload into" in err, err
    assert sorted(p.name for p in ws_dir.iterdir()) == before  # nothing written into the workspace root
    status, body = asgi(app, "POST", "/api/upload", *multipart([("folder", None, b"datasets/new"),
                                                                ("files", "photo.png", png())]))
    assert status == 200, body
    assert json.loads(body) == {"saved": ["datasets/new/photo.png"], "folder": "datasets/new", "renamed": [],
                                "replaced": []}
    assert (ws_dir / "datasets" / "new" / "photo.png").read_bytes() == png()


def test_model_lists_offer_transformer_files_only(app, asgi):
    """A LoRA named without "lora" (style-kohya.safetensors) was offered as a base on the Models and Train pages;
    the file lists now read each header: transformers only, a damaged header still listed (inspect says why)."""
    app, ws_dir, ui = app
    (ws_dir / "models" / "broken.safetensors").write_bytes(b"not a safetensors file")
    status, raw = asgi(app, "GET", "/api/models")
    assert status == 200, raw
    listed = set(json.loads(raw)["transformers"])
    assert "models/base.safetensors" in listed and "models/broken.safetensors" in listed
    assert not {p for p in listed if "style-" in p}, listed
