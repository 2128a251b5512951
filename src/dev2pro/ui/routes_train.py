"""API for the Train, Monitor and Results pages: the generated form, validation + TOML preview, start / stop /
resume, run folders, sampling on dev with a LoRA strength, and `dev2pro compare` against another LoRA.

Configs the browser builds are written to ``configs/`` in the workspace (absolute, workspace-confined paths) and
run as ``dev2pro train configs/RUN.JOB.toml``, the same command a terminal user would type. Each job's config is
written when it is queued, under a name of its own (the run folder's path + the job id), and never rewritten: a
queued job trains exactly what was submitted, into its own folder. Paths read from a run's ``config.toml`` (for
sampling and comparing) must be inside the workspace too.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import load_config, render_toml
from ..errors import UserError
from ..outputs import write_text
from ..train.folder import RunFolder
from ..train.run import folder_status
from . import comparewith, editrefs, forms, loraconvert, planview, routes_data, trainform
from .handlers import json_body, number, text
from .jobs import run_status
from .monitor import find_runs, run_info

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@functools.lru_cache(maxsize=1)
def _schema():
    # torch-free; loaded in the background at start-up (planview.warm_up), so a tab click never waits for it
    from ..config import path_fields
    from ..schemas import TrainConfig, load_train_config

    specs = forms.field_specs(TrainConfig)
    return specs, load_train_config, path_fields(TrainConfig), trainform.annotate(specs)


LORA_FILES = ("", ".safetensors", ".diffusers.safetensors", ".comfy.safetensors")  # train/export.LORA_SUFFIXES


def _values(values: dict) -> dict:
    """The browser's values with the web app's defaults for what they leave out (``trainform.ui_defaults``)."""
    steps = next((s["default"] for s in _schema()[0] if s["key"] == "train.steps"), 0)
    return trainform.ui_defaults(values, steps)


def _config(ui, values: dict):
    """Browser values -> a validated TrainConfig whose paths, names and the files under its paths are all in
    the workspace (no symlink out: the job would read or write through it)."""
    specs, loader, paths, _ = _schema()
    values = _values(values)
    # the loader imports torch for presets and rank checks: one thread at a time; the preset's console line
    # ("--vram 24 preset: ...") is for `dev2pro train`, not for the web app's terminal on every keystroke
    with planview.LOCK, contextlib.redirect_stdout(io.StringIO()):
        cfg = forms.build_config(specs, values, loader, paths, ui.ws.resolve,
                                 name=lambda folder, value, key: ui.ws.name(folder, value, key, LORA_FILES))
    for key, value in forms.path_values(cfg, paths):
        if Path(value).exists():
            ui.ws.check_tree(Path(value), f"'{key}'")
    return cfg


def _preset_keys(cfg, values: dict) -> set[str]:
    """The ``section.key`` settings the ``model.vram`` preset chose (the user wrote none of them)."""
    data = forms.form_to_data(_schema()[0], _values(values), drop_defaults=True)
    return set(planview.preset_choices(cfg, data))


def _render(cfg, preset: set[str] = frozenset()) -> str:
    """The config as TOML, checked to read back: a job never gets a config file its command cannot load.
    ``preset``: keys the ``model.vram`` preset chose, written commented out, so the job's loader sees them unset
    and its preset chooses them again (the same values: same preset, same model) and says so, instead of
    reporting them as "kept your ..." settings the user never wrote."""
    text_ = _comment_out(render_toml(cfg), preset) if preset else render_toml(cfg)
    try:
        tomllib.loads(text_)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"these settings do not make a readable config file ({e}); remove line breaks and "
                        f"control characters from text settings") from None
    return text_


def _comment_out(text_: str, keys: set[str]) -> str:
    """TOML ``text_`` with the ``section.key = ...`` lines of ``keys`` commented out (plain tables only)."""
    out, section = [], ""
    for line in text_.splitlines():
        m = re.match(r"^\[([\w.]+)\]$", line)
        if m or line.startswith("[["):
            section = m.group(1) if m else ""
        key = line.split(" = ", 1)[0] if " = " in line and not line.startswith("#") else None
        if key and f"{section}.{key}" in keys:
            line = f"# {line}  (the model.vram preset's choice; uncomment to pin it)"
        out.append(line)
    return "\n".join(out) + "\n"


def _write_config(ui, stem: str, text_: str) -> Path:
    """``configs/STEM.toml``, written once (a new name per job: never overwritten while a job may read it)."""
    configs = ui.ws.resolve("configs")
    configs.mkdir(exist_ok=True)
    return write_text(ui.ws.name(configs, stem + ".toml", "config name"), text_, overwrite=False, what="config")


async def schema(request: Request, ui):
    """The Train form: every field with a label in words, its help, whether it is in Basics and its Advanced
    group; plus what the page carries over (settings), and the workspace's models and dataset folders."""
    _, _, paths, fields = _schema()
    return JSONResponse({"fields": fields, "basics": list(trainform.BASICS), "paths": sorted(paths),
                         "settings": ui.settings(), "gpu": planview.detect_gpu() if planview._gpu_done.is_set()
                         else "pending", **routes_data.choices(ui)})


