"""API for the Train, Monitor and Results pages: the generated form, validation + TOML preview, start / stop /
resume, run folders, sampling on dev with a LoRA strength, and `dev2pro compare` against another LoRA.

Configs the browser builds are written to ``configs/`` in the workspace (absolute, workspace-confined paths) and
run as ``dev2pro train configs/NAME.toml``, the same command a terminal user would type.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import load_config, render_toml
from ..errors import UserError
from ..outputs import write_text
from . import forms
from .monitor import find_runs, run_info

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@functools.lru_cache(maxsize=1)
def _schema():
    # lazy: the schemas load diffusers + transformers (~3 s); the server starts without them
    from ..config import path_fields
    from ..schemas import TrainConfig, load_train_config

    return forms.field_specs(TrainConfig), load_train_config, path_fields(TrainConfig)


def _config(ui, values: dict):
    specs, loader, paths = _schema()
    return forms.build_config(specs, values, loader, paths, ui.ws.resolve)


async def schema(request: Request, ui):
    specs, _, paths = _schema()
    return JSONResponse({"fields": specs, "paths": sorted(paths), "settings": ui.settings()})


async def preview(request: Request, ui):
    cfg = _config(ui, (await request.json())["values"])
    return JSONResponse({"toml": render_toml(cfg)})


async def start(request: Request, ui):
    cfg = _config(ui, (await request.json())["values"])
    out = Path(cfg.save.output_dir)
    run_rel = out.relative_to(ui.ws.root).as_posix()
    job = _job_for(ui, run_rel)
    if job and job["status"] in ("queued", "running"):
        raise UserError(f"{run_rel} is already {job['status']} (job {job['id']})")
    if out.exists() and any(out.iterdir()) and not cfg.save.overwrite:
        raise UserError(f"{run_rel} already holds a run; resume it on the Monitor page, tick save.overwrite to "
                        f"start over, or choose another save.output_dir")
    out.parent.mkdir(parents=True, exist_ok=True)  # inside the workspace (checked by _config)
    (ui.ws.root / "configs").mkdir(exist_ok=True)
    path = write_text(ui.ws.root / "configs" / f"{out.name}.toml", render_toml(cfg))
    job = ui.jobs.submit("train", ["train", str(path)], title=f"train {run_rel}", run_dir=run_rel)
    return JSONResponse({"job": job, "config": ui.ws.rel(path)})


async def resume(request: Request, ui):
    """Continue a run from its latest saved state (`dev2pro train RUN/config.toml --resume`)."""
    run = ui.ws.resolve((await request.json())["run"], must_exist=True)
    if not (run / "state").is_dir() or not any((run / "state").iterdir()):
        raise UserError(f"{ui.ws.rel(run)} has no saved training state to resume from (set save.every)")
    job = ui.jobs.submit("train", ["train", str(run / "config.toml"), "--resume"],
                         title=f"resume {ui.ws.rel(run)}", run_dir=ui.ws.rel(run))
    return JSONResponse({"job": job})


def _job_for(ui, run_rel: str) -> dict | None:
    return next((j for j in ui.jobs.list() if j["kind"] == "train" and j["run_dir"] == run_rel), None)


async def runs(request: Request, ui):
    """Run folders in the workspace (started here or from a terminal) and runs of UI jobs not yet written."""
    ui.jobs.schedule()
    found = [ui.ws.rel(d) for d in find_runs(ui.ws.root)]
    pending = [j["run_dir"] for j in ui.jobs.list() if j["kind"] == "train" and j["run_dir"] not in found]
    out = []
    for rel in list(dict.fromkeys(pending)) + found:
        job = _job_for(ui, rel)
        finished = (ui.ws.root / rel / "summary.json").exists()
        out.append({"run": rel, "status": job["status"] if job else "finished" if finished else "no UI job",
                    "job": job["id"] if job else None})
    return JSONResponse({"runs": out})


async def run(request: Request, ui):
    d = ui.ws.resolve(request.query_params["run"])
    rel = d.relative_to(ui.ws.root).as_posix()
    job = _job_for(ui, rel)
    if job is None and not d.is_dir():
        raise UserError(f"{rel} is not a run folder")
    tail = ui.jobs.log_tail(job["id"]) if job else ""
    info = await run_in_threadpool(run_info, d, ui.ws.root, tail)  # reads event files
    return JSONResponse({**info, "job": job, "log": tail})


def _run_config(run: Path) -> dict:
    return tomllib.loads((run / "config.toml").read_text())


async def sample(request: Request, ui):
    """Render the run's prompts with one of its LoRAs at a strength, on the inference base (dev)."""
    b = await request.json()
    lora = ui.ws.resolve(b["lora"], must_exist=True)
    run = lora.parent
    cfg = _run_config(run)
    strength = float(b.get("strength", 1.0))
    prompts = [p for p in str(b.get("prompt") or "").splitlines() if p.strip()] or cfg["sample"]["prompts"] or \
        ["a photo"]
    s = cfg["sample"]
    out = run / "ui-samples" / f"{lora.stem}-x{strength:g}-{time.strftime('%H%M%S')}"
    out.parent.mkdir(exist_ok=True)
    args = ["sample", "--model", cfg["model"]["path"], "--lora", f"{lora}:{strength}", "--steps", str(s["steps"]),
            "--size", f"{s['width']}x{s['height']}", "--guidance", str(s["guidance"]),
            "--seeds", ",".join(str(x) for x in s["seeds"]), "--out", str(out)]
    base = cfg["model"].get("inference_base") or cfg["model"].get("transformer")
    if base:
        args += ["--transformer", base]
    for p in prompts:
        args += ["--prompt", p]
    return JSONResponse(ui.jobs.submit("sample", args, title=f"sample {lora.name} x{strength:g}",
                                       run_dir=ui.ws.rel(run), out=out.relative_to(ui.ws.root).as_posix()))


