"""Content-keyed on-disk caches of VAE latents and text embeddings, so encoders run once per input, not per epoch.

Each cached tensor set is one safetensors file named by a sha256 over *everything that determines its content*:

- latents: the image file's bytes, the bucket size, the encoder identity, the caller's settings and our
  preprocessing version (``PREPROCESS_VERSION``: bump it when ``load_and_fit`` changes its output); with a loss
  mask, also the mask file's bytes and ``masks.PREPROCESS_VERSION`` (the latent-grid mask is stored beside the
  latents as ``mask`` (1, h, w); an all-white mask is not stored); with a reference image (an edit pair's
  "before", ``folders.find_control``), also its bytes: its latents, fitted to the same bucket (at most 1 MP:
  ``buckets.reference_size``), are stored as ``control`` (C, h', w'), further references of a multi-reference
  edit as ``control_1``, ``control_2``, ...;
- text: the caption, the encoder identity and settings such as the T5 max length.

So a renamed image still hits, and an edited image, another bucket, another VAE or another max length misses:
a stale entry can never be reused, it simply is not looked up any more. Files are written to a temp name and
``os.replace``-d into place, so a crash (or two ranks caching at once) never leaves a half file under a real key;
a file that fails the header check anyway (truncated, garbage) is logged and recomputed.

Encoders come in as callables (``encode_fn``), not models: the cache neither knows nor loads models, which keeps it
testable with a lambda and usable with any VAE / text-encoder stack.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load

from dev2pro.data.buckets import load_and_fit, reference_size
from dev2pro.data import masks as masksmod
from dev2pro.outputs import save_safetensors

log = logging.getLogger(__name__)

PREPROCESS_VERSION = "fit-v1"  # cover + centre crop, RGB over white, float in [-1, 1]
LATENT_NAME = "latents"
MASK_NAME = "mask"
CONTROL_NAME = "control"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(record: dict) -> str:
    # JSON with sorted keys: an unambiguous, order-independent serialisation of the inputs
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def latent_key(image_sha256: str, size: tuple[int, int], encoder_id: str, settings: dict | None = None,
               mask_sha256: str | None = None, control_sha256: str | list[str] | None = None) -> str:
    """Cache key of one image's latents at bucket ``size`` = (width, height), with its mask's and its reference
    image's hashes if it has them (without them the key is what it always was: existing caches stay valid; a
    list: several references, in order)."""
    record = dict(kind="latents", image=image_sha256, size=list(size), encoder=encoder_id, settings=settings or {},
                  preprocess=PREPROCESS_VERSION)
    if mask_sha256 is not None:
        record["mask"] = [mask_sha256, masksmod.PREPROCESS_VERSION]
    if control_sha256 is not None:
        record["control"] = control_sha256
        if reference_size(tuple(size)) != tuple(size):  # a bucket above 1 MP: its references are shrunk to 1 MP
            record["control_size"] = list(reference_size(tuple(size)))
    return _key(record)


def control_names(n: int) -> list[str]:
    """The tensor names of ``n`` reference images' latents: ``control``, ``control_1``, ..."""
    return [CONTROL_NAME] + [f"{CONTROL_NAME}_{i}" for i in range(1, n)] if n else []


def cached_controls(cached: dict) -> torch.Tensor | None:
    """(n, C, h, w): the reference latents of one cached image, in order; None without."""
    names = control_names(sum(1 for k in cached if k == CONTROL_NAME or k.startswith(CONTROL_NAME + "_")))
    return torch.stack([cached[k] for k in names]) if names else None


def text_key(caption: str, encoder_id: str, settings: dict | None = None) -> str:
    """Cache key of one caption's embeddings."""
    return _key(dict(kind="text", caption=caption, encoder=encoder_id, settings=settings or {}))


