"""What a base renders with when the user gives no steps or guidance: its variant's own (FLUX.2's ``spec.sampling``,
FLUX.1 dev's 20 steps at 3.5), and for a dev2pro de-distillation (its ``dev2pro.*`` metadata) guidance 1 with true
CFG. Torch-free, so `dev2pro inspect` says it without loading diffusers; ``sampling`` re-exports it."""

from __future__ import annotations

from typing import Mapping


def step_distilled(spec) -> bool:
    """A step- and guidance-distilled base (FLUX.2 klein distilled): rendered at its own steps and never with CFG,
    which its pipeline ignores (``spec.sampling``)."""
    own = getattr(spec, "sampling", None)
    return own is not None and own.guidance == "none"


FLUX1_STEPS, FLUX1_GUIDANCE = 20, 3.5  # FLUX.1 has no per-variant table: dev's embedded 3.5, 20 steps as ComfyUI


def own_settings(spec) -> tuple[int, float]:
    """(steps, guidance value) a base is rendered with when none are given: a FLUX.2 variant's own (``spec.sampling``:
    klein distilled 4 steps, klein Base and FLUX.2 dev 50 at 4), else FLUX.1's 20 at 3.5."""
    own = getattr(spec, "sampling", None)  # FLUX.1 specs have none
    return (own.steps, own.scale) if own is not None else (FLUX1_STEPS, FLUX1_GUIDANCE)


def dedistilled(metadata: Mapping[str, str]) -> bool:
    """A dev2pro de-distillation export or adapter (objective flow or cfg_teacher): trained at guidance 1, it renders
    with true CFG, a kept guidance embedding at 1.0, as its run's ``cfg`` grids (guidance_distill makes a dev-like
    model: rendered as dev)."""
    return (metadata.get("dev2pro.recipe") == "dedistill"
            and metadata.get("dev2pro.objective") in ("flow", "cfg_teacher"))


def default_guidance(spec, metadata: Mapping[str, str], guidance: float | None = None,
                     cfg: float | None = None, scale: float | None = None) -> tuple[float, float]:
    """(guidance value, true CFG scale) for ``resolve_guidance``: given values win; else the base's scale --
    ``scale`` when given, else its own (``own_settings``) -- as guidance, and for a ``dedistilled`` file guidance 1.0
    with that scale as true CFG (its CFG when ``cfg`` alone is given)."""
    scale = own_settings(spec)[1] if scale is None else scale
    if guidance is None and dedistilled(metadata):
        return 1.0, scale if cfg is None else cfg
    return scale if guidance is None else guidance, 1.0 if cfg is None else cfg
