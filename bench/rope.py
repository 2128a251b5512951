"""How many kernel launches `train.fused_rope` saves per FLUX training step (issue 20: the eager step is host-bound).

Counts the non-view aten ops one forward + backward dispatches -- what a GPU launches as kernels (views launch
nothing) -- on FLUX.1 and FLUX.2 [dev] transformers with the real block counts (19 + 38, 8 + 48) at a small width
(the count does not depend on width or token count), with and without gradient checkpointing, diffusers' rotation
vs ours. Counts, not CPU timings: the claim is about launches on a GPU, which `bench/gpu_train.py` times.

    python bench/rope.py
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev2pro import families  # noqa: E402
from dev2pro.noise import quiet_third_party  # noqa: E402
from dev2pro.families.flux2.spec import TINY_DEV  # noqa: E402
from dev2pro.flux.spec import TINY  # noqa: E402
from dev2pro.train.rope import use_fused_rope  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in (torch.ops.aten.detach.default,):
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _model(name, width):
    if name == "flux1":
        spec = TINY.with_(hidden=width, num_heads=width // 16, num_double=19, num_single=38, axes_dim=(4, 6, 6))
        channels, text = 64, TINY.context_dim
    else:
        spec = TINY_DEV.with_(hidden=width, num_heads=width // 16, num_double=8, num_single=48, axes_dim=(4, 4, 4, 4))
        channels, text = 128, TINY_DEV.context_dim
    fam = families.get(name)
    model = families.build_transformer(spec, seed=0).to(torch.bfloat16).requires_grad_(False)
    for m in model.modules():  # a trainable weight in every block, as a LoRA gives: backward goes through all
        if isinstance(m, torch.nn.Linear) and m.out_features == m.in_features:
            m.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    h = w = 16
    record = {"prompt_embeds": torch.randn(1, 16, text, generator=g), "pooled": torch.randn(1, 32, generator=g)}
    inputs = fam.model_inputs(torch.randn(1, h * w // 4, channels, generator=g), torch.tensor([0.5]), record, h, w,
                              torch.tensor([1.0]), "cpu", torch.bfloat16)
    return model, inputs


def _step(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()


def count(name, checkpointing, fused) -> int:
    model, inputs = _model(name, 64)
    if checkpointing:
        model.enable_gradient_checkpointing()
    was = use_fused_rope(fused)
    try:
        with CountOps() as c:
            _step(model, inputs)
    finally:
        use_fused_rope(was)
    return sum(c.ops.values())


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    quiet_third_party()
    print("| model | checkpointing | aten ops/step, diffusers | fused RoPE | saved | ratio |")
    print("|---|---|---|---|---|---|")
    for name in ("flux1", "flux2"):
        for ckpt in (False, True):
            a, b = count(name, ckpt, False), count(name, ckpt, True)
            print(f"| {name} | {ckpt} | {a} | {b} | {a - b} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
