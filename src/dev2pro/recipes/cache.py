"""`dev2pro cache INPUT... --model DIR --out DIR`: encode a dataset once into sharded safetensors for training.

Inputs are image/caption folders and/or webdataset-style .tar shards; the output is ``shard-NNNNN.safetensors``
files of N samples (VAE latents + T5/CLIP embeddings), ``index.json`` and ``empty.safetensors`` (see
``data.shards``). Run it again after a kill and it continues: complete shards are skipped. Train on the result
with ``data.shards = "OUT/index.json"`` in a train or dedistill config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.buckets import make_buckets
from ..data.shards import collect_sources, write_shards
from ..errors import UserError


def cache(inputs: list[str], model_dir: str, out_dir: str, per_shard: int = 1000, resolution: int = 512,
          bucket_step: int = 64, t5_max_length: int = 512, default_caption: str = "", batch_size: int = 4,
          device: str | None = None) -> dict:
    """Encode ``inputs`` into shards under ``out_dir``; returns {index, samples, skipped}."""
    from ..flux.latents import encode_images
    from .train_lora import quiet_libraries
    from .train_steps import encoder_identity, load_encoders, text_encoder

    if per_shard < 1:
        raise UserError("--per-shard must be >= 1")
    quiet_libraries()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    samples, skipped = collect_sources([Path(i) for i in inputs], default_caption)
    if not samples:
        raise UserError(f"no readable images in {', '.join(inputs)}")
    missing = [s.key for s, _ in samples if not s.caption]
    if missing:
        raise UserError(f"{len(missing)} image(s) have no caption (e.g. {missing[:3]}); add .txt captions or "
                        f"pass --default-caption")
    comps = load_encoders(Path(model_dir), device)
    encode_text = text_encoder(comps["pipe"], device, t5_max_length)

    settings = {"encoder": encoder_identity(Path(model_dir)), "t5_max_length": t5_max_length,
                "resolution": resolution, "bucket_step": bucket_step, "per_shard": per_shard}
    index = write_shards(samples, Path(out_dir), per_shard, make_buckets(resolution * resolution, step=bucket_step),
                         lambda px: encode_images(comps["vae"], px.to(device)).cpu(), encode_text, settings,
                         skipped=skipped, batch_size=batch_size)
    return {"index": str(index), "samples": len(samples), "skipped": skipped}


def add_cache_parser(sub):
    p = sub.add_parser("cache", help="encode image folders / webdataset tars into sharded latent+text caches")
    p.add_argument("inputs", nargs="+", help="image folders (name.png + name.txt) and/or .tar shards")
    p.add_argument("--model", required=True, help="FLUX.1-dev-layout model folder (VAE, text encoders)")
    p.add_argument("--out", required=True, help="output folder for shards and index.json")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard file")
    p.add_argument("--resolution", type=int, default=512, help="bucket target side")
    p.add_argument("--bucket-step", type=int, default=64)
    p.add_argument("--t5-max-length", type=int, default=512)
    p.add_argument("--default-caption", default="", help="caption for images without one")
    p.add_argument("--batch-size", type=int, default=4, help="encoder batch")

    def run(a):
        r = cache(a.inputs, a.model, a.out, a.per_shard, a.resolution, a.bucket_step, a.t5_max_length,
                  a.default_caption, a.batch_size)
        print(f"{r['samples']} samples -> {r['index']}")
        for s in r["skipped"]:
            print(f"  skipped (unreadable): {s}")
    p.set_defaults(run=run)
