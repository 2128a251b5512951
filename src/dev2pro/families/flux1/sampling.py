"""Rendering FLUX.1 with diffusers' ``FluxPipeline`` around any transformer: the model folder's VAE, scheduler and
(optionally) text stack, prompts encoded once with CLIP (pooled) + T5 (sequence), images or final latents.

Guidance comes resolved (``sampling.Guidance``): embedded on dev-like bases, true CFG (a second forward with the
negative prompt) on bases without the embedding. Each image has its own seeded CPU generator, so an image depends
on its seed only (not on batch composition or device RNG state) and the same seed repeats bit for bit on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from ...errors import UserError
from ...flux.fp8 import compute_dtype
from ..family import each_prompt_and_seed
from ...flux.latents import check_image_size, load_vae, unpack
from ...text import TEXT_COMPONENTS, Embeds, encode_each, free_memory, load_text_encoders

SCHEDULER = "scheduler"


def load_components(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    text_encoders: bool = True) -> dict:
    """VAE, scheduler and (``text_encoders=True``) the text stack of ``text.load_text_encoders`` from a
    FLUX.1-dev-layout folder, offline; skipped text parts come back as None (callers that hold embeddings)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist: pass a FLUX.1-dev-layout diffusers folder "
                        "(model_index.json, vae/, text_encoder/, ...), e.g. one written by `dev2pro init-tiny`")
    wanted = ["vae", *(TEXT_COMPONENTS if text_encoders else ()), SCHEDULER]
    missing = [n for n in wanted if not (root / n).is_dir()]
    if missing:
        raise UserError(f"model folder {root} lacks {', '.join(missing)}/: it must have the FLUX.1-dev diffusers "
                        "layout (download the whole repo, not only the transformer)")
    out = {"vae": load_vae(root, dtype=dtype), **{n: None for n in TEXT_COMPONENTS}}
    try:
        out[SCHEDULER] = FlowMatchEulerDiscreteScheduler.from_pretrained(root / SCHEDULER, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {root / SCHEDULER} as FlowMatchEulerDiscreteScheduler: {e}") from None
    if text_encoders:
        pipe = load_text_encoders(root, "cpu", dtype)
        out.update({n: getattr(pipe, n) for n in TEXT_COMPONENTS})
    return out


def build_pipeline(components: dict, transformer=None, progress: bool = False):
    """A FluxPipeline from ``load_components`` output; any component (text encoders, transformer) may be None."""
    parts = {n: components.get(n) for n in ("vae", SCHEDULER, *TEXT_COMPONENTS)}
    pipe = FluxPipeline(transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def encode_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 512) -> list[Embeds]:
    """Encode each prompt with the pipeline's CLIP (pooled) and T5 (sequence): [(embeds [1,seq,D], pooled [1,P])]."""
    return encode_each(pipe, prompts, max_sequence_length, pipe._execution_device)


def encode_and_free(components: dict, prompts: Sequence[str], negative: str = "", device: str | torch.device = "cpu",
                    max_sequence_length: int = 512) -> tuple[list[Embeds], Embeds]:
    """Encode ``prompts`` and the negative on ``device``, then drop the text encoders from ``components``.

    Returns (prompt embeddings, negative embedding), on the CPU. Freeing CLIP/T5 before the transformer is moved to
    the device is what lets FLUX.1 sample on a 24 GB card.
    """
    for name in ("text_encoder", "text_encoder_2"):
        components[name].to(device)
    pipe = build_pipeline(components)
    embeds = encode_prompts(pipe, list(prompts) + [negative], max_sequence_length)
    del pipe
    for name in TEXT_COMPONENTS:
        components[name] = None
    free_memory(device)
    return embeds[:-1], embeds[-1]


@torch.no_grad()
def render(pipe, embeds: Sequence[Embeds], seeds: Sequence[int], guidance, *,
           negative: Embeds | None = None, steps: int = 20, width: int = 1024, height: int = 1024) -> list:
    """Render every (prompt embedding, seed) pair, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...] as PIL images.

    ``guidance`` is resolved once per run (``sampling.resolve_guidance``) for this transformer. ``negative`` (embeddings)
    is the true-CFG negative; default: the empty prompt, encoded with the pipeline's text encoders. The transformer is put in eval mode for the call and restored afterwards (callers mid-training).
    """
    transformer, g = pipe.transformer, guidance
    check_image_size(pipe, width, height)
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    device = pipe._execution_device
    dtype = compute_dtype(transformer)
    use_cfg = g.cfg > 1.0
    if use_cfg and negative is None:
        if pipe.text_encoder is None:
            raise ValueError("true CFG needs a negative prompt embedding: pass negative= (this pipeline has no "
                             "text encoders to encode the empty prompt)")
        negative = encode_prompts(pipe, [""], max_sequence_length=embeds[0][0].shape[1])[0]
    extra = {}
    if use_cfg:
        extra = dict(negative_prompt_embeds=negative[0].to(device, dtype),
                     negative_pooled_prompt_embeds=negative[1].to(device, dtype), true_cfg_scale=g.cfg)
    def draw(pair, generator):
        prompt_embeds, pooled = pair
        out = pipe(prompt_embeds=prompt_embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                   num_inference_steps=steps, width=width, height=height, generator=generator,
                   output_type="latent", **g.pipeline_kwargs(transformer), **extra)
        return decode(pipe, out.images, width, height)[0]

    return each_prompt_and_seed(transformer, embeds, seeds, draw)


@torch.no_grad()
def decode(pipe, packed: torch.Tensor, width: int, height: int) -> list:
    """Packed latents (B, T, C*4) -> PIL images, as FluxPipeline decodes them but in the VAE's own dtype: the
    pipeline hands the VAE latents in the transformer's dtype, so a bf16 transformer beside the fp32 VAE that
    training keeps for caching crashed ("Input type (BFloat16) and bias type (float)")."""
    vae = pipe.vae
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    image = vae.decode(latents.to(next(vae.parameters()).device, vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@torch.no_grad()
def render_latents(pipe, embeds: Sequence[Embeds], seeds: Sequence[int], guidance, *,
                   negative: Embeds | None = None, steps: int = 20, width: int = 1024, height: int = 1024,
                   batch_size: int = 64) -> torch.Tensor:
    """Like ``render`` for aligned lists (image i = ``embeds[i]`` with ``seeds[i]``), batched, returning the
    denoised latents (N, C, height/8, width/8) instead of decoded images -- for evaluations that sample hundreds
    of small images or decode with something other than the pipeline's VAE. Each image still gets its own seeded
    CPU generator, so image i equals the one ``render`` makes for that prompt and seed (up to batch numerics)."""
    if len(embeds) != len(seeds):
        raise ValueError(f"{len(embeds)} prompt embeddings but {len(seeds)} seeds: pass aligned lists")
    transformer, g = pipe.transformer, guidance
    multiple = check_image_size(pipe, width, height)
    device, dtype = pipe._execution_device, compute_dtype(transformer)
    use_cfg = g.cfg > 1.0
    if use_cfg and negative is None:
        raise ValueError("true CFG needs a negative prompt embedding: pass negative=")
    was_training = transformer.training
    transformer.eval()
    out = []
    try:
        for lo in range(0, len(seeds), batch_size):
            pe = torch.cat([e[0] for e in embeds[lo:lo + batch_size]]).to(device, dtype)
            pooled = torch.cat([e[1] for e in embeds[lo:lo + batch_size]]).to(device, dtype)
            n = pe.shape[0]
            extra = {}
            if use_cfg:
                extra = dict(negative_prompt_embeds=negative[0].expand(n, -1, -1).to(device, dtype),
                             negative_pooled_prompt_embeds=negative[1].expand(n, -1).to(device, dtype),
                             true_cfg_scale=g.cfg)
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[lo:lo + batch_size]]
            tokens = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=steps, width=width,
                          height=height, generator=gens, output_type="latent", **g.pipeline_kwargs(transformer),
                          **extra).images
            out.append(unpack(tokens.float().cpu(), 2 * (height // multiple), 2 * (width // multiple)))
    finally:
        transformer.train(was_training)
    return torch.cat(out)
