"""API for the Models and Dataset pages: model discovery, inspect, fp8 convert, uploads, captions, auto-caption.

Long work (convert, caption) is queued as a `dev2pro` job; ``inspect`` reads headers only, so it runs inline
(still as a subprocess of the same CLI, so the page shows exactly what the terminal shows).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path, PurePosixPath

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..data.buckets import assign_bucket, make_buckets
from ..data.folders import Scanner
from ..errors import CheckpointError, UserError
from .datasetremove import remove_images, removed_list, restore_images
from .datasettools import bulk_edit, undo
from .handlers import TooLarge, json_body, number, text
from ..lora.sniff import is_base_model
from .loracheck import refuse_lora_source
from .pairs import listed_images, reference_folders, too_large
from .upload import read_upload
from .workspace import PathRefused

MAX_IMAGES = 2000  # listed per dataset request (each one's header is read)
_EDITING = threading.Lock()  # one caption edit, undo, remove or restore at a time (each reads, then writes)


def _candidates(ui) -> dict:
    """Flux model folders, transformer files and captioner folders found in the workspace; ``skipped``: entries
    that are symlinks out of the workspace (never read, listed so the page can say why they are missing)."""
    root, skipped = ui.ws.root, []
    flux = [p.parent for p in ui.ws.find("model_index.json", skipped=skipped)]
    flux_set = set(flux)
    # transformers: each model folder's transformer/ plus standalone checkpoint files (not LoRAs or outputs)
    transformers = [f / "transformer" for f in flux if (f / "transformer").is_dir()]
    transformers += [p for p in ui.ws.find("*.safetensors", skipped=skipped)
                     if not any(f in p.parents for f in flux_set) and p.relative_to(root).parts[0] not in ("runs",
                                                                                                       "compares")
                     and "lora" not in p.name.lower() and not (p.parent / "adapter_config.json").exists()
                     and _transformer_file(p)]
    captioners = [p.parent for p in ui.ws.find("config.json", skipped=skipped)
                  if not (p.parent / "model_index.json").exists() and p.parent.parent not in flux_set
                  and p.parent not in flux_set]
    rel = ui.ws.rel
    partners = {rel(b): rel(d / "transformer") for b, d in _distilled_partners(flux).items()}
    return {"flux": [rel(p) for p in flux], "transformers": sorted({rel(p) for p in transformers}),
            "distilled_partner": partners,
            "captioners": [rel(p) for p in captioners],
            "skipped": [{"path": p, "reason": "a symlink out of the workspace; move or copy it in"}
                        for p in sorted(set(skipped))]}


def _transformer_file(path) -> bool:
    """A standalone .safetensors holds a Flux transformer (its header names the input embedder), so a LoRA named
    without "lora", a VAE or a text encoder is not offered as a base; a damaged header stays listed (inspecting it
    says what is wrong)."""
    try:
        return is_base_model(path)
    except (CheckpointError, OSError):
        return True


def _small_json(path) -> dict:
    """A model folder's small JSON file (model_index.json, transformer/config.json), {} when absent or damaged."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1_000_000))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _distilled_partners(folders) -> dict:
    """FLUX.2 klein Base folder -> a distilled klein folder of the same architecture (its transformer config): where
    a LoRA trained on Base is used, so the Train page's inference base (the Dev2Pro loop: train on the undistilled
    model, look at the samples on the distilled one)."""
    arch = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim")
    klein = {}
    for f in folders:
        index = _small_json(f / "model_index.json")
        if index.get("_class_name") == "Flux2KleinPipeline" and (f / "transformer").is_dir():
            config = _small_json(f / "transformer" / "config.json")
            klein[f] = (bool(index.get("is_distilled")), tuple(config.get(k) for k in arch))
    distilled = {}
    for folder, (is_distilled, shape) in klein.items():
        if is_distilled:
            distilled.setdefault(shape, folder)  # the first one found of each architecture
    return {f: distilled[shape] for f, (is_distilled, shape) in klein.items()
            if not is_distilled and shape in distilled}


