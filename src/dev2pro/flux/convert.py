"""`dev2pro convert`: any readable checkpoint to another layout and/or dtype, streamed one tensor at a time.

Each output tensor is produced when its bytes are written (``outputs.stream_safetensors``), from plain reads of the
source (``streamread``: no mmap), with the finite check fused into the cast or run once on the converted tensor --
not a second scan of every tensor by the writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import families
from ..errors import CheckpointError, UserError
from ..outputs import NonFiniteError, atomic_path, stream_safetensors, tensor_nbytes
from . import fp8 as fp8mod
from . import keys as keymod
from . import checkpoint as ckmod
from .checkpoint import DTYPE_CHOICES, FP8_DTYPES, LAYOUTS, Checkpoint, _same_scale, open_checkpoint
from .inspection import missing_summary
from .streamread import TensorFile, check_finite, prefetched, stream_quantize

def convert(src: str | os.PathLike, dst: str | os.PathLike, layout: str | None = None, dtype: str | None = None,
            policy: "fp8mod.Fp8Policy | None" = None, overwrite: bool = False, allow_pickle: bool = False,
            drop_guidance: bool = False, extra_metadata: Mapping[str, str] | None = None,
            progress: Callable[[int], None] | None = None, allow_incomplete: bool = False,
            variant: str | None = None) -> Path:
    """Convert any readable checkpoint to ``layout`` (bfl|comfy|diffusers; default: keep) and ``dtype``
    (bf16|fp16|fp32|fp8|fp8-scaled; default: keep), streaming one tensor at a time.

    Refused: a destination that is (or holds) the source, a model folder, a folder holding files this writer does
    not write; an incomplete source (unless ``allow_incomplete``); NaN/inf in any written tensor. ``variant``
    (klein-base | klein-distilled): record which FLUX.2 klein a file is, which its keys cannot tell."""
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    if variant:
        spec = ckpt.spec()
        if not getattr(spec, "is_klein", False):
            raise UserError(f"--variant names a FLUX.2 klein file's variant (Base and distilled share their keys); "
                            f"{src} is {ckpt.family.title} {spec.variant}, which its keys already tell")
        extra_metadata = {**ckpt.family.modelspec(spec.with_variant(variant)), **(extra_metadata or {})}
    layout = output_layout(ckpt.layout, dst, layout)
    check_scaled_fp8_layout(layout, dtype, ckpt.fp8_format, src)
    missing = ckpt.missing()
    if missing and not allow_incomplete:
        raise CheckpointError(f"{src} is incomplete: it lacks {missing_summary(missing)}, so the converted file "
                              f"would not load either. Use a complete copy, or pass --allow-incomplete to convert "
                              f"it anyway")
    entries, meta = conversion_entries(ckpt, layout, dtype, policy, drop_guidance)
    entries = prefetched(entries)  # reading + casting tensor i + 1 while tensor i is written
    # the training provenance travels (a de-distilled export stays one: ``sampling.dedistilled``); the layout,
    # dtype and sizes are the new file's own
    meta = {**{k: v for k, v in ckpt.metadata.items() if k.startswith("dev2pro.") and k not in meta}, **meta,
            "dev2pro.source": Path(src).name, **(extra_metadata or {})}
    sources = [ckpt.path, *set(ckpt.files.values())]
    try:
        if layout == "diffusers":
            return write_diffusers_folder(ckpt, entries, Path(dst), meta, overwrite, progress, sources)
        return stream_safetensors(entries, dst, meta, overwrite=overwrite, progress=progress,  # checked: entries
                                  what="converted checkpoint", sources=sources, finite=False)
    except NonFiniteError as e:
        why = "its values overflow fp16 (convert to bf16 instead)" if dtype == "fp16" else "the source holds NaN/inf"
        raise NonFiniteError(f"refusing to write {dst}: {e}; nothing was written ({why}; source {src})") from None




def conversion_entries(ckpt: Checkpoint, layout: str, dtype: str | None, policy: "fp8mod.Fp8Policy | None",
                       drop_guidance: bool = False):
    """The (key, dtype, shape, produce) list for ``stream_safetensors`` plus the file metadata."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    policy = policy or fp8mod.Fp8Policy()
    key_layout = "diffusers" if layout == "diffusers" else "bfl"
    prefix = "model.diffusion_model." if layout == "comfy" else ""
    steps = ckpt.plan(key_layout)
    if drop_guidance:
        steps = {k: v for k, v in steps.items() if "guidance" not in k}
    quant = dtype in ("fp8", "fp8-scaled")
    scaled = dtype == "fp8-scaled"
    entries = []
    any_scale = False
    for key, parts in steps.items():
        shape = _out_shape(ckpt, parts)
        src_dtypes = {ckpt.dtypes[p[0]] for p in parts}
        if dtype is None:  # keep: lossless re-layout (fp8 bytes are copied with their scale when possible)
            out_dtype = src_dtypes.pop() if len(src_dtypes) == 1 else torch.bfloat16
            if out_dtype not in FP8_DTYPES:
                entries.append((prefix + key, out_dtype, shape,
                                (lambda parts=parts, d=out_dtype: _produce(ckpt, parts, d))))
                continue
            if _same_scale(ckpt, parts):
                sc = ckpt.scale_of(parts[0][0])
                entries.append((prefix + key, out_dtype, shape,
                                (lambda parts=parts, k=key: check_finite(k, keymod.assemble(parts, ckpt.get)))))
                if sc is not None:
                    entries.append(_scale_entry(prefix + key, lambda sc=sc, k=key: check_finite(k, sc)))
                    any_scale = True
                continue
            # Fusing pieces with different scales (diffusers q|k|v -> BFL qkv) needs one new scale.
            lazy = _lazy_quant(ckpt, parts, scaled=True, fmt=out_dtype)
            entries.append((prefix + key, out_dtype, shape, (lambda lazy=lazy: lazy(0))))
            entries.append(_scale_entry(prefix + key, lambda lazy=lazy: lazy(1)))
            any_scale = True
            continue
        if quant and len(shape) == 2 and policy.should_quantize(key, shape):
            lazy = _lazy_quant(ckpt, parts, scaled=scaled, fmt=torch.float8_e4m3fn)
            entries.append((prefix + key, torch.float8_e4m3fn, shape, (lambda lazy=lazy: lazy(0))))
            if scaled:
                entries.append(_scale_entry(prefix + key, lambda lazy=lazy: lazy(1)))
                any_scale = True
            continue
        # The keep-in-bf16 policy: tensors the fp8 policy leaves out are written in bf16.
        out_dtype = torch.bfloat16 if quant or dtype is None else DTYPE_CHOICES[dtype]
        entries.append((prefix + key, out_dtype, shape,
                        (lambda parts=parts, d=out_dtype: _produce(ckpt, parts, d))))
    if any_scale:
        marker = fp8mod.scaled_fp8_marker(torch.float8_e4m3fn)
        entries.insert(0, (prefix + "scaled_fp8", marker.dtype, tuple(marker.shape), lambda: marker))
    spec = ckpt.spec()
    if drop_guidance and spec.guidance_embeds:
        if ckpt.family.name != "flux1":
            raise UserError(f"--drop-guidance is for FLUX.1 (a pro-like file without guidance embedding); "
                            f"{ckpt.path} is {ckpt.family.title}")
        spec = spec.with_(guidance_embeds=False)
    meta = {
        **ckpt.family.modelspec(spec),
        "dev2pro.layout": layout,
        "dev2pro.dtype": dtype or "keep",
        "dev2pro.dtype_policy": policy.describe() if quant else "none",
        "dev2pro.axes_dim": json.dumps(list(spec.axes_dim)),
    }
    return entries, meta


