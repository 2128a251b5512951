"""Validation loss: the flow-matching loss on held-out images at fixed noise levels and fixed noise.

A training loss jumps with every draw of sigma and noise, so it says little about over-fitting. Here each held-out
image is noised with one fixed noise per seed (a generator of its own per seed, images in a fixed order) at each of
a fixed list of sigmas, and the model's velocity error is averaged: per sigma, and over sigmas (each sigma weighs the
same). The same images, noise and sigmas at every evaluation make the number comparable across steps and runs.

The held-out images come from ``validation.folder`` or are a ``validation.fraction`` of the training images, picked
by a hash of the file name (the same images every run, whatever the folder order; they leave training). They are
cached in the same pass as the training data (``data.prepare.load_training_data(holdout=...)``), so no encoder is
loaded again.

Evaluating must not change training: the model runs in eval mode (LoRA dropout off) under ``no_grad``, and the
global torch RNG state (which LoRA dropout draws from) is saved and restored around it (``torch.random.fork_rng``);
the noise comes from generators of its own. A run with validation on trains bitwise the same weights as one
without it. The history (step -> numbers) is part of the resumable state, so a resumed run reports what an
uninterrupted one reports.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.cache import LATENT_NAME, cached_controls, load_cached
from ..data.folders import IMAGE_EXTENSIONS, DatasetFolder, Item
from ..errors import UserError
from ..flow import flow_target, noisy_input
from ..flux.latents import pack, pack_references
from ..objectives import ModelInputs, predict


# ------------------------------------------------------------------------------------------------ which images
def check_holdout(folder: str, training: Sequence[tuple[str, bool]] = ()) -> None:
    """Refuse a ``validation.folder`` that does not exist, has no images, or whose images training reads too:
    one of the ``training`` folders (path, recursive), inside a recursive one, or holding one (its subfolders
    are read) -- a loss on trained images would say nothing about held-out ones (before anything is written)."""
    if not folder:
        return
    p = Path(folder)
    if not p.is_dir():
        raise UserError(f"validation.folder: {p} is not a folder; give a folder of held-out images with .txt "
                        f"captions, or use validation.fraction instead")
    held = p.resolve()
    for path, recursive in training:
        t = Path(path).resolve()
        if held == t or t.is_relative_to(held) or (recursive and held.is_relative_to(t)):
            how = "is" if held == t else "holds" if t.is_relative_to(held) else "is inside"
            raise UserError(f"validation.folder: {p} {how} the training folder {path}, so its images would be "
                            f"trained on; give a folder of images kept out of [[data.folders]], or use "
                            f"validation.fraction to hold some of the training images out")
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not f.name.startswith(".")
               for f in p.rglob("*")):  # subfolders too: a kohya parent of N_name folders is read as one
        raise UserError(f"validation.folder: {p} has no images ({', '.join(IMAGE_EXTENSIONS)}); put held-out "
                        f"images (with .txt captions) there, or use validation.fraction instead")


def name_hash(path: Path) -> str:
    """The order held-out images are picked in: a hash of the file name, not of where the folder is."""
    return hashlib.sha256(Path(path).name.encode()).hexdigest()


@dataclass(frozen=True)
class Holdout:
    """Which images are held out for validation: those of ``folder``, or ``fraction`` of the training images."""

    folder: str = ""
    fraction: float = 0.0

    @classmethod
    def of(cls, folder: str, fraction: float) -> "Holdout | None":
        """The holdout of ``validation.folder`` / ``validation.fraction``; None when both are off."""
        return cls(folder, fraction) if folder or fraction > 0 else None

    def split(self, items: list[Item], scan: Callable[[list[DatasetFolder]], list[Item]]
              ) -> tuple[list[Item], list[Item]]:
        """(training items, held-out items); ``scan`` reads folders with the dataset's rules (captions, trigger).

        ``fraction``: the ``max(1, round(fraction * n))`` training images (regularization images never) with the
        lowest file-name hash (ties by path)."""
        if self.folder:
            try:
                return items, scan([DatasetFolder(Path(self.folder))])
            except UserError as e:
                raise UserError(f"validation.folder: {e}") from None
        own = [i for i, it in enumerate(items) if getattr(it, "role", "train") != "reg"]
        order = sorted(own, key=lambda i: (name_hash(items[i].path), str(items[i].path)))
        k = max(1, round(self.fraction * len(own)))
        if k >= len(own):
            raise UserError(f"validation.fraction = {self.fraction:g} would hold out all {len(own)} training "
                            f"image(s); lower it, or give held-out images in validation.folder")
        held = set(order[:k])
        return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# ------------------------------------------------------------------------------------------------ the loss
def _key(sigma: float) -> str:
    return f"{float(sigma):g}"


@torch.no_grad()
def validation_loss(model, dataset, sigmas: Sequence[float], seeds: Sequence[int], guidance: float, device,
                    dtype: torch.dtype, rows: int = 1, autocast: Callable = None) -> dict:
    """``{"overall": mean over sigmas, "per_sigma": {"0.3": mean over images and seeds, ...}}``.

    ``dataset``: a ``CachedDataset`` (its entries once each, repeats ignored); ``rows``: sigmas per forward.
    The caller restores the model's mode and the RNG (``Validator.evaluate`` does)."""
    sums = {_key(s): 0.0 for s in sigmas}
    n = 0
    gens = {seed: torch.Generator().manual_seed(int(seed)) for seed in seeds}
    for entry in dataset.entries:
        cached = load_cached(entry.latents)
        item = {"latents": cached[LATENT_NAME], **load_cached(entry.text)}
        x0 = item["latents"].float()  # (C, h, w)
        controls = cached_controls(cached)  # edit pairs: the references' tokens, as trained
        ref = None if controls is None else pack_references(controls.float()[None])
        for seed in seeds:
            noise = torch.randn(x0.shape, generator=gens[seed])  # the same noise for every sigma of this image
            for lo in range(0, len(sigmas), rows):
                chunk = torch.tensor([float(s) for s in sigmas[lo:lo + rows]], dtype=torch.float32)
                b = chunk.shape[0]
                x_t = pack(noisy_input(x0.expand(b, *x0.shape), noise.expand(b, *noise.shape), chunk))
                text = {k: item[k].unsqueeze(0).expand(b, *item[k].shape) for k in ("prompt_embeds", "pooled")
                        if k in item}
                inputs = ModelInputs(x_t, chunk, text["prompt_embeds"], text.get("pooled"), *x0.shape[1:],
                                     None if ref is None else ref.expand(b, *ref.shape[1:]),
                                     None if controls is None else tuple(controls.shape[-2:]))
                with autocast() if autocast else contextlib.nullcontext():
                    pred = predict(model, inputs, guidance, device, dtype)
                target = pack(flow_target(x0, noise).unsqueeze(0)).to(pred.device).expand_as(pred)
                per_row = (pred - target.float()).pow(2).reshape(b, -1).mean(dim=1).cpu()
                for s, v in zip(sigmas[lo:lo + rows], per_row.tolist()):
                    sums[_key(s)] += v
            n += 1
    per_sigma = {k: v / max(n, 1) for k, v in sums.items()}
    return {"overall": sum(per_sigma.values()) / len(per_sigma), "per_sigma": per_sigma}


