"""What the Monitor and Results pages show about a run folder, read from the files `dev2pro train` writes.

Nothing here talks to the training process: loss and lr come from its TensorBoard event files (``logs/``), the
step total from its resolved ``config.toml``, the step reached from the newest of the logs, the saved states
(``state/step-NNNNNN``) and ``summary.json`` (a run stopped between two logged points went further), sample grids
from ``samples/``, LoRA files from the folder itself and the final numbers from ``summary.json``. So a run started
from a terminal is watched the same way as one started from the browser, and a restarted web app sees everything a
run has written so far.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..train.folder import STEP_RE, RunFolder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCALARS = {"loss": "loss/step", "smoothed": "loss/smoothed", "lr": "lr", "val": "val/loss"}  # val: held-out loss
_MEM = re.compile(r"mem=([0-9.]+)G")


def find_runs(root: Path, limit: int = 200, depth: int = 6, max_folders: int = 20_000) -> list[Path]:
    """Training run folders under ``root`` (a ``config.toml`` beside ``logs/``, ``state/`` or
    ``summary.json``), newest first; hidden and symlinked folders skipped, at most ``depth`` levels and
    ``max_folders`` folders looked at (bounded work on any workspace)."""
    runs, seen = [], 0
    for d, dirs, files in os.walk(root):  # never follows symlinked folders
        rel = Path(d).relative_to(root)
        seen += 1
        if seen > max_folders:
            break
        dirs[:] = [] if len(rel.parts) >= depth else sorted(x for x in dirs if not x.startswith("."))
        if RunFolder(d).config.name in files:
            f = RunFolder(d)
            if f.logs.is_dir() or f.state.is_dir() or f.summary.exists():
                runs.append(f.root)
                dirs[:] = [x for x in dirs if x not in (f.state.name, f.logs.name, f.samples.name, "cache", "wandb")]
    return sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)[:limit]


def read_scalars(logs: Path) -> dict[str, list[list[float]]]:
    """{name: [[step, value, wall_time], ...]} from the run's event files; a resumed run's repeated steps keep
    their latest value."""
    if not logs.is_dir() or not any(logs.glob("events.out.tfevents.*")):
        return {k: [] for k in SCALARS}
    ea = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    ea.Reload()
    tags = set(ea.Tags().get("scalars", []))
    out = {}
    for name, tag in SCALARS.items():
        by_step: dict[int, list[float]] = {}
        for e in ea.Scalars(tag) if tag in tags else []:
            if e.step not in by_step or e.wall_time >= by_step[e.step][2]:
                by_step[e.step] = [e.step, e.value, e.wall_time]
        out[name] = [by_step[s] for s in sorted(by_step)]
    return out


def _speed(points: list[list[float]], window: int = 10) -> float | None:
    """Steps per second over the last ``window`` logged points (one training session: no gaps > 60 s)."""
    pts = points[-window:]
    while len(pts) >= 2 and pts[-1][2] - pts[0][2] > 60 * (len(pts) - 1):
        pts = pts[1:]
    if len(pts) < 2 or pts[-1][2] <= pts[0][2]:
        return None
    return (pts[-1][0] - pts[0][0]) / (pts[-1][2] - pts[0][2])


def live_speed(points: list[list[float]], job: dict | None, finished: bool, now: float | None = None) -> float | None:
    """The run's current steps per second, or None when it is not training now: a UI job that is not queued or
    running (stopped, failed, done), a finished run, or -- with no UI job (a terminal's run) -- a last logged point
    older than 10 minutes. A running job counts only the points its own session logged (after a Resume, the
    previous session's speed is not shown as current)."""
    if finished or (job is not None and job.get("status") != "running"):
        return None
    if job is not None:
        return _speed([p for p in points if p[2] >= (job.get("started") or 0)])
    now = time.time() if now is None else now
    return _speed(points) if points and now - points[-1][2] < 600 else None


def saved_states(state: Path) -> list[str]:
    """The complete training states under ``state``, oldest first: ``step-NNNNNN/`` folders (not links) holding
    common.json and common.safetensors (a save cut short, a temporary folder or a stray file is not one)."""
    found = [(int(m.group(1)), p.name) for p in state.iterdir() if (m := STEP_RE.match(p.name))
             and not p.is_symlink() and (p / "common.json").is_file() and (p / "common.safetensors").is_file()] \
        if state.is_dir() else []
    return [name for _, name in sorted(found)]


def saved_step(state: Path) -> int | None:
    """The step of the newest complete training state under ``state`` (``saved_states``), None when there is none."""
    names = saved_states(state)
    return int(STEP_RE.match(names[-1]).group(1)) if names else None


def last_step(logged: int, saved: int | None, summary: dict | None) -> tuple[int, str | None]:
    """(the last step the run reached, where it comes from when not the logs). The event files hold a point every
    ``log_every`` steps, so a run stopped (Ctrl-C, kill, crash) between two has gone further: its newest saved state
    (the interrupt's own save included) or, for a finished run, summary.json's ``steps`` say how far."""
    done = summary.get("steps") if summary else None
    done = done if isinstance(done, int) and not isinstance(done, bool) else None
    step, source = logged, None
    if saved is not None and saved > step:
        step, source = saved, f"saved state step-{saved:06d}"
    if done is not None and done > step:
        step, source = done, "summary.json"
    return step, (f"{source}; the last logged step is {logged}" if source else None)


_GRID = re.compile(r"^step(\d{6})(-[a-z0-9-]+)?\.png$")
# what each grid of a step shows (train/samples.py's names): the LoRA where it is used, and where it was trained
GRID_LABELS = {"": "inference base (as used)", "-base": "training base (Base)", "-adapter": "with the adapter",
               "-g1": "guidance 1, no CFG", "-cfg": "true CFG"}


def latest_grids(samples: list[Path]) -> list[tuple[str, Path]]:
    """(label, path) of every grid of the latest step -- e.g. a klein LoRA on the distilled model next to Base --
    inference base first."""
    by_step: dict[int, dict[str, Path]] = {}
    for p in samples:
        m = _GRID.match(p.name)
        if m:
            by_step.setdefault(int(m.group(1)), {})[m.group(2) or ""] = p
    if not by_step:
        return []
    grids = by_step[max(by_step)]
    order = sorted(grids, key=lambda tag: (tag not in GRID_LABELS, list(GRID_LABELS).index(tag)
                                           if tag in GRID_LABELS else 0, tag))
    return [(GRID_LABELS.get(tag, tag.lstrip("-")), grids[tag]) for tag in order]


def run_info(run: Path, root: Path, log_tail: str = "", inside=lambda p: True, job: dict | None = None) -> dict:
    """Everything the Monitor/Results pages show for one run folder (paths relative to ``root``); ``inside(path)``
    says whether a file may be read (the workspace's rule: no symlink out), others are left out; ``job``: the UI
    job training it (its status and start time decide whether a speed and an ETA are current, ``live_speed``)."""
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    ok = lambda p: inside(p) and p.is_file()  # noqa: E731
    f = RunFolder(run)
    total = None
    if ok(f.config):
        try:
            total = tomllib.loads(f.config.read_text(errors="replace")).get("train", {}).get("steps")
        except (tomllib.TOMLDecodeError, AttributeError):
            pass
        total = total if isinstance(total, int) and not isinstance(total, bool) else None
    scalars = read_scalars(f.logs) if inside(f.logs) else {k: [] for k in SCALARS}
    summary = None
    if ok(f.summary):
        try:
            summary = json.loads(f.summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary = None
        summary = summary if isinstance(summary, dict) else None
    speed = live_speed(scalars["loss"], job, summary is not None)
    logged = int(scalars["loss"][-1][0]) if scalars["loss"] else 0
    step, step_from = last_step(logged, saved_step(f.state) if inside(f.state) else None, summary)
    mem = _MEM.findall(log_tail)
    samples = [p for p in sorted(f.samples.glob("*.png"))[:1000] if ok(p)] \
        if f.samples.is_dir() and inside(f.samples) else []
    return {
        "run": rel(run), "total_steps": total, "step": step, "step_from": step_from, "logged_step": logged,
        "steps_per_second": speed,
        "eta_seconds": (total - step) / speed if speed and total and total > step else None,
        # the CLI's mem=: torch.cuda.max_memory_allocated (train/progress.peak_memory_gb), process RAM on a CPU run
        "memory_gb": float(mem[-1]) if mem else None,
        "memory_label": "peak GPU memory allocated (process RAM on a CPU run)",
        "scalars": {k: [[p[0], p[1]] for p in v] for k, v in scalars.items()},
        "samples": [rel(p) for p in samples],
        "latest_samples": [{"label": label, "file": rel(p)} for label, p in latest_grids(samples)],
        "loras": [rel(p) for p in sorted(run.glob("*.safetensors"))[:1000] if ok(p)] if run.is_dir() else [],
        "states": saved_states(f.state) if inside(f.state) else [],  # what --resume can load (Resume button)
        # per-step numbers stay out (the curves come from the event files); validation_best is kept
        "summary": {k: v for k, v in summary.items() if k not in ("losses", "validation")} if summary else None,
        "finished": summary is not None,
    }
