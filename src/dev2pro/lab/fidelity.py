"""How well a LoRA adapter stands in for dev2pro: dev + adapter vs dev2pro, by rank, at the model's output.

`lora extract --ranks` measures each linear layer on its own (retained energy, layer output error on random
inputs). What the demo's arms feel is the whole network: errors add up through the blocks, and a LoRA carries no
bias or norm changes. So for each rank the adapter is applied to dev and the velocity prediction is compared
with dev2pro's on fixed inputs (the concept prompts, seeded noise latents at several noise levels):

  output error   ||f(dev + adapter) - f(dev2pro)|| / ||f(dev2pro)||
  unexplained    ||f(dev + adapter) - f(dev2pro)|| / ||f(dev) - f(dev2pro)||: the share of the de-distillation's
                 effect on the output the adapter misses (0 = all of it captured, 1 = as if no adapter)
  moved          ||f(dev + adapter) - f(dev)|| / ||f(dev) - f(dev2pro)||: how far the adapter moves dev, in units of
                 this dev2pro's move. An adapter de-distilled on its own (`dedistill` with train.adapter_rank) is a
                 separate run: it can move dev as far in another direction, so only "moved" says much for it.

The forward passes run on one torch thread (``threads.one_thread``): the numbers do not move with the core count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..flux.checkpoint import load_transformer
from ..lora.formats import load_lora
from ..lora.ops import apply_lora, extract_pair
from ..objectives import ModelInputs, predict
from .threads import one_thread


@torch.no_grad()
def _velocity(model, embeds: torch.Tensor, pooled: torch.Tensor, seed: int, sigmas=(0.25, 0.5, 0.75, 1.0),
              side: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c = embeds.shape[0], model.config.in_channels
    outs = []
    for s in sigmas:
        x = torch.randn(n, (side // 2) ** 2, c, generator=g)
        inputs = ModelInputs(x, torch.full((n,), s), embeds, pooled, side, side)
        with one_thread():
            outs.append(predict(model, inputs, 1.0, "cpu", torch.float32))
    return torch.cat(outs)


def adapter_output_errors(dev: str | Path, dev2pro: str | Path, adapters: Mapping[str, object],
                          embeds: torch.Tensor, pooled: torch.Tensor, seed: int = 0) -> dict[str, dict]:
    """For each named adapter (a LoraWeights or a file): output error and unexplained share vs dev2pro."""
    target = _velocity(load_transformer(dev2pro, dtype=torch.float32)[0].eval(), embeds, pooled, seed)
    plain = _velocity(load_transformer(dev, dtype=torch.float32)[0].eval(), embeds, pooled, seed)
    gap = float((plain - target).norm())
    out = {}
    for name, lw in adapters.items():
        model, _ = load_transformer(dev, dtype=torch.float32)
        apply_lora(model, load_lora(lw) if isinstance(lw, (str, Path)) else lw, adapter_name="adapter")
        got = _velocity(model.eval(), embeds, pooled, seed)
        err = float((got - target).norm())
        out[name] = {"output_error": round(err / float(target.norm()), 6),
                     "unexplained": round(err / gap, 6) if gap > 0 else 0.0,
                     "moved": round(float((got - plain).norm()) / gap, 6) if gap > 0 else 0.0}
    out["dev (no adapter)"] = {"output_error": round(gap / float(target.norm()), 6), "unexplained": 1.0, "moved": 0.0}
    return out


def by_rank(d: Mapping) -> dict[str, float]:
    """Rank-keyed numbers in rank order (JSON files hold them with string keys, sorted as strings)."""
    return {str(k): v for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def adapter_fidelity(dev: str | Path, dev2pro: str | Path, extract_report: Mapping, ranks: Sequence[int],
                     others: Mapping[str, object], embeds: torch.Tensor, pooled: torch.Tensor) -> dict:
    """The demo report's adapter section: `lora extract --ranks`'s ``extract_report`` (layer level) beside the
    model-level errors of dev + the adapter extracted at each of ``ranks`` and of each named adapter in ``others``
    (a LoraWeights or a file), on the prompts ``embeds``/``pooled``."""
    a_sd, b_sd = (load_transformer(f, dtype=torch.float32)[0].state_dict() for f in (dev, dev2pro))
    candidates = {f"extracted r{k}": extract_pair(a_sd, b_sd, k)[0] for k in ranks}
    candidates.update(others)
    total = extract_report["total"]
    return {"recommended_rank": int(extract_report["recommended_rank"]),
            "energy_target": extract_report["energy_target"],
            "energy_target_met": bool(extract_report.get("energy_target_met", True)),
            "energy_by_rank": by_rank(total["energy_by_rank"]),
            "layer_error_by_rank": by_rank(total["output_error_by_rank"]),
            "model": adapter_output_errors(dev, dev2pro, candidates, embeds, pooled),
            "not_linear": len(extract_report["not_linear"])}
