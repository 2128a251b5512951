"""Bake LoRAs into a base checkpoint file, streamed one tensor at a time (a 24 GB base needs about one tensor of RAM).

Each LoRA's delta is added in the base's own naming: BFL-fused deltas (``formats.to_bfl``: img/txt qkv, single
linear1) for BFL and ComfyUI files, diffusers names for diffusers files and folders (a folder in, a folder out).
FLUX.2 bases take FLUX.2 LoRAs, through that family's key map (``lora_keys.delta_weights``: q|k|v stacked, the
final adaLN's shift|scale halves swapped); a LoRA of the other family is a one-line error naming both. fp8
weights are dequantised first and requantised after with the same scheme (plain casts, or ComfyUI scaled fp8 with
a fresh per-tensor scale; its ``scaled_fp8`` marker is kept): adding a delta to fp8 storage directly, or dropping
the scale, gives silently wrong weights. Every other tensor is copied through unchanged. Written with
``outputs.stream_safetensors`` because safetensors' own writer needs the whole state dict in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..flux import checkpoint as C
from ..flux import convert as flux_convert
from ..flux import fp8 as fp8mod
from ..outputs import check_output, stream_safetensors
from .formats import LoraWeights, load_lora, to_bfl
from .ops import lora_delta

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]  # outputs.stream_safetensors' entries


def deltas_for(ckpt: C.Checkpoint, loras: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """Summed ``scale`` x delta per weight key of ``ckpt``, in its own naming (fp32); UserError naming the LoRA file
    for a module the base lacks or whose delta has another shape (a LoRA for another model family or size)."""
    total: dict[str, torch.Tensor] = {}
    for path, scale in loras:
        lw = load_lora(path, family=ckpt.family, base=ckpt.path)
        if getattr(lw, "adapter", "lora") != "lora":  # LoKr / LoHa / DoRA: placed by lora.lycoris
            for key, d in _adapter_deltas(ckpt, lw, path, scale).items():
                total[key] = total[key] + d if key in total else d
            continue
        for name, delta in _deltas(lw, ckpt.key_layout):
            key = name + ".weight"
            if key not in ckpt.shapes:
                raise UserError(f"{path}: module {name!r} has no weight in base {ckpt.path}; the LoRA is for "
                                f"another model (family or size)")
            d = delta() * scale
            if tuple(d.shape) != tuple(ckpt.shapes[key]):
                raise UserError(f"{path}: module {name!r} gives a {tuple(d.shape)} delta but the base weight is "
                                f"{tuple(ckpt.shapes[key])}; the LoRA is for another model size")
            total[key] = total[key] + d if key in total else d
    return total


def _adapter_deltas(ckpt: C.Checkpoint, lw, path, scale: float) -> dict[str, torch.Tensor]:
    """weight key -> ``scale`` x delta of a LoKr / LoHa / DoRA file (DoRA reads the base weights it renormalises)."""
    from .lycoris import deltas

    spec = ckpt.spec()
    sizes = (spec.num_double, spec.num_single, spec.hidden, spec.mlp_hidden, spec.guidance_embeds)
    shape = lambda n: tuple(ckpt.shapes[n + ".weight"]) if n + ".weight" in ckpt.shapes else None  # noqa: E731
    try:
        out = deltas(lw, ckpt.key_layout, sizes, lambda n: ckpt.get_dequantized(n + ".weight", torch.float32), shape,
                     scale)
    except UserError as e:
        raise UserError(f"{path}: {e} (base {ckpt.path})") from None
    return {n + ".weight": d for n, d in out.items()}


def _deltas(lw: LoraWeights, naming: str):
    """(module name in ``naming``, delta in fp32 when called) for each module of ``lw``."""
    if lw.family == "flux2":
        from ..families.flux2.lora_keys import delta_weights

        return [(n, lambda d=d: d) for n, d in delta_weights(lw, naming=naming).items()]
    mods = to_bfl(lw) if naming == "bfl" else dict(lw)
    return [(n, lambda m=m: lora_delta(m)) for n, m in mods.items()]


def add_delta(weight: torch.Tensor, delta: torch.Tensor,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight + delta, its scale) in the weight's own storage: maths in fp32, one rounding at the end.

    ``weight`` as stored in a file (fp8 with its ComfyUI ``scale`` when it has one, or bf16/fp16/fp32); fp8 comes
    back requantised with the same scheme (a new 0-d fp32 scale when ``scale`` is given, else None). Other dtypes
    come back cast, with ``scale`` passed through.
    """
    fp8 = weight.dtype in C.FP8_DTYPES
    w = (fp8mod.dequantize_entry(weight, scale, torch.float32) if fp8 else weight.to(torch.float32)) + delta
    if fp8:
        return fp8mod.quantize(w, scaled=scale is not None, dtype=weight.dtype)
    return w.to(weight.dtype), scale


