"""The `dev2pro compare` config: a shared model folder, prompts and seeds, and the ``[[arms]]`` each rendered
with its own transformer, LoRAs and guidance. Kept apart from ``schemas`` (train and dedistill); ``schemas``
re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from .arguments import parse_lora_arg, slug
from .choices import GUIDANCE_MODES, MAX_REFERENCES
from .config import load_config, opt, parse_size, require, require_path_list, require_range
from .errors import ConfigError, UserError


@dataclass
class Arm:
    name: str = opt("", "label in the grid, report and file names (unique)")
    transformer: str | None = opt(None, "transformer checkpoint (file or folder, any layout/dtype); "
                                        "default: the model folder's")
    loras: list[str] = opt([], 'LoRA files with optional strength, e.g. ["style.safetensors:0.8"]')
    guidance: float | None = opt(None, "guidance strength (embedded value, or CFG scale on bases without "
                                       "embedding); default: the base's own (FLUX.1 3.5, FLUX.2 dev and klein Base 4)")
    cfg: float = opt(1.0, "true CFG scale (> 1 adds a negative-prompt pass)")
    mode: str = opt("auto", "how guidance is applied", choices=GUIDANCE_MODES)
    fp8: bool = opt(False, "keep fp8 checkpoints in fp8 storage")
    steps: int = opt(0, "sampling steps of this arm (0 = the config's steps; a step-distilled base such as FLUX.2 "
                        "klein distilled: its own 4, and never CFG)")

    def validate(self):
        require(bool(self.name.strip()), "name: every arm needs a name")
        require(self.cfg >= 1.0, f"cfg: must be >= 1 (1 = off), got {self.cfg}")
        if self.guidance is not None:
            require_range("guidance", self.guidance, 0, 100, above=True)
        for item in self.loras:
            try:
                parse_lora_arg(item)
            except UserError as e:
                raise ConfigError(f"loras: {e}") from None


@dataclass
class CompareConfig:
    model: str = opt("", "diffusers model folder (FLUX.1 or FLUX.2): VAE, text encoders, scheduler, default "
                         "transformer")
    prompts: list[str] = opt([], "prompts rendered by every arm")
    negative: str = opt("", "negative prompt for true CFG")
    seeds: list[int] = opt([0, 1], "seeds rendered by every arm")
    steps: int = opt(20, "sampling steps")
    size: str = opt("1024x1024", "image size WIDTHxHEIGHT")
    out: str = opt("compare-out", "output folder (must not exist unless --overwrite)")
    image: str | list[str] | None = opt(None, "reference image every prompt edits (FLUX.2 edit-pair LoRAs; fitted "
                                              "to size), as `dev2pro sample --image`; a list: several, in order")
    metric_hook: str | None = opt(None, 'optional extra metrics: "module:function" or "file.py:function", '
                                        "called as fn(images, prompts) -> {name: float}")
    arms: list[Arm] = opt([], "[[arms]] tables: what to compare")

    def validate(self):
        require(bool(self.model), "model: set the shared model folder")
        require(bool(self.prompts), "prompts: give at least one prompt")
        require(bool(self.seeds), "seeds: give at least one seed")
        require(self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        require(len(self.arms) >= 1, "arms: add at least one [[arms]] table")
        require_path_list("image", self.image, MAX_REFERENCES)
        try:
            parse_size(self.size)
        except UserError as e:
            raise ConfigError(f"size: {e}") from None
        slugs = [slug(a.name) for a in self.arms]
        dup = sorted({a.name for a, s in zip(self.arms, slugs) if slugs.count(s) > 1})
        require(not dup, f"arms: names must be unique (also as file names), repeated: {dup}")


def load_compare_config(path, overrides: list[str] | None = None, data: dict | None = None) -> CompareConfig:
    """The `dev2pro compare` config from a TOML file, a dict and ``--set`` overrides."""
    return load_config(CompareConfig, path, overrides, data)