async def compare(request: Request, ui):
    """`dev2pro compare`: this LoRA vs another LoRA (or none) on the inference base, same prompts and seeds; the
    config goes through CompareConfig's own validation and is saved in configs/ like any other."""
    from ..schemas import CompareConfig  # lazy: loads diffusers + transformers (~3 s), see _schema

    b = await request.json()
    lora = ui.ws.resolve(b["lora"], must_exist=True)
    other = ui.ws.resolve(b["other"], must_exist=True) if b.get("other") else None
    cfg = _run_config(lora.parent)
    s, m = cfg["sample"], cfg["model"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ui.ws.root / "compares" / f"{lora.parent.name}-{stamp}"
    base = m.get("inference_base") or m.get("transformer") or None
    arms = [(f"{lora.parent.name}/{lora.name}", lora)] + ([(f"{other.parent.name}/{other.name}", other)]
                                                         if other else []) + [("no LoRA", None)]
    data = {"model": m["path"], "prompts": s["prompts"] or ["a photo"], "seeds": s["seeds"],
            "steps": int(b.get("steps") or s["steps"]), "size": f"{s['width']}x{s['height']}", "out": str(out),
            "arms": [{"name": name, "guidance": float(s["guidance"]), "transformer": base,
                      "loras": [f"{path}:1.0"] if path else []} for name, path in arms]}
    (ui.ws.root / "configs").mkdir(exist_ok=True)
    out.parent.mkdir(exist_ok=True)
    path = write_text(ui.ws.root / "configs" / f"compare-{stamp}.toml",
                      render_toml(load_config(CompareConfig, data=data)))
    job = ui.jobs.submit("compare", ["compare", str(path)], title=f"compare {lora.name}"
                         + (f" vs {other.name}" if other else ""), run_dir=ui.ws.rel(lora.parent),
                         out=out.relative_to(ui.ws.root).as_posix())
    return JSONResponse({**job, "config": ui.ws.rel(path)})


async def compares(request: Request, ui):
    reports = sorted(ui.ws.find("report.html"), key=lambda p: p.stat().st_mtime, reverse=True)
    return JSONResponse({"reports": [ui.ws.rel(p) for p in reports if (p.parent / "compare.png").exists()]})


def routes(handler) -> list[Route]:
    return [
        Route("/api/schema", handler(schema)),
        Route("/api/train/preview", handler(preview), methods=["POST"]),
        Route("/api/train/start", handler(start), methods=["POST"]),
        Route("/api/train/resume", handler(resume), methods=["POST"]),
        Route("/api/runs", handler(runs)),
        Route("/api/run", handler(run)),
        Route("/api/sample", handler(sample), methods=["POST"]),
        Route("/api/compare", handler(compare), methods=["POST"]),
        Route("/api/compares", handler(compares)),
    ]
