"""The demo's world on disk: captioned image folders, shards through `dev2pro cache`'s writer, prompt embeddings.

Flux's VAE downsamples by 8 and would turn an 8x8 digit into one latent pixel. So images are stored as 64x64 PNGs
of 8x8 blocks, and the shard writer's "VAE" is ``encode_pixels``: 8x8 block means -> ``world.encode`` (the fixed
invertible pixel codec), lossless. Captions go through the tiny family's real CLIP/T5 tokenizers and encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from ..data.buckets import make_buckets
from ..data.shards import collect_sources, write_shards
from ..outputs import save_safetensors
from ..text import load_text_encoders, text_encoder
from .world import base_caption, concept_caption, encode, few_shot, plain, styled, to_pil

T5_LEN = 16  # the longest caption is 10 T5 tokens
SIZE = 64  # pixel side seen by the pipeline: 8x8 digit pixels as 8x8 blocks
CODEC = "dev2pro-demo-pixel-v1"  # recorded in the shards' settings: latents made by encode_pixels

TextEncoder = Callable[[Sequence[str]], dict]


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, caption: Callable[[int], str],
                 render: Callable[[np.ndarray], np.ndarray]) -> Path:
    """``images`` (N, 8, 8) rendered by ``render`` as SIZE x SIZE PNGs, each with its ``caption(label)`` .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (rgb, y) in enumerate(zip(render(images), labels)):
        to_pil(rgb, scale=SIZE // 8).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(int(y)))
    return folder


def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The shard writer's "VAE": (B, 3, 64, 64) in [-1, 1] -> 8x8 block means -> codec latents (B, 16, 8, 8)."""
    rgb = torch.nn.functional.avg_pool2d((pixels.float() + 1) / 2, SIZE // 8)  # (B, 3, 8, 8)
    return encode(rgb.permute(0, 2, 3, 1))


def load_text_encoder(model_dir: Path) -> TextEncoder:
    """Captions -> {"prompt_embeds", "pooled"} with the model folder's CLIP/T5 on the CPU (``T5_LEN`` tokens)."""
    return text_encoder(load_text_encoders(model_dir, "cpu"), "cpu", T5_LEN)


def write_demo_shards(folder: Path, out: Path, encode_text: TextEncoder) -> Path:
    """An image folder -> shards at ``out`` (one SIZE x SIZE bucket), latents by ``encode_pixels``."""
    samples, bad = collect_sources([folder])
    return write_shards(samples, out, per_shard=512, buckets=make_buckets(SIZE * SIZE, step=SIZE),
                        encode_latents=encode_pixels, encode_text=encode_text,
                        settings={"codec": CODEC, "t5_max_length": T5_LEN}, skipped=bad, batch_size=64)


def write_prompts(encode_text: TextEncoder, captions: Sequence[str], out: Path) -> Path:
    """The evaluation prompts' embeddings and the empty prompt's (the CFG negative) in one safetensors file."""
    prompts = encode_text(list(captions))
    empty = encode_text([""])
    return save_safetensors({**prompts, "empty_embeds": empty["prompt_embeds"][0],
                             "empty_pooled": empty["pooled"][0]}, out, overwrite=True)


def load_prompts(path: str | Path) -> dict[str, torch.Tensor]:
    """``write_prompts``'s file: prompt_embeds (N, L, D), pooled (N, D), empty_embeds (L, D), empty_pooled (D,)."""
    return load_file(str(path))


def write_world(root: Path, world, seeds: int, per_class: int, encode_text: TextEncoder,
                shards=write_demo_shards, prompts=write_prompts) -> tuple[Path, dict[int, Path], Path]:
    """The demo's data under ``root``: the base world and one few-shot concept set per seed as image folders, then
    shards (``shards(folder, out, encode_text)``: a family's codec and text stack), and the eval prompts (``prompts``)
    -> (base shards, {seed: concept shards}, prompts file). Folders already written are reused."""
    base_dir = root / "data" / "base"
    if not base_dir.is_dir():
        write_folder(base_dir, world.train_images, world.train_labels, base_caption, plain)
    base_shards = shards(base_dir, root / "shards" / "base", encode_text)
    concept_shards = {}
    for s in range(seeds):
        d = root / "data" / f"concept-seed{s}"
        if not d.is_dir():
            images, labels = few_shot(world, per_class, seed=s)
            write_folder(d, images, labels, concept_caption, styled)
        concept_shards[s] = shards(d, root / "shards" / f"concept-seed{s}", encode_text)
    return base_shards, concept_shards, prompts(encode_text, [concept_caption(k) for k in range(10)],
                                                root / "prompts.safetensors")

