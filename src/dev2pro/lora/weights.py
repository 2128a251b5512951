"""A LoRA in memory, whatever file it came from: ``LoraModule`` (one low-rank pair and its alpha), ``LoraWeights``
(diffusers module path -> module, plus metadata, layout and family), and the PEFT side of it: a module's alpha
under a ``LoraConfig`` read from a file's metadata, and the config and state dict that recreate these modules in
peft. Every reader and writer (``formats``, ``lycoris``, ``xlabs``, FLUX.2's ``lora_keys``) builds on these; this
module imports none of them."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import UserError

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraModule:
    """One low-rank update of a linear layer: delta W = up @ down * alpha / rank."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    rank = property(lambda self: self.down.shape[0])
    scale = property(lambda self: self.alpha / self.rank)  # what up @ down is multiplied by


class LoraWeights(dict):
    """diffusers module path -> LoraModule, plus string metadata, the layout it was read from (if any) and the model
    family it is for ('flux1', 'flux2'; None: not known, which reads and writes as FLUX.1)."""

    def __init__(self, modules: Mapping[str, LoraModule] | None = None, metadata: Mapping[str, str] | None = None,
                 layout: str | None = None, family: str | None = None):
        super().__init__(modules or {})
        self.metadata = dict(metadata or {})
        self.layout = layout
        self.family = family


def pair(name: str, g: dict, alpha: float | None = None) -> LoraModule:
    if "down" not in g or "up" not in g:
        raise UserError(f"LoRA module {name!r} has {sorted(g)} but needs both down (lora_down/lora_A) and up "
                        f"(lora_up/lora_B): the file is incomplete.")
    down, up = g["down"], g["up"]
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise UserError(f"LoRA module {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                        f"linear LoRA pair (conv LoRAs are not supported).")
    if "alpha" in g:
        a = g["alpha"]
        if a.numel() != 1:  # kohya writes a 0-d tensor; one scale per module is all any reader applies
            raise UserError(f"LoRA module {name!r}: alpha holds {a.numel()} values (shape {tuple(a.shape)}), not "
                            f"one number; the file is damaged or not a LoRA -- re-export it")
        alpha = float(a.float().reshape(()).item())
    return LoraModule(down, up, float(down.shape[0]) if alpha is None else alpha)


def adapter_config(metadata: Mapping[str, str] | None) -> dict | None:
    """LoraConfig kwargs diffusers would use from a file's metadata (None: no metadata, alpha = rank)."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    cfg = json.loads(raw)
    pre = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return pre or cfg


def config_alpha(cfg: dict, name: str, rank: int) -> float:
    """A module's effective alpha (our alpha/rank convention) under a LoraConfig, patterns matched as peft does."""
    if cfg.get("use_dora"):
        raise UserError("this is a DoRA adapter (use_dora in its metadata); only plain LoRAs are supported.")
    alpha = cfg.get("lora_alpha", 8)  # LoraConfig's default, which diffusers would use too
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    # rsLoRA scales by alpha / sqrt(r); express it as an alpha over r.
    return float(alpha) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)


def lora_to_peft_state_dict(lw: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Unprefixed PEFT keys ``<module>.lora_A.weight`` / ``.lora_B.weight`` (pair with ``peft_config_kwargs``)."""
    return {f"{n}.lora_{ab}.weight": t for n, m in lw.items() for ab, t in (("A", m.down), ("B", m.up))}


def plain_number(x: float) -> int | float:
    """16.0 -> 16 (as kohya and peft metadata write whole numbers), other values as floats."""
    return int(x) if float(x).is_integer() else float(x)


def peft_config_kwargs(lw: Mapping[str, LoraModule]) -> dict:
    """``peft.LoraConfig`` kwargs that give every module its own rank and alpha.

    The commonest rank/alpha are the defaults; the rest go to ``rank_pattern``/``alpha_pattern`` keyed ``^<module>``
    (diffusers' anchored form). ``target_modules`` is an exact-name regex: a plain list would also hit every
    ``single_transformer_blocks.N.proj_out`` when the LoRA targets the top-level ``proj_out``.
    """
    if not lw:
        raise UserError("the LoRA has no modules.")
    r = Counter(m.rank for m in lw.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in lw.values()).most_common(1)[0][0]
    return dict(
        r=r, lora_alpha=plain_number(alpha),
        target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(lw)) + ")$",
        rank_pattern={f"^{re.escape(n)}": m.rank for n, m in sorted(lw.items()) if m.rank != r},
        alpha_pattern={f"^{re.escape(n)}": plain_number(m.alpha) for n, m in sorted(lw.items()) if m.alpha != alpha},
        lora_dropout=0.0, bias="none", use_dora=False, use_rslora=False,
    )
