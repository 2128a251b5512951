"""The ``--vram`` presets applied to a train config: FLUX.1's measured table (``plan.VRAM_PRESETS``), the same
settings computed from the plan for other families (``fitted_preset``), and the clamps both need (a swap count
within the model's blocks, 8-bit AdamW only where bitsandbytes exists)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UserError
from .flux.checkpoint import open_checkpoint
from .host_memory import pinned_bytes
from .plan import CUDA_OVERHEAD, GB, VRAM_PRESETS, PlanInputs, estimate, fmt_gb, remedies

HOST_RAM_FLOOR_GB = 32  # computed presets assume at least this much host RAM (``host_budget``)


# PlanInputs field -> config key, for presets computed from the plan
_CONFIG_KEYS = {"gradient_checkpointing": "model.gradient_checkpointing", "fp8_storage": "model.fp8_storage",
                "fp8_keep": "model.fp8_keep", "blocks_to_swap": "model.blocks_to_swap",
                "text_encoder": "model.text_encoder", "text_encoder_dtype": "model.text_encoder_dtype",
                "vae_tiling": "model.vae_tiling", "optimizer": "train.optimizer"}


# the text encoder while caching, when it does not fit: bf16, then fp8 (FLUX.2: Mistral 24B in ~23 GB), then the CPU
_TEXT_REMEDIES = (dict(text_encoder_dtype="bf16"), dict(text_encoder_dtype="fp8"), dict(text_encoder="cpu"))


def host_budget(gb: int) -> int:
    """Host RAM a computed ``--vram gb`` preset assumes the machine has: twice the card, at least 32 GB."""
    return max(HOST_RAM_FLOOR_GB, 2 * gb) * GB


@dataclass
class Fitted:
    """A computed preset: ``settings`` (the PlanInputs chosen), its ``plan``, and whether the ladder wanted 8-bit
    AdamW that bitsandbytes' absence ruled out."""

    settings: PlanInputs
    plan: object  # plan.Plan
    gb: int
    no_bitsandbytes: bool = False

    def values(self) -> dict[str, object]:
        s = self.settings
        return {key: list(getattr(s, f)) if isinstance(getattr(s, f), tuple) else getattr(s, f)
                for f, key in _CONFIG_KEYS.items()}

    def host_note(self) -> str:
        """The preset line's host RAM part: the peak, the pinned swap buffer, and the budget it assumed."""
        p, budget = self.plan, host_budget(self.gb)
        pinned = pinned_bytes(p.swapped_bytes)  # PyTorch's host allocator rounds up to a power of two
        over = f", over the {fmt_gb(budget)} this preset assumes: no setting that fits the card needs less" \
            if p.host_ram > budget else f"; assumes >= {fmt_gb(budget)} of host RAM"
        return f"host RAM peak ~{fmt_gb(p.host_ram)}" + (f" ({fmt_gb(pinned)} pinned for block swap)" if pinned
                                                         else "") + over


def fit_preset(inp: PlanInputs, gb: int, fixed: set[str] = frozenset()) -> Fitted:
    """The ``--vram gb`` preset computed for this model from the plan (FLUX.2's sizes are not FLUX.1's table).

    Start from the roomiest settings (the 48 GB preset's) and apply the remedies in order (``plan.remedies``: the
    cheapest change in speed first: VAE tiling, which slows only the samples' decode, before block swap, which
    slows every step, up to all the model's blocks; the text encoder to bf16, fp8, then the CPU, when caching does
    not fit). Host RAM rule: the machine is assumed to have
    ``host_budget(gb)`` of RAM (twice the card, at least 32 GB). The first setting whose GPU peak fits ``gb`` GB
    and whose host peak fits that budget wins; when none fits both, the GPU-fitting setting with the lowest host
    peak (the earliest, i.e. fastest, of equals): a GPU fit never buys bf16 weights with 56 GB of pinned RAM
    (FLUX.2 dev, swap 53) when fp8 storage fits too. Nothing fits the card: the most frugal setting.
    ``fixed``: config keys the user wrote (never changed)."""
    roomy = {**VRAM_PRESETS[48]["model"], **VRAM_PRESETS[48]["train"]}
    field_of = {v: k for k, v in _CONFIG_KEYS.items()}
    frozen = {field_of[k] for k in fixed if k in field_of}
    s = replace(inp, **{k: v for k, v in roomy.items() if k in _CONFIG_KEYS and k not in frozen})
    budget, skipped, best = gb * GB, False, None
    ladder = [c for _, c in remedies(inp.spec)]
    first_swap = next(i for i, c in enumerate(ladder) if "blocks_to_swap" in c)
    for change in [{}] + ladder[:first_swap] + [dict(vae_tiling=True)] + ladder[first_swap:]:
        change = {k: v for k, v in change.items() if k not in frozen}
        if change.get("optimizer") == "adamw8bit" and not has_bitsandbytes():
            skipped = True
            continue  # 8-bit states need bitsandbytes (CUDA)
        s = replace(s, **change)
        for te in _TEXT_REMEDIES:
            if estimate(s).caching_peak + CUDA_OVERHEAD > budget and not set(te) & frozen:
                s = replace(s, **te)
        plan = estimate(s)
        if plan.peak + CUDA_OVERHEAD <= budget:
            if plan.host_ram <= host_budget(gb):
                return Fitted(s, plan, gb, skipped)
            if best is None or plan.host_ram < best.plan.host_ram:
                best = Fitted(s, plan, gb, skipped)
    return best or Fitted(s, estimate(s), gb, skipped)


def fitted_preset(inp: PlanInputs, gb: int, fixed: set[str] = frozenset()) -> dict[str, object]:
    """``fit_preset``'s settings as "section.key" -> value."""
    return fit_preset(inp, gb, fixed).values()


def vram_preset(gb: int, explicit: set[str]) -> tuple[dict[str, object], list[str]]:
    """(chosen, kept): the ``gb`` preset's ``"section.key" -> value`` settings not named in ``explicit`` (what the
    user wrote), and the preset keys left alone because the user wrote them."""
    if gb not in VRAM_PRESETS:
        raise UserError(f"model.vram = {gb}: choose one of {', '.join(map(str, sorted(VRAM_PRESETS)))} (GB), "
                        "or 0 for no preset")
    chosen, kept = {}, []
    for sec, values in VRAM_PRESETS[gb].items():
        for key, value in values.items():
            name = f"{sec}.{key}"
            if name in explicit:
                kept.append(name)
                continue
            if name == "train.optimizer" and value == "adamw8bit" and not has_bitsandbytes():
                value = "adamw"  # 8-bit states need bitsandbytes (CUDA); the plan shows the difference
            chosen[name] = list(value) if isinstance(value, (list, tuple)) else value
    return chosen, kept


def clamp_blocks_to_swap(blocks: int, transformer: str, allow_pickle: bool = False) -> int:
    """A preset's swap count is for FLUX.1's 57 blocks: at most the blocks of the checkpoint at ``transformer``
    (its header only); unchanged when it cannot be read (loading the base later reports a bad path clearly)."""
    try:
        spec = open_checkpoint(transformer, allow_pickle=allow_pickle).spec()
    except Exception:  # noqa: BLE001
        return blocks
    return min(blocks, spec.num_double + spec.num_single)


def has_bitsandbytes() -> bool:
    try:  # optional (CUDA only): imported only to see whether it is there
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True
