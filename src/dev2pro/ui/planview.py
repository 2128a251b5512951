"""The plan the Train page shows before Start: what `dev2pro plan` says for the form's settings, as data.

``page_plan`` takes a config the CLI's own loader has validated (a ``model.vram`` preset already applied) and
returns the peak GPU memory against the chosen card (``plan.advise``: the same verdict and advice as the CLI),
host RAM, the settings the preset chose, the dataset's caption count (training stops on uncaptioned images) and a
time per step where a measurement exists: a finished run in this workspace with the same model, resolution, batch
and memory settings (its ``summary.json``), else the H200 bench rows for full-size FLUX.1 with the same preset.

The card comes from the browser: a preset size (8/12/16/24/48 GB) or "this GPU", read once from ``nvidia-smi``
in the background at start-up (no CUDA context is created in the web app's process: it would take GPU memory
from the jobs). ``warm_up`` loads the schema, the GPU facts and the plan's torch imports in a background thread,
so a tab click never waits for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..config import as_list
from ..errors import UserError
from ..train.folder import RunFolder
from ..train.run import folder_status
from .monitor import find_runs

GB = 1024**3
PRESETS = (8, 12, 16, 24, 48)
MEMORY_KEYS = ("fp8_storage", "gradient_checkpointing", "blocks_to_swap")  # settings that change a step's speed

# bench/results/gpu_train-h200-2026-11-28.md: s/step of full-size FLUX.1, LoRA rank 16, batch 1, per --vram preset
# (12 and 8 with adamw: bitsandbytes was not installed), at 512^2 and 1024^2
BENCH_H200 = {48: {512: 0.835, 1024: 1.009}, 24: {512: 0.657, 1024: 1.194}, 16: {512: 0.638, 1024: 1.159},
              12: {512: 0.696, 1024: 1.213}, 8: {512: 0.805, 1024: 1.224}}
BENCH_SOURCE = "an H200 (bench, 2026-11-28; other cards differ)"

_gpu: dict | None = None
_gpu_done = threading.Event()


def detect_gpu(timeout: float = 10) -> dict | None:
    """{name, bytes, gb, preset} of GPU 0 from ``nvidia-smi`` (None without one); read once."""
    global _gpu
    if _gpu_done.is_set():
        return _gpu
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout).stdout
            name, mib = out.strip().splitlines()[0].rsplit(",", 1)
            total = int(float(mib)) * 2**20
            fits = [v for v in PRESETS if v * GB <= total * 1.02]
            _gpu = {"name": name.strip(), "bytes": total, "gb": round(total / GB, 1),
                    "preset": max(fits) if fits else min(PRESETS)}
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            _gpu = None
    _gpu_done.set()
    return _gpu


# The config loader (presets, rank checks) and the plan import torch and diffusers lazily, and diffusers' lazy
# modules fail when two threads import the same name at once ("cannot import name 'FluxTransformer2DModel'"): the
# warm-up and every request that validates or plans a form hold this lock (after the warm-up, each takes ~0.1 s).
LOCK = threading.RLock()


def heavy_imports():
    """Import what the loader and the plan load lazily (torch, diffusers' transformer classes), once."""
    with LOCK:
        import dev2pro.plan  # noqa: F401 -- torch + diffusers: seconds, paid once
        from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel  # noqa: F401 -- built by the plan


def warm_up(load_schema) -> threading.Thread:
    """Load the form schema, then the GPU facts and the plan's imports (torch), in a background thread."""
    def run():
        load_schema()
        detect_gpu()
        try:
            heavy_imports()
        except Exception:  # noqa: BLE001 -- the plan request reports it
            pass
    t = threading.Thread(target=run, name="dev2pro-ui-warm-up", daemon=True)
    t.start()
    return t


def preset_choices(cfg, data: dict) -> dict:
    """{"section.key": value} the ``model.vram`` preset set (the keys the user did not write)."""
    if not cfg.model.vram:
        return {}
    from ..plan import VRAM_PRESETS

    out = {}
    # FLUX.2's 32/80 GB presets are computed (presets.fitted_preset) over the same keys as the table's
    for sec, values in VRAM_PRESETS.get(cfg.model.vram, VRAM_PRESETS[48]).items():
        for key in values:
            if key not in (data.get(sec) or {}):
                value = getattr(getattr(cfg, sec), key)
                out[f"{sec}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def caption_count(cfg, ws) -> dict:
    """Images and captioned images in the config's dataset folders (their subfolders too when a folder holds
    none itself: a kohya parent of N_name folders); bounded by the workspace's image limit."""
    images = captioned = samples = 0
    default = bool(cfg.data.default_caption.strip())
    for folder in cfg.data.folders:
        path = Path(folder.path)
        if not path.is_dir() or not ws.inside(path):
            continue
        found = ws.images(path, limit=5000)
        if not found or folder.recursive:
            controls = {Path(c).resolve() for c in as_list(folder.controls)}  # references: not images to caption
            subs = sorted(p for p in path.iterdir()
                          if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")  # as training
                          and p.resolve() not in controls)
            found += [img for sub in subs[:200] for img in ws.images(sub, limit=5000)]
        samples += len(found) * folder.repeats
        for img in found:
            images += 1
            if default or folder.caption.strip() or img.with_suffix(".txt").is_file():
                captioned += 1
    return {"images": images, "captioned": captioned, "shards": bool(cfg.data.shards), "samples": samples}


def run_steps(cfg, captions: dict) -> tuple[int, bool]:
    """(the run's steps, estimated): ``train.steps``, or for ``train.epochs`` the steps its images give at one
    batch per ``data.batch_size`` samples (training counts them per bucket at the start: a few more batches when
    the images fall in several buckets)."""
    from ..train.epochs import steps_for

    if not cfg.train.epochs or not captions.get("samples"):
        return cfg.train.steps, False
    return steps_for(cfg.train.epochs, -(-captions["samples"] // cfg.data.batch_size), cfg.train.grad_accum), True


def _model_key(m) -> str:
    return os.path.realpath(m.transformer or m.path) if (m.transformer or m.path) else ""


def measured_speed(cfg, ws) -> dict | None:
    """s/step of a finished run in the workspace with this model, resolution, batch and memory settings."""
    want = (_model_key(cfg.model), cfg.data.resolution, cfg.data.batch_size,
            *(getattr(cfg.model, k) for k in MEMORY_KEYS))
    for run in find_runs(ws.root, limit=50):
        f = RunFolder(run)
        try:
            summary = json.loads(f.summary.read_text())
            with open(f.config, "rb") as fh:
                c = tomllib.loads(fh.read(1_000_000).decode("utf-8", "replace"))
            m, d = c.get("model", {}), c.get("data", {})
            got = (os.path.realpath(ws.root / (m.get("transformer") or m.get("path") or "")),
                   d.get("resolution"), d.get("batch_size"), *(m.get(k) for k in MEMORY_KEYS))
            speed = float(summary.get("steps_per_second") or 0)
        except (OSError, ValueError, TypeError, AttributeError, tomllib.TOMLDecodeError):
            continue
        if got == want and speed > 0 and ws.inside(f.summary) and ws.inside(f.config):
            return {"s_per_step": 1 / speed, "source": f"measured in {ws.rel(run)} (same model, resolution, batch "
                                                      f"and memory settings)"}
    return None


def bench_speed(cfg, spec) -> dict | None:
    """The H200 bench's s/step for full-size FLUX.1 with the same preset at 512 or 1024 (batch 1)."""
    full_flux1 = (spec.hidden, spec.num_double, spec.num_single) == (3072, 19, 38)
    row = BENCH_H200.get(cfg.model.vram, {})
    if full_flux1 and cfg.data.batch_size == 1 and isinstance(cfg.data.resolution, int) and cfg.data.resolution in row:
        return {"s_per_step": row[cfg.data.resolution], "source": f"the --vram {cfg.model.vram} preset at "
                                                                  f"{cfg.data.resolution}px on {BENCH_SOURCE}"}
    return None


def page_plan(cfg, data: dict, card: str | int | None, ws) -> dict:
    """The plan as the Train page shows it; ``card``: "gpu" (this GPU), a size in GB, or None (no card)."""
    from ..plan import CUDA_OVERHEAD, advise, check_fits_a_card, check_rank, estimate, render
    from ..schemas import plan_inputs

    inputs = plan_inputs(cfg)
    check_rank(inputs)
    plan = estimate(inputs)
    check_fits_a_card(plan)
    gpu = detect_gpu()
    if card == "gpu":
        card_bytes, card_label = (gpu["bytes"], f"this GPU ({gpu['name']}, {gpu['gb']:g} GB)") if gpu else (None, "")
    elif card:
        card_bytes, card_label = int(card) * GB, f"{'an' if int(card) in (8, 18, 80) else 'a'} {int(card)} GB card"
    else:
        card_bytes, card_label = None, ""
    need = plan.peak + CUDA_OVERHEAD
    if card_bytes:
        try:
            fits, message = advise(inputs, card_bytes)
        except UserError:  # a remedy the model cannot take (e.g. swapping 8 blocks of a 6-block model)
            fits = need <= card_bytes
            message = (f"fits: ~{need / GB:.1f} GB of {card_bytes / GB:.1f} GB" if fits else
                       f"the plan needs ~{need / GB:.1f} GB but the card has {card_bytes / GB:.1f} GB: lower "
                       f"data.resolution or lora.rank, or pick a smaller GPU preset")
    else:
        fits, message = None, "no card to check against: pick a GPU memory size"
    speed = measured_speed(cfg, ws) or bench_speed(cfg, inputs.spec)
    captions = caption_count(cfg, ws)
    steps, estimated = run_steps(cfg, captions)
    if speed:
        speed.update(total_s=speed["s_per_step"] * steps, steps=steps, steps_estimated=estimated)
    reasons = [message.replace("WARNING: ", "")] if fits is False else []
    reasons += start_reasons(cfg, ws, captions)
    return {"fits": fits, "message": message, "peak_gb": plan.peak / GB, "need_gb": need / GB,
            "card_gb": card_bytes / GB if card_bytes else None, "card": card_label,
            "host_ram_gb": plan.host_ram / GB, "train_peak_gb": plan.train_peak() / GB,
            "sampling_peak_gb": plan.sampling_peak / GB if inputs.sample_pixels else None,
            "caching_peak_gb": plan.caching_peak / GB, "lora_params": plan.lora_params,
            "preset": preset_choices(cfg, data), "vram": cfg.model.vram, "speed": speed, "dataset": captions,
            "saving": saving(cfg), "can_start": not reasons, "reasons": reasons, "text": render(plan), "gpu": gpu}


def saving(cfg) -> dict:
    """How often the run saves and samples, with a warning when it saves nothing before the end."""
    warnings = []
    if not cfg.save.every and not cfg.save.every_epochs:
        warnings.append("saving is off until the end (save.every = 0): a crash, an out-of-memory error or a reboot "
                        "loses the whole run, and it cannot be resumed")
    if not cfg.sample.every and not cfg.sample.every_epochs and cfg.sample.prompts:
        warnings.append("samples only at the end (sample.every = 0)")
    return {"save_every": cfg.save.every, "sample_every": cfg.sample.every, "steps": cfg.train.steps,
            "save_every_epochs": cfg.save.every_epochs, "sample_every_epochs": cfg.sample.every_epochs,
            "epochs": cfg.train.epochs, "warnings": warnings}


def preflight_reason(cfg) -> str | None:
    """What `dev2pro train` refuses before it writes anything (``train.preflight.check_training_inputs``, called
    with the arguments the recipe passes): an inference base or adapter of another family or size, a
    transformer of another model than the folder, shards of another text stack, a missing data folder; None when
    it passes."""
    from ..train.preflight import check_training_inputs

    m = cfg.model
    try:
        check_training_inputs(m.transformer or m.path, m.path, adapter=m.adapter, inference_base=m.inference_base,
                              shards=cfg.data.shards, reference=cfg.sample.control,
                              needs_text=not cfg.data.shards or bool(cfg.sample.prompts),
                              allow_pickle=m.allow_pickle, family=m.family, text_dtype=m.text_encoder_dtype,
                              folders=cfg.data.folders)
    except Exception as e:  # noqa: BLE001 -- UserError, or a header that does not parse
        if Path(m.transformer or m.path).exists() and not _readable(m):
            return None  # a training base no check can read: the plan says so, a job names it with its fix
        return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e)[:300]}"
    return None


def _readable(m) -> bool:
    from ..flux.checkpoint import open_checkpoint

    try:
        open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle, family=m.family).spec()
        return True
    except Exception:  # noqa: BLE001 -- any failure to read it
        return False


def start_reasons(cfg, ws, captions: dict | None = None) -> list[str]:
    """Why Start is refused, apart from the memory fit: the CLI's preflight, uncaptioned or missing images, an
    output folder that holds a run or other files. The plan shows them; ``/api/train/start`` enforces them."""
    captions = captions or caption_count(cfg, ws)
    reasons = [r for r in [preflight_reason(cfg)] if r]
    if not captions["shards"] and captions["images"] == 0:
        reasons.append("the dataset folder holds no images: upload some on the Dataset page")
    elif captions["captioned"] < captions["images"]:
        missing = captions["images"] - captions["captioned"]
        reasons.append(f"{missing} of {captions['images']} images have no caption (training stops on them): "
                       f"caption them on the Dataset page, or set a caption for images without one (Advanced › "
                       f"Dataset)")
    out = Path(cfg.save.output_dir)
    status = folder_status(out) if out.is_dir() and ws.inside(out) else "absent"  # a failed start's: reused
    if status == "saved" and not cfg.save.overwrite:
        reasons.append(f"{ws.rel(out)} already holds a run: choose another output name (resume that run on the "
                       f"Monitor page, or tick 'Overwrite an existing run' under Advanced › Saving)")
    elif status == "foreign":
        reasons.append(f"{ws.rel(out)} holds other files (not a run): choose another output name")
    return reasons
