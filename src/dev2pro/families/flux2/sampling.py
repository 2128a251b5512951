"""Rendering FLUX.2 with diffusers' own pipelines around any transformer and ready embeddings.

Guidance semantics per variant (``spec.SAMPLING``): klein Base has no guidance embedding and samples with true CFG
(``Flux2KleinPipeline(is_distilled=False)`` runs the empty-prompt branch itself when ``guidance_scale > 1``);
klein distilled is step-distilled (4 steps, no CFG: ``is_distilled=True`` ignores the scale); FLUX.2 dev takes
the scale as its embedded guidance (``Flux2Pipeline``). ``Guidance`` (``sampling.resolve_guidance``) is resolved
once per run; here it becomes the pipeline's ``guidance_scale``.

Each image has its own seeded CPU generator, as FLUX.1 sampling does, so an image depends on its seed only.
Latents come back from the pipeline un-normalised (VAE space) and are decoded in the VAE's own dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...flux.fp8 import compute_dtype
from ..family import each_prompt_and_seed


def build_pipeline(components: dict, transformer, distilled: bool = False, progress: bool = False):
    """``Flux2Pipeline`` for a transformer with a guidance embedding (dev), else ``Flux2KleinPipeline``; text
    encoders are not needed (embeddings are passed in)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    vae, scheduler = components["vae"], components["scheduler"]
    if transformer is not None and transformer.config.guidance_embeds:
        pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    else:
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  transformer=transformer, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def guidance_scale(pipe, guidance) -> float:
    """The pipeline's ``guidance_scale`` for a resolved ``sampling.Guidance``: the embedded value on dev, the
    true-CFG scale on klein (1 = no CFG; a distilled pipeline ignores it anyway)."""
    if guidance.embedded is not None and pipe.transformer.config.guidance_embeds:
        return float(guidance.embedded)
    return float(guidance.cfg)


@torch.no_grad()
def render(pipe, embeds: Sequence[tuple], seeds: Sequence[int], guidance, *, negative: tuple | None = None,
           steps: int = 4, width: int = 512, height: int = 512, references: Sequence | None = None) -> list:
    """Every (prompt embedding, seed) pair, prompt-major, as PIL images (``sampling.render``'s contract).
    ``embeds``: (prompt_embeds (1, L, D), None) pairs; ``negative``: the true-CFG negative (default "");
    ``references``: one PIL reference image -- or a list of them -- per prompt (the pipeline's ``image``: an
    edit), or None."""
    if references is not None and len(references) != len(embeds):
        raise ValueError(f"{len(references)} reference images for {len(embeds)} prompts: give one per prompt")
    transformer = pipe.transformer
    device, dtype = pipe._execution_device, compute_dtype(transformer)
    scale = guidance_scale(pipe, guidance)
    cfg = scale > 1.0 and not transformer.config.guidance_embeds and not pipe.config.get("is_distilled", False)
    extra = {}
    if cfg:
        if negative is None:
            raise ValueError("true CFG needs the negative prompt embedding (the empty prompt): pass negative=")
        extra["negative_prompt_embeds"] = negative[0].to(device, dtype)
    def draw(pair, generator):
        (pe, _), ref = pair
        image = {} if ref is None else {"image": list(ref) if isinstance(ref, (list, tuple)) else [ref]}
        latents = pipe(prompt_embeds=pe.to(device, dtype), num_inference_steps=steps, width=width,
                       height=height, generator=generator, guidance_scale=scale, output_type="latent",
                       **image, **extra).images
        return decode(pipe, vae_space(pipe, latents, height, width))[0]

    return each_prompt_and_seed(transformer, list(zip(embeds, references or [None] * len(embeds))), seeds, draw)


def vae_space(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pipeline's ``output_type="latent"`` result as VAE-space latents (B, 32, H/8, W/8). Klein's pipelines
    return those; ``Flux2Pipeline`` (dev) returns its packed, batch-normalised tokens (B, T, 128) instead, so its
    own tail is replayed here: scatter by the position ids, undo the VAE's batch norm, unpatchify 2x2."""
    if latents.ndim == 4:
        return latents
    grid = torch.empty(latents.shape[0], 1, height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2))
    x = pipe._unpack_latents_with_ids(latents, pipe._prepare_latent_ids(grid).to(latents.device))
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(x.device, x.dtype)
    return pipe._unpatchify_latents(x * std + mean)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list:
    """VAE-space latents (B, 32, H/8, W/8) -> PIL images, decoded in the VAE's dtype (a bf16 transformer beside
    the fp32 VAE kept for caching must not hand it bf16)."""
    vae = pipe.vae
    image = vae.decode(latents.to(next(vae.parameters()).device, vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@torch.no_grad()
def render_latents(pipe, embeds: Sequence[tuple], seeds: Sequence[int], guidance, *, negative: tuple | None = None,
                   steps: int = 4, width: int = 512, height: int = 512, batch_size: int = 1) -> torch.Tensor:
    """``sampling.render_latents``' contract for FLUX.2: aligned lists (image i = ``embeds[i]`` with ``seeds[i]``),
    returning the denoised VAE-space latents (N, 32, height/8, width/8) on the CPU in fp32. One image per call
    (``batch_size`` is accepted for the shared signature): each is its seed's alone."""
    if len(embeds) != len(seeds):
        raise ValueError(f"{len(embeds)} prompt embeddings but {len(seeds)} seeds: pass aligned lists")
    transformer = pipe.transformer
    device, dtype = pipe._execution_device, compute_dtype(transformer)
    scale = guidance_scale(pipe, guidance)
    cfg = scale > 1.0 and not transformer.config.guidance_embeds and not pipe.config.get("is_distilled", False)
    if cfg and negative is None:
        raise ValueError("true CFG needs the negative prompt embedding (the empty prompt): pass negative=")
    extra = {"negative_prompt_embeds": negative[0].to(device, dtype)} if cfg else {}
    was_training = transformer.training
    transformer.eval()
    out = []
    try:
        for (pe, _), seed in zip(embeds, seeds):
            generator = torch.Generator("cpu").manual_seed(int(seed))
            latents = pipe(prompt_embeds=pe.to(device, dtype), num_inference_steps=steps, width=width,
                           height=height, generator=generator, guidance_scale=scale, output_type="latent",
                           **extra).images
            out.append(vae_space(pipe, latents, height, width).float().cpu())
    finally:
        transformer.train(was_training)
    return torch.cat(out)
