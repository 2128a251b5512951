"""What a LoRA run measures and publishes beside its loop: the validation loss on a schedule, which weights are
published (the EMA's, a schedule-free optimiser's average, or the trained ones: ``optim.published_weights``), the
optional W&B sink, and the early-stopping advice at the end. The recipe builds one ``Watch`` from plain values
and calls it; the loop only sees ``Events.validate``.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UserError
from .ema import EMA
from .optim import is_schedule_free, published_weights
from .validation import Validator, advice, check_holdout, describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def check_inputs(validation_folder: str, wandb: bool, optimizer: str, folders=()) -> None:
    """Refuse, before anything is written, an empty validation folder, one the training ``folders`` (``[[data.
    folders]]`` entries: ``path``, ``recursive``) read, or an optional package that is missing."""
    check_holdout(validation_folder, [(f.path, f.recursive) for f in folders])
    check_optional_packages(wandb, optimizer)


def check_optional_packages(wandb: bool, optimizer: str) -> None:
    """Refuse a run that asks for an optional package that is not installed."""
    if wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("logging.wandb = true needs the wandb package: pip install 'dev2pro[wandb]', or set "
                        "logging.wandb = false")
    if optimizer == "schedulefree_adamw" and importlib.util.find_spec("schedulefree") is None:
        raise UserError("train.optimizer = 'schedulefree_adamw' needs the schedulefree package: pip install "
                        "'dev2pro[schedulefree]', or use 'adamw'")


def open_sinks(wandb: bool, project: str, mode: str, root: Path, config_file: Path) -> list:
    """The extra loggers of ``Progress``: a W&B run under ``root/wandb`` when asked for (its config: the run's
    resolved ``config_file``), else none."""
    if not wandb:
        return []
    from .wandb_log import open_wandb  # the optional package is imported only here

    config = tomllib.loads(config_file.read_text()) if config_file.is_file() else {}
    return [open_wandb(project, mode, root, root.name, config)]


@dataclass
class Watch:
    """The trainable weights, their optimiser and EMA, and the validator of one run (``bar`` set once it exists)."""

    params: list
    optimizer: object
    ema: EMA | None = None
    validator: Validator | None = None
    total: int = 0
    bar: object = None
    notes: list = field(default_factory=list)  # start-up lines (``startup_lines``)

    def weights(self) -> AbstractContextManager:
        """``with watch.weights():`` the model holds the weights that are saved and sampled."""
        return published_weights(self.params, self.optimizer, self.ema)

    def published(self, act: Callable):
        """``act`` (a save, a sample grid) run with the published weights in the model."""
        def run(*args):
            with self.weights():
                return act(*args)
        return run

    def restore(self, history: dict | None, step: int) -> None:
        """A resumed run's validation history, up to its state's ``step``."""
        if self.validator is not None:
            self.validator.restore(history, step)

    def validate(self, model, step: int) -> dict | None:
        """The validation loss at ``step`` when it is due (on the published weights), reported on ``bar``."""
        v = self.validator
        if v is None or not v.due(step, self.total):
            return None
        with self.weights():
            result = v.evaluate(model, step)
        if self.bar is not None:
            self.bar.validation(step, result, f"validation at step {step}: loss {describe(result)}")
        return result

    def finish(self, lora_file: Callable[[int], Path], every: int, say: Callable[[str], None]) -> dict:
        """The early-stopping advice on the console, and ``summary.json``'s additions: ``validation`` (step ->
        {overall, per_sigma}) and ``validation_best``. ``lora_file(step)``: where a save at ``step`` writes."""
        if self.validator is None:
            return {}
        best = self.validator.best()
        lines = advice(best, self.total, lambda s: lora_file(s) if lora_file(s).exists() else None, every)
        for line in lines:
            say(line)
        return {"validation": self.validator.summary(),
                "validation_best": {"step": best[0], "overall": best[1], "advice": lines} if best else None}


def make_watch(params: list, optimizer, ema_decay: float, total: int, held_out=None, sigmas: Sequence[float] = (),
               seeds: Sequence[int] = (), every: int = 0, guidance: float = 1.0, device=None,
               dtype: torch.dtype = torch.float32, rows: int = 1, autocast: Callable | None = None,
               warmup_steps: int = 0, source: str = "", wandb_dir: Path | None = None) -> Watch:
    """A ``Watch``: an EMA of ``params`` when ``ema_decay`` > 0, a validator when ``held_out`` (a cached dataset of
    held-out images, from ``source``) is given; its ``notes`` say so (and where W&B writes, ``wandb_dir``)."""
    ema = EMA(params, ema_decay) if ema_decay > 0 else None
    validator = None
    if held_out is not None:
        validator = Validator(held_out, [float(s) for s in sigmas], [int(s) for s in seeds], every, guidance, device,
                              dtype, max(1, rows), autocast)
    watch = Watch(params, optimizer, ema, validator, total)
    watch.notes = startup_lines(watch, warmup_steps, every, source, wandb_dir or None)
    return watch


def startup_lines(watch: Watch, warmup_steps: int, every: int, source: str, wandb_dir: Path | None) -> list[str]:
    """What the start-up lines say about EMA, schedule-free weights, validation and W&B."""
    lines = []
    if watch.ema is not None:
        lines.append(f"  EMA: the LoRA files and samples hold the EMA of the trained weights (decay "
                     f"{watch.ema.decay:g}); the resumable state keeps both")
    if is_schedule_free(watch.optimizer):
        lines.append("  schedule-free AdamW: the LoRA files and samples hold its averaged (eval) weights; constant "
                     "LR" + (f" after {warmup_steps} warmup steps" if warmup_steps else ""))
    v = watch.validator
    if v is not None:
        lines.append(f"  validation: {len(v.dataset.entries)} held-out image(s) ({source}) x {len(v.seeds)} seed(s) "
                     f"at sigmas {', '.join(f'{s:g}' for s in v.sigmas)}, before training, "
                     + (f"every {every} steps " if every else "") + "and at the end")
    if wandb_dir is not None:
        lines.append(f"  W&B: {wandb_dir}")
    return lines
