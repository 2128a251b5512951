"""What Results' "Compare against" offers for one LoRA: the run's own other checkpoints (its ``-stepNNNNNN`` files:
"final vs step 1500" is how a checkpoint is picked) and the LoRAs of other runs trained on a model of the same
family and size (a FLUX.2 LoRA on a FLUX.1 base fails only inside the queued job). A run's model is read from its
``config.toml`` and the checkpoint header it names (``flux.checkpoint``), cached per file and modification time.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..train.folder import RunFolder
from .monitor import find_runs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_RUNS = 200  # runs looked at, newest first
MAX_FILES = 500  # LoRA files offered in all
OTHER_LAYOUTS = (".diffusers.", ".comfy.")  # the same weights in another layout: the kohya file stands for them


@functools.lru_cache(maxsize=256)
def _signature(path: str, mtime: float) -> tuple | None:
    from ..flux.checkpoint import open_checkpoint

    try:
        ckpt = open_checkpoint(path)
        spec = ckpt.spec()
    except Exception:  # noqa: BLE001 -- an unreadable model: no family to match
        return None
    return (ckpt.family.name, ckpt.family.title, spec.hidden, spec.num_double, spec.num_single)


def model_signature(path: str | Path) -> tuple | None:
    """(family, title, width, double blocks, single blocks) of a model file or folder; None when unreadable."""
    try:
        return _signature(os.path.realpath(path), Path(path).stat().st_mtime)
    except OSError:
        return None


def run_model(ui, run: Path) -> str:
    """The training base a run's config names (model.transformer, else model.path), inside the workspace; ""."""
    config = RunFolder(run).config
    if not (ui.ws.inside(config) and config.is_file()):
        return ""
    try:
        with open(config, "rb") as f:
            m = tomllib.loads(f.read(1_000_000).decode("utf-8", "replace")).get("model", {})
        value = (m.get("transformer") or m.get("path") or "") if isinstance(m, dict) else ""
        return str(ui.ws.confine(ui.ws.root / value, "model")) if isinstance(value, str) and value else ""
    except (tomllib.TOMLDecodeError, UserError, OSError, ValueError):
        return ""


def run_signature(ui, run: Path) -> tuple | None:
    model = run_model(ui, run)
    return model_signature(model) if model else None


def describe(sig: tuple | None) -> str:
    return f"a {sig[1]} model {sig[2]} wide ({sig[3]} + {sig[4]} blocks)" if sig else "an unreadable model"


def _loras(ui, run: Path) -> list[Path]:
    return [p for p in sorted(run.glob("*.safetensors"))[:1000]
            if not any(x in p.name for x in OTHER_LAYOUTS) and ui.ws.inside(p) and p.is_file()]


def candidates(ui, lora: Path) -> list[str]:
    """Workspace paths of the LoRAs ``lora`` can be compared against: its run's other files first (newest step
    first), then other runs' of the same model family and size (newest runs first), at most MAX_FILES."""
    run = lora.parent
    out = [p for p in reversed(_loras(ui, run)) if p != lora]
    sig = run_signature(ui, run)
    if sig is not None:
        for other in find_runs(ui.ws.root, limit=MAX_RUNS):
            if len(out) >= MAX_FILES:
                break
            if other != run and run_signature(ui, other) == sig:
                out += _loras(ui, other)
    return [ui.ws.rel(p) for p in out[:MAX_FILES]]


def check_other(ui, lora: Path, other: Path) -> None:
    """UserError when ``other``'s run trained on a model of another family or size than ``lora``'s run."""
    if other.parent == lora.parent or not RunFolder(other.parent).config.is_file():
        return  # the run's own checkpoint, or a LoRA outside any run (its header is checked by the job)
    mine, theirs = run_signature(ui, lora.parent), run_signature(ui, other.parent)
    if mine is not None and theirs is not None and mine != theirs:
        raise UserError(f"'other': {ui.ws.rel(other)} was trained on {describe(theirs)}, this run on "
                        f"{describe(mine)}: a LoRA fits only the model it was trained for; compare against a LoRA "
                        f"of the same model")
