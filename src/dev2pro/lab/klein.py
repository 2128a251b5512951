"""The demo's toy world on FLUX.2 [klein]: a 32-channel pixel codec, shards and prompts through klein's Qwen3 text
stack, sampling of Base / distilled with a LoRA at several strengths, and the judges' numbers per arm.

The codec. ``AutoencoderKLFlux2`` (32 latent channels, /8) has random weights in the tiny folder, and a /8 VAE would
turn an 8x8 digit into one latent pixel anyway. As the FLUX.1 demo does (``world.encode``), images are 64x64 PNGs of
8x8 blocks and a FIXED INVERTIBLE per-pixel map stands in for the VAE: ``v = 2*rgb - 1`` lifted to 32 channels by
a fixed (32, 3) matrix with orthonormal columns, scaled by sqrt(32/3). Its output is a *stored* FLUX.2 latent
(``families/flux2/latents.py``: 32 channels at 1/8, batch-norm-normalised, un-patchified), so FLUX.1's ``pack``
of it is the token sequence ``Flux2KleinPipeline`` builds (2x2 patches -> 128 channels, 16 tokens for 64x64).
The pipeline hands back *VAE-space* latents (its batch-norm undone with the folder's statistics, which the tiny
folder sets to non-trivial values); ``to_stored`` redoes ``patchify -> (p - mean) / std -> unpatchify`` with the
same statistics before ``decode`` (the exact left inverse of ``encode``) reads them. So the real FLUX.2 packing and
normalisation run on both sides; only the convolutional VAE is replaced.

Samples files hold decoded RGB (N, 8, 8, 3), class-major, one array per key (``"s1.25"``: a LoRA at strength 1.25;
``"none"``: no LoRA), like ``lab/arms``' files, so every arm of a seed compares image by image (same prompts and
noise seeds).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

LATENT_CHANNELS = 32
SCALE = float(np.sqrt(LATENT_CHANNELS / 3))
SIZE = 64  # pixels seen by the pipeline: 8x8 digit pixels as 8x8 blocks -> an 8x8 latent -> 16 tokens
TEXT_LEN = 24  # Qwen3 chat-template tokens: the longest caption takes 22 (the pipeline pads to this length)
CODEC = "dev2pro-demo-pixel32-v1"  # recorded in the shards' settings: latents made by encode_pixels
EMBED_GAIN = 50.0  # the stand-in Qwen3's token embeddings x this (``write_model``)

TextEncoder = Callable[[Sequence[str]], dict]


def _codec_matrix() -> np.ndarray:
    """Fixed (32, 3) matrix with orthonormal columns; R's diagonal made positive so the signs are reproducible."""
    a = np.random.default_rng(2026).standard_normal((LATENT_CHANNELS, 3))
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diag(r))).astype(np.float32)


Q = _codec_matrix()


def encode(rgb) -> torch.Tensor:
    """RGB (N, H, W, 3) in [0, 1] (numpy or torch) -> stored FLUX.2 latents (N, 32, H, W) float32."""
    rgb = rgb.detach().to("cpu", torch.float32) if isinstance(rgb, torch.Tensor) else \
        torch.from_numpy(np.asarray(rgb, dtype=np.float32))
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {tuple(rgb.shape)}")
    return (SCALE * torch.einsum("cj,nhwj->nchw", torch.from_numpy(Q), 2.0 * rgb - 1.0)).contiguous()


