"""What a user watches during training: a progress bar (smoothed loss, lr, it/s, ETA, peak memory) and
TensorBoard scalars/images. Both are optional and cheap: nothing here synchronises the GPU except the loss value
the loop already fetched."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def peak_memory_gb() -> float:
    """Peak accelerator memory (CUDA) or current process RSS on CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return psutil.Process().memory_info().rss / 1024**3


class Progress:
    """tqdm bar + TensorBoard writer; ``update(step, loss, lr)`` once per optimiser step."""

    def __init__(self, total: int, start: int, desc: str, log_dir: Path | None, enabled: bool = True,
                 smoothing: float = 0.9, smoothed: float | None = None, log_every: int = 10):
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        unit="step")
        self.smoothing = smoothing
        self.log_every = max(1, log_every)
        self.smoothed = smoothed
        self.writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(log_dir))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                log.warning("tensorboard is not importable; logging to the progress bar only")

    def update(self, step: int, loss: float, lr: float, extra: dict | None = None):
        s = self.smoothing
        self.smoothed = loss if self.smoothed is None else s * self.smoothed + (1 - s) * loss
        if step % self.log_every == 0 or step == 1:  # formatting/TensorBoard every step costs ~ms on small steps
            self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{lr:.2e}", mem=f"{peak_memory_gb():.1f}G",
                                 refresh=False)
        self.bar.update(1)
        if self.writer and step % self.log_every == 0:
            self.writer.add_scalar("loss/step", loss, step)
            self.writer.add_scalar("loss/smoothed", self.smoothed, step)
            self.writer.add_scalar("lr", lr, step)
            for k, v in (extra or {}).items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image, step: int):
        if self.writer:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def write(self, message: str):
        self.bar.write(message)

    def close(self):
        self.bar.close()
        if self.writer:
            self.writer.close()