async def plan(request: Request, ui):
    """Validate the form with the CLI's loader and plan it (`dev2pro plan`): ``{"ok": false, "error", "field"}``
    for settings the loader refuses (the field it names, for the page to mark), else the plan and verdict."""
    b = await json_body(request, ("values", "card"))
    card = b.get("card")
    if card not in (None, "", "gpu"):
        card = number(b, "card", None, 1, 1024)

    def work():
        try:
            cfg = _config(ui, b["values"])
            data = forms.form_to_data(_schema()[0], _values(b["values"]), drop_defaults=True)
            with planview.LOCK:
                return {"ok": True, "plan": planview.page_plan(cfg, data, card or None, ui.ws)}
        except UserError as e:  # ConfigError, PathRefused, ImpossiblePlan: the CLI's own message
            keys = [f["key"] for f in _schema()[3]]
            return {"ok": False, "error": str(e), "field": trainform.error_field(str(e), keys)}
        except Exception as e:  # noqa: BLE001 -- a model the plan cannot read: training could not either
            return {"ok": False, "error": f"the plan could not read the model ({type(e).__name__}: "
                                          f"{str(e)[:300]}); check the base model on the Models page",
                    "field": "model.path"}
    return JSONResponse(await run_in_threadpool(work))  # imports torch the first time; plans in a thread


async def preview(request: Request, ui):
    values = (await json_body(request, ("values",)))["values"]
    cfg = await run_in_threadpool(_config, ui, values)  # may wait for the start-up imports: not in the event loop
    return JSONResponse({"toml": await run_in_threadpool(lambda: _render(cfg, _preset_keys(cfg, values)))})


def _start_check(ui, values: dict, card) -> tuple:
    """(config, its TOML) for a start, refused with the plan's reasons (the CLI's preflight, uncaptioned images,
    an output folder in use; the memory fit against ``card`` when the page sends one) before a job is queued."""
    cfg = _config(ui, values)
    with planview.LOCK:
        if card in (None, ""):
            reasons = planview.start_reasons(cfg, ui.ws)
        else:  # the plan's reasons: start_reasons (computed once, inside page_plan) plus the memory fit
            data = forms.form_to_data(_schema()[0], _values(values), drop_defaults=True)
            reasons = planview.page_plan(cfg, data, card, ui.ws)["reasons"]
    if reasons:
        raise UserError("not started: " + "; ".join(reasons))
    return cfg, _render(cfg, _preset_keys(cfg, values))


