"""Which linears of a Flux transformer a LoRA trains: named presets plus block selection -> module names.

Names are diffusers module paths (what peft wraps). Presets follow what Flux LoRA trainers expose:
  attention   q/k/v/out of image and text streams in double blocks, q/k/v in single blocks
  all_linear  attention + both MLPs of double blocks + single blocks' fused MLP input and output projection
Extras: ``modulation`` (AdaLN linears: norm1, norm1_context, single norm, norm_out) and ``embedders`` (x/context
embedders and the timestep/text/guidance MLPs) -- rarely useful for style LoRAs, and training the guidance MLP
is exactly what the Dev2Pro recipe warns against, so they are opt-in.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError

PRESETS = ("attention", "all_linear")
EXTRAS = ("modulation", "embedders")

_DOUBLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_SINGLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v")
_SINGLE_MLP = ("proj_mlp", "proj_out")


def target_modules(preset: str, n_double: int, n_single: int, extras: Sequence[str] = (),
                   double_blocks: Sequence[int] | None = None, single_blocks: Sequence[int] | None = None,
                   guidance: bool = True) -> list[str]:
    """Full diffusers module names for a preset; ``*_blocks`` restrict to those block indices (None = all)."""
    if preset not in PRESETS:
        raise ConfigError(f"lora.targets = {preset!r} is not a preset: choose one of {', '.join(PRESETS)}")
    for e in extras:
        if e not in EXTRAS:
            raise ConfigError(f"lora.extra_targets: unknown {e!r}; choose from {', '.join(EXTRAS)}")
    dbl = list(range(n_double)) if double_blocks is None else list(double_blocks)
    sgl = list(range(n_single)) if single_blocks is None else list(single_blocks)
    for name, sel, n in (("double_blocks", dbl, n_double), ("single_blocks", sgl, n_single)):
        bad = [i for i in sel if not 0 <= i < n]
        if bad:
            raise ConfigError(f"lora.{name}: indices {bad} are out of range; the model has {n} such blocks")
    double_mods = _DOUBLE_ATTN + (_DOUBLE_MLP if preset == "all_linear" else ())
    single_mods = _SINGLE_ATTN + (_SINGLE_MLP if preset == "all_linear" else ())
    names = [f"transformer_blocks.{i}.{m}" for i in dbl for m in double_mods]
    names += [f"single_transformer_blocks.{i}.{m}" for i in sgl for m in single_mods]
    if "modulation" in extras:
        names += [f"transformer_blocks.{i}.{m}" for i in dbl for m in ("norm1.linear", "norm1_context.linear")]
        names += [f"single_transformer_blocks.{i}.norm.linear" for i in sgl] + ["norm_out.linear"]
    if "embedders" in extras:
        names += ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                  "time_text_embed.text_embedder.linear_2"]
        if guidance:
            names += ["time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"]
    if not names:
        raise ConfigError("lora: the block selection leaves no module to train")
    return names
