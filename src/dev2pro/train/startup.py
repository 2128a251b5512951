"""Parts of `train`'s start-up lines (torch-free): what the dataset scan found and the buckets an epoch fills (per
resolution and with the reg samples' share, ``data.mixing``), the steps in epochs, and when the run saves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..data.mixing import epoch_lines


def dataset_lines(ds, source: str) -> list[str]:
    """``data: N images (M samples per epoch with repeats) from SOURCE`` and the bucket lines of the dataset ``ds``
    (a ``CachedDataset`` of folders, or shards: no per-image entries)."""
    buckets = Counter(ds.buckets())  # latent (h, w) per sample, repeats included
    entries = getattr(ds, "entries", None)
    n_images = len({e.image for e in entries} if entries and entries[0].image else entries or ds)
    per_image = {e.image: e for e in entries or () if e.image}.values()  # what the scan found beside each image
    masked, refs = sum(e.masked for e in per_image), max((e.references for e in per_image), default=0)
    return [
        f"  data: {n_images} images ({len(ds)} samples per epoch with repeats) from {source}"
        + (f"; {masked} with a loss mask" if masked else "") + (f"; edit pairs: {refs} reference(s) each" * bool(refs)),
        *(epoch_lines(entries) if entries and entries[0].resolution else  # per resolution, reg samples
          [f"  buckets: {len(buckets)} bucket(s): " + ", ".join(f"{w * 8}x{h * 8} ({n})" for (h, w), n in
                                                            sorted(buckets.items(), key=lambda kv: -kv[1]))])]


def steps_line(steps: int, start: int, batch: int, grad_accum: int, per_epoch: int) -> str:
    """``steps 2400, batch 1 x grad_accum 1, 150 batches per epoch = 16.0 epochs`` (``start``: a resume's step)."""
    per_epoch = max(1, per_epoch)
    return (f"  steps {steps}" + (f" (resuming at {start})" if start else "") + f", batch {batch} x grad_accum "
            f"{grad_accum}, {per_epoch} batches per epoch = {steps * grad_accum / per_epoch:.1f} epochs")


def saves_line(every: int, keep_loras: int, final: Path, layouts, state: Path) -> str:
    """When the LoRA is saved (every ``every`` steps, the newest ``keep_loras`` steps' files kept; and at the end as
    ``final`` in ``layouts``) and where the resumable state goes."""
    kept = f" (the newest {keep_loras} steps' LoRA files kept: save.keep_loras)" if keep_loras else ""
    return ("  saves: " + (f"every {every} steps{kept} and " if every else "") +
            f"at the end -> {final} ({', '.join(layouts)}), resumable state in {state}")


def guidance_line(guidance_embeds: bool, guidance: float, base: str, variant: str) -> str:
    """The guidance input training feeds the base (none where it has no guidance embedding)."""
    if guidance_embeds:
        return f"  guidance {guidance} in training (base: {base}, {variant})"
    return (f"  no guidance input in training (base: {base}, {variant}: no guidance embedding" +
            (f"; train.guidance = {guidance:g} is not read)" if guidance != 1.0 else ")"))


def guidance_warnings(guidance_embeds: bool, guidance: float, extra_targets) -> list[str]:
    """What the Dev2Pro recipe warns about before a LoRA trains on a guidance-distilled base (``guidance_embeds``):
    a guidance other than 1.0, and a LoRA on the guidance embedder (``lora.extra_targets`` "embedders"), which sees
    one guidance value only and so changes how the model answers every other one untrained."""
    if not guidance_embeds:
        return []
    out = []
    if guidance != 1.0:
        out.append(f"training a guidance-distilled base at guidance {guidance:.2f}: the Dev2Pro recipe trains at 1.0; "
                   "other values pull the guidance embedding off its distilled meaning and the LoRA tends to collapse "
                   "or blur when used on dev")
    if "embedders" in extra_targets:
        out.append(f"lora.extra_targets = embedders trains a LoRA on the guidance embedder too, which sees guidance "
                   f"{guidance:g} only: on dev at 3.5 (or any other guidance) its change is extrapolated, not learned. "
                   "Leave embedders out unless you train on a de-distilled base and sample it at this guidance")
    return out