# where a captioner comes from, for an empty captioner list (caption.py reads these families)
CAPTIONER_HELP = {
    "families": ["Florence-2 (florence-community/Florence-2-base, -large)",
                 "Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct)",
                 "Qwen3-VL (Qwen/Qwen3-VL-4B-Instruct, -8B-Instruct)",
                 "BLIP (Salesforce/blip-image-captioning-base, -large)"],
    "command": "hf download florence-community/Florence-2-base --local-dir {ws}/models/florence-2-base",
}
MODEL_HELP = ("hf download black-forest-labs/FLUX.1-dev --local-dir {ws}/models/flux1-dev  |  FLUX.2 klein: "
              "hf download black-forest-labs/FLUX.2-klein-base-4B --local-dir {ws}/models/flux2-klein-base-4b (train "
              "on it) and black-forest-labs/FLUX.2-klein-4B to {ws}/models/flux2-klein-4b (samples: its transformer/)")


def dataset_folders(ui, limit: int = 2000) -> list[str]:
    """Workspace folders holding images, run outputs and samples left out."""
    return sorted({ui.ws.rel(p.parent) for p in ui.ws.find(("*.png", "*.jpg", "*.jpeg", "*.webp"), limit=limit)
                   if "samples" not in p.parts and "runs" not in p.relative_to(ui.ws.root).parts[:1]
                   and "compares" not in p.relative_to(ui.ws.root).parts[:1]})


def choices(ui) -> dict:
    """What the Train page offers: model folders, transformer files and dataset folders of the workspace."""
    found = _candidates(ui)
    return {"models": found["flux"], "transformers": found["transformers"], "datasets": dataset_folders(ui)}


async def models(request: Request, ui):
    ws = str(ui.ws.root)
    return JSONResponse({**_candidates(ui), "settings": ui.settings(), "workspace": ws, "datasets": dataset_folders(ui),
                         "captioner_help": {**CAPTIONER_HELP, "command": CAPTIONER_HELP["command"].format(ws=ws)},
                         "model_help": MODEL_HELP.format(ws=ws)})


async def settings(request: Request, ui):
    values = await json_body(request)
    allowed = {"train_base", "train_transformer", "inference_base", "captioner", "dataset", "trigger"}
    for key in values:
        if key not in allowed:
            raise UserError(f"unknown setting {key!r}; known: {', '.join(sorted(allowed))}")
        value = text(values, key, "", max_len=1000)
        if key != "trigger" and value:
            ui.ws.resolve(value, must_exist=True)  # only workspace paths are remembered
    return JSONResponse(ui.save_settings({k: v for k, v in values.items() if k in allowed}))


async def inspect(request: Request, ui):
    path = ui.ws.check_tree(ui.ws.resolve(text(await json_body(request, ("path",)), "path"), must_exist=True), "'path'")
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
    """Queue `dev2pro convert SRC DST --dtype D`: a base model (file or folder) to another dtype; refused before a
    job is queued: a LoRA source (the LoRA command named), an existing output without ``overwrite``."""
    body = await json_body(request, ("src", "dst", "dtype", "overwrite"))
    src = ui.ws.check_tree(ui.ws.resolve(text(body, "src"), must_exist=True), "'src'")
    dst = ui.ws.resolve(text(body, "dst"))
    if dst == ui.ws.root:
        raise UserError("'dst' is the workspace itself; name a new file or folder inside it")
    dtype = text(body, "dtype", "fp8")
    if dtype not in ("fp8", "fp8-scaled", "bf16", "fp16", "fp32"):
        raise UserError(f"dtype {dtype!r} is not one of fp8, fp8-scaled, bf16, fp16, fp32")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise UserError(f"'overwrite' must be true or false, not {type(overwrite).__name__}")
    await run_in_threadpool(refuse_lora_source, src, ui.ws.rel)  # headers only
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise UserError(f"output {ui.ws.rel(dst)} already exists; tick 'overwrite' (\"overwrite\": true) to replace "
                        f"it, or choose another output path")
    args = ["convert", str(src), str(dst), "--dtype", dtype] + (["--overwrite"] if overwrite else [])
    if src.is_dir() and dst.suffix == ".safetensors":  # a diffusers folder -> one file: the layout ComfyUI loads
        args += ["--layout", "comfy"]
    job = ui.jobs.submit("convert", args, title=f"convert {ui.ws.rel(src)} -> {ui.ws.rel(dst)} ({dtype})"
                         + (" (overwrite)" if overwrite else ""))
    return JSONResponse(job)


