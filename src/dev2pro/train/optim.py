"""Optimisers and learning-rate schedules, chosen by name, and the weights a run publishes.

AdamW is torch's. 8-bit AdamW (bitsandbytes), Prodigy (prodigyopt) and schedule-free AdamW (schedulefree) are
optional: asking for one that is not installed is a clear error with the install command, never a silent fallback
to something else.

Schedule-free AdamW (Defazio et al. 2024) trains on one sequence of weights (``y``) and keeps an average (``x``)
that is the model to evaluate: ``optimizer.eval()`` swaps ``x`` in, ``optimizer.train()`` swaps ``y`` back. It
replaces the LR schedule (its own linear warmup is ``warmup_steps``), so ``build_scheduler`` keeps the LR
constant. ``published_weights`` is the one context in which samples, validation and LoRA files see the weights a
run publishes -- the EMA, the schedule-free average, or the raw weights -- and it restores the training weights
*bitwise* afterwards (the ``lerp`` back and forth of ``train()/eval()`` is not exact), so evaluating or saving never
changes what the next step computes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch

from ..errors import ConfigError

from ..choices import OPTIMIZERS, SCHEDULES  # noqa: E402,F401 -- re-exported


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """An optimiser over ``params`` by name (adamw | adamw8bit | prodigy | adafactor | schedulefree_adamw);
    ``warmup_steps`` is read by schedule-free AdamW only (the others warm up in ``build_scheduler``)."""
    params = [p for p in params if p.requires_grad]
    if name == "schedulefree_adamw":
        try:
            from schedulefree import AdamWScheduleFree  # optional
        except ImportError:
            raise ConfigError("train.optimizer = 'schedulefree_adamw' needs schedulefree: pip install "
                              "'dev2pro[schedulefree]', or use 'adamw'") from None
        opt = AdamWScheduleFree(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                warmup_steps=warmup_steps)
        opt.train()  # it starts in eval mode and refuses to step there
        return opt
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional, CUDA only
        except ImportError:
            raise ConfigError("train.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                              "(CUDA only), or use 'adamw'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy  # optional
        except ImportError:
            raise ConfigError("train.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt "
                              "(and set train.lr = 1.0 as Prodigy expects), or use 'adamw'") from None
        return Prodigy(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError("train.optimizer = 'adafactor' needs torch >= 2.5")
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based): linear warmup, then constant / cosine / linear decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ConfigError(f"unknown lr schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def is_schedule_free(optimizer) -> bool:
    """A schedule-free optimiser (it has ``train()``/``eval()`` weight modes); accelerate's wrapper included."""
    return "weight_lr_power" in getattr(optimizer, "defaults", {}) and hasattr(optimizer, "eval")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR multiplier per step; constant for a schedule-free optimiser (its warmup is its own)."""
    if is_schedule_free(optimizer):
        if schedule != "constant":
            raise ConfigError(f"train.schedule = {schedule!r}: schedule-free AdamW needs no LR schedule; set "
                              f"train.schedule = \"constant\"")
        warmup = 0
    lr_lambda(warmup, warmup, total, schedule)  # validate the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total, schedule, min_ratio))


@contextlib.contextmanager
def published_weights(params: list[torch.nn.Parameter], optimizer=None, ema=None) -> Iterator[None]:
    """Inside: the model holds the weights a run publishes (the EMA's, else a schedule-free optimiser's average,
    else the trained ones); afterwards the training weights come back bitwise and the optimiser is in train mode."""
    if ema is not None:
        with ema.applied():
            yield
        return
    if optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    backup = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()  # the mode flag; the weights themselves are restored exactly below
        with torch.no_grad():
            for b, p in zip(backup, params):
                p.copy_(b)
