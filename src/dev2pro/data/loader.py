"""Training batches from the caches: a dataset of cached files, a resumable bucket sampler, caption dropout.

Images of different buckets have different latent shapes, so a batch must come from one bucket. The sampler
groups the (repeat-expanded) indices by bucket, shuffles inside each bucket, cuts batches, then shuffles the
batch order, all from an RNG seeded with ``(seed, epoch)``: epoch ``e`` is the same list of batches in every run.
Resuming is therefore just "(epoch, position)": a resumed run replays exactly the batches an uninterrupted run
would have seen. With DataLoader workers the sampler runs ahead of training (prefetch), so save
``state_dict(batches_done=...)`` with the count the loop actually consumed.

Caption dropout (training on the empty caption some of the time) is drawn with the step's other random draws in
``objectives.draw``; ``collate`` only stacks. ``prefetch_batches`` reads the cache files of the next batches in a
thread while the current step runs (the random draws stay in the training thread, so results do not change).
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from dev2pro.data.cache import CONTROL_NAME, LATENT_NAME, MASK_NAME, cached_controls, load_cached
from dev2pro.errors import UserError


@dataclass(frozen=True)
class CacheEntry:
    """One training image at one bucket as cache files: its latents (and loss mask, if it has one), its caption's
    text embeddings, its repeats, its loss weight (``data.reg_weight`` for reg images), the resolution it was
    bucketed at and its role (train / reg)."""

    latents: Path
    text: Path
    caption: str = ""
    repeats: int = 1
    weight: float = 1.0
    resolution: int = 0
    role: str = "train"
    bucket: tuple[int, ...] = ()  # (width, height) in pixels
    image: Path | None = None  # the source image (one image has an entry per resolution)
    masked: bool = False  # its latents file holds a loss mask
    references: int = 0  # reference images (edit pairs) encoded with it


class CachedDataset(torch.utils.data.Dataset):
    """Cached entries with repeats expanded; item ``i`` is a dict of ``latents`` (C, h, w), the text tensors
    (``prompt_embeds`` (seq, D), ``pooled`` (D,), ...) and ``caption``, plus ``mask`` (1, h, w) for an image
    with a loss mask and ``weight`` for an entry whose loss weight is not 1 (absent otherwise: see ``collate``)."""

    def __init__(self, entries: Sequence[CacheEntry | tuple]):
        self.entries = [e if isinstance(e, CacheEntry) else CacheEntry(*e) for e in entries]
        self.index = [i for i, e in enumerate(self.entries) for _ in range(e.repeats)]  # position -> entry

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[self.index[i]]
        cached = load_cached(entry.latents)
        item = {"latents": cached[LATENT_NAME], **load_cached(entry.text), "caption": entry.caption}
        if MASK_NAME in cached:
            item["mask"] = cached[MASK_NAME]
        if CONTROL_NAME in cached:
            item["control"] = cached_controls(cached)  # (n, C, h, w): n reference images
        if entry.weight != 1:
            item["weight"] = float(entry.weight)
        return item

    def fingerprint(self) -> list[str]:
        """Per entry, in order: ``LATENTS:TEXT:REPEATS:WEIGHT``, the content keys of its cached latents (the cache
        names them by a hash of the image, mask, references, bucket and encoder) and caption text (16 hex digits
        each). A state records it; a resume compares (``train.datacheck``). Moving the image folder keeps it."""
        return [f"{e.latents.stem[:16]}:{e.text.stem[:16]}:{e.repeats}:{e.weight:g}" for e in self.entries]

    def buckets(self) -> list[tuple[int, ...]]:
        """Latent (h, w) of every index, read from file headers only (for ``BucketBatchSampler``)."""
        shapes = []
        for e in self.entries:
            with safe_open(e.latents, "pt") as f:
                shapes.append(tuple(f.get_slice(LATENT_NAME).get_shape()[-2:]))
        return [shapes[j] for j in self.index]


class BucketBatchSampler:
    """Batches of indices sharing a bucket, reshuffled each epoch from (seed, epoch), resumable mid-epoch.

    With ``world_size`` > 1 each rank takes every ``world_size``-th batch of the same epoch list (truncated so
    all ranks step together).
    """

    def __init__(
        self,
        bucket_of_each_index: Sequence[Hashable],
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_indices = len(bucket_of_each_index)
        groups: dict[Hashable, list[int]] = {}  # bucket -> indices, buckets in first-seen order
        for i, b in enumerate(bucket_of_each_index):
            groups.setdefault(b, []).append(i)
        self.groups = list(groups.values())
        self.epoch, self.position = 0, 0
        self.origin = (0, 0)  # (batches done, epoch) where this dataset's epochs start (``restart``)
        if len(self) == 0:
            largest = max((len(g) for g in self.groups), default=0)
            raise UserError(
                f"no batches: the largest bucket has {largest} image(s) for batch_size {batch_size} "
                f"over {world_size} process(es) (drop_last={drop_last}); lower batch_size or add images"
            )

    def _batches_per_epoch_all_ranks(self) -> int:
        split = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: math.ceil(n / self.batch_size))
        return sum(split(len(g)) for g in self.groups)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same every epoch)."""
        return self._batches_per_epoch_all_ranks() // self.world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order; a pure function of (seed, epoch, buckets)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            shuffled = [group[j] for j in rng.permutation(len(group))]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches[: len(self) * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the next ``iter`` starts the following epoch."""
        if self.position >= len(self):  # the last pass was left right after its final batch
            self.epoch, self.position = self.epoch + 1, 0
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1  # counted before yielding: a batch handed out is a batch done
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Where the next batch comes from. Pass ``batches_done`` (since epoch 0) when workers prefetch."""
        if batches_done is not None:
            epoch, position = divmod(batches_done - self.origin[0], len(self))
            epoch += self.origin[1]
        else:
            epoch, position = divmod(self.epoch * len(self) + self.position, len(self))
        state = {"epoch": epoch, "position": position, "seed": self.seed, "num_indices": self.num_indices}
        if batches_done is not None:
            state["batches"] = batches_done
        return {**state, "origin": list(self.origin)} if self.origin != (0, 0) else state

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was saved (the saved seed wins: it is the same run)."""
        if state["num_indices"] != self.num_indices:
            raise UserError(
                f"the dataset changed since the checkpoint ({state['num_indices']} items with repeats then, "
                f"{self.num_indices} now), so the run cannot continue with the same batches; restore the "
                "dataset or start a new run"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self.origin = tuple(state.get("origin", (0, 0)))

    def restart(self, state: dict, batches_done: int) -> None:
        """Continue a run saved at ``state`` on a changed dataset: its seed, a fresh epoch (the one after the saved
        epoch, unless that one had not begun) from ``batches_done``, the batches the run had consumed then."""
        self.seed, self.position = state["seed"], 0
        self.epoch = state["epoch"] + (1 if state["position"] else 0)
        self.origin = (batches_done, self.epoch)


def collate(batch: list[dict]) -> dict:
    """Stack dataset items into ``latents`` (B, C, h, w), the text tensors (``prompt_embeds`` (B, seq, D),
    ``pooled`` (B, D), ...) and ``captions``; ``mask`` (B, 1, h, w) only when an item has one (ones for the
    others) and ``weights`` (B,) only when an item's weight is not 1: a batch without either is the unweighted
    loss exactly, not a loss multiplied by ones. ``control`` (B, n, C, h', w'): the n reference images' latents,
    when the items have them (a dataset has as many for every image: ``data.prepare``)."""
    if len({"control" in item for item in batch}) > 1:
        raise UserError("a batch mixes images with and without a reference image: give every [[data.folders]] "
                        "entry a controls folder, or none")
    names = [k for k in batch[0] if k not in ("latents", "caption", "mask", "weight")]
    out = {"latents": torch.stack([item["latents"] for item in batch]),  # (B, C, h, w)
           **{name: torch.stack([item[name] for item in batch]) for name in names},
           "captions": [item["caption"] for item in batch]}
    if any("mask" in item for item in batch):
        ones = torch.ones((1, *out["latents"].shape[-2:]))
        out["mask"] = torch.stack([item.get("mask", ones) for item in batch])  # (B, 1, h, w)
    if any("weight" in item for item in batch):
        out["weights"] = torch.tensor([item.get("weight", 1.0) for item in batch])  # (B,)
    return out


def batches_forever(sampler):
    """The sampler's batches, epoch after epoch (it reshuffles per epoch and resumes mid-epoch)."""
    while True:
        yield from sampler


@dataclass
class LoadedBatch:
    """This rank's dataset items of one batch, read ahead by ``prefetch_batches``."""

    items: list


class prefetch_batches:
    """``LoadedBatch``es of ``batches`` (index lists; this rank keeps its ``1/world`` slice) read ``depth`` ahead by a
    daemon thread, in order. Errors are raised where the batch is taken; ``close`` (or garbage collection) stops
    the thread. The sampler runs ahead too: save its state with ``batches_done``, as with DataLoader workers."""

    def __init__(self, batches: Iterator[list[int]], dataset, rank: int = 0, world: int = 1, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_read_ahead, args=(batches, dataset, rank, world, self.queue, self.stop),
                                       name="dev2pro-prefetch", daemon=True)
        self.thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> LoadedBatch:
        got = self.queue.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it: a process that exits while the thread is inside a read can die in
        C++ (``terminate called without an active exception``, seen after Ctrl-C) instead of exiting cleanly."""
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def __del__(self):
        self.stop.set()


def _read_ahead(batches, dataset, rank, world, out: queue.Queue, stop: threading.Event) -> None:
    # a function, not a method: the thread must not keep the prefetcher alive (its __del__ stops the thread)
    try:
        for indices in batches:
            per = len(indices) // world
            item: object = LoadedBatch([dataset[i] for i in indices[rank * per:(rank + 1) * per]])
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as e:  # noqa: BLE001 -- handed to the training thread, raised there
        out.put(e)
    else:
        out.put(StopIteration())
