"""`dev2pro lora info | convert | merge | extract`: move LoRAs between layouts, bake them into bases, and ship the
dev -> dev2pro difference itself as a LoRA.

merge and extract stream through checkpoints one tensor at a time (a 24 GB base needs about one tensor of RAM):
merge is ``lora.merge.merge_loras`` (each LoRA's delta added in the base's own naming, fp8 requantised with the
same scheme); extract takes the SVD of B - A per linear layer. FLUX.1 and FLUX.2 alike: a LoRA's family is read
from the file (``lora.flux2``), and a LoRA and a base (or two checkpoints) of different families is a one-line error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..flux import checkpoint as C
from .. import families
from ..guidance_defaults import dedistilled
from ..lora import formats as F
from ..lora.lycoris import describe, param_count
from ..lora import extraction as X
from ..lora.merge import merge_loras
from ..outputs import check_output, write_json


def info(path: str, as_json: bool = False) -> dict:
    """Describe a LoRA file (``load_lora`` has validated it: finite values, every shape fits a Flux transformer):
    one dict, printed as JSON with ``as_json``, else as aligned text, and returned."""
    lw = F.load_lora(path)
    groups: dict[str, dict] = {}
    for name, m in lw.items():
        g = name.split(".")[0] if not name[0:1].isdigit() else name
        key = f"{g} {describe(m)}"
        groups[key] = groups.get(key, 0) + 1
    family = families.get(lw.family).title if lw.family else "FLUX.1 or FLUX.2 (its names and shapes fit both)"
    arch = str((lw.metadata or {}).get("modelspec.architecture", ""))  # which base: flux-2-dev, flux-2-klein-4b...
    out = {"path": str(path), "family": family, **({"base": arch.removesuffix("/lora")} if arch else {}),
           "layout": lw.layout, "type": getattr(lw, "adapter", "lora"),
           "modules": len(lw), "groups": groups, "params": sum(param_count(m) for m in lw.values()),
           "size_bytes": Path(path).stat().st_size, "metadata": lw.metadata}
    if dedistilled(lw.metadata or {}):  # dev -> dev2pro: base + it renders as dev2pro is used
        out["dedistill"] = (f"a de-distillation adapter (objective {lw.metadata['dev2pro.objective']}): base + it is a "
                            f"dev2pro, trained at guidance 1; dev2pro sample --adapter renders it with true CFG")
    if (refs := F.edit_references(lw.metadata)) > 0:  # trained on FLUX.2 edit pairs: it edits a reference image
        out["edit"] = f"trained on edit pairs, {refs} reference image(s) per edit (sample with as many --image)"
    print(json.dumps(out, indent=2, default=str) if as_json else format_info(out))
    return out


def format_info(info: dict) -> str:
    """The human form of ``info()``'s dict: known fields first, any other field as ``name: value``."""
    lines = [f"{info['path']}", *([f"  family:   {info['family']}"] if "family" in info else []),
             *([f"  base:     {info['base']}"] if "base" in info else []),
             f"  layout:   {info['layout']}", *([f"  type:     {info['type']}"] if "type" in info else []),
             f"  modules:  {info['modules']}",
             f"  params:   {info['params']:,}", f"  size:     {_bytes(info['size_bytes'])}", "  groups:"]
    lines += [f"    {n:>5} x {g}" for g, n in sorted(info["groups"].items())]
    for k, v in info.items():
        if k not in ("path", "family", "base", "layout", "type", "modules", "params", "size_bytes", "groups",
                     "metadata"):
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


def convert(src: str, dst: str, to: str, overwrite: bool = False, family: str | None = None) -> Path:
    """``src`` rewritten in layout ``to``. ``family`` ('flux1' / 'flux2'): the model the LoRA is for -- needed only
    when neither its names and shapes nor its header tell (FLUX.2's comfy layout differs from FLUX.1's)."""
    lw = F.load_lora(src, family=family)
    out = F.save_lora(lw, dst, to, metadata=lw.metadata, overwrite=overwrite, sources=[src])
    kind = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}.get(getattr(lw, "adapter", "lora"),
                                                                              "adapter")
    print(f"wrote {out} ({families.get(lw.family or 'flux1').title} {kind}, {to} layout, {len(lw)} modules)")
    if lw.family is None and family is None:
        print("note: its names, shapes and header fit FLUX.1 and FLUX.2 alike, so it was written as FLUX.1; for a "
              "FLUX.2 LoRA run again with --family flux2")
    return out


def merge(base: str, loras: list[tuple[str, float]], out: str, overwrite: bool = False) -> Path:
    """Bake LoRAs into a single-file checkpoint, keeping its layout and dtype scheme (fp8 requantised)."""
    path = merge_loras(base, loras, out, overwrite=overwrite)
    ckpt = C.open_checkpoint(base)
    fp8 = "" if ckpt.fp8_format == "none" else f" {ckpt.fp8_format}"
    print(f"wrote {path} ({len(loras)} LoRA(s) merged into {ckpt.family.title} {ckpt.layout}{fp8} base)")
    return path


def _check_extract_args(rank, energy, ranks) -> int:
    if ranks:
        if any(r <= 0 for r in ranks):
            raise UserError(f"--ranks must be positive integers, got {ranks}")
        return max(ranks)
    if rank is None or rank <= 0:
        raise UserError(f"--rank must be > 0, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {energy}")
    return rank


