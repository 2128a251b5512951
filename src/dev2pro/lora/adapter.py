"""Dev2Pro as a training adapter: a frozen LoRA (dev -> dev2pro) on the training base, switched off for samples.

The recipe trains a LoRA on dev2pro and uses it on dev. Holding both 12 GB bases is what a 24 GB card cannot do.
If dev2pro ~= dev + a low-rank delta (``lora extract --from dev --to dev2pro``, or ``dedistill`` with
``train.adapter_rank``), one base is enough: with the *adapter* on, the model is (nearly) dev2pro and the trained
LoRA learns on it; with the adapter off, it is dev, so samples are exactly "the LoRA on dev" at no extra memory.
ai-toolkit's ``assistant_lora_path`` does the same for schnell.

The adapter is a *side branch* (a second peft adapter, frozen), never merged into the base weights: merged into
fp8 storage, a delta far below the weights' fp8 step (2^-4 relative for e4m3) rounds away. peft runs several
active adapters per layer and sums their outputs; ``peft``'s ``set_adapter`` makes every active adapter
trainable, so the adapter's weights are frozen again after every switch. Saving goes through the ``default``
adapter only (``lora_from_peft_model(model, "default")``, ``get_peft_model_state_dict``), so LoRA files and
training states never contain it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping

import torch
from peft.tuners.lora import LoraLayer

from ..families import build_transformer, of_model
from .formats import LoraModule, load_lora
from .ops import apply_lora

ADAPTER = "training_adapter"  # peft adapter name: unique, no '.'


def _lora_layers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def freeze(model: torch.nn.Module, name: str = ADAPTER) -> None:
    for layer in _lora_layers(model):
        if name in layer.lora_A:
            layer.lora_A[name].requires_grad_(False)
            layer.lora_B[name].requires_grad_(False)


def attach(model: torch.nn.Module, lw: Mapping[str, LoraModule], scale: float = 1.0, name: str = ADAPTER,
           dtype: torch.dtype = torch.float32) -> str:
    """Add ``lw`` as a frozen side-branch adapter (weights in ``dtype``), active beside the adapters already on."""
    apply_lora(model, lw, scale, adapter_name=name)
    for layer in _lora_layers(model):
        if name in layer.lora_A:
            layer.lora_A[name].to(dtype)
            layer.lora_B[name].to(dtype)
    freeze(model, name)
    return name


def attach_file(model: torch.nn.Module, path: str | Path, scale: float = 1.0, dtype: torch.dtype = torch.float32,
                name: str = ADAPTER) -> str:
    """``attach`` for a LoRA file in any layout ``formats.load_lora`` reads (kohya, comfy, diffusers, xlabs; FLUX.2's
    three); a LoRA of another family than the model's is a one-line UserError naming both."""
    return attach(model, load_lora(path, family=of_model(model)), scale, name, dtype)


def set_enabled(model: torch.nn.Module, enabled: bool, name: str = ADAPTER) -> None:
    """Switch the adapter on/off on every layer that has it; the other adapters keep their state."""
    for layer in _lora_layers(model):
        if name not in layer.lora_A:
            continue
        others = [a for a in layer.active_adapters if a != name]
        wanted = others + ([name] if enabled else [])  # the order attach() gives: same sums, same bits
        if list(layer.active_adapters) != wanted:
            layer.set_adapter(wanted)  # makes all of ``wanted`` trainable: the adapter is frozen again below
    freeze(model, name)


def is_enabled(model: torch.nn.Module, name: str = ADAPTER) -> bool:
    layers = [m for m in _lora_layers(model) if name in m.lora_A]
    return bool(layers) and all(name in m.active_adapters for m in layers)


@contextlib.contextmanager
def disabled(model: torch.nn.Module, name: str = ADAPTER) -> Iterator[None]:
    """The model without the adapter for the block (e.g. samples on dev), restored afterwards."""
    was = is_enabled(model, name)
    set_enabled(model, False, name)
    try:
        yield
    finally:
        set_enabled(model, was, name)


def held_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers the modules hold (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            key = (t.untyped_storage().data_ptr(), t.dtype, t.shape) if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def lora_bytes(shapes: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a rank-``rank`` LoRA on linears of (out, in) ``shapes``: rank x (in + out) per module."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(rank * (o + i) * size for o, i in shapes.values())


def linear_shapes(spec) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of a Flux transformer of ``spec`` (built on the meta device: no memory)."""
    model = build_transformer(spec, device="meta")
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def training_bytes(spec, lora_targets: list[str], lora_rank: int, adapter_rank: int = 0, inference_base: bool = False,
                   fp8_policy=None, compute: torch.dtype = torch.bfloat16,
                   adapter_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Parameter bytes a LoRA training run holds, by part, from shapes alone (for `dev2pro plan` and the README).

    base: every tensor in ``compute`` (or 1 byte where ``fp8_policy`` quantises it); lora: fp32 on
    ``lora_targets``; adapter: rank ``adapter_rank`` on every Linear (an extracted adapter covers each one that
    changed) in ``adapter_dtype``; inference_base: a second base plus its copy of the LoRA for samples.
    """
    model = build_transformer(spec, device="meta")
    size = torch.empty((), dtype=compute).element_size()
    base = sum(t.numel() * (1 if fp8_policy is not None and fp8_policy.should_quantize(n, tuple(t.shape)) else size)
               for n, t in model.state_dict().items())
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = lora_bytes({n: shapes[n] for n in lora_targets}, lora_rank)
    parts = {"base": base, "lora": lora, "adapter": lora_bytes(shapes, adapter_rank, adapter_dtype),
             "inference_base": base + lora if inference_base else 0}
    parts["total"] = sum(parts.values())
    return parts


class WithoutAdapters:
    """Call a peft-injected model with every adapter off: the frozen base as a teacher, with no second copy.

    Adapter de-distillation's ``cfg_teacher`` needs dev (the base) and dev + LoRA (the student) at once; both are
    the same weights, so the teacher forward switches the LoRA off for the call (peft ``enable_adapters``) and back.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.module = model  # what predict() and families.of_model() unwrap (as DDP's): the family is the model's
        self.config = model.config

    def __call__(self, *args, **kwargs):
        layers = _lora_layers(self.model)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            return self.model(*args, **kwargs)
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # peft re-marks the active adapters trainable, as they were