# ------------------------------------------------------------------------------------------------ dataset
def _image_checker(min_size: int, buckets):
    """``check(path) -> (size or None, reason or None)`` with the dataset reader's own rules (unreadable, too
    small, an aspect ratio no bucket can hold)."""
    def check(path):
        if why := too_large(path):  # the header only: an image too large to decode per request is not decoded here
            return None, why
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
    """The folder's images (at most ``MAX_IMAGES``; a kohya parent's are those of its N_name subfolders) with sizes,
    captions and bucket preview, and with ``controls`` (edit pairs: repeated, or one folder per line) each one's
    reference per folder, a pair summary per folder and how many images have a usable reference in every one;
    bounded work for any query (resolution, step and min_size are range-checked before anything is read)."""
    folder = ui.ws.resolve(q.get("folder", ""), must_exist=True)
    if not folder.is_dir():
        raise UserError(f"{q.get('folder')} is not a folder")
    resolution = number(q, "resolution", 512, 16, 4096)
    step = number(q, "bucket_step", 64, 16, 512)
    buckets = make_buckets(resolution ** 2, step=step)
    check = _image_checker(number(q, "min_size", 16, 1, 4096), buckets)
    controls = [line for value in q.getlist("controls") for line in value.splitlines() if line.strip()]
    refs = reference_folders(ui.ws, folder, controls)
    items, sizes, skipped = [], [], []
    images = listed_images(ui.ws, folder, MAX_IMAGES + 1, skipped)
    for img, key, stem in images[:MAX_IMAGES]:
        size, reason = check(img)
        caption = ui.ws.read_text(img.with_suffix(".txt"))  # None: none, or a symlink out (never read)
        rel = ui.ws.rel(img)
        items.append({"path": rel, "name": img.relative_to(folder).as_posix(), "caption": (caption or "").strip(),
                      "has_caption": caption is not None, "size": list(size) if size else None, "bad": reason})
        if refs:
            items[-1]["references"] = [r.check(rel, key, stem, size) for r in refs]
        if size:
            sizes.append(size)
    preview = _bucket_preview(sizes, buckets)
    folders = dataset_folders(ui)
    out = {"folder": ui.ws.rel(folder), "images": items, "buckets": preview, "folders": folders,
           "truncated": len(images) > MAX_IMAGES, "caption_clashes": _caption_clashes(items),
           "skipped": [{"name": n, "reason": "a symlink out of the workspace (not read)"} for n in skipped],
           "removed": removed_list(ui.ws, folder)}
    if refs:
        out["pairs"] = [r.summary(complete=len(images) <= MAX_IMAGES) for r in refs]
        # training pairs an image only with a usable reference from every folder (else the run is refused)
        out["pairs_complete"] = sum(all(r["status"] in ("paired", "cropped") for r in im["references"])
                                    for im in items)
    return out


def _caption_clashes(items: list[dict]) -> list[dict]:
    """Images that share one caption file (``cat.png`` and ``cat.jpg`` both read ``cat.txt``): editing one card's
    caption edits the other's. Each such item gets ``shares_caption`` (the other images' names)."""
    by_caption: dict[str, list[dict]] = {}
    for im in items:
        by_caption.setdefault(str(PurePosixPath(im["path"]).with_suffix(".txt")), []).append(im)
    clashes = []
    for caption, group in by_caption.items():
        if len(group) > 1:
            for im in group:
                im["shares_caption"] = [o["name"] for o in group if o is not im]
            clashes.append({"caption": caption, "images": [im["name"] for im in group]})
    return clashes


