"""The demo's arms after training: each arm's model sampled at every guidance, and the jobs spread over workers.

An arm's samples are one ``samples-<length>.npz`` per LoRA length in its run folder ("short", "long"; "none" for
dev without a LoRA), holding decoded RGB images (N, 8, 8, 3), class-major (``per_class`` per digit), under one key
per guidance (``sample_key``). Every arm of a seed uses the same prompts and noise seeds, so arms compare image by
image.

An image depends on its seed and the arm's settings only: each has its own seeded generator, the batches
(``render_latents``' 64, class-major) are fixed by ``per_class``, and rendering runs on one torch thread
(``threads.one_thread``): MKL may split a product differently per thread count (at the demo's sizes 1, 2 and 4
threads gave the same images on a 2-core AVX-512 machine; the pin makes that hold on any machine).
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ..flux.checkpoint import load_transformer
from ..lora.formats import load_lora
from ..lora.ops import apply_lora
from ..outputs import atomic_path
from ..sampling import build_pipeline, render_latents, resolve_guidance
from .dataset import load_prompts
from .threads import one_thread
from .world import decode


def sample_key(guidance: float) -> str:
    """The key of the samples drawn at ``guidance`` in a samples file (``"g3.5"``): writer and report share it."""
    return f"g{guidance}"


def load_samples(path: str | Path) -> dict[str, np.ndarray]:
    """A samples file as {sample_key(guidance): RGB images (N, 8, 8, 3)}."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def sample_arm(run: Path, target: str | Path, loras: Mapping[str, str | Path | None], prompts_file: str | Path,
               model_dir: str | Path, *, seed: int, per_class: int, steps: int, guidances: Sequence[float],
               size: int) -> dict[str, str]:
    """Sample ``target`` with each LoRA of ``loras`` (length -> file, or None for the bare model) at each guidance.

    ``per_class`` images per digit prompt of ``prompts_file``, noise seeds ``seed * 100_000 + i`` shared by every
    class; a model without guidance embedding is sampled with true CFG against the empty prompt. Finished files
    are reused. Returns {length: samples file}."""
    prompts = load_prompts(prompts_file)
    classes = prompts["prompt_embeds"].shape[0]
    embeds = [(prompts["prompt_embeds"][k:k + 1], prompts["pooled"][k:k + 1])
              for k in range(classes) for _ in range(per_class)]
    seeds = [seed * 100_000 + i for _ in range(classes) for i in range(per_class)]  # same noise for every class
    negative = (prompts["empty_embeds"][None], prompts["empty_pooled"][None])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    files = {}
    for length, lora in loras.items():
        out = Path(run) / f"samples-{length}.npz"
        if not out.is_file():
            model, _ = load_transformer(target, dtype=torch.float32)
            if lora is not None:
                apply_lora(model, load_lora(lora), 1.0, adapter_name="arm")
            pipe = build_pipeline({"scheduler": scheduler}, model)
            arrays = {}
            for g in guidances:  # embedded guidance on dev, the CFG scale on pro (the oracle)
                guidance = resolve_guidance(model.config.guidance_embeds, "auto", g)
                with one_thread():
                    lat = render_latents(pipe, embeds, seeds, guidance, negative=negative, steps=steps,
                                         width=size, height=size)
                arrays[sample_key(g)] = decode(lat)
            with atomic_path(out, overwrite=True, folder=False) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        files[length] = str(out)
    return files


def run_jobs(worker: Callable[[dict], dict], jobs: Sequence[dict], workers: int, progress: bool,
             initializer: Callable[[], None] | None = None) -> list[dict]:
    """``worker(job)`` for every job, in ``workers`` processes (1: in this one); results sorted by (seed, arm).

    ``worker`` must be a module-level function: the processes are spawned, so they start clean (no forked torch
    thread pools) and import it by name. ``initializer`` runs in each process first, before that import (e.g. to
    quiet third-party warnings the worker's module imports would print)."""
    bar = tqdm(total=len(jobs), desc="LoRA arms", unit="job", disable=not progress, dynamic_ncols=True)
    results = []
    if workers <= 1:
        for j in jobs:
            results.append(worker(j))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer) as pool:
            for fut in as_completed([pool.submit(worker, j) for j in jobs]):
                results.append(fut.result())
                bar.update()
    bar.close()
    return sorted(results, key=lambda r: (r["seed"], r["arm"]))
