"""Exponential moving average of weights: the averaged model is usually the better export of a long fine-tune.

After each optimiser step ``shadow <- decay * shadow + (1 - decay) * param`` (a ``lerp`` towards the live
weights). Early on a fixed decay would average in the random-ish start, so the effective decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the schedule diffusers and timm use). The shadow is kept
in fp32 next to the fp32 master weights; it works on sharded (FSDP2 DTensor) parameters as well, since ``lerp_``
is elementwise. ``state_dict`` is plain tensors + numbers, so it fits the pickle-free training state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class EMA:
    """Shadow copies of ``params`` updated with ``update()``; ``applied()`` swaps them in temporarily."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the EMA weights (for export or samples); restored afterwards."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [_local(s) for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        with torch.no_grad():
            for s, saved in zip(self.shadow, state["shadow"]):
                _local(s).copy_(saved)


def _local(t: torch.Tensor) -> torch.Tensor:
    # a DTensor (FSDP2 shard) is saved as this rank's piece
    return t.to_local() if hasattr(t, "to_local") else t
