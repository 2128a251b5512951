"""What differs between the families `dev2pro demo` runs the Dev2Pro story on -- in one table.

``recipes/demo.py`` is one linear recipe (world -> pro -> dev -> dev2pro -> adapters -> LoRA arms -> judges); each
row here hands it a family's pieces:

  write_model        ``root/models`` -> (the tiny model folder, pro's start file; "" = the folder's transformer)
  load_text_encoder  the folder's text stack as captions -> cached records (FLUX.1: CLIP + T5; FLUX.2 dev: Mistral3)
  write_shards       an image folder -> shards (the family's pixel codec in its stored latent layout)
  write_prompts      the eval prompts' (and the empty prompt's) embeddings in one file
  prompt_embeds      that file -> (prompt_embeds, pooled or None): the adapter fidelity's inputs
  sample_arm         ``lab.arms.sample_arm``'s contract: a model + LoRAs sampled at each guidance into samples files
  text_len           the text length of the shards and the configs (``model.t5_max_length``)
  dev_guidance       the guidance dev is used at (arm A trains at it; the main setting samples at it)
  lora_format        the LoRA layout the arms save and ``sample_arm`` reads
  lora_suffix        that layout's file suffix (``train.export.LORA_SUFFIXES``)

Rows are looked up by name (``get``): the LoRA workers are spawned processes and receive the name in their job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class DemoFamily:
    name: str  # `dev2pro demo --family` value
    title: str  # for the report
    out: str  # default output folder
    write_model: Callable[[Path], tuple[Path, str]]
    load_text_encoder: Callable[[Path], Callable]
    write_shards: Callable
    write_prompts: Callable
    prompt_embeds: Callable
    sample_arm: Callable
    text_len: int
    dev_guidance: float
    lora_format: str
    lora_suffix: str


def _flux1() -> DemoFamily:
    from ..flux.tiny import write_tiny_model
    from . import arms, dataset

    def write_model(models: Path) -> tuple[Path, str]:
        folder = models / "tiny"
        if not (folder / "model_index.json").is_file():
            write_tiny_model(folder, variant="pro", seed=0, overwrite=True)
        return folder, ""  # pro starts from the folder's own (guidance-free) transformer

    def prompt_embeds(path):
        t = dataset.load_prompts(path)
        return t["prompt_embeds"], t["pooled"]

    return DemoFamily("flux1", "FLUX.1", "demo-out", write_model, dataset.load_text_encoder,
                      dataset.write_demo_shards, dataset.write_prompts, prompt_embeds, arms.sample_arm,
                      text_len=dataset.T5_LEN, dev_guidance=3.5, lora_format="kohya", lora_suffix="")


def _flux2_dev() -> DemoFamily:
    from . import flux2_dev, klein

    return DemoFamily("flux2-dev", "FLUX.2 [dev]", "demo-flux2-dev-out", flux2_dev.write_model,
                      flux2_dev.load_text_encoder, flux2_dev.write_shards, klein.write_prompts,
                      flux2_dev.prompt_embeds, flux2_dev.sample_arm, text_len=flux2_dev.TEXT_LEN,
                      dev_guidance=flux2_dev.GUIDANCE, lora_format="diffusers", lora_suffix=".diffusers")


_ROWS = {"flux1": _flux1, "flux2-dev": _flux2_dev}
NAMES = tuple(_ROWS)


def get(name: str) -> DemoFamily:
    """The demo row of family ``name`` (its modules imported on first use)."""
    if name not in _ROWS:
        raise UserError(f"unknown demo family {name!r}: use one of {', '.join(NAMES)} (or flux2-klein, flux2-klein-edit)")
    return _ROWS[name]()