def decode(z) -> np.ndarray:
    """Stored latents (N, 32, H, W) -> RGB (N, H, W, 3) float32 in [0, 1]; the exact left inverse of ``encode``."""
    z = z.detach().to("cpu", torch.float32).numpy() if isinstance(z, torch.Tensor) else np.asarray(z, np.float32)
    if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected (N, {LATENT_CHANNELS}, H, W) latents, got shape {z.shape}")
    v = np.einsum("cj,nchw->nhwj", Q, z) / SCALE
    return np.clip((v + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The shard writer's "VAE": (B, 3, 64, 64) in [-1, 1] -> 8x8 block means -> stored latents (B, 32, 8, 8)."""
    rgb = torch.nn.functional.avg_pool2d((pixels.float() + 1) / 2, SIZE // 8)
    return encode(rgb.permute(0, 2, 3, 1))


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder VAE's latent batch-norm (mean, std), (1, 128, 1, 1), as ``Flux2KleinPipeline`` computes them."""
    mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def to_stored(vae_latents: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The pipeline's VAE-space latents (N, 32, h, w) -> stored (normalised) latents: the pipeline's last step
    undone (``latents.encode_images`` after the VAE)."""
    from ..families.flux2.latents import patchify, unpatchify

    mean, std = stats
    return unpatchify((patchify(vae_latents.float()) - mean) / std)


class _Posterior:
    """What ``vae.encode(x).latent_dist`` hands its readers (``mode()``, ``sample()``): one exact latent."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def mode(self) -> torch.Tensor:
        return self.z

    def sample(self, generator=None) -> torch.Tensor:
        return self.z


def pixel_codec_vae(vae):
    """The folder's ``AutoencoderKLFlux2`` whose ``encode`` is the pixel codec: (B, 3, 64, 64) in [-1, 1] ->
    ``encode_pixels`` -> the batch-norm undone, i.e. VAE-space latents whose FLUX.2 normalisation gives back the
    codec's stored latents exactly. Every FLUX.2 reader of ``encode`` (``latents.encode_images`` for the training
    cache, ``Flux2KleinPipeline``'s ``image=`` references) then sees the codec; config, batch norm and dtype stay
    the folder's. ``decode`` is left alone (the demo decodes with ``to_stored`` + ``decode``). Returns ``vae``."""
    from types import SimpleNamespace

    from ..families.flux2.latents import patchify, unpatchify

    mean, std = bn_stats(vae)

    def encode(pixels: torch.Tensor, return_dict: bool = True):
        z = unpatchify(patchify(encode_pixels(pixels)) * std + mean).to(pixels.dtype)
        return SimpleNamespace(latent_dist=_Posterior(z)) if return_dict else (_Posterior(z),)

    vae.encode = encode
    vae.pixel_codec = CODEC
    return vae


@contextmanager
def codec_vae_loaded():
    """Inside, FLUX.2's ``latents.load_vae`` (what `dev2pro train` on image folders encodes with) returns
    ``pixel_codec_vae`` of the folder's VAE: an edit-pair run caches its images AND its references through the
    codec, with `train`'s own folder cache (the text-to-image demo's shards are written by ``write_shards`` here,
    without references)."""
    from ..families.flux2 import latents

    real = latents.load_vae
    latents.load_vae = lambda *a, **k: pixel_codec_vae(real(*a, **k))
    try:
        yield
    finally:
        latents.load_vae = real


# ------------------------------------------------------------------------------------------------ data
def write_model(folder: Path, seed: int = 0, spec=None, variant: str = "klein-base") -> Path:
    """The tiny FLUX.2 folder (``families.flux2.tiny.write_tiny``, ``variant`` klein-base, or dev with its Mistral3)
    with its stand-in text encoder's token embeddings scaled by ``EMBED_GAIN``.

    Why: a random 36-layer Qwen3 of width 32 hands out hidden states (layers 9/18/27) of std ~0.04 in which the
    prompt's own words are ~14% of the signal -- the template and 9 random layers wash them out, where a trained
    Qwen3 keeps them. The FLUX.1 demo's tiny T5 gives std ~1.0 with the words at ~23%; with klein's as it is, the
    toy Base ignored its prompt after 1000 steps (every digit prompt drew the same image). Qwen3 is pre-norm, so
    scaling the token embeddings (std 0.02 -> 1) raises the residual stream's token content against what the
    layers add: std ~0.9, words ~20%. Everything else (tokenizer, template, layers, stacking) is untouched."""
    import json

    import transformers

    from ..families.flux2.tiny import write_tiny

    write_tiny(folder, variant, seed=seed, spec=spec, overwrite=True)
    encoder_class = json.loads((folder / "model_index.json").read_text())["text_encoder"][1]  # Qwen3 or Mistral3
    te = getattr(transformers, encoder_class).from_pretrained(str(folder / "text_encoder"))
    with torch.no_grad():
        te.get_input_embeddings().weight.mul_(EMBED_GAIN)
    te.save_pretrained(str(folder / "text_encoder"))
    return folder


def load_text_encoder(model_dir: Path, text_len: int = TEXT_LEN) -> TextEncoder:
    """Captions -> {"prompt_embeds" (B, text_len, D) bf16} with the folder's text stack (Qwen3 for klein, Mistral3
    for dev: FLUX.2's cached text format)."""
    from ..families import get

    fam = get("flux2")
    return fam.text_encoder(fam.load_text(model_dir, "cpu"), "cpu", text_len)


def write_shards(folder: Path, out: Path, encode_text: TextEncoder, text_len: int = TEXT_LEN) -> Path:
    """An image folder -> shards at ``out`` (one SIZE x SIZE bucket), latents by ``encode_pixels``."""
    from ..data.buckets import make_buckets
    from ..data.shards import collect_sources, write_shards as write

    samples, bad = collect_sources([folder])
    return write(samples, out, per_shard=512, buckets=make_buckets(SIZE * SIZE, step=SIZE),
                 encode_latents=encode_pixels, encode_text=encode_text,
                 settings={"codec": CODEC, "family": "flux2", "max_length": text_len}, skipped=bad, batch_size=64)


def write_prompts(encode_text: TextEncoder, captions: Sequence[str], out: Path) -> Path:
    """The evaluation prompts' embeddings (as training sees them: bf16-rounded) and the empty prompt's (the CFG
    negative) in one file: prompt_embeds (N, L, D), empty_embeds (L, D), fp32."""
    from ..outputs import save_safetensors

    prompts = encode_text(list(captions))["prompt_embeds"].float()
    empty = encode_text([""])["prompt_embeds"][0].float()
    return save_safetensors({"prompt_embeds": prompts, "empty_embeds": empty}, out, overwrite=True)


def load_prompts(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------------ sampling
def strength_key(strength: float | None) -> str:
    """The samples-file key of a LoRA strength (``"s1.25"``), ``"none"`` for the bare model."""
    return "none" if strength is None else f"s{float(strength):g}"


def load_klein(target: str | Path, lora: str | Path | None, model_dir, distilled: bool):
    """(pipeline, VAE batch-norm stats) for ``target`` with ``lora`` attached as the peft adapter "lora0" (strength
    set per render with ``strength.set_strength``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .. import sampling as S
    from ..families import get

    fam = get("flux2")
    model, _ = S.load_base(str(target), [(str(lora), 1.0)] if lora else [], torch.float32)
    vae = pixel_codec_vae(fam.load_vae(model_dir))  # a reference image (``render``'s ``image``) is codec-encoded
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    return fam.build_pipeline({"vae": vae, "scheduler": scheduler}, model, distilled=distilled), bn_stats(vae)


@torch.no_grad()
def render(pipe, embeds: torch.Tensor, seeds: Sequence[int], *, steps: int, cfg: float,
           negative: torch.Tensor | None = None, image: Sequence | None = None) -> torch.Tensor:
    """One batched ``Flux2KleinPipeline`` call: prompt embeddings (N, L, D), one seeded CPU generator per image (so
    image i starts from its seed's noise, as one call per image would), true CFG ``cfg`` against ``negative``
    (L, D) when > 1 -- or, for a transformer with a guidance embedding (``Flux2Pipeline``: FLUX.2 dev), ``cfg`` as
    its embedded guidance. ``image``: the pipeline's reference images (PIL), shared by every image of the call (an
    edit). Returns VAE-space latents (N, 32, 8, 8) fp32. Batched because the tiny model's cost is per call, not
    per image (one image per call was ~30x slower here)."""
    from ..families.flux2.sampling import vae_space

    extra = {} if image is None else {"image": list(image)}
    embedded = pipe.transformer.config.guidance_embeds
    if cfg > 1.0 and not embedded and not pipe.config.get("is_distilled", False):
        extra["negative_prompt_embeds"] = negative[None].expand(len(embeds), -1, -1)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    pipe.transformer.eval()
    latents = pipe(prompt_embeds=embeds, num_inference_steps=steps, width=SIZE, height=SIZE, generator=generators,
                   guidance_scale=cfg, output_type="latent", **extra).images
    return vae_space(pipe, latents, SIZE, SIZE).float().cpu()  # dev's pipeline hands back packed tokens


def eval_batch(prompts_file, seed: int, per_class: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(embeddings (10 * per_class, L, D) class-major, noise seeds ``seed * 100_000 + i`` shared by every class,
    the empty prompt (L, D))."""
    prompts = load_prompts(prompts_file)
    pe = prompts["prompt_embeds"].repeat_interleave(per_class, dim=0)
    seeds = [seed * 100_000 + i for _ in range(prompts["prompt_embeds"].shape[0]) for i in range(per_class)]
    return pe, seeds, prompts["empty_embeds"]


def sample_model(target: str | Path, lora: str | Path | None, strengths: Sequence[float | None], prompts_file,
                 model_dir, *, seed: int, per_class: int, steps: int, cfg: float, distilled: bool) -> dict:
    """Sample ``target`` (+ ``lora`` at each of ``strengths``; None = adapter off): ``per_class`` images per prompt
    (``eval_batch``), ``steps`` steps, true CFG ``cfg`` (1 = none). Returns {strength_key: RGB (N, 8, 8, 3)}."""
    from .. import strength as ST

    pipe, stats = load_klein(target, lora, model_dir, distilled)
    embeds, seeds, empty = eval_batch(prompts_file, seed, per_class)
    out = {}
    for s in strengths:
        if lora:
            ST.set_strength(pipe.transformer, "lora0", 0.0 if s is None else float(s))
        out[strength_key(s)] = decode(to_stored(render(pipe, embeds, seeds, steps=steps, cfg=cfg, negative=empty),
                                                stats))
    return out


def calibrate(base: str | Path, distilled: str | Path, lora: str | Path, prompts_file, model_dir, *,
              seeds: Sequence[int], base_steps: int, cfg: float, distilled_steps: int,
              strengths: Sequence[float]) -> dict:
    """`dev2pro calibrate`'s measurement through its library (``strength.effect``, ``strength.calibrate``) with
    batched renders: the LoRA's effect at 1.0 on Base (true CFG ``cfg``, ``base_steps``) -- the RMS change of the
    fixed-seed final latents -- and the strength on the distilled model (``distilled_steps``, no CFG) whose effect
    equals it. Every prompt of ``prompts_file`` x ``seeds``. Returns ``Calibration.to_dict()``."""
    from .. import strength as ST

    prompts = load_prompts(prompts_file)
    n = prompts["prompt_embeds"].shape[0]
    embeds = prompts["prompt_embeds"].repeat_interleave(len(seeds), dim=0)
    flat_seeds = [int(s) for _ in range(n) for s in seeds]

    def runner(target, steps, scale, is_distilled):
        pipe, _ = load_klein(target, lora, model_dir, is_distilled)

        def latents_at(strength: float) -> torch.Tensor:
            ST.set_strength(pipe.transformer, "lora0", strength)
            return render(pipe, embeds, flat_seeds, steps=steps, cfg=scale, negative=prompts["empty_embeds"])
        return latents_at

    ref_at = runner(base, base_steps, cfg, False)
    reference = ST.effect(ref_at(1.0), ref_at(0.0))
    tgt_at = runner(distilled, distilled_steps, 1.0, True)
    tgt_base = tgt_at(0.0)
    return ST.calibrate(reference, lambda s: ST.effect(tgt_at(s), tgt_base), strengths).to_dict()


def save_samples(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    from ..outputs import atomic_path

    with atomic_path(Path(path), overwrite=True, folder=False) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def load_samples(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def save_grid(rgb: np.ndarray, path: Path, per_class: int) -> None:
    """Samples (class-major) as one PNG: rows digits 0-9, columns sampling seeds."""
    from .world import grid

    grid(rgb, rows=10, cols=per_class, scale=4).save(path)

