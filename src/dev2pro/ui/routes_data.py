"""API for the Models and Dataset pages: model discovery, inspect, fp8 convert, uploads, captions, auto-caption.

Long work (convert, caption) is queued as a `dev2pro` job; ``inspect`` reads headers only, so it runs inline
(still as a subprocess of the same CLI, so the page shows exactly what the terminal shows).
"""

from __future__ import annotations

import asyncio
import json
import sys

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..data.buckets import assign_bucket, make_buckets
from ..data.folders import Scanner
from ..errors import UserError
from .workspace import check_image


def _candidates(ui) -> dict:
    """Flux model folders, transformer files and captioner folders found in the workspace."""
    root = ui.ws.root
    flux = [p.parent for p in ui.ws.find("model_index.json")]
    flux_set = set(flux)
    # transformers: each model folder's transformer/ plus standalone checkpoint files (not LoRAs or outputs)
    transformers = [f / "transformer" for f in flux if (f / "transformer").is_dir()]
    transformers += [p for p in ui.ws.find("*.safetensors") if not any(f in p.parents for f in flux_set)
                     and p.relative_to(root).parts[0] not in ("runs", "compares")
                     and "lora" not in p.name.lower() and not (p.parent / "adapter_config.json").exists()]
    captioners = [p.parent for p in ui.ws.find("config.json")
                  if not (p.parent / "model_index.json").exists() and p.parent.parent not in flux_set
                  and p.parent not in flux_set]
    rel = ui.ws.rel
    return {"flux": [rel(p) for p in flux], "transformers": sorted({rel(p) for p in transformers}),
            "captioners": [rel(p) for p in captioners]}


async def models(request: Request, ui):
    return JSONResponse({**_candidates(ui), "settings": ui.settings(), "workspace": str(ui.ws.root)})


async def settings(request: Request, ui):
    values = await request.json()
    allowed = {"train_base", "train_transformer", "inference_base", "captioner", "dataset", "trigger"}
    for key, value in values.items():
        if key not in allowed:
            raise UserError(f"unknown setting {key!r}")
        if key != "trigger" and value:
            ui.ws.resolve(value, must_exist=True)  # only workspace paths are remembered
    return JSONResponse(ui.save_settings({k: v for k, v in values.items() if k in allowed}))


async def inspect(request: Request, ui):
    path = ui.ws.resolve((await request.json())["path"], must_exist=True)
    # a subprocess awaited without blocking the server (it imports torch: seconds)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dev2pro.cli", "inspect", str(path), "--json",
                                                cwd=ui.ws.root, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise UserError(lines[-1] if lines else "inspect failed")
    return JSONResponse({"path": ui.ws.rel(path), "info": json.loads(out)})


async def convert(request: Request, ui):
    body = await request.json()
    src = ui.ws.resolve(body["src"], must_exist=True)
    dst = ui.ws.resolve(body["dst"])
    dtype = body.get("dtype", "fp8")
    if dtype not in ("fp8", "fp8-scaled", "bf16", "fp16", "fp32"):
        raise UserError(f"dtype {dtype!r} is not one of fp8, fp8-scaled, bf16, fp16, fp32")
    args = ["convert", str(src), str(dst), "--dtype", dtype]
    if src.is_dir() and dst.suffix == ".safetensors":  # a diffusers folder -> one file: the layout ComfyUI loads
        args += ["--layout", "comfy"]
    job = ui.jobs.submit("convert", args, title=f"convert {ui.ws.rel(src)} -> {body['dst']} ({dtype})")
    return JSONResponse(job)


# ------------------------------------------------------------------------------------------------ dataset
def _image_checker(min_size: int, buckets):
    """``check(path) -> (size or None, reason or None)`` with the dataset reader's own rules (unreadable, too
    small, an aspect ratio no bucket can hold)."""
    def check(path):
        scanner = Scanner(min_size=min_size, buckets=buckets)
        size = scanner.image_size(path, path.name)
        return size, (scanner.skipped[0][len(path.name) + 2:-1] if scanner.skipped else None)
    return check


def _bucket_preview(sizes: list[tuple[int, int]], buckets) -> list[dict]:
    """How many images land in each bucket, with the same functions training uses."""
    counts: dict[tuple[int, int], int] = {}
    for w, h in sizes:
        b = assign_bucket(w, h, buckets)
        counts[b] = counts.get(b, 0) + 1
    return [{"bucket": f"{w}x{h}", "images": n} for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])]


async def dataset(request: Request, ui):
    return JSONResponse(await run_in_threadpool(_dataset, ui, request.query_params))  # reads every image header


