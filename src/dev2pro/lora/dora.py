"""DoRA: a LoRA whose merged weight is renormalised to a learned magnitude -- three conventions in the wild.

With V = W + up @ down * alpha / rank (W the base weight):

    axis "in"        LyCORIS / ComfyUI (``dora_scale`` shape (1, in)):  W' = V * dora_scale / ||V||_column
    axis "out"       peft (``lora_magnitude_vector`` shape (out,)):     W' = m / ||V||_row * V
    axis "out_base"  ComfyUI given ``dora_scale`` of shape (out, 1):    W' = V * dora_scale / ||W||_row

ComfyUI's output-axis branch divides by the *base* weight's row norms (``comfy/weight_adapter/base.py``
``weight_decompose``), not by V's as peft does, so a peft DoRA goes into the ComfyUI layout as "out_base" with
``dora_scale = m * ||W||_row / ||V||_row`` -- computed from the training base when the file is saved (``rebase``):
on that base ComfyUI's formula then gives peft's merged weight. No low-rank file can give a column-normalised
reader the same weight (row and column rescalings do not commute). A file says which it holds: the shape in the
ComfyUI layout (never ambiguous for Flux: no layer has 1 input or output) plus ``dev2pro.dora_axis``, the key name
in the diffusers layout. Strength s merges as ComfyUI does: W + s (W' - W). ``norm + eps`` as ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .weights import LoraModule

AXIS_KEY = "dev2pro.dora_axis"
AXES = ("in", "out", "out_base")
_EPS = torch.finfo(torch.float32).eps


@dataclass
class DoraModule(LoraModule):
    """A LoRA pair plus a magnitude vector and the convention it is read with (``AXES``)."""

    magnitude: torch.Tensor = None  # [in] for "in", [out] for "out" / "out_base"
    axis: str = "out"

    shape = property(lambda self: (self.up.shape[0], self.down.shape[1]))


def is_peft_dora(lw) -> bool:
    """Every module of ``lw`` is peft's DoRA (axis "out"): peft holds it as it is."""
    return bool(lw) and all(isinstance(m, DoraModule) and m.axis == "out" for m in lw.values())


def merged_weight(m: DoraModule, weight: torch.Tensor) -> torch.Tensor:
    """W' in fp32 for base ``weight`` (fp32, the module's own rows)."""
    w = weight.float()
    v = w + m.up.float() @ m.down.float() * m.scale
    mag = m.magnitude.float().reshape(-1)
    if m.axis == "in":
        return v * (mag / (v.norm(dim=0) + _EPS))[None, :]
    if m.axis == "out":
        return v * (mag / v.norm(dim=1))[:, None]
    return v * (mag / (w.norm(dim=1) + _EPS))[:, None]


def delta(m: DoraModule, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W' - W (fp32), times ``strength``."""
    return (merged_weight(m, weight) - weight.float()) * strength


def rebase(m: DoraModule, weight: torch.Tensor) -> DoraModule:
    """A peft ("out") module as ComfyUI's "out_base" one: the same merged weight on ``weight`` (its base)."""
    if m.axis != "out":
        return m
    w = weight.float()
    v = w + m.up.float() @ m.down.float() * m.scale
    mag = m.magnitude.float().reshape(-1) * (w.norm(dim=1) + _EPS) / v.norm(dim=1)
    return DoraModule(m.down, m.up, m.alpha, mag, "out_base")


def axis_from_file(name: str, scale: torch.Tensor, out_features: int, in_features: int,
                   declared: str | None) -> str:
    """The convention of a ComfyUI-layout ``dora_scale``: its shape, checked against ``dev2pro.dora_axis``."""
    shape, declared = tuple(scale.shape), {"out": "out_base"}.get(declared, declared)
    if shape == (1, in_features) or shape == (in_features,) and (in_features != out_features or declared == "in"):
        axis = "in"
    elif shape == (out_features, 1) or shape == (out_features,):
        axis = "out_base"
    else:
        raise UserError(f"DoRA module {name!r}: dora_scale has shape {shape}, not (1, {in_features}) (per input "
                        f"column) or ({out_features}, 1) (per output row); the file is damaged -- re-export it")
    if declared and declared != axis:
        raise UserError(f"DoRA module {name!r}: dora_scale shape {shape} contradicts {AXIS_KEY}; the file is "
                        f"damaged -- re-export it")
    return axis


def to_comfy(m: DoraModule, name: str) -> torch.Tensor:
    """The ComfyUI-layout ``dora_scale`` tensor of a module; a peft ("out") module must be ``rebase``d first."""
    if m.axis == "out":
        raise UserError(f"DoRA module {name!r} is peft's (normalised per output row by the adapted weight): the "
                        f"ComfyUI layout needs it converted with the base weights it was trained on -- save it from "
                        f"training (`dev2pro train` does), or write the diffusers layout (`--to diffusers`)")
    mag = m.magnitude.reshape(-1)
    return mag[None, :] if m.axis == "in" else mag[:, None]