def extract_lora(a: str, b: str, out: str, rank: int | None = None, energy: float | None = None,
                 overwrite: bool = False, min_delta: float = 0.0, exact: bool | None = None,
                 ranks: list[int] | None = None, device: str | None = None, oversample: int = 16, niter: int = 4,
                 n_inputs: int = 256) -> dict:
    """SVD of (B - A) per linear layer, streamed tensor by tensor (GPU when there is one).

    Default: write a kohya-layout LoRA of ``rank`` (or fewer per layer with ``energy``) and, beside it,
    ``<out>.json``: per-layer and total retained energy by rank (the spectrum summary), the recommended rank for
    the energy target (default 0.9) -- the smallest rank meeting it, else the best one there is, with
    ``energy_target_met`` false and a warning --, warnings (an fp8 side among them: its rounding, measured on the
    first layers, is part of the difference). With ``ranks`` nothing but the fidelity report ``out`` (JSON) is
    written: per rank, retained energy and the relative output error of A + rank-k LoRA against B on fixed random
    inputs, per layer and in total. Returns the report.
    """
    rank = _check_extract_args(rank, energy, ranks)
    report_path = Path(out) if ranks else Path(str(out) + ".json")
    for path in {Path(out), report_path}:
        check_output(path, overwrite, folder=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here; use --device cpu")
    target = energy if energy is not None else 0.9
    report = {"from": str(a), "to": str(b), "rank": rank, "energy_target": target, "device": device,
              "layers": {}, "not_linear": {}, "warnings": []}
    ca, cb = C.open_checkpoint(a), C.open_checkpoint(b)
    fam_spec, probe = cb.spec(), X.fp8_probe(ca, cb, a, b)  # the target's family and size: the LoRA is for it
    lw, inputs, t0 = F.LoraWeights(layout="kohya", family=fam_spec.family), {}, time.perf_counter()
    for name, wa, delta, dtypes in X.layer_pairs(ca, cb, a, b, report):
        if float(delta.norm()) <= min_delta * max(float(wa.norm()), 1e-12) or not delta.any():
            continue
        if probe is not None:
            X.probe_layer(probe, ca, cb, wa, delta, dtypes)
        layer, module = X.extract_layer(wa, delta, rank, energy, ranks, inputs, n_inputs, exact=exact,
                                       oversample=oversample, niter=niter, device=device)
        report["layers"][name] = layer
        if module is not None:
            lw[name] = module
    if not report["layers"]:
        raise UserError(f"{a} and {b} have identical linear weights: there is nothing to extract")
    if probe is not None:
        report["fp8"], warning = X.fp8_report(probe)
        report["warnings"].append(warning)
    X.totals(report, ranks)
    report["recommended_rank"], report["energy_target_met"] = X.recommend(report["total"]["energy_by_rank"], target)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _warn_and_print(report, energy, ranks)
    if not ranks:
        # a de-distillation's provenance travels: base + this adapter renders as it (``sampling.dedistilled``)
        made = {k: v for k, v in cb.metadata.items() if k in ("dev2pro.recipe", "dev2pro.objective")}
        meta = F.kohya_metadata(rank, float(rank), 1.0, "n/a", Path(b).name, spec=fam_spec, extra={
            **made, "dev2pro.extracted_from": Path(a).name, "dev2pro.extracted_to": Path(b).name,
            "dev2pro.retained_energy": str(report["total"]["retained_energy"])})
        F.save_lora(lw, out, "kohya", metadata=meta, overwrite=overwrite)
    write_json(report_path, report, overwrite=True)
    print(f"wrote {'' if ranks else str(out) + ' and '}{report_path}")
    return report


def _warn_and_print(report: dict, energy: float | None, ranks: list[int] | None) -> None:
    layers, total = report["layers"], report["total"]
    methods = sorted({v["method"] for v in layers.values()})
    print(f"{len(layers)} layers ({'/'.join(methods)} SVD on {report['device']}, {report['seconds']} s)")
    if report["not_linear"]:
        worst = max(report["not_linear"].items(), key=lambda kv: kv[1])
        report["warnings"].append(f"{len(report['not_linear'])} non-linear tensors (biases, norms) differ and are "
                                  f"not in the LoRA (largest relative difference {worst[1]:.3g} in {worst[0]})")
    print("rank | total retained energy" + (" | total output rel. error | worst layer error" if ranks else ""))
    for k, e in total["energy_by_rank"].items():
        line = f"{k:>4} | {e:.4f}"
        if ranks:
            worst = max(v["output_error_by_rank"][k] for v in layers.values())
            line += f" | {total['output_error_by_rank'][k]:.4f} | {worst:.4f}"
        print(line)
    target, best = report["energy_target"], report["recommended_rank"]
    print(f"recommended rank for {target:g} of the energy: {best}" if report["energy_target_met"] else
          f"recommended rank for {target:g} of the energy: none up to rank {best} (it keeps "
          f"{total['energy_by_rank'][best]:.4f}; see the warning)")
    if (warning := X.target_warning(report, energy, ranks)) is not None:
        report["warnings"].append(warning)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