def _is_valid(path: Path, key: str, required: Iterable[str] = ()) -> bool:
    """True if ``path`` holds a complete safetensors file written for ``key`` (header check only, cheap)."""
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as f:  # rejects truncated or garbage files
            ok = (f.metadata() or {}).get("key") == key and set(required) <= set(f.keys()) and len(f.keys()) > 0
    except Exception as e:
        log.warning("cache file %s is unreadable (%s); recomputing it", path, e)
        return False
    if not ok:
        log.warning("cache file %s does not match its key; recomputing it", path)
    return ok


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Through ``outputs``: a recognisable temp renamed into place, NaN/inf refused, a full or read-only disk as
    one line. No fsync: a cache file lost in a power cut fails the header check and is recomputed."""
    save_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, path, metadata, overwrite=True,
                     what="cache file", fsync=False)


def _batches(keys: list[str], batch_size: int) -> Iterable[list[str]]:
    for i in range(0, len(keys), batch_size):
        yield keys[i : i + batch_size]


def cache_latents(
    items_with_buckets: Sequence[tuple],
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    encoder_id: str,
    cache_dir: Path | str,
    batch_size: int = 4,
    settings: dict | None = None,
) -> list[Path]:
    """Latent cache files for (image path, (width, height) bucket[, mask path or None[, reference image(s): a
    path, a tuple of paths or None]]), computing only the missing ones.

    ``encode_fn`` maps (B, 3, H, W) pixels in [-1, 1] to (B, C, H/8, W/8) latents (e.g. ``encode_images`` bound
    to a VAE); batches never mix buckets. Returns one path per input, in input order. Each file holds
    ``latents`` (C, h, w) (+ ``mask``, + ``control_names``: the references' latents at the same bucket) and
    metadata naming the source image and bucket.
    """
    out_dir = Path(cache_dir) / "latents"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, todo = [], {}  # todo: key -> (image, size, mask, controls); one image+bucket is encoded once
    for image, size, *extra in items_with_buckets:
        mask, control = (list(extra) + [None, None])[:2]
        controls = tuple(control) if isinstance(control, (list, tuple)) else ((control,) if control else ())
        shas = [_sha256_file(Path(c)) for c in controls]  # one reference: its hash alone, as it always was
        key = latent_key(_sha256_file(Path(image)), size, encoder_id, settings,
                         _sha256_file(Path(mask)) if mask else None,
                         (shas[0] if len(shas) == 1 else shas) if shas else None)
        path = out_dir / f"{key}.safetensors"
        paths.append(path)
        if key not in todo and not _is_valid(path, key, [LATENT_NAME] + control_names(len(controls))):
            todo[key] = (Path(image), tuple(size), mask, controls)
    by_bucket = defaultdict(list)
    for key, (_, size, _, _) in todo.items():
        by_bucket[size].append(key)
    for (w, h), keys in sorted(by_bucket.items()):
        for batch in _batches(keys, batch_size):
            latents = _encode([todo[k][0] for k in batch], (w, h), encode_fn)  # (B, C, h/8, w/8)
            refs = _encode_references(batch, {k: todo[k][3] for k in batch}, (w, h), encode_fn)
            for k, z in zip(batch, latents):
                meta = dict(key=k, source=str(todo[k][0]), bucket=f"{w}x{h}", encoder=encoder_id)
                tensors = {LATENT_NAME: z, **_latent_mask(todo[k][0], todo[k][2], (w, h), z.shape[-2:]),
                           **dict(zip(control_names(len(refs[k])), refs[k]))}
                _write_atomic(tensors, out_dir / f"{k}.safetensors", meta)
    log.info("latent cache %s: %d reused, %d computed", out_dir, len(set(paths)) - len(todo), len(todo))
    return paths


def _encode_references(keys: list, controls: dict, bucket: tuple[int, int], encode_fn) -> dict[str, list]:
    """key -> the latents of its reference images (fitted to the bucket's ``reference_size``), in order; []
    without."""
    out: dict[str, list] = {k: [] for k in keys}
    for i in range(max((len(controls[k]) for k in keys), default=0)):
        with_i = [k for k in keys if len(controls[k]) > i]
        for k, z in zip(with_i, _encode([controls[k][i] for k in with_i], reference_size(bucket), encode_fn)):
            out[k].append(z)
    return out


def _encode(images: list, bucket: tuple[int, int], encode_fn) -> torch.Tensor:
    """(B, C, h/8, w/8) latents of ``images`` fitted to ``bucket`` (cover + centre crop)."""
    pixels = torch.stack([load_and_fit(image, bucket) for image in images])  # (B, 3, h, w)
    with torch.no_grad():
        latents = encode_fn(pixels)
    if latents.shape[0] != len(images):
        raise ValueError(f"encode_fn returned {latents.shape[0]} latents for {len(images)} images")
    return latents


def _latent_mask(image: Path, mask: Path | None, bucket: tuple[int, int], latent_hw) -> dict:
    """``{"mask": (1, h, w)}`` for an image with a mask that is not white everywhere, else {}."""
    if mask is None:
        return {}
    m = masksmod.latent_mask(masksmod.load_mask(mask, masksmod.oriented_size(image), bucket), tuple(latent_hw))
    return {} if bool((m == 1).all()) else {MASK_NAME: m}


def cache_text(
    captions: Sequence[str],
    encode_fn: Callable[[list[str]], dict[str, torch.Tensor]],
    encoder_id: str,
    settings: dict,
    cache_dir: Path | str,
    batch_size: int = 8,
) -> dict[str, Path]:
    """Text-embedding cache files per distinct caption, computing only the missing ones.

    ``encode_fn`` maps a list of B captions to a dict of (B, ...) tensors, e.g. ``prompt_embeds`` (B, seq, D)
    and ``pooled`` (B, D); each file stores one caption's rows under the same names.
    """
    out_dir = Path(cache_dir) / "text"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, todo = {}, []
    for caption in dict.fromkeys(captions):  # distinct, first-seen order
        key = text_key(caption, encoder_id, settings)
        paths[caption] = out_dir / f"{key}.safetensors"
        if not _is_valid(paths[caption], key):
            todo.append(caption)
    for batch in _batches(todo, batch_size):
        with torch.no_grad():
            embeds = encode_fn(list(batch))
        for name, t in embeds.items():
            if t.shape[0] != len(batch):
                raise ValueError(f"encode_fn returned {name} with batch {t.shape[0]} for {len(batch)} captions")
        for i, caption in enumerate(batch):
            meta = dict(key=text_key(caption, encoder_id, settings), caption=caption, encoder=encoder_id)
            _write_atomic({name: t[i] for name, t in embeds.items()}, paths[caption], meta)
    log.info("text cache %s: %d reused, %d computed", out_dir, len(paths) - len(todo), len(todo))
    return paths


def load_cached(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of one cache file, in memory on CPU.

    Read into memory rather than mmap-ed (``load_file``): the files are small, and a mapped file that is later
    truncated kills the process with SIGBUS instead of raising.
    """
    return load(Path(path).read_bytes())
