"""`dev2pro cache INPUT... --model DIR --out DIR`: encode a dataset once into sharded safetensors for training.

Inputs are image/caption folders and/or webdataset-style .tar shards; the output is ``shard-NNNNN.safetensors``
files of N samples (VAE latents + T5/CLIP embeddings), ``index.json`` and ``empty.safetensors`` (see
``data.shards``). Run it again after a kill and it continues: complete shards are skipped. Train on the result
with ``data.shards = "OUT/index.json"`` in a train or dedistill config.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..data.buckets import make_buckets
from ..data.shards import collect_sources, write_shards
from ..errors import UserError
from ..flux.latents import encode_images, load_vae
from ..noise import quiet_libraries
from ..outputs import write_failure
from ..text import encoder_identity, load_text_encoders, text_encoder


def cache(inputs: list[str], model_dir: str, out_dir: str, per_shard: int = 1000, resolution: int = 512,
          bucket_step: int = 64, t5_max_length: int = 512, default_caption: str = "", batch_size: int = 4,
          device: str | None = None, min_size: int = 16, recursive: bool = False,
          strict: bool = False) -> dict:
    """Encode ``inputs`` into shards under ``out_dir``; returns {index, samples, skipped}.

    The inputs are read with the rules `train` applies to its folders (``data.folders``): the same skips,
    listed, the same caption errors, the kohya ``N_name/`` layout (repeats are kept per sample in the index).
    """
    if per_shard < 1:
        raise UserError("--per-shard must be >= 1")
    check_cache_folder(Path(out_dir))  # before minutes of loading encoders
    quiet_libraries()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    buckets = make_buckets(resolution * resolution, step=bucket_step)
    samples, skipped = collect_sources([Path(i) for i in inputs], default_caption, min_size, buckets, recursive,
                                       strict)
    vae = load_vae(model_dir, device)
    encode_text = text_encoder(load_text_encoders(model_dir, device), device, t5_max_length)

    settings = {"encoder": encoder_identity(Path(model_dir)), "t5_max_length": t5_max_length,
                "resolution": resolution, "bucket_step": bucket_step, "per_shard": per_shard}
    index = write_shards(samples, Path(out_dir), per_shard, buckets,
                         lambda px: encode_images(vae, px.to(device)).cpu(), encode_text, settings,
                         skipped=skipped, batch_size=batch_size)
    return {"index": str(index), "samples": len(samples), "skipped": skipped}


def check_cache_folder(out: Path) -> None:
    """Create ``out`` (and its parents) and check it is writable: a read-only or full disk is one line naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(write_failure("create the cache folder", e.filename or out, e.errno, e.strerror)) from None
    if not os.access(out, os.W_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(out).f_flag & os.ST_RDONLY
        raise UserError(write_failure("write the cache folder", out, errno.EROFS if read_only else errno.EACCES))
