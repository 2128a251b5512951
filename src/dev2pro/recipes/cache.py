"""`dev2pro cache INPUT... --model DIR --out DIR`: encode a dataset once into sharded safetensors for training.

Inputs are image/caption folders and/or webdataset-style .tar shards; the output is ``shard-NNNNN.safetensors``
files of N samples (VAE latents + text embeddings), ``index.json`` and ``empty.safetensors`` (see ``data.shards``).
The model folder's family (FLUX.1: CLIP + T5 and the 16-channel VAE; FLUX.2: Qwen3 or Mistral and the 32-channel
VAE, from its ``model_index.json``) says how, exactly as `train` encodes its folders, and is recorded in the index
so that training refuses shards of another family. Run it again after a kill and it continues: complete shards are
skipped. Train on the result with ``data.shards = "OUT/index.json"`` in a train or dedistill config.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import families
from ..choices import TEXT_DTYPES
from ..data.buckets import make_buckets
from ..data.shards import collect_sources, write_shards
from ..errors import UserError
from ..flux.checkpoint import DTYPE_CHOICES
from ..noise import quiet_libraries
from ..outputs import write_failure
from ..text import encoder_identity, free_memory
from ..train.preflight import check_text_dtype


def cache(inputs: list[str], model_dir: str, out_dir: str, per_shard: int = 1000, resolution: int = 512,
          bucket_step: int = 64, t5_max_length: int = 512, default_caption: str = "", batch_size: int = 4,
          device: str | None = None, min_size: int = 16, recursive: bool = False,
          strict: bool = False, family: str = "auto", text_device: str | None = None,
          text_dtype: str = "fp32", controls: Sequence[str] = ()) -> dict:
    """Encode ``inputs`` into shards under ``out_dir``; returns {index, samples, skipped, family}.

    The inputs are read with the rules `train` applies to its folders (``data.folders``): the same skips,
    listed, the same caption errors, the kohya ``N_name/`` layout (repeats are kept per sample in the index).
    ``t5_max_length``: caption tokens of the family's text encoder; ``text_device`` / ``text_dtype`` (fp32, bf16,
    fp8 for FLUX.2): where and in which dtype it runs, as ``model.text_encoder`` / ``text_encoder_dtype`` in train.
    ``controls``: edit pairs' reference folder(s) (FLUX.2), stored beside each image's latents.
    """
    if per_shard < 1:
        raise UserError("--per-shard must be >= 1")
    if text_dtype not in TEXT_DTYPES:
        raise UserError(f"--text-encoder-dtype {text_dtype!r}: use one of {', '.join(TEXT_DTYPES)}")
    fam = families.of_folder(model_dir, family)  # before minutes of reading images: a wrong folder is one line
    check_text_dtype(text_dtype, fam, "--text-encoder-dtype ")
    if controls and not fam.references:
        raise UserError(f"--controls: {fam.title} has no reference-image input (edit pairs are FLUX.2's); cache "
                        "without --controls, or cache for a FLUX.2 model")
    check_cache_folder(Path(out_dir))
    quiet_libraries()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_device = text_device or device
    buckets = make_buckets(resolution * resolution, step=bucket_step)
    samples, skipped = collect_sources([Path(i) for i in inputs], default_caption, min_size, buckets, recursive,
                                       strict, [Path(c) for c in controls])
    pipe = fam.load_text(model_dir, text_device, DTYPE_CHOICES[text_dtype])
    vae = fam.load_vae(model_dir, device)
    # FLUX.1's text settings are {"t5_max_length": n}, what this index always held: its old shards stay valid
    settings = {"encoder": encoder_identity(Path(model_dir)), **fam.text_settings(pipe, t5_max_length),
                "resolution": resolution, "bucket_step": bucket_step, "per_shard": per_shard}
    if text_dtype != "fp32":  # other values than fp32 embeddings: another fingerprint, as in train's cache
        settings["text_encoder_dtype"] = text_dtype
    index = write_shards(samples, Path(out_dir), per_shard, buckets,
                         lambda px: fam.encode_images(vae, px.to(device)).cpu(),
                         fam.text_encoder(pipe, text_device, t5_max_length), settings,
                         skipped=skipped, batch_size=batch_size)
    pipe = vae = None
    free_memory(device)
    return {"index": str(index), "samples": len(samples), "skipped": skipped, "family": fam.name}


def check_cache_folder(out: Path) -> None:
    """Create ``out`` (and its parents) and check it is writable: a read-only or full disk is one line naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(write_failure("create the cache folder", e.filename or out, e.errno, e.strerror)) from None
    if not os.access(out, os.W_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(out).f_flag & os.ST_RDONLY
        raise UserError(write_failure("write the cache folder", out, errno.EROFS if read_only else errno.EACCES))
