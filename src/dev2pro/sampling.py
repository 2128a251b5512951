"""Sampling, any family: the right kind of guidance, a base with LoRAs, grids and PNGs with metadata. Each family
renders with its own diffusers pipeline (``families/flux1/sampling.py``: FluxPipeline, re-exported here as the
FLUX.1 API; ``families/flux2/sampling.py``), reached through ``Family.build_pipeline`` / ``render``.

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
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .arguments import parse_lora_arg, parse_seeds, read_prompts, slug  # noqa: F401 -- re-exported
from .choices import GUIDANCE_MODES
from .errors import UserError
from .flux.checkpoint import load_transformer, open_checkpoint
from .families.flux1.sampling import (SCHEDULER, build_pipeline, decode, encode_and_free,  # noqa: F401
                                      encode_prompts, load_components, render, render_latents)
from .flux.fp8 import compute_dtype  # noqa: F401 (API)
from .guidance_defaults import (FLUX1_GUIDANCE, FLUX1_STEPS, dedistilled, default_guidance,  # noqa: F401 (API)
                                own_settings, step_distilled)
from .lora.formats import load_lora
from .lora.ops import apply_lora
from .outputs import atomic_path
from .text import free_memory

MODES = GUIDANCE_MODES


# ------------------------------------------------------------------------------------------------ components
def guidance_mode(transformer) -> str:
    """'embedded' if the transformer has a guidance embedding, else 'true_cfg'."""
    return "embedded" if transformer.config.guidance_embeds else "true_cfg"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (Flux's native dtype), fp32 on CPU (bf16 matmuls there are slow and not bit-reproducible)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_base(path: str | os.PathLike, loras: Sequence[tuple[str, float]] = (), dtype: torch.dtype = torch.float32,
              fp8_storage: bool = False, allow_pickle: bool = False):
    """Transformer from any checkpoint ``load_transformer`` reads, with LoRAs (path, scale) applied as adapters.

    Returns (transformer, Checkpoint). With ``fp8_storage`` fp8 files stay fp8 in memory (compute in ``dtype``).
    A LoRA of the other model family (a FLUX.2 LoRA on a FLUX.1 base, or back) is a one-line UserError naming both.
    """
    header = open_checkpoint(path, allow_pickle=allow_pickle) if loras else None  # headers: a wrong LoRA fails first
    lws = [load_lora(lora_path, family=header.family, base=path) for lora_path, _ in loras]
    if loras:
        check_loras_fit(header, [p for p, _ in loras], lws, path)
    transformer, ckpt = load_transformer(path, dtype=dtype, fp8_storage=fp8_storage, allow_pickle=allow_pickle)
    for i, (lw, (lora_path, scale)) in enumerate(zip(lws, loras)):
        try:  # peft keeps adapters in ModuleDicts: names must be unique and free of '.'
            apply_lora(transformer, lw, scale=scale, adapter_name=f"lora{i}")
        except UserError as e:
            raise UserError(f"LoRA {lora_path} on {path}: {e}") from None
    # Adapter weights keep peft's dtype (fp32 for bf16 bases): peft casts activations to it and back per layer.
    transformer.eval().requires_grad_(False)
    return transformer, ckpt


def check_loras_fit(header, paths: Sequence, lws: Sequence, base) -> None:
    """Plain LoRAs against the shapes ``header`` (a Checkpoint) declares, on a meta-device model (no memory): a LoRA
    of another size is one line naming its file before any weights load."""
    from . import families
    from .lora.ops import check_fits

    model = None
    for path, lw in zip(paths, lws):
        if getattr(lw, "adapter", "lora") != "lora":
            continue  # LyCORIS / DoRA: checked by apply_lora (their own module shapes)
        model = model or families.build_transformer(header.spec(), device="meta")
        try:
            check_fits(model, lw)
        except UserError as e:
            raise UserError(f"LoRA {path} does not fit {base}: {e}") from None


def check_inputs_exist(model_dir: str | os.PathLike, transformer: str | os.PathLike | None,
                       loras: Sequence[tuple[str, float]]) -> None:
    """Fail fast (before minutes of loading) on a missing model folder, transformer file or LoRA file, and on a
    LoRA and a model passed in each other's place (told from the safetensors header: ``lora.sniff``)."""
    from .lora.sniff import is_base_model, lora_layout

    sniffable = lambda p: Path(p).is_file() and Path(p).suffix.lower() == ".safetensors"  # noqa: E731
    if Path(model_dir).is_file():
        what = ("a LoRA: pass it with --lora (the model is the diffusers model folder)" if sniffable(model_dir)
                and lora_layout(model_dir) else "a file: pass the diffusers model folder (FLUX.1 or FLUX.2: its text "
                "encoders and VAE), and a transformer file with --transformer")
        raise UserError(f"model folder {model_dir} is {what}")
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder {model_dir} does not exist: pass a diffusers model folder (FLUX.1 or FLUX.2)")
    if transformer is not None and not Path(transformer).exists():
        raise UserError(f"transformer checkpoint {transformer} does not exist")
    for lora_path, _ in loras:
        if not Path(lora_path).is_file():
            raise UserError(f"LoRA file {lora_path} does not exist")
        if sniffable(lora_path) and is_base_model(lora_path):
            raise UserError(f"LoRA file {lora_path} is a base model (a Flux transformer), not a LoRA: render it with "
                            f"--transformer {lora_path} (or merge a LoRA into it with dev2pro lora merge)")


