"""Strength transfer: at which strength does a LoRA do on one model what it does at 1.0 on another?

FLUX.2 klein users train on Base and use the LoRA on the distilled model, and report needing strength 1.5-2.0 there.
We measure it without any judge model. The **effect** of a LoRA at strength ``s`` on a model is how far it moves
that model's own fixed-seed outputs:

    effect(model, s) = mean over (prompt, seed) of RMS(latents(model + s * LoRA) - latents(model))

computed on the final denoised latents (same prompts, seeds, size and the model's own sampling settings: Base with
true CFG and ~50 steps, distilled with its 4 steps). The **reference** is the effect on the training model at 1.0;
``calibrate`` finds the strength on the target model whose effect equals it: it evaluates a grid of strengths,
brackets the crossing (the effect grows with ``s`` on any sane model) and refines it by bisection, so the answer
is a measured strength, not an extrapolation.

The pieces are plain callables so the maths is testable on its own: ``effect_curve`` takes ``latents_at(s)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import UserError

DEFAULT_STRENGTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
METADATA_KEY = "dev2pro.recommended_strength"


def recommendation(metadata: dict | None) -> dict | None:
    """The strength ``dev2pro calibrate --write`` recorded in a LoRA's metadata: ``{"strength", "target",
    "target_variant", ...}``, or None (none recorded, or not readable as one)."""
    try:
        rec = json.loads((metadata or {}).get(METADATA_KEY) or "null")
        return rec if isinstance(rec, dict) and float(rec["strength"]) > 0 else None
    except (ValueError, TypeError, KeyError):
        return None


def file_recommendation(path) -> dict | None:
    """``recommendation`` of a LoRA file, from its safetensors header (no tensor is read; None if unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return recommendation(f.metadata())
    except (SafetensorError, OSError):
        return None


def strength_note(path, strength: float, variant: str) -> str | None:
    """A note when the LoRA file carries a calibrated strength for models of ``variant`` (the one rendering) and
    is rendered at another strength, or carries none while it was trained on another variant (klein Base rendered on
    distilled: `dev2pro calibrate` measures it); None otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    rec, trained = recommendation(meta), meta.get("dev2pro.train_base_variant", "")
    klein = trained.startswith("klein") and variant.startswith("klein")  # Base -> distilled: the measured case
    if klein and trained != variant and (not rec or rec.get("target_variant") != variant):
        return (f"note: {Path(path).name} was trained on {trained} and renders on {variant} at {strength:g}, a "
                f"strength not measured for it: `dev2pro calibrate {path} --model <the {trained} folder> --target "
                f"<this transformer> --write` finds the one that does here what 1.0 does on {trained}")
    if not rec or not variant or rec.get("target_variant") != variant or abs(float(rec["strength"]) - strength) < 1e-3:
        return None
    return (f"note: {Path(path).name} carries a calibrated strength {float(rec['strength']):g} for {variant} models "
            f"(dev2pro calibrate, on {rec.get('target', '?')}); this renders it at {strength:g}: pass "
            f"--lora {path}:{float(rec['strength']):g} to use it")


def effect(lora_latents: torch.Tensor, base_latents: torch.Tensor) -> float:
    """Mean over images of the RMS difference (float64, per image, then averaged: batch- and order-free)."""
    diff = (lora_latents.double() - base_latents.double()).flatten(1)
    return float(diff.pow(2).mean(dim=1).sqrt().mean())


@dataclass
class Calibration:
    """A calibration: the reference effect, the measured (strength, effect) points and the recommendation."""

    reference: float
    points: list[tuple[float, float]] = field(default_factory=list)
    strength: float | None = None  # None: the target never reaches the reference within the searched range
    note: str = ""

    def to_dict(self) -> dict:
        return {"reference_effect": self.reference, "points": [list(p) for p in sorted(self.points)],
                "recommended_strength": self.strength, "note": self.note}


def calibrate(reference: float, effect_at: Callable[[float], float],
              strengths: Sequence[float] = DEFAULT_STRENGTHS, refine: int = 6) -> Calibration:
    """The strength ``s`` with ``effect_at(s) == reference``: the grid, then ``refine`` bisection steps inside
    the first bracketing interval (each halves it: 6 steps turn a 0.25-wide bracket into 0.004)."""
    if not reference > 0:
        raise UserError("the LoRA does not change the reference model's outputs (effect 0): nothing to calibrate; "
                        "check that the LoRA matches the model (family, targets) and its strength is not 0")
    grid = sorted({float(s) for s in strengths if s > 0})
    if not grid:
        raise UserError("give at least one positive strength to search")
    cal = Calibration(reference)
    lo = (0.0, 0.0)  # strength 0 moves nothing
    for s in grid:
        e = effect_at(s)
        cal.points.append((s, e))
        if e >= reference:
            hi = (s, e)
            break
        lo = (s, e)
    else:
        cal.note = (f"even strength {grid[-1]:g} moves the target less than strength 1.0 moves the reference "
                    f"({cal.points[-1][1]:.4g} < {reference:.4g}); search higher strengths")
        return cal
    for _ in range(refine):  # bisection on the bracket [lo, hi]
        mid = (lo[0] + hi[0]) / 2
        e = effect_at(mid)
        cal.points.append((mid, e))
        lo, hi = ((mid, e), hi) if e < reference else (lo, (mid, e))
    # the last bracket is narrow: interpolate inside it
    span = hi[1] - lo[1]
    cal.strength = lo[0] + (hi[0] - lo[0]) * ((reference - lo[1]) / span if span > 0 else 0.5)
    return cal


def set_strength(model, adapter_name: str, strength: float) -> None:
    """Scale every peft LoRA layer's ``adapter_name`` to ``strength`` x its alpha/rank (0 turns it off)."""
    from peft.tuners.lora import LoraLayer  # heavy: only when a calibration runs

    found = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.set_scale(adapter_name, strength)
            found = True
    if not found:
        raise ValueError(f"no LoRA layer holds the adapter {adapter_name!r}")