async def start(request: Request, ui):
    b = await json_body(request, ("values", "card"))
    values, card = b["values"], b.get("card")
    if card not in (None, "", "gpu"):
        card = number(b, "card", None, 1, 1024)
    cfg, toml_text = await run_in_threadpool(_start_check, ui, values, card)
    out = ui.ws.resolve(ui.ws.rel(cfg.save.output_dir))  # checked by _config; once more, after symlinks
    run_rel = ui.ws.rel(out)
    if out == ui.ws.root:
        raise UserError("save.output_dir is the workspace itself; name a run folder inside it (e.g. runs/NAME)")
    if out.exists() and not out.is_dir():
        raise UserError(f"save.output_dir {run_rel} is a file; choose a folder name")
    job = _job_for(ui, run_rel)
    if job and job["status"] in ("queued", "running"):
        raise UserError(f"{run_rel} is already {job['status']} (job {job['id']})")
    status = folder_status(out)  # a start that failed before its first save leaves a folder the CLI reuses
    if status in ("saved", "foreign") and not cfg.save.overwrite:
        raise UserError(f"{run_rel} already holds " + ("a run; resume it on the Monitor page, tick save.overwrite to "
                        "start over," if status == "saved" else "other files;") + " or choose another save.output_dir")
    out.parent.mkdir(parents=True, exist_ok=True)  # inside the workspace (checked by _config)
    job_id = ui.jobs.reserve_id("train")
    path = _write_config(ui, f"{_slug(run_rel)}.{job_id}", toml_text)
    job = ui.jobs.submit("train", ["train", str(path)], title=f"train {run_rel}", run_dir=run_rel, job_id=job_id,
                         config=ui.ws.rel(path))
    return JSONResponse({"job": job, "config": ui.ws.rel(path)})


def _slug(rel: str) -> str:
    """A run folder's workspace path as one file-name part: runs/a/same -> runs-a-same."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", rel.replace("/", "-")).strip("-.")[:120] or "run"


async def resume(request: Request, ui):
    """Continue a run from its latest saved state (`dev2pro train|dedistill RUN/config.toml --resume`, the command
    that made it); every path its config names must be in the workspace, as for a start."""
    from ..recipes.plan import is_dedistill_config  # a TOML read: no torch

    run = ui.ws.resolve(text(await json_body(request, ("run",)), "run"), must_exist=True)
    if not RunFolder(run).state.is_dir() or not any(RunFolder(run).state.iterdir()):
        raise UserError(f"{ui.ws.rel(run)} has no saved training state to resume from (set save.every)")
    config = ui.ws.confine(RunFolder(run).config, f"{ui.ws.rel(run)}/config.toml")
    if not config.is_file():
        raise UserError(f"{ui.ws.rel(run)} has no config.toml to resume with")
    command = "dedistill" if is_dedistill_config(str(config)) else "train"
    await run_in_threadpool(_check_run_paths, ui, config, command)
    job = ui.jobs.submit("train", [command, str(config), "--resume"],
                         title=f"resume {ui.ws.rel(run)}", run_dir=ui.ws.rel(run))
    return JSONResponse({"job": job})


def _check_run_paths(ui, config: Path, command: str) -> None:
    """Every path a run's saved config names (model, data, outputs...) inside the workspace, no symlink out."""
    from ..config import path_fields
    from ..schemas import DedistillConfig, TrainConfig, load_dedistill_config, load_train_config

    schema, loader = (DedistillConfig, load_dedistill_config) if command == "dedistill" else \
        (TrainConfig, load_train_config)
    with planview.LOCK, contextlib.redirect_stdout(io.StringIO()):  # the loader's preset line is the job's
        cfg = loader(str(config))
    for key, value in forms.path_values(cfg, path_fields(schema)):
        try:
            ui.ws.rel(value)
        except UserError as e:
            raise UserError(f"{ui.ws.rel(config)}: '{key}' = {value} is outside the workspace ({e}); the web app "
                            f"runs jobs on workspace files only: resume it with the CLI or move it in") from None
        if Path(value).exists():
            ui.ws.check_tree(Path(value), f"'{key}'")


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
        folder = RunFolder(ui.ws.root / rel)
        finished = folder.summary.stat().st_mtime if folder.summary.exists() else None
        try:  # when it last changed (the config is written at the start, summary.json at the end)
            when = max(p.stat().st_mtime for p in (folder.root, folder.config, folder.summary) if p.exists())
        except ValueError:
            when = job["created"] if job else 0
        # a job refused by the run lock while another process finished the run: the run is finished
        status = run_status(job, finished) or ("finished" if finished else "no UI job")
        out.append({"run": rel, "status": status, "job": job["id"] if job else None,
                    "modified": max(when, job["created"] if job else 0)})
    out.sort(key=lambda r: r["modified"], reverse=True)  # newest first
    return JSONResponse({"runs": out})