def merged_entries(ckpt: C.Checkpoint, deltas: dict[str, torch.Tensor]) -> list[Entry]:
    """The output file's entries in the base's key order: its tensors with ``deltas`` added (``deltas`` is emptied
    as they are written), untouched tensors copied, fp8 scales written as 0-d fp32 after their weights."""
    entries: list[Entry] = []
    if "scaled_fp8" in ckpt.aux:  # ComfyUI's marker of a scaled-fp8 file: readers need it to apply the scales
        marker = ckpt.raw(ckpt.aux["scaled_fp8"])
        entries.append((ckpt.aux["scaled_fp8"], marker.dtype, tuple(marker.shape), lambda m=marker: m))
    for key, shape in ckpt.shapes.items():
        dtype, full = ckpt.dtypes[key], ckpt.prefix + key
        scale_key = fp8mod.scale_key_for(key, ckpt.aux)
        if key not in deltas:
            entries.append((full, dtype, tuple(shape), lambda k=key: ckpt.get(k)))
            if scale_key:
                entries.append((ckpt.aux[scale_key], torch.float32, (), lambda s=scale_key: ckpt.raw(ckpt.aux[s])
                                .float().reshape(())))
            continue
        memo: dict = {}

        def merged(which: int, key=key, memo=memo) -> torch.Tensor:
            # the weight (0) and its scale (1) come from one requantisation, computed when the weight is written
            if not memo:
                memo[0], memo[1] = add_delta(ckpt.get(key), deltas.pop(key), ckpt.scale_of(key))
            return memo.pop(which)
        entries.append((full, dtype, tuple(shape), lambda m=merged: m(0)))
        if scale_key:
            entries.append((ckpt.aux[scale_key], torch.float32, (), lambda m=merged: m(1).reshape(()).float()))
    return entries


def merge_loras(base: str | os.PathLike, loras: list[tuple[str, float]], out: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Write ``base`` with each (LoRA file, scale) of ``loras`` added to ``out``: the base's layout, key order,
    dtypes and metadata (with its family's modelspec fields where it lacks them: a FLUX.2 klein folder's variant),
    plus ``dev2pro.merged_loras`` (JSON [[file name, scale], ...]).

    A diffusers folder gives a transformer folder (config.json + safetensors, as ``convert`` writes it). UserError
    for an existing ``out`` without ``overwrite``, an ``out`` that is one of the inputs, a LoRA that does not fit
    the base; nothing is written then, nor when a merged tensor overflows its dtype (NaN/inf).
    """
    ckpt = C.open_checkpoint(base)
    folder = ckpt.layout == "diffusers-folder"
    sources = [base, *set(ckpt.files.values()), *(p for p, _ in loras)]
    check_output(out, overwrite, "merged checkpoint", folder=folder, sources=sources,
                 owned=flux_convert.DIFFUSERS_FOLDER_FILES if folder else None)
    entries = merged_entries(ckpt, deltas_for(ckpt, loras))
    # what the keys cannot tell travels too: a klein folder's Base/distilled (model_index.json) is recorded in the
    # file, as `dev2pro convert` records it, so the merged model is inspected and sampled as its base is
    meta = {**ckpt.family.modelspec(ckpt.spec()), **ckpt.metadata}
    meta["dev2pro.merged_loras"] = json.dumps([[Path(p).name, s] for p, s in loras])
    if folder:
        return flux_convert.write_diffusers_folder(ckpt, entries, Path(out), meta, overwrite, None, sources=sources)
    return stream_safetensors(entries, out, meta, overwrite=overwrite, what="merged checkpoint", sources=sources)
