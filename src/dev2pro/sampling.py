"""Sampling: diffusers' FluxPipeline around any transformer, the right kind of guidance, grids and PNGs with metadata.

Two kinds of guidance exist for Flux bases, and which one a base needs is a fact about its weights:

  embedded  guidance-distilled bases (FLUX.1-dev, and dev2pro which keeps the embedding) take the guidance value as
            an input (``guidance_in`` / ``guidance_embedder``): one forward pass per step. The Flux-Dev2Pro recipe
            trains a LoRA on dev2pro at guidance 1.0 and samples it on FLUX.1-dev at ~3.5 this way.
  true_cfg  bases without the embedding (pro, de-distilled models) need classifier-free guidance: a second forward
            with a negative prompt (default: the empty prompt) each step, out = neg + cfg * (cond - neg).

``mode="auto"`` picks from ``transformer.config.guidance_embeds``. The two combine: embedded guidance plus a true-CFG
scale > 1. In true_cfg mode the CFG scale is ``true_cfg`` when set (> 1), else ``guidance``, so ``--guidance 3.5``
means "strength 3.5" on either kind of base; a guidance embedding, if the base has one, then gets the neutral 1.0.

Text encoders are optional: pipelines take ready embeddings (``encode_prompts``), so a caller can encode every prompt
once, free the encoders (T5-XXL is ~9.5 GB) and only then put the transformer on the device -- what the trainer does
with its cached embeddings. Each image gets its own CPU ``torch.Generator`` seeded with its seed, so an image depends
on its seed only (not on batch composition or device RNG state), and the same seed repeats bit for bit on CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .arguments import parse_lora_arg, parse_seeds, read_prompts, slug  # noqa: F401 -- re-exported
from .choices import GUIDANCE_MODES
from .errors import UserError
from .flux.checkpoint import load_transformer
from .flux.latents import load_vae, unpack
from .lora.formats import load_lora
from .lora.ops import apply_lora
from .outputs import atomic_path
from .text import TEXT_COMPONENTS, Embeds, encode_each, free_memory, load_text_encoders

MODES = GUIDANCE_MODES
SCHEDULER = "scheduler"


# ------------------------------------------------------------------------------------------------ components
def guidance_mode(transformer) -> str:
    """'embedded' if the transformer has a guidance embedding, else 'true_cfg'."""
    return "embedded" if transformer.config.guidance_embeds else "true_cfg"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (Flux's native dtype), fp32 on CPU (bf16 matmuls there are slow and not bit-reproducible)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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


def load_base(path: str | os.PathLike, loras: Sequence[tuple[str, float]] = (), dtype: torch.dtype = torch.float32,
              fp8_storage: bool = False):
    """Transformer from any checkpoint ``load_transformer`` reads, with LoRAs (path, scale) applied as adapters.

    Returns (transformer, Checkpoint). With ``fp8_storage`` fp8 files stay fp8 in memory (compute in ``dtype``).
    """
    transformer, ckpt = load_transformer(path, dtype=dtype, fp8_storage=fp8_storage)
    for i, (lora_path, scale) in enumerate(loras):
        lw = _load_lora_for(transformer, lora_path)
        # peft keeps adapters in ModuleDicts: names must be unique and free of '.'
        apply_lora(transformer, lw, scale=scale, adapter_name=f"lora{i}")
    # Adapter weights keep peft's dtype (fp32 for bf16 bases): peft casts activations to it and back per layer.
    transformer.eval().requires_grad_(False)
    return transformer, ckpt


def _load_lora_for(transformer, path) -> object:
    """A LoRA file read with the key maps of ``transformer``'s family: FLUX.1's reader refuses FLUX.2 modules
    (``attn.to_qkv_mlp_proj``, single blocks' plain ``attn.to_out``) that every trained klein LoRA has."""
    from . import families

    if families.of_model(transformer).name != "flux2":
        return load_lora(path)
    from safetensors import SafetensorError, safe_open

    from .families.flux2 import lora_keys
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors LoRA file ({e})") from None
    try:
        return lora_keys.read_lora(sd, metadata, len(transformer.transformer_blocks),
                                   len(transformer.single_transformer_blocks))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def check_inputs_exist(model_dir: str | os.PathLike, transformer: str | os.PathLike | None,
                       loras: Sequence[tuple[str, float]]) -> None:
    """Fail fast (before minutes of loading) on a missing model folder, transformer file or LoRA file."""
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder {model_dir} does not exist: pass a FLUX.1-dev-layout diffusers folder")
    if transformer is not None and not Path(transformer).exists():
        raise UserError(f"transformer checkpoint {transformer} does not exist")
    for lora_path, _ in loras:
        if not Path(lora_path).is_file():
            raise UserError(f"LoRA file {lora_path} does not exist")


# ------------------------------------------------------------------------------------------------ guidance
@dataclass(frozen=True)
class Guidance:
    """What a render actually applies: the resolved mode, the embedded value (None: no embedding) and CFG scale."""

    mode: str
    embedded: float | None
    cfg: float  # <= 1: no second forward

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for titles and logs, e.g. ``embedded guidance 3.5`` or ``true CFG 3.5``."""
        if self.mode == "embedded":
            return f"guidance {self.embedded:g}" + (f", true CFG {self.cfg:g}" if self.cfg > 1.0 else "")
        return f"true CFG {self.cfg:g}" if self.cfg > 1.0 else "no CFG" + (
            f" (guidance {self.embedded:g})" if self.embedded is not None else "")

    def pipeline_kwargs(self, transformer) -> dict:
        """The FluxPipeline arguments for this guidance (the pipeline builds the guidance tensor from them)."""
        if (self.embedded is not None) != bool(transformer.config.guidance_embeds):
            raise ValueError(f"{self} was resolved for a base {'with' if self.embedded is not None else 'without'} "
                             "a guidance embedding; resolve it for this transformer")
        return {"guidance_scale": self.embedded if self.embedded is not None else 1.0}


def resolve_guidance(guidance_embeds: bool, mode: str = "auto", guidance: float = 3.5,
                     true_cfg: float = 1.0) -> Guidance:
    """Turn (mode, guidance, true_cfg) into what the pipeline gets for a base with/without a guidance embedding."""
    if mode not in MODES:
        raise UserError(f"guidance mode {mode!r} is not one of {', '.join(MODES)}")
    if not (math.isfinite(guidance) and guidance > 0):  # NaN rendered a black image with exit 0
        raise UserError(f"guidance {guidance} must be a finite number > 0 (3.5 is dev's default)")
    if not math.isfinite(true_cfg) or true_cfg < 1.0:
        raise UserError(f"true CFG scale {true_cfg} must be a finite number >= 1 (1 turns true CFG off)")
    has_embedding = bool(guidance_embeds)
    if mode == "auto":
        mode = "embedded" if has_embedding else "true_cfg"
    if mode == "embedded":
        if not has_embedding:
            raise UserError("mode 'embedded' needs a base with a guidance embedding (FLUX.1-dev, dev2pro); this "
                            "transformer has none: use mode 'true_cfg' (or 'auto')")
        return Guidance("embedded", float(guidance), float(true_cfg))
    cfg = true_cfg if true_cfg > 1.0 else guidance
    if cfg < 1.0:
        raise UserError(f"true CFG scale {cfg} (from --guidance) must be >= 1 (1 turns true CFG off)")
    return Guidance("true_cfg", 1.0 if has_embedding else None, float(cfg))


def compute_dtype(transformer) -> torch.dtype:
    """The dtype the transformer computes in (fp8-stored weights compute in their ``compute_dtype``)."""
    layer = transformer.x_embedder
    layer = getattr(layer, "base_layer", layer)  # peft wraps targeted linears
    return getattr(layer, "compute_dtype", layer.weight.dtype)


# ------------------------------------------------------------------------------------------------ rendering
def _check_size(pipe, width: int, height: int) -> int:
    """Image sides must be positive multiples of the VAE factor x 2 (2x2 latent packing); returns that multiple."""
    multiple = pipe.vae_scale_factor * 2
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise UserError(f"image size {width}x{height} must be positive multiples of {multiple}")
    return multiple


@torch.no_grad()
def render(pipe, embeds: Sequence[Embeds], seeds: Sequence[int], guidance: Guidance, *,
           negative: Embeds | None = None, steps: int = 20, width: int = 1024, height: int = 1024) -> list:
    """Render every (prompt embedding, seed) pair, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...] as PIL images.

    ``guidance`` is resolved once per run (``resolve_guidance``) for this transformer. ``negative`` (embeddings)
    is the true-CFG negative; default: the empty prompt, encoded with the pipeline's text encoders. The transformer is put in eval mode for the call and restored afterwards (callers mid-training).
    """
    transformer, g = pipe.transformer, guidance
    _check_size(pipe, width, height)
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
    was_training = transformer.training
    transformer.eval()
    images = []
    try:
        for prompt_embeds, pooled in embeds:
            for seed in seeds:
                generator = torch.Generator("cpu").manual_seed(int(seed))  # CPU noise: same image on any device
                out = pipe(prompt_embeds=prompt_embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                           num_inference_steps=steps, width=width, height=height, generator=generator,
                           output_type="latent", **g.pipeline_kwargs(transformer), **extra)
                images.append(decode(pipe, out.images, width, height)[0])
    finally:
        transformer.train(was_training)
    return images


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
def render_latents(pipe, embeds: Sequence[Embeds], seeds: Sequence[int], guidance: Guidance, *,
                   negative: Embeds | None = None, steps: int = 20, width: int = 1024, height: int = 1024,
                   batch_size: int = 64) -> torch.Tensor:
    """Like ``render`` for aligned lists (image i = ``embeds[i]`` with ``seeds[i]``), batched, returning the
    denoised latents (N, C, height/8, width/8) instead of decoded images -- for evaluations that sample hundreds
    of small images or decode with something other than the pipeline's VAE. Each image still gets its own seeded
    CPU generator, so image i equals the one ``render`` makes for that prompt and seed (up to batch numerics)."""
    if len(embeds) != len(seeds):
        raise ValueError(f"{len(embeds)} prompt embeddings but {len(seeds)} seeds: pass aligned lists")
    transformer, g = pipe.transformer, guidance
    multiple = _check_size(pipe, width, height)
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


# ------------------------------------------------------------------------------------------------ grids and files
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` on one line (newlines, tabs and other control characters become spaces: Pillow cannot measure
    multi-line text, and a label band holds one line) and cut with an ellipsis so it fits ``width`` pixels."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_grid(images: Sequence, rows: int, cols: int, labels: Sequence[str | None] | None = None, pad: int = 0,
              font_size: int = 12):
    """Tile equally sized images row-major into ``rows`` x ``cols``; ``labels`` (one per cell) go in a band above.

    Size without labels: (cols*W + (cols-1)*pad, rows*H + (rows-1)*pad). Labels add a band per row.
    """
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("grid images must all have the same size")
    font = _font(font_size)
    band = font_size + 6 if labels is not None and any(labels) else 0
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * (h + band) + (rows - 1) * pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * (w + pad), r * (h + band + pad)
        grid.paste(im.convert("RGB"), (x, y + band))
        if band and labels[i]:
            draw.text((x + 2, y + 2), _fit(draw, str(labels[i]), font, w - 4), fill="black", font=font)
    return grid


LABEL_FONT_SIZE = 12  # label bands are LABEL_FONT_SIZE + 6 pixels high


def make_labelled_grid(images: Sequence, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                       font_size: int = LABEL_FONT_SIZE):
    """A sample grid people can read: one row per prompt, one column per seed, row-major ``images``.

    Layout (band = ``font_size + 6`` px): a title band (e.g. the step), a header band with each column's label
    (the seed), then per row a band with its label (the prompt, cut to fit) above the images. Size:
    (cols*W, rows*H + (rows + 2) * band). ``make_grid`` stays the plain tiling.
    """
    rows, cols = len(row_labels), len(col_labels)
    body = make_grid(images, rows=rows, cols=cols)
    w, h = images[0].size
    band = font_size + 6
    grid = Image.new("RGB", (cols * w, 2 * band + rows * (h + band)), "white")
    draw, font = ImageDraw.Draw(grid), _font(font_size)
    draw.text((2, 2), _fit(draw, title, font, cols * w - 4), fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((c * w + 2, band + 2), _fit(draw, str(label), font, w - 4), fill=(60, 60, 60), font=font)
    for r, label in enumerate(row_labels):
        y = 2 * band + r * (h + band)
        draw.rectangle([0, y, cols * w - 1, y + band - 1], fill=(235, 235, 235))
        draw.text((2, y + 2), _fit(draw, str(label), font, cols * w - 4), fill="black", font=font)
        grid.paste(body.crop((0, r * h, cols * w, (r + 1) * h)), (0, y + band))
    return grid


def save_png(image, path: str | os.PathLike, info: dict, overwrite: bool = False) -> Path:
    """Write a PNG atomically with each ``info`` item as a text chunk (non-strings as JSON)."""
    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(str(key), value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    with atomic_path(path, overwrite=overwrite, what="image") as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return Path(path)


# ------------------------------------------------------------------------------------------------ any family
def prepare_family(model_dir: str | os.PathLike, family, prompts: Sequence[str], negative: str = "",
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   max_sequence_length: int = 512) -> tuple[dict, list, object]:
    """(components {vae, scheduler}, prompt embeddings, negative embedding) for ``family``'s model folder, the
    text encoders loaded on ``device``, used once and freed (FLUX.1: ``load_components`` + ``encode_and_free``)."""
    if family.name == "flux1":
        components = load_components(model_dir, dtype)
        embeds, negative_embeds = encode_and_free(components, prompts, negative, device, max_sequence_length)
        return components, embeds, negative_embeds
    pipe = family.load_text(model_dir, device, dtype)
    encode = family.text_encoder(pipe, device, max_sequence_length)
    out = [family.embeds_of({k: v[0] for k, v in encode([text]).items()}) for text in [*prompts, negative]]
    components = {"vae": family.load_vae(model_dir, "cpu", dtype), SCHEDULER: pipe.scheduler}
    del pipe
    free_memory(device)
    return components, out[:-1], out[-1]

