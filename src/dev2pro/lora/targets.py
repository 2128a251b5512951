"""Which linears of a Flux transformer a LoRA trains: named presets plus block selection -> module names.

Names are diffusers module paths (what peft wraps). Presets follow what Flux LoRA trainers expose:
  attention   q/k/v/out of image and text streams in double blocks, q/k/v in single blocks
  all_linear  attention + both MLPs of double blocks + single blocks' fused MLP input and output projection
Extras: ``modulation`` (AdaLN linears: norm1, norm1_context, single norm, norm_out) and ``embedders`` (x/context
embedders and the timestep/text/guidance MLPs) -- rarely useful for style LoRAs, and training the guidance MLP
is exactly what the Dev2Pro recipe warns against, so they are opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError

PRESETS = ("attention", "all_linear")
EXTRAS = ("modulation", "embedders")


@dataclass(frozen=True)
class TargetTables:
    """A family's module names per preset part (diffusers paths; block parts relative to the block)."""

    double_attn: tuple[str, ...]
    double_mlp: tuple[str, ...]
    single_attn: tuple[str, ...]
    single_mlp: tuple[str, ...]
    double_modulation: tuple[str, ...]  # per double block
    single_modulation: tuple[str, ...]  # per single block
    top_modulation: tuple[str, ...]  # outside the blocks
    embedders: tuple[str, ...]
    guidance_embedders: tuple[str, ...]


FLUX1_TABLES = TargetTables(
    double_attn=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out"),
    double_mlp=("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    single_attn=("attn.to_q", "attn.to_k", "attn.to_v"),
    single_mlp=("proj_mlp", "proj_out"),
    double_modulation=("norm1.linear", "norm1_context.linear"),
    single_modulation=("norm.linear",),
    top_modulation=("norm_out.linear",),
    embedders=("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
               "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
               "time_text_embed.text_embedder.linear_2"),
    guidance_embedders=("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"),
)


def target_modules(preset: str, n_double: int, n_single: int, extras: Sequence[str] = (),
                   double_blocks: Sequence[int] | None = None, single_blocks: Sequence[int] | None = None,
                   guidance: bool = True, tables: TargetTables = FLUX1_TABLES) -> list[str]:
    """Full diffusers module names for a preset; ``*_blocks`` restrict to those block indices (None = all);
    ``tables``: the family's module names (FLUX.1's by default)."""
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
    t = tables
    double_mods = t.double_attn + (t.double_mlp if preset == "all_linear" else ())
    single_mods = t.single_attn + (t.single_mlp if preset == "all_linear" else ())
    names = [f"transformer_blocks.{i}.{m}" for i in dbl for m in double_mods]
    names += [f"single_transformer_blocks.{i}.{m}" for i in sgl for m in single_mods]
    if "modulation" in extras:
        names += [f"transformer_blocks.{i}.{m}" for i in dbl for m in t.double_modulation]
        names += [f"single_transformer_blocks.{i}.{m}" for i in sgl for m in t.single_modulation]
        names += list(t.top_modulation)
    if "embedders" in extras:
        names += list(t.embedders)
        if guidance:
            names += list(t.guidance_embedders)
    if not names:
        raise ConfigError("lora: the block selection leaves no module to train")
    return names
