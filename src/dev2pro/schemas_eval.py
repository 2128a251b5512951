"""The `dev2pro train` config sections about what a run measures on itself and where it reports it:
``[validation]`` (a loss on held-out images at fixed noise levels and noise seeds, comparable across steps and runs)
and ``[logging]`` (optional Weights & Biases beside TensorBoard). Kept apart from ``schemas`` so that module stays
about the training itself; ``schemas.TrainConfig`` holds both sections."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import opt, require, require_range


@dataclass
class ValidationSection:
    folder: str = opt("", "held-out images with same-stem .txt captions, never trained on (or use fraction)",
                      path=True)
    fraction: float = opt(0.0, "hold out this fraction of the training images instead (picked by file-name hash, "
                               "the same ones every run; they leave training); 0 = off")
    every: int = opt(100, "validation loss every N steps (also before training and at the end); 0 = only those")
    sigmas: list[float] = opt([0.1, 0.3, 0.5, 0.7, 0.9], "fixed noise levels the loss is measured at (each in (0, 1])")
    seeds: list[int] = opt([0], "noise seeds: one fixed noise per image and seed, the same at every step and run")

    @property
    def enabled(self) -> bool:
        return bool(self.folder) or self.fraction > 0

    def validate(self):
        require(not (self.folder and self.fraction > 0), "folder: set validation.folder or validation.fraction, "
                                                          "not both")
        require(0.0 <= self.fraction < 1.0, f"fraction must be in [0, 1), got {self.fraction}")
        require_range("every", self.every, 0)
        require(bool(self.sigmas) and all(isinstance(s, (int, float)) and not isinstance(s, bool) and
                                          math.isfinite(s) and 0 < s <= 1 for s in self.sigmas),
                f"sigmas must be a non-empty list of noise levels in (0, 1], got {self.sigmas}")
        require(len(set(self.sigmas)) == len(self.sigmas), f"sigmas: each noise level once, got {self.sigmas}")
        require(bool(self.seeds) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31
                                         for x in self.seeds), f"seeds must be integers >= 0, got {self.seeds}")


@dataclass
class LoggingSection:
    wandb: bool = opt(False, "also log to Weights & Biases (pip install 'dev2pro[wandb]'); TensorBoard always logs")
    project: str = opt("dev2pro", "W&B project name")
    mode: str = opt("offline", "W&B mode: offline needs no account (upload later with `wandb sync`); online "
                               "needs `wandb login`", ("offline", "online"))

    def validate(self):
        require(not self.wandb or bool(self.project.strip()), "project: set logging.project (a W&B project name)")
