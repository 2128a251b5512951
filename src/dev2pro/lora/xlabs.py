"""XLabs processor LoRAs (read only): ``[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`` ...,
no alpha (scale 1). Moved out of ``formats`` (which dispatches here) to keep that module under its size limit."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import UserError
from .weights import LoraModule, pair


def read_xlabs(sd: Mapping[str, torch.Tensor], mlp_hidden: int | None) -> dict[str, LoraModule]:
    """XLabs processor LoRAs (no alpha: scale 1). A qkv LoRA shares one down across q, k and v."""
    targets = {("double", "qkv_lora1"): ["attn.to_q", "attn.to_k", "attn.to_v"],
               ("double", "qkv_lora2"): ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
               ("double", "proj_lora1"): ["attn.to_out.0"], ("double", "proj_lora2"): ["attn.to_add_out"],
               ("single", "qkv_lora"): ["attn.to_q", "attn.to_k", "attn.to_v"], ("single", "proj_lora"): ["proj_out"]}
    groups: dict[tuple, dict] = {}
    for key, t in sd.items():
        m = re.fullmatch(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)\.(down|up)\.weight",
                         key)
        if not m or (m.group(1), m.group(3)) not in targets:
            raise UserError(f"unexpected key {key!r} in an XLabs-layout LoRA.")
        groups.setdefault(m.groups()[:3], {})[m.group(4)] = t
    out = {}
    for (kind, idx, proc), g in groups.items():
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{idx}."
        m = pair(block + proc, g)
        names = targets[(kind, proc)]
        if kind == "single" and proc == "proj_lora":
            # XLabs feeds only the attention output (first `hidden` inputs of linear2) to this LoRA: pad the down
            # with zero columns for the mlp inputs, as diffusers' state-dict expansion does.
            hidden = m.down.shape[1]
            extra = mlp_hidden if mlp_hidden is not None else 4 * hidden
            m = LoraModule(torch.cat([m.down, m.down.new_zeros(m.rank, extra)], 1), m.up, m.alpha)
        for j, name in enumerate(names):
            size = m.up.shape[0] // len(names)
            out[block + name] = LoraModule(m.down, m.up[j * size:(j + 1) * size], m.alpha)
    return out