async def upload(request: Request, ui):
    """Multipart upload of images into a workspace folder, all-or-nothing: every file is checked (decodes as an
    image, its safe name, no image of that name already there unless ``overwrite``) before any is written; the
    reply names the files as saved (``renamed``: those whose name changed, ``replaced``: images overwritten)."""
    limit = ui.max_upload_bytes
    total = limit * ui.max_files + 2**20
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > total:  # refused before reading a byte
        raise TooLarge(f"upload too large (limit {limit / 2**20:.3g} MiB per file, {ui.max_files} files)")
    form = await read_upload(request, limit, total, ui.max_files)
    for key in form.keys():
        if key not in ("folder", "overwrite", "files"):
            raise UserError(f"unknown upload field {key!r}; send folder, overwrite and files")
    named = form.get("folder")
    if not isinstance(named, str) or not named.strip():
        raise UserError("'folder' is missing or empty: choose the dataset folder to upload into (a folder inside "
                        "the workspace, e.g. datasets/my-set)")
    folder = ui.ws.resolve(named)
    if folder == ui.ws.root:
        raise UserError(f"'folder' {named.strip()!r} is the workspace itself: choose the dataset folder to upload "
                        f"into (a folder inside the workspace, e.g. datasets/my-set)")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"upload folder {ui.ws.rel(folder)} is a file; choose a folder")
    overwrite = form.get("overwrite") in ("1", "true", "on")
    blobs = []
    for f in form.getlist("files"):
        if isinstance(f, str):
            raise UserError("'files' must be file parts")
        data = await f.read(limit + 1)  # never more than the limit in memory
        if len(data) > limit:
            raise UserError(f"upload {f.filename!r} is over the limit of {limit / 2**20:.3g} MiB (--max-upload-mb)")
        blobs.append((f.filename or "image", data))
    if not blobs:
        raise UserError("no files in the upload")
    plan = await run_in_threadpool(ui.ws.plan_upload, folder, blobs, limit, overwrite)  # every file, nothing written
    folder.mkdir(parents=True, exist_ok=True)
    saved = await run_in_threadpool(ui.ws.write_upload, plan)
    renamed = [{"from": i["filename"], "to": i["dest"].name} for i in plan if i["dest"].name != i["filename"]]
    replaced = [ui.ws.rel(i["replaces"]) if i["replaces"] != i["dest"] else ui.ws.rel(i["dest"])
                for i in plan if i["replaces"] is not None]
    return JSONResponse({"saved": [ui.ws.rel(p) for p in saved], "folder": ui.ws.rel(folder), "renamed": renamed,
                         "replaced": replaced})


async def caption(request: Request, ui):
    body = await json_body(request, ("image", "text"))
    image = ui.ws.resolve(text(body, "image"), must_exist=True)
    caption_text = text(body, "text", max_len=10_000)
    ui.ws.write_caption(image, caption_text)
    return JSONResponse({"image": ui.ws.rel(image), "caption": caption_text.strip()})


