"""What a user watches during training: a progress bar (smoothed loss, lr, it/s, ETA, peak memory, the last
validation loss) and TensorBoard scalars/images, plus optional extra sinks (W&B, ``train.wandb_log``) that get
the same values. All optional and cheap: nothing here synchronises the GPU except the loss value the loop already
fetched."""

from __future__ import annotations

import logging
import math
import sys
import time
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
    """tqdm bar (or, without one, a progress line every ``log_every`` steps) + TensorBoard writer.

    ``update(step, loss, lr)`` once per optimiser step. The bar's postfix shows this step's loss and the smoothed
    value every step (the final line of a run prints the same numbers); memory is queried every ``log_every``.
    Non-finite losses (steps skipped by ``train.nan_policy = "skip"``) do not enter the smoothed value.
    """

    def __init__(self, total: int, start: int, desc: str, log_dir: Path | None, enabled: bool = True,
                 smoothing: float = 0.9, smoothed: float | None = None, log_every: int = 10, lines: bool = False,
                 sinks: list | None = None):
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        unit="step")
        self.total, self.desc, self.enabled, self.lines = total, desc, enabled, lines and not enabled
        self.smoothing = smoothing
        self.log_every = max(1, log_every)
        self.smoothed = smoothed
        self.mem = 0.0
        self.t0, self.first = time.perf_counter(), start
        self.writer, self.sinks, self.val = None, list(sinks or []), None  # val: the last validation loss
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: a broken tensorboard must not stop training
                self.writer = SummaryWriter(str(log_dir))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                log.warning("tensorboard is not importable; logging to the progress bar only")

    def update(self, step: int, loss: float, lr: float, extra: dict | None = None):
        s = self.smoothing
        if math.isfinite(loss):
            self.smoothed = loss if self.smoothed is None else s * self.smoothed + (1 - s) * loss
        periodic = step % self.log_every == 0 or step == self.total
        if periodic or step == self.first + 1:
            self.mem = peak_memory_gb()
        avg = f"{self.smoothed:.4f}" if self.smoothed is not None else "-"
        val = {} if self.val is None else {"val": f"{self.val:.4f}"}
        if self.enabled:  # cheap (no refresh): tqdm redraws at its own pace
            self.bar.set_postfix({"loss": f"{loss:.4f}", "avg": avg, **val, "lr": f"{lr:.2e}",
                                  "mem": f"{self.mem:.1f}G"}, refresh=False)
        self.bar.update(1)
        if self.lines and periodic:
            rate = (step - self.first) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else 0.0
            print(f"{self.desc} step {step}/{self.total} ({100 * step // self.total}%)  loss {loss:.4f}  avg {avg}"
                  + (f"  val {self.val:.4f}" if self.val is not None else "")
                  + f"  lr {lr:.2e}  {rate:.2f} step/s  ETA {_hms(eta)}  mem {self.mem:.1f}G", flush=True)
        if self.writer and periodic:  # the last step too: Monitor shows where a run ended, not its last 10th
            self.writer.add_scalar("loss/step", loss, step)
            self.writer.add_scalar("loss/smoothed", self.smoothed, step)
            self.writer.add_scalar("lr", lr, step)
            for k, v in (extra or {}).items():
                self.writer.add_scalar(k, v, step)
        if self.sinks and periodic:
            values = {"loss/step": loss, "lr": lr, **(extra or {})}
            if self.smoothed is not None:
                values["loss/smoothed"] = self.smoothed
            for sink in self.sinks:
                sink.log(values, step)

    def validation(self, step: int, result: dict, line: str | None = None):
        """A validation result (``train.validation``): ``val/loss`` and ``val/sigma_<s>`` scalars, the bar's
        ``val``, and ``line`` on the console (when anything is shown there)."""
        self.val = result["overall"]
        values = {"val/loss": result["overall"], **{f"val/sigma_{k}": v for k, v in result["per_sigma"].items()}}
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()  # a validation point is rare and worth showing on the Monitor page at once
        for sink in self.sinks:
            sink.log(values, step)
        if line:
            self.note(line)

    def start_clock(self):
        """Rates and ETAs count from here (not from set-up work such as a step-0 sample grid)."""
        self.t0 = time.perf_counter()
        if self.enabled:  # the bar's own rate and ETA too
            self.bar.start_t = self.bar.last_print_t = self.bar._time()

    def end_bar(self):
        """Close the bar at the end of the loop (its clock would run on through the final save and samples);
        TensorBoard stays open for the final grid."""
        self.bar.close()

    def image(self, tag: str, image, step: int):
        if self.writer:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        for sink in self.sinks:
            sink.image(tag, image, step)

    def note(self, message: str):
        """``message`` on the console when it shows anything (the bar, or ``lines`` without one)."""
        if self.enabled or self.lines:
            self.write(message)

    def write(self, message: str):
        """A console line that does not break the bar (stdout)."""
        self.bar.write(message, file=sys.stdout)
        sys.stdout.flush()

    def close(self):
        self.bar.close()
        if self.writer:
            self.writer.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render_each(render, pipe, embeds, seeds, desc: str, bar: bool, references=None, **kwargs) -> list:
    """``render`` (``sampling.render``) one image at a time so a bar can show how far a grid is.

    The same images as one call: every (prompt, seed) pair has its own seeded generator. Prompt-major order.
    ``references``: one reference image per prompt (FLUX.2 edit LoRAs), or None.
    """
    total = len(embeds) * len(seeds)
    images = []
    with tqdm(total=total, desc=desc, disable=not bar, leave=False, unit="image") as pbar:
        for i, e in enumerate(embeds):
            ref = {} if references is None else {"references": [references[i]]}
            for s in seeds:
                images += render(pipe, [e], [s], **ref, **kwargs)
                pbar.update(1)
    return images