# ------------------------------------------------------------------------------------------------ during a run
@dataclass
class Validator:
    """Evaluates on a schedule and keeps the history (step -> numbers) for the summary, the state and advice."""

    dataset: object
    sigmas: list
    seeds: list
    every: int
    guidance: float
    device: object
    dtype: torch.dtype
    rows: int = 1
    autocast: Callable | None = None
    history: dict = field(default_factory=dict)  # step -> {"overall", "per_sigma"}

    def due(self, done: int, total: int) -> bool:
        """Before training (step 0), every ``every`` steps and at the last step."""
        return done == 0 or done == total or bool(self.every) and done % self.every == 0

    def evaluate(self, model, step: int) -> dict:
        """The numbers at ``step``, with the model's modes and the global RNG exactly as they were before."""
        modes = [(m, m.training) for m in model.modules()]
        cuda = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            model.eval()
            try:
                result = validation_loss(model, self.dataset, self.sigmas, self.seeds, self.guidance, self.device,
                                         self.dtype, self.rows, self.autocast)
            finally:
                for m, training in modes:
                    m.training = training
        self.history[int(step)] = result
        return result

    def restore(self, history: dict | None, step: int) -> None:
        """A resumed run's history: what was measured up to the state's ``step`` (later steps are measured again)."""
        self.history = {int(k): v for k, v in (history or {}).items() if int(k) <= step}

    def best(self) -> tuple[int, float] | None:
        """(step, overall) of the lowest validation loss so far (the earliest on a tie)."""
        if not self.history:
            return None
        step = min(self.history, key=lambda s: (self.history[s]["overall"], s))
        return step, self.history[step]["overall"]

    def summary(self) -> dict:
        """``summary.json``'s ``validation``: step (as text, JSON keys) -> numbers."""
        return {str(s): self.history[s] for s in sorted(self.history)}


def describe(result: dict) -> str:
    """One console line's worth: ``0.4123 (sigma 0.1 0.2101, 0.3 0.3312, ...)``."""
    parts = ", ".join(f"{k} {v:.4f}" for k, v in result["per_sigma"].items())
    return f"{result['overall']:.4f} (per sigma: {parts})"


def advice(best: tuple[int, float] | None, total: int, lora_file: Callable[[int], Path | None],
           every: int) -> list[str]:
    """Early-stopping advice: the step with the best validation loss and its LoRA file, or the ``save.every``
    that would have kept one (``lora_file(step)``: the file saved at that step, None if none)."""
    if best is None:
        return []
    step, value = best
    head = f"best validation loss {value:.4f} at step {step} of {total}"
    if step == 0:
        return [f"{head}: training did not improve on the base; lower train.lr or train fewer steps"]
    if step == total:
        f = lora_file(step)
        return [f"{head} (the last): {f}" if f else f"{head} (the last)"]
    f = lora_file(step)
    if f is not None:
        return [f"{head}: use {f} (the later steps over-fit the held-out images)"]
    return [f"{head}: no LoRA was saved at that step; save.every = {every or step} would have kept it "
            f"(then train again, or stop at train.steps = {step})"]
