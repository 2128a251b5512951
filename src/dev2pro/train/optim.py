"""Optimisers and learning-rate schedules, chosen by name.

AdamW is torch's. 8-bit AdamW (bitsandbytes) and Prodigy (prodigyopt) are optional: asking for one that is not
installed is a clear error with the install command, never a silent fallback to something else.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import ConfigError

from ..choices import OPTIMIZERS, SCHEDULES  # noqa: E402,F401 -- re-exported


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """An optimiser over ``params`` by name (adamw | adamw8bit | prodigy | adafactor)."""
    params = [p for p in params if p.requires_grad]
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


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_lambda(warmup, warmup, total, schedule)  # validate the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total, schedule, min_ratio))
