"""Text encoding for Flux: CLIP (pooled) + T5 (sequence) from a FLUX.1-dev-layout model folder, offline.

One encoder stack serves caching (`dev2pro train`'s data step, `dev2pro cache`), training (sample prompts) and
sampling: a text-only diffusers ``FluxPipeline`` (no transformer, no VAE), whose ``encode_prompt`` is the
reference for how Flux tokenises and embeds. Embeddings leave here in fp32 on the CPU, so a caller can encode
everything first, free the encoders (T5-XXL is ~9.5 GB in bf16) and only then put the transformer on the device.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import FluxPipeline

from .errors import UserError

# Sub-folders of a FLUX.1-dev diffusers folder that text encoding needs.
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

Embeds = tuple[torch.Tensor, torch.Tensor]  # (T5 prompt_embeds [1, seq, D], CLIP pooled [1, P])


def load_text_encoders(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """CLIP + T5 (and their tokenizers, plus the scheduler) as a text-only FluxPipeline on ``device`` in ``dtype``."""
    root = Path(model_dir)
    if not (root / "model_index.json").is_file():
        raise UserError(f"model folder {root} is not a FLUX.1-dev-layout model folder (no model_index.json); it "
                        f"must hold vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    missing = [n for n in TEXT_COMPONENTS if not (root / n).is_dir()]
    if missing:
        raise UserError(f"model folder {root} lacks {', '.join(missing)}/: it must have the FLUX.1-dev diffusers "
                        "layout (download the whole repo, not only the transformer)")
    try:
        pipe = FluxPipeline.from_pretrained(root, transformer=None, vae=None, local_files_only=True,
                                            torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the text encoders from {root}: {e}") from None
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe.to(device)


@torch.no_grad()
def encode_texts(pipe, texts: Sequence[str], max_length: int, device=None) -> dict[str, torch.Tensor]:
    """``texts`` -> {"prompt_embeds" (B, seq, D), "pooled" (B, P)} in fp32 on the CPU, in one batch."""
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise ValueError("this pipeline has no text encoders: load them with load_text_encoders, or pass prompt "
                         "embeddings")
    pe, pooled, _ = pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=device,
                                       max_sequence_length=max_length)
    return {"prompt_embeds": pe.float().cpu(), "pooled": pooled.float().cpu()}


def text_encoder(pipe, device, max_length: int) -> Callable[[list[str]], dict]:
    """``encode_texts`` bound to a pipeline, device and T5 length: the ``encode_fn`` the caches take."""
    return lambda texts: encode_texts(pipe, texts, max_length, device)


def encode_each(pipe, texts: Sequence[str], max_length: int, device=None) -> list[Embeds]:
    """One (prompt_embeds [1, seq, D], pooled [1, P]) pair per text, each encoded on its own (as a sampler does)."""
    out = []
    for text in texts:
        t = encode_texts(pipe, [text], max_length, device)
        out.append((t["prompt_embeds"], t["pooled"]))
    return out


def encoder_identity(folder: Path) -> str:
    """A cheap identity for the encoders of a model folder: configs + weight-file headers, sizes and mtimes."""
    h = hashlib.sha256()
    for sub in ("vae", *TEXT_COMPONENTS):
        d = Path(folder) / sub
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            st = f.stat()
            h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def free_memory(device) -> None:
    """Return freed encoders' memory (host and, on CUDA, the cache) before the transformer arrives."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