async def autocaption(request: Request, ui):
    """Queue `dev2pro caption FOLDER --model M --json ...` (all images, or the selected ``files``)."""
    b = await json_body(request, ("folder", "model", "files", "trigger", "prompt", "overwrite", "max_length",
                                  "batch_size"))
    folder = ui.ws.check_tree(ui.ws.resolve(text(b, "folder"), must_exist=True), "'folder'")
    model = ui.ws.check_tree(ui.ws.resolve(text(b, "model"), must_exist=True), "'model'")
    if not folder.is_dir():
        raise UserError(f"{b['folder']} is not a folder")
    args = ["caption", str(folder), "--model", str(model), "--json",
            "--overwrite" if b.get("overwrite") else "--skip-existing"]
    for flag in ("prompt", "trigger"):
        if text(b, flag, "", max_len=2000).strip():
            args.append(f"--{flag}={b[flag].strip()}")  # one argument: a value starting with '-' stays a value
    for flag, hi in (("max_length", 1024), ("batch_size", 256)):
        if b.get(flag) not in (None, ""):
            args.append(f"--{flag.replace('_', '-')}={number(b, flag, None, 1, hi)}")
    names = []
    files = b.get("files") or []
    if not isinstance(files, list) or len(files) > 10_000:
        raise UserError("'files' must be a list of at most 10000 image paths")
    for f in files:
        image = ui.ws.resolve(f, must_exist=True)
        if image.parent != folder:
            raise UserError(f"{f} is not in {b['folder']}")
        names.append(image.name)
    if names:
        args += ["--files", ",".join(names)]
    job = ui.jobs.submit("caption", args, title=f"caption {ui.ws.rel(folder)}" + (f" ({len(names)} images)"
                                                                                 if names else ""))
    return JSONResponse(job)


# ------------------------------------------------------------------------------------------------ dataset tools
def _folder(ui, b: dict) -> Path:
    """The request's dataset folder: inside the workspace, existing, a folder; UserError naming 'folder'."""
    named = text(b, "folder", "", max_len=1000)
    if not named.strip():
        raise UserError("'folder' is missing or empty: name the dataset folder (e.g. datasets/my-set)")
    try:
        folder = ui.ws.resolve(named, must_exist=True)
    except PathRefused as e:
        raise UserError(f"'folder': {e}") from None
    if not folder.is_dir():
        raise UserError(f"'folder' {named} is a file, not a folder")
    return folder


def _flag(b: dict, key: str, default: bool) -> bool:
    value = b.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"'{key}' must be true or false, not {type(value).__name__}")
    return value


def _locked(fn, *args):
    with _EDITING:
        return fn(*args)


async def captions_bulk(request: Request, ui):
    """One caption edit over a folder (``op``: prepend, append, replace, remove); ``dry_run`` (the default) only
    says what would change."""
    b = await json_body(request, ("folder", "op", "text", "find", "whole_word", "files", "dry_run"))
    args = (ui.ws, _folder(ui, b), text(b, "op"), text(b, "text", "", max_len=2000), text(b, "find", "", max_len=2000),
            _flag(b, "whole_word", True), b.get("files"), _flag(b, "dry_run", True))
    return JSONResponse(await run_in_threadpool(_locked, bulk_edit, *args))


async def captions_undo(request: Request, ui):
    """Put back the captions the folder's last bulk edit replaced."""
    b = await json_body(request, ("folder",))
    return JSONResponse(await run_in_threadpool(_locked, undo, ui.ws, _folder(ui, b)))


def _controls(b: dict) -> list[str]:
    value = b.get("controls") or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise UserError("'controls' must be a reference folder, or a list of them")
    return [line for c in value for line in c.splitlines() if line.strip()]


async def dataset_remove(request: Request, ui):
    """Move images (and their caption, mask and, with ``controls``, reference files) into ``.removed/``."""
    b = await json_body(request, ("folder", "files", "controls"))
    folder = _folder(ui, b)
    return JSONResponse(await run_in_threadpool(_locked, remove_images, ui.ws, folder, b.get("files"), _controls(b)))


async def dataset_restore(request: Request, ui):
    """Move removed images (``.removed/`` paths) and their files back under their own names."""
    b = await json_body(request, ("folder", "files"))
    folder = _folder(ui, b)
    return JSONResponse(await run_in_threadpool(_locked, restore_images, ui.ws, folder, b.get("files")))


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
        Route("/api/captions/bulk", handler(captions_bulk), methods=["POST"]),
        Route("/api/captions/undo", handler(captions_undo), methods=["POST"]),
        Route("/api/dataset/remove", handler(dataset_remove), methods=["POST"]),
        Route("/api/dataset/restore", handler(dataset_restore), methods=["POST"]),
    ]
