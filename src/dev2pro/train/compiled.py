"""Regional compilation (``train.compile = "blocks"``) and what it cost.

diffusers' ``compile_repeated_blocks`` compiles each repeated block class once (FLUX.1: the double and the single
block), instead of the whole model: a 57-block network costs two block classes' compile time. Recompiles measured
on CPU (torch 2.13, ``TORCH_LOGS=recompiles``): the first block of each class sees an input that differs from the
rest (double: its input does not require grad; single: the concatenated text + image stride), and the first new
token count (bucket) turns the static graph dynamic -- at most 4 frames per class, 8 for FLUX.1, and none per
step or per further bucket. ``CompileStats`` reads torch._dynamo's counters, so the numbers a run reports
(frames, graphs, seconds) are the compiler's own.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class CompileStats:
    """What torch.compile did so far in this process: frames compiled (each recompile is one more), graphs
    produced, and seconds spent compiling (dynamo + AOTAutograd + inductor, forward and backward)."""

    frames: int = 0
    graphs: int = 0
    seconds: float = 0.0

    @classmethod
    def now(cls) -> "CompileStats":
        from torch._dynamo.utils import compilation_time_metrics, counters

        seconds = sum(sum(v) for k, v in compilation_time_metrics.items()
                      if k == "_compile.compile_inner" or "bw_compiler" in k)
        return cls(int(counters["frames"]["ok"]), int(counters["stats"]["unique_graphs"]), seconds)

    def since(self, start: "CompileStats") -> "CompileStats":
        return CompileStats(self.frames - start.frames, self.graphs - start.graphs, self.seconds - start.seconds)

    def line(self) -> str:
        return (f"compile: {self.graphs} graph(s) from {self.frames} compiled frame(s) in {self.seconds:.1f} s "
                f"(regional, per block class; more frames than classes = recompiles)")

    def as_dict(self) -> dict:
        return asdict(self)


def compile_blocks(model: torch.nn.Module) -> CompileStats:
    """Compile each repeated transformer block class of ``model`` once (lazily, at its first call); returns the
    counters' start so ``CompileStats.now().since(start)`` is this model's compile cost."""
    start = CompileStats.now()
    model.compile_repeated_blocks(dynamic=True)
    return start