def _scale_entry(weight_key: str, produce):
    """ComfyUI's legacy per-tensor scale: ``<module>.scale_weight``, a 0-d fp32 tensor."""
    base = weight_key[:-len(".weight")] if weight_key.endswith(".weight") else weight_key
    return (base + ".scale_weight", torch.float32, (), (lambda: produce().reshape(()).float()))


def _lazy_quant(ckpt: Checkpoint, parts, scaled: bool, fmt: torch.dtype):
    """Quantise once; the weight entry takes q, then its scale entry (written right after) takes the scale.

    Each value is dropped when handed out, so no quantised tensor outlives its write (peak stays one tensor).
    """
    memo: dict = {}

    def get(which: int):
        if not memo:
            whole = _one_file_tensor(ckpt, parts)
            if whole is not None:  # chunked from the file: the fp8 output + two chunks of RAM
                memo[0], memo[1] = stream_quantize(whole, parts[0][0], scaled, fmt)
            else:  # high-precision sources quantised as stored (no fp32 copy); fp8 sources dequantised first
                t = keymod.assemble(parts, lambda k: ckpt.get_dequantized(k, torch.float32)
                                    if ckpt.dtypes[k] in FP8_DTYPES else _read(ckpt, k))
                memo[0], memo[1] = fp8mod.quantize(check_finite(parts[0][0], t), scaled=scaled, dtype=fmt)
        return memo.pop(which)
    return get


def _one_file_tensor(ckpt: Checkpoint, parts) -> TensorFile | None:
    """The source of a one-piece, high-precision output tensor in a safetensors file (None otherwise)."""
    key = parts[0][0]
    if len(parts) > 1 or parts[0][1] is not None or ckpt._state is not None or ckpt.dtypes[key] in FP8_DTYPES:
        return None
    return TensorFile(ckpt.files[ckpt.prefix + key], ckpt.prefix + key)


def _read(ckpt: Checkpoint, key: str) -> torch.Tensor:
    """One tensor as stored, read without mmap from a safetensors file (``get`` for pickles)."""
    if ckpt._state is not None:
        return ckpt.get(key)
    return TensorFile(ckpt.files[ckpt.prefix + key], ckpt.prefix + key).read()


