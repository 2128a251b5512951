"""Sharded caches for datasets too big for one-file-per-image: sources in, safetensors shards + an index out.

Sources are image/caption folders (``name.png`` + ``name.txt``) or webdataset-style tar shards (members
``key.jpg|png|webp`` + ``key.txt``). Both become the same list of ``Source(key, caption, origin)``, every image
decoded once up front: an image that does not decode is skipped and listed (the rest is kept), and the sample
list -- hence the split into shards of N -- is fixed before any encoding starts. Shard ``i`` holds samples
``[i*N, (i+1)*N)`` as tensors ``{j}.latents`` (C, h, w), ``{j}.prompt_embeds`` (seq, D), ``{j}.pooled`` (D,),
(edit pairs, ``--controls``: ``{j}.control``, ``{j}.control_1``, ... the references' latents at the bucket, <= 1 MP)
and a fingerprint of its keys, image bytes and encoder settings in its metadata: a rerun skips every shard
whose file is complete and carries the same fingerprint, so a killed `dev2pro cache` resumes where it stopped.
``index.json`` lists shards, keys, captions and latent sizes; ``empty.safetensors`` holds the empty prompt's
embeddings (caption dropout, the CFG teacher's unconditional branch).

``ShardDataset`` reads an index as a map-style dataset whose ``buckets()`` feed ``BucketBatchSampler``, so the
training order is the sampler's: deterministic from (seed, epoch) and resumable mid-epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load

from ..errors import UserError
from ..outputs import save_safetensors, write_json
from .buckets import assign_bucket, load_and_fit, reference_size
from .cache import cached_controls, control_names
from .folders import IMAGE_EXTENSIONS, UNSUPPORTED_EXTENSIONS, DatasetFolder, Scanner, decode_caption

log = logging.getLogger(__name__)

INDEX_NAME, EMPTY_NAME = "index.json", "empty.safetensors"


@dataclass(frozen=True)
class Source:
    """One sample before encoding: its key, caption and where its image bytes live.

    A plain file, or a tar member given by the byte range of its data (``offset``, ``size``): reading a member is
    then one seek in the tar file, not a ``tarfile.open`` that walks every header before it (which made reading
    all N members of a shard O(N^2)).
    """

    key: str
    caption: str
    path: str
    member: str = ""  # tar member name (for messages); empty for a plain file
    offset: int = 0  # tar members: where the member's data starts in the tar file
    size: int = 0  # tar members: its length in bytes
    repeats: int = 1  # times per epoch (kohya N_name folders)
    controls: tuple[str, ...] = ()  # its reference image(s), edit pairs (image folders only)

    def read(self) -> bytes:
        if not self.member:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise UserError(f"{self.path}: member {self.member} is cut short (the tar changed or is truncated)")
        return data


def tar_sources(tar_path: Path, scanner: Scanner) -> list[Source]:
    """Samples of a webdataset tar in member order: ``key.<image ext>`` + optional ``key.txt``.

    One sequential pass over the tar: captions are read as they pass, images are recorded by their data's byte
    range; members in unsupported image formats are listed by ``scanner``. Only uncompressed tars (webdataset's
    format) are accepted: byte ranges need the raw file.
    """
    images, captions = {}, {}
    try:
        tar = tarfile.open(tar_path, "r:")
    except tarfile.ReadError as e:
        raise UserError(f"{tar_path}: not an uncompressed tar ({e}); webdataset shards are plain .tar files") \
            from None
    with tar:
        for m in tar:
            if not m.isreg() or m.issparse():
                continue
            stem, ext = _split(m.name)
            last = "." + ext.rsplit(".", 1)[-1].lower() if ext else ""
            if ext.lower() in IMAGE_EXTENSIONS:
                images.setdefault(stem, m)
            elif last in UNSUPPORTED_EXTENSIONS:
                scanner.unsupported(f"{tar_path}::{m.name}", last)
            elif ext == ".txt":
                captions[stem] = decode_caption(tar.extractfile(m).read(), f"{tar_path}::{m.name}")
    out = []
    for k, m in images.items():
        label = f"{tar_path}::{m.name}"
        out.append((Source(k.rsplit("/", 1)[-1], "", str(tar_path), m.name, m.offset_data, m.size),
                    captions.get(k), label, f"{tar_path}::{k}.txt"))
    return out


def _split(name: str) -> tuple[str, str]:
    # webdataset keys end at the first dot of the file name ("a/b.seg.png" -> key "a/b", ext ".seg.png")
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + ext)


def collect_sources(inputs: Sequence[Path], default_caption: str = "", min_size: int = 16, buckets=None,
                    recursive: bool = False, strict: bool = False,
                    controls: Sequence[Path] = ()) -> tuple[list[tuple[Source, tuple]], list]:
    """Every usable sample of folders and .tar files with its image size, and the skipped ones as
    ``"path (reason)"`` lines: the rules of ``data.folders`` (the ones `train` applies), tar members included.
    ``controls``: the reference folder(s) of edit pairs (image folders only), looked up as `train` does."""
    scanner = Scanner(min_size, buckets, default_caption or None, strict=strict)
    good, masked = [], []
    for inp in map(Path, inputs):
        if inp.is_dir():
            folder = DatasetFolder(inp, recursive=recursive, controls=tuple(controls) or None)
            for item, key in scanner.folders([folder]):
                good.append((Source(key, item.caption, str(item.path), repeats=item.repeats,
                                    controls=tuple(map(str, item.controls))), item.size))
                masked += [str(item.mask)] if item.mask else []
        elif inp.suffix == ".tar" and inp.is_file() and controls:
            raise UserError(f"{inp}: --controls reads reference images from image folders; a .tar shard has none "
                            "(cache the pairs from their folders)")
        elif inp.suffix == ".tar" and inp.is_file():
            for source, text, label, txt_label in tar_sources(inp, scanner):
                size = scanner.image_size(source.read(), label)
                caption = scanner.caption(text, label, txt_label) if size else None
                if caption is not None:
                    good.append((dataclasses.replace(source, caption=caption), size))
        else:
            raise UserError(f"{inp}: expected an image folder or a .tar shard")
    scanner.finish(good)
    if masked:  # shards hold latents and text only
        log.warning("%d loss mask(s) are not stored in shards (the images are cached whole); train from the "
                    "folders to use them: %s", len(masked), ", ".join(masked[:3]) + (" ..." if len(masked) > 3 else ""))
    return good, scanner.skipped


def _fingerprint(samples, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s, bucket in samples:
        h.update(f"{s.key}\0{s.caption}\0{bucket}\0".encode())
        h.update(hashlib.sha256(s.read()).digest())
        for c in s.controls:  # edit pairs: the references' bytes too (none: the fingerprint it always was)
            h.update(hashlib.sha256(Path(c).read_bytes()).digest())
        if s.controls and reference_size(bucket) != tuple(bucket):  # above 1 MP: references shrunk to 1 MP
            h.update(f"ref{reference_size(bucket)}".encode())
    return h.hexdigest()


def _shard_done(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:
        return False  # truncated or garbage: rewrite it


def write_shards(
    samples: Sequence[tuple[Source, tuple[int, int]]],
    out_dir: Path,
    per_shard: int,
    buckets: Sequence[tuple[int, int]],
    encode_latents: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], dict[str, torch.Tensor]],
    settings: dict,
    skipped: Sequence[str] = (),
    batch_size: int = 4,
) -> Path:
    """Encode ``samples`` (source, (width, height)) into shards of ``per_shard``; returns the index path.

    ``encode_latents``: (B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8); ``encode_text``: B captions -> dict
    of (B, ...) tensors. Shards already complete with the same fingerprint are skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, done = [], 0
    for n, lo in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[lo:lo + per_shard]
        sized = [(s, assign_bucket(w, h, list(buckets))) for s, (w, h) in chunk]
        path = out_dir / f"shard-{n:05d}.safetensors"
        fp = _fingerprint(sized, settings)
        if _shard_done(path, fp):
            done += 1
        else:
            tensors = _encode_chunk(sized, encode_latents, encode_text, batch_size)
            meta = {"fingerprint": fp, "keys": json.dumps([s.key for s, _ in sized])}
            save_safetensors(tensors, path, meta, overwrite=True)
        shards.append({"file": path.name, "keys": [s.key for s, _ in sized], "captions": [s.caption for s, _ in sized],
                       "latent_hw": [[b[1] // 8, b[0] // 8] for _, b in sized],
                       "repeats": [s.repeats for s, _ in sized]})
    empty = out_dir / EMPTY_NAME
    if not empty.exists():
        save_safetensors({k: v[0] for k, v in encode_text([""]).items()}, empty, overwrite=True)
    log.info("shards in %s: %d reused, %d written", out_dir, done, len(shards) - done)
    refs = {len(s.controls) for s, _ in samples}
    return write_json(out_dir / INDEX_NAME, {"version": 1, "settings": settings, "shards": shards,
                                             "empty": EMPTY_NAME, "skipped": list(skipped),
                                             **({"references": max(refs)} if max(refs, default=0) else {})})


def _encode_chunk(sized, encode_latents, encode_text, batch_size) -> dict[str, torch.Tensor]:
    tensors = {}
    by_bucket: dict[tuple, list[int]] = {}
    for j, (_, b) in enumerate(sized):
        by_bucket.setdefault(b, []).append(j)
    for (w, h), idx in by_bucket.items():  # a VAE batch never mixes sizes
        for lo in range(0, len(idx), batch_size):
            part = idx[lo:lo + batch_size]
            pixels = torch.stack([load_and_fit(io.BytesIO(sized[j][0].read()), (w, h)) for j in part])
            with torch.no_grad():
                lat = encode_latents(pixels)  # (B, C, h/8, w/8)
            for j, z in zip(part, lat):
                tensors[f"{j:06d}.latents"] = z.float().clone()
            ref_size = reference_size((w, h))  # the bucket, at most 1 MP
            for i, name in enumerate(control_names(len(sized[part[0]][0].controls))):
                with torch.no_grad():
                    refs = encode_latents(torch.stack([load_and_fit(sized[j][0].controls[i], ref_size) for j in part]))
                for j, z in zip(part, refs):
                    tensors[f"{j:06d}.{name}"] = z.float().clone()
    captions = [s.caption for s, _ in sized]
    for lo in range(0, len(captions), batch_size):
        with torch.no_grad():
            emb = encode_text(captions[lo:lo + batch_size])
        for name, t in emb.items():
            for i, row in enumerate(t):
                tensors[f"{lo + i:06d}.{name}"] = row.float().clone()
    return tensors


class ShardDataset(torch.utils.data.Dataset):
    """Samples of a shard index; item ``i`` is a dict of ``latents``, text tensors and ``caption``."""

    def __init__(self, index_path: Path | str):
        self.index_path = Path(index_path)
        if not self.index_path.is_file():
            raise UserError(f"data.shards: {self.index_path} does not exist (write it with `dev2pro cache`)")
        self.index = json.loads(self.index_path.read_text())
        self.root = self.index_path.parent
        # each sample repeats times per epoch (kohya N_name folders); indexes without "repeats" mean once
        self.items = [(sh["file"], j, sh["captions"][j], tuple(sh["latent_hw"][j]))
                      for sh in self.index["shards"] for j in range(len(sh["keys"]))
                      for _ in range(sh.get("repeats", [1] * len(sh["keys"]))[j])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        file, j, caption, _ = self.items[i]
        f, names = self._open(file)
        prefix = f"{j:06d}."
        item = {**{n: f.get_tensor(prefix + n) for n in names}, "caption": caption}
        if "control" in item:  # edit pairs: (n, C, h, w), as the folder cache's items
            item["control"] = cached_controls({k: item.pop(k) for k in control_names(len(names)) if k in item})
        return item

    def _open(self, file: str):
        # one open handle per shard and process (opening + listing 1000s of keys per item cost more than the
        # training step on small models); handles are not pickled into DataLoader workers
        handles = self.__dict__.setdefault("_handles", {})
        if file not in handles:
            f = safe_open(self.root / file, "pt")
            names = sorted({k.split(".", 1)[1] for k in f.keys() if k.startswith("000000.")})
            handles[file] = (f, names)
        return handles[file]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def buckets(self) -> list[tuple[int, int]]:
        """Latent (h, w) of every index, from the index alone (for ``BucketBatchSampler``)."""
        return [it[3] for it in self.items]

    def empty_text(self) -> dict[str, torch.Tensor]:
        return load((self.root / self.index["empty"]).read_bytes())