# model_index.json's pipeline -> the folder's name in messages (FLUX.2 klein and dev share a family, not a text stack)
FOLDER_TITLES = {"FluxPipeline": "FLUX.1", "Flux2KleinPipeline": "FLUX.2 klein", "Flux2Pipeline": "FLUX.2 dev"}


def check_folder_family(model_dir: str | os.PathLike, transformer: str | os.PathLike, header,
                        flag: str = "--transformer") -> None:
    """A transformer (``header``: its ``open_checkpoint``) of another model than the folder it is rendered with --
    another family, FLUX.2 klein and dev, or another size (`train`'s ``preflight.check_folder_model``): one line
    naming both, before the folder's text encoders load (a size mix ended in a raw shape error)."""
    from .families import of_folder
    from .train.preflight import check_folder_model

    folder = of_folder(model_dir)
    if folder.name == header.family.name:
        return check_folder_model(str(transformer), str(model_dir), header, (flag, "--model"))
    name = json.loads((Path(model_dir) / "model_index.json").read_text()).get("_class_name")
    raise UserError(f"{flag} {transformer} is {header.family.title}, the model folder {model_dir} is "
                    f"{FOLDER_TITLES.get(name, folder.title)}: give a transformer of the folder's family "
                    f"({folder.title}) or the {header.family.title} model folder it belongs to")


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


def unknown_variant_note(spec, path) -> str | None:
    """A note for a FLUX.2 klein file that does not say whether it is Base or distilled (a BFL / ComfyUI single
    file: no model_index.json beside it, no dev2pro metadata), which is then rendered as Base; None otherwise."""
    from .families.flux2.spec import KLEIN_UNKNOWN  # on use: the registry imports this module's users

    if getattr(spec, "variant", None) != KLEIN_UNKNOWN:
        return None
    return (f"note: {path} does not say whether it is FLUX.2 klein Base or distilled (no model_index.json beside "
            f"it, no dev2pro metadata), so it is rendered as Base ({spec.sampling.steps} steps, true CFG "
            f"{spec.sampling.scale:g}); if it is the distilled model, record that once: dev2pro convert {path} "
            f"OUT.safetensors --variant klein-distilled")


def no_cfg() -> Guidance:
    """What a step-distilled base is rendered with: no CFG (and no guidance embedding to feed)."""
    return resolve_guidance(False, "auto", 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ rendering
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
    if _CONTROL.search(text):  # only then: an ordinary label keeps its spacing (titles use "  |  ")
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

