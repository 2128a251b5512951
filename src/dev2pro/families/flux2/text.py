"""Text encoding for FLUX.2: klein's Qwen3 (hidden states 9/18/27 stacked) and dev's Mistral3 (10/20/30), through
the pipelines' own code.

``Flux2KleinPipeline.encode_prompt`` is the reference: each prompt is wrapped in Qwen3's chat template as one user
message with ``enable_thinking=False`` (so the text ends in an empty ``<think>`` block), padded to 512 tokens, run
through the causal LM with the attention mask, and hidden states 9, 18 and 27 are stacked along the feature axis:
(B, 512, 3 x hidden) = 7680 wide for Qwen3-4B, 12288 for Qwen3-8B. The transformer gets no attention mask, so the
padding positions are part of the conditioning and are cached as they are (never trimmed). Text position ids are
4-axis (t, h, w, l) = (0, 0, 0, token index) and depend only on the length: they are rebuilt, not cached.

We never reimplement that: a text-only pipeline (``transformer=None, vae=None``) calls its own ``encode_prompt``, as
``dev2pro.text`` does for FLUX.1. The negative / caption-dropout embedding is the empty prompt "" through the same
path, exactly what the pipeline's true CFG uses for Base. FLUX.2 dev (``Flux2Pipeline``) works the same way with
BFL's system message before the prompt, Mistral-Small-3.x and layers 10/20/30; which pipeline a folder needs is read
from its ``model_index.json``.

Cached records are bf16 (7.7-15k wide x 512 tokens: 8-16 MB per caption, twice that in fp32); embeddings handed to
a caller in memory are fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...errors import UserError
from .spec import TEXT_ENCODERS

TEXT_COMPONENTS = ("text_encoder", "tokenizer")
MAX_LENGTH = 512  # Flux2KleinPipeline's default max_sequence_length (tokenizer_max_length)
LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline's
PIPELINES = ("Flux2KleinPipeline", "Flux2Pipeline")
CACHE_DTYPE = torch.bfloat16
EMPTY_PROMPT = ""  # the pipeline's negative prompt for true CFG


def load_text_encoder(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """Text encoder + tokenizer (+ scheduler) as a text-only ``Flux2KleinPipeline`` (or ``Flux2Pipeline`` for a
    FLUX.2 dev folder) on ``device`` in ``dtype``, offline."""
    import diffusers  # lazy: seconds to import

    root = Path(model_dir)
    name = check_folder(root)
    fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    try:
        pipe = getattr(diffusers, name).from_pretrained(root, transformer=None, vae=None, local_files_only=True,
                                                        dtype=torch.bfloat16 if fp8 else dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the FLUX.2 text encoder from {root}: {e}") from None
    pipe.text_encoder.eval().requires_grad_(False)
    if fp8:  # Linear weights stored in fp8 (per-tensor scaled), computed in bf16: Mistral 24B in ~25 GB, not 47
        from ...flux.fp8 import Fp8Policy, enable_fp8_storage

        enable_fp8_storage(pipe.text_encoder, Fp8Policy.from_names(["norms", "biases"]), compute_dtype=torch.bfloat16)
    return pipe.to(device)


def wants_mistral(spec) -> bool:
    """Whether a transformer reads dev's Mistral3 layers rather than klein's Qwen3: a published context width says
    so (a FLUX.2 dev de-distilled without its guidance embedding still reads Mistral3); other widths (tiny models)
    follow the guidance embedding, as only dev has one."""
    known = TEXT_ENCODERS.get(spec.context_dim)
    return known[0].startswith("Mistral") if known else not spec.is_klein


def check_folder(model_dir: str | Path, spec=None) -> str:
    """The pipeline class of a FLUX.2 model folder that holds its text stack; a one-line UserError naming what is
    missing and where to get it otherwise (before a run writes anything). ``spec``: the transformer it must feed."""
    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise UserError(f"model.path {root} is not a FLUX.2 diffusers folder (no model_index.json): point it at the "
                        "whole downloaded model folder (text_encoder/, tokenizer/, vae/, transformer/)")
    name = json.loads((root / "model_index.json").read_text()).get("_class_name", "Flux2KleinPipeline")
    if name not in PIPELINES:
        raise UserError(f"model folder {root} is a {name} folder, not FLUX.2 ({' or '.join(PIPELINES)})")
    wants = None if spec is None else wants_mistral(spec)
    dev = name == "Flux2Pipeline" if wants is None else wants
    repo = "black-forest-labs/FLUX.2-dev" if dev else "FLUX.2 klein"
    missing = [n for n in TEXT_COMPONENTS if not (root / n).is_dir() or not any((root / n).iterdir())]
    if missing:
        what = "Mistral3 (Mistral-Small-3.x 24B)" if dev else "Qwen3"
        raise UserError(f"model folder {root} lacks {' and '.join(m + '/' for m in missing)} (the {what} text "
                        f"encoder captions are encoded with): download the whole {repo} repo, not only the "
                        "transformer")
    if spec is not None and (name == "Flux2Pipeline") != wants:
        encoder = "a FLUX.2 dev (Mistral3)" if name == "Flux2Pipeline" else "a FLUX.2 klein (Qwen3)"
        model = f"a FLUX.2 {'dev' if wants else 'klein'} transformer (context {spec.context_dim})"
        raise UserError(f"{encoder} text encoder in {root} cannot feed {model}: use the text encoder of the same "
                        "model folder")
    return name


def default_layers(pipe) -> tuple[int, ...]:
    """The hidden layers a pipeline stacks by default: 9/18/27 for klein, 10/20/30 for dev."""
    return DEV_LAYERS if type(pipe).__name__ == "Flux2Pipeline" else LAYERS


@torch.no_grad()
def encode(pipe, texts: Sequence[str], max_length: int = MAX_LENGTH, layers: Sequence[int] | None = None,
           device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` -> (prompt_embeds (B, seq, 3 x hidden) fp32 on the CPU, text_ids (B, seq, 4)), in one batch."""
    if pipe.text_encoder is None:
        raise ValueError("this pipeline has no text encoder: load it with load_text_encoder, or pass prompt "
                         "embeddings")
    embeds, ids = pipe.encode_prompt(prompt=list(texts), device=device, max_sequence_length=max_length,
                                     text_encoder_out_layers=tuple(layers or default_layers(pipe)))
    return embeds.float().cpu(), ids.cpu()