def _dataset(ui, q) -> dict:
    folder = ui.ws.resolve(q.get("folder", ""), must_exist=True)
    if not folder.is_dir():
        raise UserError(f"{q.get('folder')} is not a folder")
    buckets = make_buckets(int(q.get("resolution", 512)) ** 2, step=int(q.get("bucket_step", 64)))
    check = _image_checker(int(q.get("min_size", 16)), buckets)
    items, sizes = [], []
    for img in ui.ws.images(folder):
        size, reason = check(img)
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8-sig", errors="replace").strip() if txt.is_file() else ""
        items.append({"path": ui.ws.rel(img), "name": img.name, "caption": caption, "has_caption": txt.is_file(),
                      "size": list(size) if size else None, "bad": reason})
        if size:
            sizes.append(size)
    preview = _bucket_preview(sizes, buckets)
    folders = sorted({ui.ws.rel(p.parent) for ext in ("png", "jpg", "jpeg", "webp")
                      for p in ui.ws.find(f"*.{ext}") if "samples" not in p.parts and "runs" not in
                      p.relative_to(ui.ws.root).parts[:1]})
    return {"folder": ui.ws.rel(folder), "images": items, "buckets": preview, "folders": folders}


async def upload(request: Request, ui):
    """Multipart upload of images into a workspace folder; all-or-nothing, each file checked as an image."""
    limit = ui.max_upload_bytes
    if int(request.headers.get("content-length", 0)) > limit * ui.max_files:
        raise UserError(f"upload too large (limit {limit // 2**20} MiB per file, {ui.max_files} files)")
    form = await request.form(max_files=ui.max_files, max_fields=20)
    folder = ui.ws.resolve(str(form.get("folder", "")))
    overwrite = form.get("overwrite") in ("1", "true", "on")
    blobs = []
    for f in form.getlist("files"):
        if isinstance(f, str):
            raise UserError("'files' must be file parts")
        data = await f.read(limit + 1)  # never more than the limit in memory
        if len(data) > limit:
            raise UserError(f"upload {f.filename!r} is over the limit of {limit // 2**20} MiB (--max-upload-mb)")
        blobs.append((f.filename or "image", data))
    if not blobs:
        raise UserError("no files in the upload")
    for name, data in blobs:  # check every file before writing any
        check_image(data, name)
    folder.mkdir(parents=True, exist_ok=True)
    saved = [ui.ws.rel(ui.ws.save_upload(folder, name, data, limit, overwrite)) for name, data in blobs]
    return JSONResponse({"saved": saved, "folder": ui.ws.rel(folder)})


async def caption(request: Request, ui):
    body = await request.json()
    image = ui.ws.resolve(body["image"], must_exist=True)
    text = str(body["text"])
    if len(text) > 10_000:
        raise UserError("caption longer than 10000 characters")
    ui.ws.write_caption(image, text)
    return JSONResponse({"image": ui.ws.rel(image), "caption": text.strip()})


async def autocaption(request: Request, ui):
    """Queue `dev2pro caption FOLDER --model M --json ...` (all images, or the selected ``files``)."""
    b = await request.json()
    folder = ui.ws.resolve(b["folder"], must_exist=True)
    model = ui.ws.resolve(b["model"], must_exist=True)
    args = ["caption", str(folder), "--model", str(model), "--json",
            "--overwrite" if b.get("overwrite") else "--skip-existing"]
    for flag in ("prompt", "trigger"):
        if str(b.get(flag) or "").strip():
            args += [f"--{flag}", str(b[flag]).strip()]
    for flag in ("max_length", "batch_size"):
        if b.get(flag) not in (None, ""):
            args += [f"--{flag.replace('_', '-')}", str(int(b[flag]))]
    names = []
    for f in b.get("files") or []:
        image = ui.ws.resolve(f, must_exist=True)
        if image.parent != folder:
            raise UserError(f"{f} is not in {b['folder']}")
        names.append(image.name)
    if names:
        args += ["--files", ",".join(names)]
    job = ui.jobs.submit("caption", args, title=f"caption {ui.ws.rel(folder)}" + (f" ({len(names)} images)"
                                                                                 if names else ""))
    return JSONResponse(job)


def routes(handler) -> list[Route]:
    return [
        Route("/api/models", handler(models)),
        Route("/api/settings", handler(settings), methods=["POST"]),
        Route("/api/inspect", handler(inspect), methods=["POST"]),
        Route("/api/convert", handler(convert), methods=["POST"]),
        Route("/api/dataset", handler(dataset)),
        Route("/api/upload", handler(upload), methods=["POST"]),
        Route("/api/caption", handler(caption), methods=["POST"]),
        Route("/api/autocaption", handler(autocaption), methods=["POST"]),
    ]