async def run(request: Request, ui):
    d = ui.ws.resolve(request.query_params["run"])
    rel = ui.ws.rel(d)
    job = _job_for(ui, rel)
    if job is None and not d.is_dir():
        raise UserError(f"{rel} is not a run folder")
    tail = ui.jobs.log_tail(job["id"]) if job else ""
    info = await run_in_threadpool(run_info, d, ui.ws.root, tail, ui.ws.inside, job)  # reads event files
    summary = RunFolder(d).summary
    # the run's status: its job's, unless that job was refused (the run lock) while another process finished it
    status = run_status(job, summary.stat().st_mtime if summary.exists() else None) or \
        ("finished" if info["finished"] else "unknown")
    return JSONResponse({**info, "job": job, "log": tail, "status": status})


def _lora_run(ui, b: dict, key: str) -> tuple[Path, Path, dict]:
    """(LoRA file, its run folder, the run's config) for a LoRA path from the browser; 4xx unless it is a
    .safetensors file inside a run folder (one with a config.toml) in the workspace."""
    lora = ui.ws.resolve(text(b, key), must_exist=True)
    if not lora.is_file() or lora.suffix != ".safetensors":
        raise UserError(f"'{key}': {ui.ws.rel(lora)} is not a .safetensors LoRA file")
    run = lora.parent
    config = ui.ws.confine(RunFolder(run).config, f"{ui.ws.rel(run)}/config.toml")
    if not config.is_file():
        raise UserError(f"'{key}': {ui.ws.rel(lora)} is not in a run folder (no config.toml beside it); pick a "
                        f"LoRA from a run's page")
    try:
        with open(config, "rb") as f:  # a run's resolved config is a few kB; never more than 1 MB read
            cfg = tomllib.loads(f.read(1_000_000).decode("utf-8", "replace"))
        if not isinstance(cfg.get("sample"), dict) or not isinstance(cfg.get("model"), dict):
            raise KeyError("sample or model")
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise UserError(f"{ui.ws.rel(config)} is not a training config ({e}); resume or rerun the run") from None
    return lora, run, cfg


def _model_path(ui, cfg: dict, key: str) -> str:
    """A model path from a run's config (absolute, or relative to the workspace where jobs run), confined."""
    value = cfg["model"].get(key) or ""
    if not isinstance(value, str):
        raise UserError(f"model.{key} in the run's config is not a path")
    return str(ui.ws.check_tree(ui.ws.root / value, f"model.{key} {value}")) if value else ""


def _sample_settings(ui, cfg: dict) -> tuple[dict, str, str]:
    s = cfg["sample"]
    for key in ("steps", "width", "height"):
        if not isinstance(s.get(key), int) or isinstance(s.get(key), bool):
            raise UserError(f"sample.{key} in the run's config is not an integer")
    if not isinstance(s.get("prompts", []), list) or not isinstance(s.get("seeds"), list):
        raise UserError("sample.prompts / sample.seeds in the run's config are not lists")
    base = _model_path(ui, cfg, "inference_base") or _model_path(ui, cfg, "transformer")
    return s, _model_path(ui, cfg, "path"), base


def _prompts(b: dict, default: list) -> list[str]:
    prompts = [p for p in text(b, "prompt", "", max_len=20_000).splitlines() if p.strip()] or default or ["a photo"]
    if len(prompts) > 20:
        raise UserError(f"{len(prompts)} prompts; sample at most 20 at a time")
    return [str(p) for p in prompts]


def _grid_guidance(base: str, s: dict) -> float | None:
    """The guidance value that renders ``base`` as the run's own samples did (``train.samples``): ``sample.guidance``
    on a base with a guidance embedding, the true-CFG scale ``sample.cfg`` on one without; None for a
    step-distilled base (FLUX.2 klein distilled), rendered at its own steps without CFG."""
    guidance = float(s.get("guidance", 3.5))
    try:
        from ..flux.checkpoint import open_checkpoint
        from ..sampling import step_distilled

        spec = open_checkpoint(base).spec()
    except (UserError, OSError, ValueError):  # an unreadable base: the job itself reports it, with its fix
        return guidance
    if step_distilled(spec):
        return None
    return guidance if spec.guidance_embeds else float(s.get("cfg", 3.5))


