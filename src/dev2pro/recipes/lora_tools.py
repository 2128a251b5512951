"""`dev2pro lora info | convert | merge | extract`: move LoRAs between layouts, bake them into bases, and ship the
dev -> dev2pro difference itself as a LoRA.

merge and extract stream through checkpoints one tensor at a time (a 24 GB base needs about one tensor of RAM):
merge adds each LoRA's delta in the base's own naming (BFL-fused qkv deltas for BFL/ComfyUI files), dequantising
fp8 weights first and requantising them with the same scheme (plain or scaled); extract takes the SVD of B - A
per linear layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..flux import checkpoint as C
from ..flux import fp8 as fp8mod
from ..flux import keys as keymod
from ..lora import formats as F
from ..lora.ops import extract, lora_delta
from ..outputs import check_output, stream_safetensors


def info(path: str, as_json: bool = False) -> dict:
    """Describe a LoRA file (``load_lora`` has validated it: finite values, every shape fits a Flux transformer):
    one dict, printed as JSON with ``as_json``, else as aligned text, and returned."""
    lw = F.load_lora(path)
    groups: dict[str, dict] = {}
    for name, m in lw.items():
        g = name.split(".")[0] if not name[0:1].isdigit() else name
        key = f"{g} r={m.rank} alpha={m.alpha:g}"
        groups[key] = groups.get(key, 0) + 1
    out = {"path": str(path), "layout": lw.layout, "modules": len(lw), "groups": groups,
           "params": sum(m.down.numel() + m.up.numel() for m in lw.values()),
           "size_bytes": Path(path).stat().st_size, "metadata": lw.metadata}
    print(json.dumps(out, indent=2, default=str) if as_json else format_info(out))
    return out


def format_info(info: dict) -> str:
    """The human form of ``info()``'s dict: known fields first, any other field as ``name: value``."""
    lines = [f"{info['path']}", f"  layout:   {info['layout']}", f"  modules:  {info['modules']}",
             f"  params:   {info['params']:,}", f"  size:     {_bytes(info['size_bytes'])}", "  groups:"]
    lines += [f"    {n:>5} x {g}" for g, n in sorted(info["groups"].items())]
    for k, v in info.items():
        if k not in ("path", "layout", "modules", "params", "size_bytes", "groups", "metadata"):
            lines.append(f"  {k + ':':<9} {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    meta = info.get("metadata") or {}
    if meta:
        lines.append("  metadata:")
        for k, v in sorted(meta.items()):
            v = str(v)
            lines.append(f"    {k}: {v if len(v) <= 100 else v[:97] + '...'}")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def convert(src: str, dst: str, to: str, overwrite: bool = False) -> Path:
    lw = F.load_lora(src)
    out = F.save_lora(lw, dst, to, metadata=lw.metadata, overwrite=overwrite, sources=[src])
    print(f"wrote {out} ({to} layout, {len(lw)} modules)")
    return out


def _deltas_for(ckpt: C.Checkpoint, loras: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """Summed delta per *weight key* of the checkpoint, in its own naming (fp32)."""
    total: dict[str, torch.Tensor] = {}
    for path, scale in loras:
        lw = F.load_lora(path)
        mods = F._to_bfl(lw) if ckpt.key_layout == "bfl" else dict(lw)
        for name, m in mods.items():
            key = name + ".weight"
            if key not in ckpt.shapes:
                raise UserError(f"{path}: module {name!r} has no weight in base {ckpt.path}; the LoRA is for "
                                f"another model (family or size)")
            d = lora_delta(m) * scale
            if tuple(d.shape) != tuple(ckpt.shapes[key]):
                raise UserError(f"{path}: module {name!r} gives a {tuple(d.shape)} delta but the base weight is "
                                f"{tuple(ckpt.shapes[key])}; the LoRA is for another model size")
            total[key] = total[key] + d if key in total else d
    return total


def merge(base: str, loras: list[tuple[str, float]], out: str, overwrite: bool = False) -> Path:
    """Bake LoRAs into a single-file checkpoint, keeping its layout and dtype scheme (fp8 requantised)."""
    ckpt = C.open_checkpoint(base)
    if ckpt.layout == "diffusers-folder":
        raise UserError(f"{base}: merge writes single files; convert the folder first "
                        f"(dev2pro convert {base} base.safetensors --layout bfl)")
    sources = [base, *set(ckpt.files.values()), *(p for p, _ in loras)]
    check_output(out, overwrite, "merged checkpoint", folder=False, sources=sources)
    deltas = _deltas_for(ckpt, loras)
    entries = []
    if "scaled_fp8" in ckpt.aux:
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

        def merged(which, key=key, dtype=dtype, scaled=scale_key is not None, memo=memo):
            if not memo:
                w = ckpt.get_dequantized(key, torch.float32) + deltas.pop(key)
                if dtype in C.FP8_DTYPES:
                    memo[0], memo[1] = fp8mod.quantize(w, scaled=scaled, dtype=dtype)
                else:
                    memo[0], memo[1] = w.to(dtype), None
            return memo.pop(which)
        entries.append((full, dtype, tuple(shape), lambda m=merged: m(0)))
        if scale_key:
            entries.append((ckpt.aux[scale_key], torch.float32, (), lambda m=merged: m(1).reshape(()).float()))
    meta = dict(ckpt.metadata)
    meta["dev2pro.merged_loras"] = json.dumps([[Path(p).name, s] for p, s in loras])
    path = stream_safetensors(entries, out, meta, overwrite=overwrite, what="merged checkpoint", sources=sources)
    print(f"wrote {path} ({len(loras)} LoRA(s) merged into {ckpt.layout} {ckpt.fp8_format} base)")
    return path


def extract_lora(a: str, b: str, out: str, rank: int, energy: float | None = None, overwrite: bool = False,
                 min_delta: float = 0.0) -> dict:
    """SVD of (B - A) per linear layer into a kohya-layout LoRA; prints and returns per-layer retained energy."""
    if rank <= 0:
        raise UserError(f"--rank must be > 0, got {rank}")
    check_output(out, overwrite)
    ca, cb = C.open_checkpoint(a), C.open_checkpoint(b)
    pa = keymod.plan(ca.shapes, ca.key_layout, "diffusers")
    pb = keymod.plan(cb.shapes, cb.key_layout, "diffusers")
    lw, report = F.LoraWeights(layout="kohya"), {}
    for key in sorted(set(pa) & set(pb)):
        if not key.endswith(".weight") or len(C._out_shape(ca, pa[key])) != 2:
            continue
        wa = keymod.assemble(pa[key], lambda k: ca.get_dequantized(k, torch.float32))
        wb = keymod.assemble(pb[key], lambda k: cb.get_dequantized(k, torch.float32))
        if wa.shape != wb.shape:
            raise UserError(f"{key}: {tuple(wa.shape)} in {a} but {tuple(wb.shape)} in {b}; not the same model")
        delta = wb - wa
        norm = float(delta.norm())
        if norm <= min_delta * max(float(wa.norm()), 1e-12):
            continue
        module, kept = extract(delta, rank, energy)
        lw[key[:-len(".weight")]] = module
        report[key[:-len(".weight")]] = {"rank": module.rank, "energy": round(kept, 6)}
    if not lw:
        raise UserError(f"{a} and {b} have identical linear weights: there is nothing to extract")
    meta = F.kohya_metadata(rank, float(rank), 1.0, "n/a", Path(b).name,
                            extra={"dev2pro.extracted_from": Path(a).name, "dev2pro.extracted_to": Path(b).name})
    F.save_lora(lw, out, "kohya", metadata=meta, overwrite=overwrite)
    energies = [v["energy"] for v in report.values()]
    print(f"wrote {out}: {len(lw)} layers, retained energy min {min(energies):.4f} mean "
          f"{sum(energies) / len(energies):.4f}")
    return report


def add_lora_parser(sub):
    """The `lora` subcommands (built in cli_commands, which imports nothing heavy)."""
    from ..cli_commands import add_lora

    add_lora(sub)