def text_ids(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(B, seq, 4) position ids for cached embeddings: (t, h, w, l) = (0, 0, 0, i), as the pipeline builds them."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._prepare_text_ids(prompt_embeds)


def cache_record(pipe, texts: Sequence[str], max_length: int = MAX_LENGTH, layers: Sequence[int] | None = None,
                 device=None) -> dict[str, torch.Tensor]:
    """The cached-format record of a batch: {"prompt_embeds": (B, seq, 3 x hidden) bf16 on the CPU}."""
    embeds, _ = encode(pipe, texts, max_length, layers, device)
    return {"prompt_embeds": embeds.to(CACHE_DTYPE)}


def empty_prompt(pipe, max_length: int = MAX_LENGTH, layers: Sequence[int] | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, seq, D) fp32, text_ids) of "": the caption-dropout target and the true-CFG negative."""
    return encode(pipe, [EMPTY_PROMPT], max_length, layers, device)


def text_encoder(pipe, device, max_length: int = MAX_LENGTH,
                 layers: Sequence[int] | None = None) -> Callable[[list[str]], dict]:
    """``cache_record`` bound to a pipeline, device and length: the ``encode_fn`` the text cache takes."""
    return lambda texts: cache_record(pipe, texts, max_length, layers, device)


def cache_settings(pipe, max_length: int = MAX_LENGTH, layers: Sequence[int] | None = None) -> dict:
    """What, besides the encoder files, decides a cached embedding: part of the cache key."""
    return {"family": "flux2", "pipeline": type(pipe).__name__, "max_length": max_length,
            "layers": list(layers or default_layers(pipe)), "dtype": "bf16"}


def check_pairing(pipe, spec) -> None:
    """UserError unless the text stack fits the transformer ``spec`` (a klein encoder with a dev transformer...)."""
    dev_pipe = type(pipe).__name__ == "Flux2Pipeline"
    te = pipe.text_encoder.config
    width = 3 * getattr(te, "text_config", te).hidden_size
    wants = wants_mistral(spec)
    if dev_pipe != wants or width != spec.context_dim:
        encoder = f"{'a FLUX.2 dev (Mistral3)' if dev_pipe else 'a FLUX.2 klein (Qwen3)'} text encoder ({width} wide)"
        model = f"a FLUX.2 {'dev' if wants else 'klein'} transformer (context {spec.context_dim})"
        raise UserError(f"{encoder} cannot feed {model}: use the text encoder of the same model folder")