def _grid_args(base: str, s: dict) -> list[str]:
    """`dev2pro sample` steps and guidance of ``_grid_guidance`` (none for a step-distilled base: its own)."""
    guidance = _grid_guidance(base, s)
    return [] if guidance is None else ["--steps", str(s["steps"]), "--guidance", str(guidance)]


async def sample(request: Request, ui):
    """Render the run's prompts with one of its LoRAs at a strength, on the inference base (dev)."""
    b = await json_body(request, ("lora", "strength", "prompt", "references"))
    lora, run, cfg = _lora_run(ui, b, "lora")
    s, model, base = _sample_settings(ui, cfg)
    refs = await run_in_threadpool(editrefs.references, ui, b, s, [lora], ui.ws.rel(run))  # reads a header
    strength = number(b, "strength", 1.0, -10, 10, kind=float)
    prompts = _prompts(b, s.get("prompts"))
    job_id = ui.jobs.reserve_id("sample")
    samples = ui.ws.resolve(f"{ui.ws.rel(run)}/ui-samples")
    samples.mkdir(exist_ok=True)
    out = ui.ws.name(samples, f"{lora.stem}-x{strength:g}-{job_id}", "sample folder")
    grid = await run_in_threadpool(_grid_args, base or model, s)  # reads a header (and model_index.json)
    args = ["sample", "--model", model, "--lora", f"{lora}:{strength}", "--size", f"{s['width']}x{s['height']}",
            *grid, "--seeds", ",".join(str(int(x)) for x in s["seeds"]), "--out", str(out)]
    for ref in refs:  # an edit: the page's reference image(s), else the run's (as its own samples)
        args += ["--image", ref]
    if base:
        args += ["--transformer", base]
    args += [f"--prompt={p}" for p in prompts]  # one argument each: a prompt starting with '-' stays a prompt
    return JSONResponse(ui.jobs.submit("sample", args, title=f"sample {lora.name} x{strength:g}", job_id=job_id,
                                       run_dir=ui.ws.rel(run), out=ui.ws.rel(samples) + "/" + out.name))


async def compare(request: Request, ui):
    """`dev2pro compare`: this LoRA vs another LoRA (or none) on the inference base, same prompts and seeds; the
    config goes through CompareConfig's own validation and is saved in configs/ under the job's id."""
    from ..schemas import CompareConfig  # lazy: loads diffusers + transformers (~3 s), see _schema

    b = await json_body(request, ("lora", "other", "steps", "references", "strength"))
    lora, run, cfg = _lora_run(ui, b, "lora")
    other = ui.ws.resolve(text(b, "other"), must_exist=True) if b.get("other") else None
    if other is not None and (not other.is_file() or other.suffix != ".safetensors"):
        raise UserError(f"'other': {ui.ws.rel(other)} is not a .safetensors LoRA file")
    if other is not None:
        await run_in_threadpool(comparewith.check_other, ui, lora, other)  # reads headers
    strength = number(b, "strength", 1.0, -10, 10, kind=float)  # the page's slider: both LoRAs at it
    s, model, base = _sample_settings(ui, cfg)
    controls = await run_in_threadpool(editrefs.references, ui, b, s, [lora] + ([other] if other else []),
                                       ui.ws.rel(run))  # every arm edits the same reference(s)
    job_id = ui.jobs.reserve_id("compare")
    compares_dir = ui.ws.resolve("compares")
    compares_dir.mkdir(exist_ok=True)
    out = ui.ws.name(compares_dir, f"{_slug(run.name)}-{job_id}", "compare folder")
    x = f" x{strength:g}" if strength != 1 else ""
    arms = [(f"{run.name}/{lora.name}{x}", lora)] + ([(f"{other.parent.name}/{other.name}{x}", other)]
                                                     if other else []) + [("no LoRA", None)]
    guidance = await run_in_threadpool(_grid_guidance, base or model, s)  # as the run's samples: a header read
    data = {"model": model, "prompts": s.get("prompts") or ["a photo"], "seeds": s["seeds"],
            "steps": number(b, "steps", s["steps"], 1, 1000), "size": f"{s['width']}x{s['height']}",
            "out": str(out), **({"image": controls[0] if len(controls) == 1 else controls} if controls else {}),
            "arms": [{"name": name, **({"guidance": guidance} if guidance is not None else {}),
                      "transformer": base or None, "loras": [f"{path}:{strength}"] if path else []}
                     for name, path in arms]}
    path = _write_config(ui, f"compare-{job_id}", _render(load_config(CompareConfig, data=data)))
    job = ui.jobs.submit("compare", ["compare", str(path)], title=f"compare {lora.name}"
                         + (f" vs {other.name}" if other else "") + x, run_dir=ui.ws.rel(run), job_id=job_id,
                         out=ui.ws.rel(compares_dir) + "/" + out.name, config=ui.ws.rel(path))
    return JSONResponse({**job, "config": ui.ws.rel(path)})