def _out_shape(ckpt: Checkpoint, parts) -> tuple[int, ...]:
    first = ckpt.shapes[parts[0][0]]
    if len(parts) == 1 and parts[0][1] is None:
        return tuple(first)
    rows = sum((p[1][1] - p[1][0]) if p[1] else ckpt.shapes[p[0]][0] for p in parts)
    return (rows, *first[1:])


def _produce(ckpt: Checkpoint, parts, dtype: torch.dtype) -> torch.Tensor:
    """fp8 pieces dequantised in fp32 (one rounding), others cast straight to ``dtype``; finite-checked."""
    t = keymod.assemble(parts, lambda k: ckpt.get_dequantized(k, torch.float32) if ckpt.dtypes[k] in FP8_DTYPES
                        else _read(ckpt, k))
    return check_finite(parts[0][0], t.to(dtype))


DIFFUSERS_FOLDER_FILES = ("config.json", "diffusion_pytorch_model*.safetensors",
                          "diffusion_pytorch_model.safetensors.index.json")


def check_scaled_fp8_layout(layout: str, dtype: str | None, source_fp8: str, src) -> None:
    """ComfyUI's scaled fp8 (``scale_weight`` beside each fp8 weight) has no place in a diffusers folder: diffusers'
    ``from_pretrained`` drops the scales with a warning and runs the unscaled weights (a 140% output error measured
    on the tiny model). Refused, with the settings that do load: plain fp8 or bf16 there, scaled fp8 in one file."""
    keeps_scales = dtype is None and source_fp8 == "fp8-scaled"
    if layout != "diffusers" or not (dtype == "fp8-scaled" or keeps_scales):
        return
    what = f"{src} is scaled fp8 and --dtype unset keeps it" if keeps_scales else "--dtype fp8-scaled writes"
    raise UserError(f"{what} ComfyUI's per-tensor scale_weight tensors, which diffusers' from_pretrained ignores (the "
                    f"folder would load with wrong weights there): for a diffusers folder use --dtype fp8 (plain "
                    f"e4m3fn casts) or --dtype bf16; for ComfyUI write one file (OUT.safetensors, --layout comfy)")


def output_layout(source_layout: str, dst: str | os.PathLike, layout: str | None = None) -> str:
    """The layout ``convert`` writes: ``layout``, else the source's; a diffusers source into ``*.safetensors`` is one
    BFL file (the diffusers layout is a folder: config.json + shards). UserError for a folder layout into a name that
    says file, or an unknown layout."""
    one_file = Path(dst).suffix.lower() == ".safetensors"
    if layout is None:
        return ("bfl" if one_file else "diffusers") if source_layout.startswith("diffusers") else source_layout
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "diffusers" and one_file:
        raise UserError(f"--layout diffusers writes a transformer folder (config.json + safetensors shards), not the "
                        f"file {dst}: name a folder (e.g. {Path(dst).with_suffix('')}), or choose --layout bfl or "
                        f"comfy for one file")
    return layout


def write_diffusers_folder(ckpt: Checkpoint, entries, dst: Path, meta, overwrite: bool, progress,
                            sources=()) -> Path:
    """A transformer folder diffusers' ``from_pretrained`` reads: config.json + (sharded) safetensors."""
    spec = ckpt.spec()
    has_guidance = any("guidance_embedder" in e[0] for e in entries)
    if has_guidance != spec.guidance_embeds:  # --drop-guidance (FLUX.1 only)
        spec = spec.with_(guidance_embeds=has_guidance)
    config = {"_class_name": ckpt.family.transformer_class, **spec.diffusers_config()}
    shards, current, size = [], [], 0
    for e in entries:
        n = tensor_nbytes(e[1], e[2])
        if current and size + n > ckmod.SHARD_BYTES:  # read at call time (tests lower it)
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    shards.append(current)
    total = sum(tensor_nbytes(e[1], e[2]) for e in entries)
    _check_not_other_component(dst)
    with atomic_path(dst, overwrite=overwrite, what="converted transformer folder", folder=True,
                     owned=DIFFUSERS_FOLDER_FILES, sources=sources, size=total) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            stream_safetensors(shards[0], tmp / "diffusion_pytorch_model.safetensors", meta, progress=progress,
                               what="converted checkpoint", finite=False)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                stream_safetensors(shard, tmp / name, meta, progress=progress, what="converted checkpoint",
                                   finite=False)
                weight_map.update({e[0]: name for e in shard})
            (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return dst


def _check_not_other_component(dst: Path) -> None:
    """A VAE or text-encoder folder has the same file names as a transformer folder: refuse to replace it."""
    try:
        cls = json.loads((dst / "config.json").read_text()).get("_class_name") if dst.is_dir() else None
    except (OSError, ValueError, AttributeError):
        return
    if cls and cls not in {f.transformer_class for f in families.families().values()}:
        raise UserError(f"{dst} holds a {cls} (its config.json), not a Flux transformer: refusing to replace it "
                        f"(nothing was deleted). Choose a new folder")
