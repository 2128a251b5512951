"""Training data ready for a loop: image folders encoded once into the latent/text cache, or `dev2pro cache` shards,
plus the sample prompts' embeddings -- after which the VAE goes to the CPU and the text encoders are freed, before
the transformer arrives on the device. The model family (``families``) says which text stack and VAE encode them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .. import families
from ..families import Family
from ..errors import UserError
from ..text import Embeds, encoder_identity, free_memory
from .buckets import make_buckets
from .cache import cache_latents, cache_text, load_cached
from .folders import DatasetFolder, scan_dataset
from .loader import CacheEntry, CachedDataset
from .mixing import active_folders, bucketed, largest_resolution
from .shards import ShardDataset

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """A dataset (items: latents + text tensors; ``buckets()``), the empty prompt's text tensors (caption dropout,
    the CFG branches), the sample prompts' embeddings, the negative for true-CFG samples (the given negative, else
    the empty prompt) and the VAE + scheduler kept for sampling."""

    dataset: object
    empty: dict
    sample_embeds: list[Embeds]
    negative: Embeds
    components: dict = field(default_factory=dict)
    validation: object = None  # the held-out images (a CachedDataset) when ``holdout`` was given


@dataclass(frozen=True)
class FolderOptions:
    """How image folders are read: the rules `train`, `dedistill` and `cache` share (``data.*`` in configs)."""

    default_caption: str = ""
    trigger: str = ""
    min_size: int = 16
    strict: bool = False
    resolution: int | tuple[int, ...] = 512  # several: each image is bucketed at each (``mixing``)
    bucket_step: int = 64
    reg_weight: float = 1.0  # loss weight of reg folders' images; 0 drops those folders


def load_training_data(model_dir: Path, device, *, folders: Sequence[DatasetFolder] = (), shards: str = "",
                       options: FolderOptions = FolderOptions(), cache_dir: Path | None = None,
                       t5_max_length: int = 512, prompts: Sequence[str] = (), negative: str = "",
                       text_device=None, text_dtype: torch.dtype = torch.float32,
                       family: Family | None = None, spec=None, holdout=None) -> TrainingData:
    """Folders (latents and text cached in ``cache_dir``) or shards (an ``index.json``), and sample embeddings.

    The text encoders run on ``text_device`` (default ``device``) in ``text_dtype``; the VAE on ``device``.
    ``family``: whose text stack and VAE (FLUX.1's by default); ``t5_max_length``: its text length in tokens;
    ``spec``: the transformer's, to refuse a text stack that cannot feed it (a klein encoder with FLUX.2 dev);
    ``holdout``: held-out images cached in the same pass (``train.validation.Holdout``; folders only).
    """
    text_device = device if text_device is None else text_device
    family = family or families.get("flux1")
    if shards:
        return _from_shards(Path(model_dir), shards, device, text_device, text_dtype, prompts, negative, options,
                            family, spec)
    return _from_folders(Path(model_dir), list(folders), options, Path(cache_dir), device, text_device, text_dtype,
                         t5_max_length, prompts, negative, family, spec, holdout)


def _from_folders(model_dir: Path, folders: list[DatasetFolder], o: FolderOptions, cache_dir: Path, device,
                  text_device, text_dtype, t5_len: int, prompts, negative: str, fam: Family,
                  spec=None, holdout=None) -> TrainingData:
    folders = active_folders(folders, o.reg_weight)
    top = largest_resolution(o.resolution, folders)  # its buckets judge aspect ratios (the range barely varies)

    def scan(fs):  # the training images, and held-out ones, by the same rules
        return scan_dataset(fs, default_caption=o.default_caption or None, trigger=o.trigger or None,
                            min_size=o.min_size, strict=o.strict, buckets=make_buckets(top * top, step=o.bucket_step))

    items = scan(folders)
    items, held = holdout.split(items, scan) if holdout is not None else (items, [])
    items = items + held  # cached in one pass; split again at the end (``held_out``: by item identity)
    _check_references(items, folders, fam)
    plan = bucketed(items, o.resolution, o.bucket_step, lambda it: it.size or _image_size(it.path))
    pipe = fam.load_text(model_dir, text_device, text_dtype)  # first: it names a folder that is no model
    if spec is not None:
        fam.check_text(pipe, spec)
    vae = fam.load_vae(model_dir, device)
    enc_id = encoder_identity(model_dir)
    latent_paths = cache_latents([(it.path, bucket, it.mask, it.controls) for it, _, bucket in plan],
                                 lambda px: fam.encode_images(vae, px).cpu(), f"vae:{enc_id}", cache_dir)
    settings = fam.text_settings(pipe, t5_len)
    if text_dtype != torch.float32:  # bf16 embeddings are other values: they get their own cache entries
        settings["text_encoder_dtype"] = str(text_dtype).removeprefix("torch.")
    extra = ["", *prompts] + ([negative] if negative else [])
    text_paths = cache_text([it.caption for it in items] + extra, fam.text_encoder(pipe, text_device, t5_len),
                            f"text:{enc_id}", settings, cache_dir)
    components = {"vae": vae.to("cpu"), "scheduler": pipe.scheduler}
    pipe = None  # the encoders are not needed again: free them before the transformer arrives
    free_memory(device)
    entries = [CacheEntry(lp, text_paths[it.caption], it.caption, it.repeats,
                          o.reg_weight if it.role == "reg" else 1.0, res, it.role, bucket, it.path,
                          it.mask is not None, len(it.controls or ()))
               for (it, res, bucket), lp in zip(plan, latent_paths)]

    def embeds_of(text):
        return fam.embeds_of(load_cached(text_paths[text]))

    held_out = {id(it) for it in held}  # a held-out image is validated at each of its resolutions
    kept = [e for e, (it, _, _) in zip(entries, plan) if id(it) not in held_out]
    return TrainingData(CachedDataset(kept), load_cached(text_paths[""]),
                        [embeds_of(p) for p in prompts], embeds_of(negative), components,
                        CachedDataset([e for e, (it, _, _) in zip(entries, plan) if id(it) in held_out])
                        if holdout is not None else None)


def _check_references(items, folders, fam: Family) -> None:
    """Edit pairs (a ``controls`` folder) train with reference tokens on every image or on none: one batch has one
    token count, and a model learns the edit only where it sees the reference."""
    with_refs = [it for it in items if it.controls]
    if with_refs and not fam.references:
        raise UserError(f"controls: reference images (edit pairs) need a FLUX.2 model (klein or dev); {fam.title} "
                        "has no reference-image input. Remove the controls folder(s) or train a FLUX.2 base")
    if with_refs and len(with_refs) < len(items):
        plain = [f"{f.path}" for f in folders if not f.controls]
        where = (f"[[data.folders]] without a controls folder: {', '.join(plain)}" if plain else
                 "the validation.folder images (use validation.fraction for an edit dataset)")
        raise UserError(f"controls: some images have reference images and some do not ({where}); give every "
                        "folder a controls folder, or none")
    counts = {len(it.controls): str(it.path) for it in with_refs}
    if len(counts) > 1:  # one batch, one token count: every image sees as many references
        raise UserError("controls: images have different numbers of reference images (" + "; ".join(
            f"{n}: e.g. {p}" for n, p in sorted(counts.items())) + "); give every [[data.folders]] entry the same "
            "number of controls folders")


def _from_shards(model_dir: Path, shards: str, device, text_device, text_dtype, prompts, negative: str,
                 o: FolderOptions, fam: Family, spec=None) -> TrainingData:
    """Pre-encoded shards: no VAE pass; the encoders load only to embed the sample prompts."""
    dataset = ShardDataset(shards)
    empty = dataset.empty_text()
    if o.trigger or o.default_caption:
        log.warning("data.trigger/default_caption do not apply to shards: their captions were encoded by "
                    "`dev2pro cache`")
    data = TrainingData(dataset, empty, [], fam.embeds_of(empty))
    if prompts:
        pipe = fam.load_text(model_dir, text_device, text_dtype)
        if spec is not None:
            fam.check_text(pipe, spec)
        encode = fam.text_encoder(pipe, text_device, empty["prompt_embeds"].shape[0])  # the shards' text length

        def embeds_of(text):
            return fam.embeds_of({k: v[0] for k, v in encode([text]).items()})

        data.sample_embeds = [embeds_of(p) for p in prompts]
        if negative:
            data.negative = embeds_of(negative)
        data.components = {"vae": fam.load_vae(model_dir), "scheduler": pipe.scheduler}
        pipe = None
        free_memory(device)
    return data


def _image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size