async def lora(request: Request, ui):
    """What the Results page offers for one of a run's LoRAs: ``references`` per edit its file says it was trained
    with (0: text-to-image; a header read), the run's ``sample.control`` (workspace paths), the default, and the
    strength ``dev2pro calibrate --write`` recorded for its target model (``recommended``, or None)."""
    path, run, cfg = _lora_run(ui, {"lora": request.query_params.get("lora", "")}, "lora")
    try:
        control, problem = [ui.ws.rel(p) for p in editrefs.run_controls(ui, cfg["sample"])], None
    except UserError as e:  # shown beside the field; a sample job refuses it by name
        control, problem = [], str(e)
    from ..strength import file_recommendation  # lazy: imports torch

    refs, rec = await run_in_threadpool(lambda: (editrefs.lora_references(path), file_recommendation(path)))
    return JSONResponse({"lora": ui.ws.rel(path), "references": refs, "control": control, "control_problem": problem,
                         "recommended": rec})  # dev2pro calibrate --write: the strength on its target model


async def compare_candidates(request: Request, ui):
    """Results' "Compare against" list for a LoRA: its run's other checkpoints, then other runs' LoRAs trained
    on a model of the same family and size (``comparewith``)."""
    lora, _, _ = _lora_run(ui, {"lora": request.query_params.get("lora", "")}, "lora")
    return JSONResponse({"lora": ui.ws.rel(lora),
                         "candidates": await run_in_threadpool(comparewith.candidates, ui, lora)})


async def lora_layouts(request: Request, ui):
    """Results' "Get as" offers: each LoRA file of a run, its layout and the layouts it is not yet in."""
    run = ui.ws.resolve(request.query_params.get("run", ""), must_exist=True)
    if not RunFolder(run).config.is_file():
        raise UserError(f"'run': {ui.ws.rel(run)} is not a run folder (no config.toml)")
    return JSONResponse({"run": ui.ws.rel(run), "files": await run_in_threadpool(loraconvert.offers, ui, run)})


async def lora_convert(request: Request, ui):
    """Queue `dev2pro lora convert` of a run's LoRA into another layout, named as training names it."""
    b = await json_body(request, ("lora", "layout"))
    layout = loraconvert.check_layout(b)
    lora, run, cfg = _lora_run(ui, b, "lora")
    return JSONResponse(await run_in_threadpool(loraconvert.queue, ui, lora, run, cfg, layout))  # reads headers


async def compares(request: Request, ui):
    reports = sorted(ui.ws.find("report.html"), key=lambda p: p.stat().st_mtime, reverse=True)
    return JSONResponse({"reports": [ui.ws.rel(p) for p in reports if (p.parent / "compare.png").exists()]})


def routes(handler) -> list[Route]:
    return [
        Route("/api/schema", handler(schema)),
        Route("/api/train/preview", handler(preview), methods=["POST"]),
        Route("/api/train/plan", handler(plan), methods=["POST"]),
        Route("/api/train/start", handler(start), methods=["POST"]),
        Route("/api/train/resume", handler(resume), methods=["POST"]),
        Route("/api/runs", handler(runs)),
        Route("/api/run", handler(run)),
        Route("/api/lora", handler(lora)),
        Route("/api/sample", handler(sample), methods=["POST"]),
        Route("/api/compare", handler(compare), methods=["POST"]),
        Route("/api/compares", handler(compares)),
        Route("/api/compare/candidates", handler(compare_candidates)),
        Route("/api/lora/layouts", handler(lora_layouts)),
        Route("/api/lora/convert", handler(lora_convert), methods=["POST"]),
    ]
