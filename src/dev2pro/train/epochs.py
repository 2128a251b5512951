"""Epoch settings as the step numbers a run uses (torch-free): ``train.epochs``, ``save.every_epochs`` and
``sample.every_epochs`` (kohya's ``max_train_epochs`` / ``save_every_n_epochs``) become ``train.steps``,
``save.every`` and ``sample.every`` once the dataset is scanned and its batches per epoch are known:
``ceil(epochs x batches per epoch / grad_accum)``.

The run's config.toml holds the resolved step fields (the epoch fields 0) under comment lines that say where they
came from (``note``), so ``--print-config`` of it and a ``--resume`` with it reach the same final step. A resume
with the original config resolves again; where the saved record has the same setting (``recorded``) its step count
is kept, so a dataset changed since (``--resume-changed-data``) does not move the end of the run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from ..config import INT_LIMIT
from ..errors import UserError
from .folder import STATE_DIR

TARGETS = {"train.epochs": "train.steps", "save.every_epochs": "save.every", "sample.every_epochs": "sample.every"}
_LINE = re.compile(r"^# (?P<key>train\.epochs|save\.every_epochs|sample\.every_epochs) = (?P<value>[\d.e+-]+) -> "
                   r"(?:every )?(?P<steps>\d+) steps \((?P<per_epoch>\d+) batches per epoch"
                   r"(?:, grad_accum (?P<grad_accum>\d+))?\)", re.M)
_HEAD = "# epoch settings resolved to steps when this run started (the step fields below hold them):"


@dataclass(frozen=True)
class Resolved:
    """One epoch setting ``key`` = ``value`` as ``steps`` (a count or an interval), from ``per_epoch`` batches per
    epoch and ``grad_accum``; ``now``: the batches per epoch of this start where it kept a recorded count."""

    key: str
    value: float
    steps: int
    per_epoch: int
    grad_accum: int = 1
    now: int = 0

    def line(self) -> str:
        """``train.epochs = 16 -> 2400 steps (150 batches per epoch)`` (what config.toml records, too)."""
        every = "every " if self.key != "train.epochs" else ""
        accum = f", grad_accum {self.grad_accum}" if self.grad_accum != 1 else ""
        per_epoch = f"{self.per_epoch} batches per epoch{accum}"
        return f"{self.key} = {_num(self.value)} -> {every}{self.steps} steps ({per_epoch})"

    def said(self) -> str:
        """The start-up line: ``line`` and, where a resume kept the recorded count on other data, that."""
        if not self.now or self.now == self.per_epoch:
            return self.line()
        return (f"{self.line()}; {self.now} batches per epoch now: kept the {self.steps} steps {TARGETS[self.key]} "
                f"had when the run started (the dataset or batch size changed since)")


def _num(value: float) -> str:
    """16.0 -> "16", 0.5 -> "0.5"; a value ``:g`` would round keeps its digits (it is read back: ``recorded``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def steps_for(epochs: float, per_epoch: int, grad_accum: int) -> int:
    """``ceil(epochs x per_epoch / grad_accum)``, exact for a decimal ``epochs`` (0.1 x 30 is 3, not 4)."""
    return max(1, math.ceil(Fraction(str(float(epochs))) * per_epoch / grad_accum))


def resolve(configured: dict[str, float], per_epoch: int, grad_accum: int,
            recorded: dict[str, Resolved] | None = None) -> list[Resolved]:
    """The epoch settings in ``configured`` (``section.key`` -> value: ``TARGETS``' keys, 0 = off, and their step
    fields) as steps for ``per_epoch`` batches per epoch. ``recorded``: the run's saved record (a resume): a setting
    it holds with the same value and grad_accum keeps its steps; a setting now off whose step field still equals the
    recorded steps keeps its record (the run's config.toml goes on saying where the number came from)."""
    recorded, out = recorded or {}, []
    for key, target in TARGETS.items():
        value, rec = configured.get(key, 0), recorded.get(key)
        if value and rec is not None and rec.value == value and rec.grad_accum == grad_accum:
            out.append(Resolved(key, value, rec.steps, rec.per_epoch, grad_accum, per_epoch))
        elif value:
            steps = steps_for(value, per_epoch, grad_accum)
            if steps > INT_LIMIT:
                raise UserError(f"{key} = {_num(value)}: {steps} steps ({per_epoch} batches per epoch) is more than "
                                f"the {INT_LIMIT} a run can count; lower {key}")
            out.append(Resolved(key, value, steps, per_epoch, grad_accum, per_epoch))
        elif rec is not None and configured.get(target) == rec.steps:
            out.append(rec)
    return out


def settings(resolved: list[Resolved]) -> dict[str, float]:
    """``section.key`` -> value for the config: each step field set, each epoch field 0 (resolved once)."""
    return {k: v for r in resolved for k, v in ((TARGETS[r.key], r.steps), (r.key, 0))}


def note(resolved: list[Resolved]) -> str:
    """The comment lines at the top of a run's config.toml ("" when no epoch setting was used)."""
    return "".join(f"{line}\n" for line in [_HEAD, *(f"# {r.line()}" for r in resolved)]) + "\n" if resolved else ""


def recorded(text: str) -> dict[str, Resolved]:
    """The record ``note`` wrote in a config.toml's ``text`` (key -> Resolved; {} when there is none)."""
    return {m["key"]: Resolved(m["key"], float(m["value"]), int(m["steps"]), int(m["per_epoch"]),
                               int(m["grad_accum"] or 1)) for m in _LINE.finditer(text)}


def started_with(resume: str, state_dir: Path, config: Path) -> dict[str, Resolved]:
    """The record in the config.toml of the run whose state ``--resume`` continues: the run folder holding that
    state, else ``config`` (this run's); {} when it cannot be read."""
    from .state import state_folder  # torch: only when a run resumes

    folder, _ = state_folder(resume, state_dir)
    saved = folder.parent.parent / "config.toml" if folder.parent.name == STATE_DIR else config
    try:
        return recorded(saved.read_text())
    except (OSError, ValueError):
        return {}


def summary(resolved: list[Resolved]) -> dict:
    """What summary.json records: key -> value, steps, batches per epoch, grad_accum."""
    return {r.key: {k: v for k, v in asdict(r).items() if k not in ("key", "now")} for r in resolved}


def further(resolved: list[Resolved], step: int) -> str | None:
    """How a run counted in ``train.epochs`` trains past ``step``: a larger train.epochs (train.steps beside it is
    refused); None when its steps come from train.steps (or from a run's config.toml, whose train.epochs is 0)."""
    r = next((r for r in resolved if r.key == "train.epochs" and r.now), None)
    if r is None:
        return None
    more = max(2 * r.value, math.floor(step * r.grad_accum / r.per_epoch) + 1)
    return (f"raise train.epochs (now {_num(r.value)} = {r.steps} steps at {r.per_epoch} batches per epoch), e.g. "
            f"--set train.epochs={_num(more)} --resume")
