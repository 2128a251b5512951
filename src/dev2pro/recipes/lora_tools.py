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
from ..flux import fp8 as fp8mod
from ..flux import keys as keymod
from ..flux.fp8 import FP8_DTYPES
from ..guidance_defaults import dedistilled
from ..lora import formats as F
from ..lora.lycoris import describe, param_count
from ..lora.merge import merge_loras
from ..lora.ops import decompose, rank_errors
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


FP8_PROBE_LAYERS = 16  # layers whose fp8 rounding extract measures: one quantise round trip each, cheap beside an SVD


def _stored_fp8(ckpt, parts) -> torch.dtype | None:
    """The fp8 dtype the checkpoint stores a (planned) tensor's pieces in, or None when they are not fp8."""
    return next((ckpt.dtypes[k] for k, *_ in parts if ckpt.dtypes.get(k) in FP8_DTYPES), None)


def _layer_pairs(ca, cb, a: str, b: str, report: dict):
    """Stream (diffusers module name, A weight, B - A, (A's fp8 dtype, B's)) for every 2-D linear weight the two
    checkpoints share, one tensor pair at a time in fp32 (the dtypes: how each file stores it, None when not fp8);
    differing 1-D tensors (biases, norm scales), which a LoRA cannot carry, go into ``report["not_linear"]`` with
    their relative difference."""
    families.require_same(ca.family, cb.family, f"model {a}", f"model {b}")
    pa, pb = ca.plan("diffusers"), cb.plan("diffusers")
    for key in sorted(set(pa) & set(pb)):
        wa = keymod.assemble(pa[key], lambda k: ca.get_dequantized(k, torch.float32))
        wb = keymod.assemble(pb[key], lambda k: cb.get_dequantized(k, torch.float32))
        if wa.shape != wb.shape:
            raise UserError(f"{key}: {tuple(wa.shape)} in {a} but {tuple(wb.shape)} in {b}; not the same model")
        if not key.endswith(".weight") or wa.ndim != 2:
            if not torch.equal(wa, wb):
                report["not_linear"][key] = round(float((wb - wa).norm() / wa.norm().clamp_min(1e-12)), 6)
            continue
        yield key[: -len(".weight")], wa, wb - wa, (_stored_fp8(ca, pa[key]), _stored_fp8(cb, pb[key]))


def _fp8_probe(ca, cb, a: str, b: str) -> dict | None:
    """The fp8 sides of an extraction (read from the headers), and the rounding measured on them so far; None when
    neither file stores fp8 weights."""
    sides = {flag: {"path": str(p), "format": c.fp8_format} for flag, c, p in (("--base", ca, a), ("--tuned", cb, b))
             if c.fp8_format != "none"}
    return {"sides": sides, "layers": 0, "rounding": 0.0, "delta": 0.0} if sides else None


def _probe_layer(probe: dict, ca, cb, wa: torch.Tensor, delta: torch.Tensor, dtypes) -> None:
    """How much of this layer's B - A is fp8 rounding: the high-precision side quantised as the fp8 side stores it
    (its format; a per-tensor scale in a scaled file) is off by about what the fp8 side's own rounding added to
    the difference. Only where one side is fp8 (two fp8 sides leave nothing exact to measure against)."""
    da, db = dtypes
    if (da is None) == (db is None) or probe["layers"] >= FP8_PROBE_LAYERS:
        return
    hi, dtype, ckpt = (wa, db, cb) if db is not None else (wa + delta, da, ca)
    q, scale = fp8mod.quantize(hi, scaled=ckpt.fp8_format == "fp8-scaled", dtype=dtype)
    probe["rounding"] += float((fp8mod.dequantize_entry(q, scale, torch.float32) - hi).double().square().sum())
    probe["delta"] += float(delta.double().square().sum())
    probe["layers"] += 1


def _fp8_report(probe: dict) -> tuple[dict, str]:
    """(the report's ``fp8`` entry, the warning): which side is fp8 and, when measured, the share of the
    difference's energy that is rounding."""
    sides = probe["sides"]
    share = min(1.0, probe["rounding"] / probe["delta"]) if probe["delta"] > 0 else None
    entry = {"sides": sides, "layers_measured": probe["layers"],
             **({"rounding_share": round(share, 4)} if share is not None else {})}
    names = " and ".join(f"{flag} {s['path']}" for flag, s in sides.items())
    formats = "/".join(sorted({s["format"] for s in sides.values()}))
    head = f"{names} store{'s' if len(sides) == 1 else ''} fp8 weights ({formats})"
    fix = "extract from the bf16/fp32 files instead (e.g. a run folder's dev2pro.safetensors, not its -fp8 export)"
    if share is None:  # both sides fp8: nothing exact to measure the rounding against
        return entry, (f"{head}: fp8 rounding (~2-3% of each weight) can outweigh a fine-tune's whole change, and "
                       f"then the difference -- and the LoRA -- is mostly rounding noise; {fix}")
    measured = f"{share:.0%} of the difference's energy is fp8 rounding (measured on {probe['layers']} " \
               f"layer{'s' if probe['layers'] != 1 else ''})"
    if share >= 0.25:
        return entry, f"{head}: about {measured}, not the fine-tune, so the LoRA is mostly rounding noise; {fix}"
    return entry, f"{head}: about {measured}; the bf16/fp32 files would give a cleaner LoRA"


def _total(layers: dict, field: str, k: int) -> float:
    """Energy-weighted total over layers: sum of kept squared singular values / sum of totals."""
    den = sum(v["delta_energy"] for v in layers.values())
    return sum(v[field][k] * v["delta_energy"] for v in layers.values()) / den if den > 0 else 1.0


def _recommend(by_rank: dict[int, float], target: float) -> tuple[int, bool]:
    """(the smallest rank keeping ``target`` of the energy, True), or (the best rank there is, False)."""
    ok = [k for k, e in sorted(by_rank.items()) if e >= target]
    return (ok[0], True) if ok else (max(by_rank), False)


def _extract_layer(wa: torch.Tensor, delta: torch.Tensor, rank: int, energy: float | None, ranks, inputs: dict,
                   n_inputs: int, **svd) -> tuple[dict, F.LoraModule | None]:
    """One layer's report entry and, without ``ranks``, its LoRA module (rank ``rank``, fewer with ``energy``)."""
    f = decompose(delta, rank, **svd)
    layer = {"method": f.method, "delta_energy": f.total,
             "relative_delta": round(float(delta.norm() / wa.norm().clamp_min(1e-12)), 6),
             "energy_by_rank": f.ladder(rank)}
    if ranks:
        layer["energy_by_rank"] = {k: round(f.energy(k), 6) for k in sorted(ranks)}
        x = inputs.setdefault(wa.shape[1], torch.randn(n_inputs, wa.shape[1],
                                                       generator=torch.Generator().manual_seed(wa.shape[1])))
        errs = rank_errors(wa, delta, f, ranks, x)
        layer["output_error_by_rank"] = {k: round((num / den) ** 0.5 if den > 0 else 0.0, 6)
                                         for k, (num, den) in errs.items()}
        layer["_errs"] = errs
        return layer, None
    layer["energy_by_rank"].setdefault(rank, round(f.energy(rank), 6))  # the --rank asked for, on the ladder or not
    k = max(1, min(rank, f.s.numel()))
    if energy is not None:
        k = min(k, f.rank_for(energy))
    layer.update(rank=k, energy=round(f.energy(k), 6))
    return layer, f.module(k)


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
    fam_spec, probe = cb.spec(), _fp8_probe(ca, cb, a, b)  # the target's family and size: the LoRA is for it
    lw, inputs, t0 = F.LoraWeights(layout="kohya", family=fam_spec.family), {}, time.perf_counter()
    for name, wa, delta, dtypes in _layer_pairs(ca, cb, a, b, report):
        if float(delta.norm()) <= min_delta * max(float(wa.norm()), 1e-12) or not delta.any():
            continue
        if probe is not None:
            _probe_layer(probe, ca, cb, wa, delta, dtypes)
        layer, module = _extract_layer(wa, delta, rank, energy, ranks, inputs, n_inputs, exact=exact,
                                       oversample=oversample, niter=niter, device=device)
        report["layers"][name] = layer
        if module is not None:
            lw[name] = module
    if not report["layers"]:
        raise UserError(f"{a} and {b} have identical linear weights: there is nothing to extract")
    if probe is not None:
        report["fp8"], warning = _fp8_report(probe)
        report["warnings"].append(warning)
    _totals(report, ranks)
    report["recommended_rank"], report["energy_target_met"] = _recommend(report["total"]["energy_by_rank"], target)
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


def _totals(report: dict, ranks: list[int] | None) -> None:
    """``report["total"]``: energy by rank over every layer and, per mode, the output error by rank or the energy
    the written LoRA retains."""
    layers = report["layers"]
    ladder = sorted(ranks) if ranks else sorted(set.intersection(*(set(v["energy_by_rank"]) for v in layers.values())))
    report["total"] = {"energy_by_rank": {k: round(_total(layers, "energy_by_rank", k), 6) for k in ladder}}
    if ranks:
        num = {k: sum(v["_errs"][k][0] for v in layers.values()) for k in ranks}
        den = sum(next(iter(v["_errs"].values()))[1] for v in layers.values())
        report["total"]["output_error_by_rank"] = {k: round((num[k] / den) ** 0.5, 6) for k in sorted(ranks)}
        for v in layers.values():
            del v["_errs"]
    else:
        den = sum(v["delta_energy"] for v in layers.values())
        report["total"]["retained_energy"] = round(sum(v["energy"] * v["delta_energy"] for v in layers.values())
                                                   / den, 6)


def _target_warning(report: dict, energy: float | None, ranks: list[int] | None) -> str | None:
    """What to do when the energy target is not met: by layer with ``energy`` (its per-layer ranks), else in total
    at the best rank there is; None when it is met. When fp8 rounding is much of the difference, no rank helps: the
    advice is the bf16/fp32 files."""
    layers, total, target = report["layers"], report["total"], report["energy_target"]
    best, share = report["recommended_rank"], report.get("fp8", {}).get("rounding_share")
    noise = share is not None and share >= 0.25
    fp8 = (f"about {share:.0%} of the difference is fp8 rounding, which no rank captures (see the fp8 warning): "
           "extract from the bf16/fp32 files rather than raising the rank") if noise else ""
    if energy is not None and not ranks:
        short = {n: v["energy"] for n, v in layers.items() if v["energy"] < energy - 1e-9}
        if not short:
            return None
        return (f"--energy {energy:g} not met in {len(short)} of {len(layers)} layers at the --rank "
                f"{report['rank']} cap (lowest {min(short.values()):.3f} in {min(short, key=short.get)}, total "
                f"{total['retained_energy']:.3f}): " + (fp8 or "raise --rank (see energy_by_rank in the report)"))
    if report["energy_target_met"]:
        return None
    kept = total["energy_by_rank"][best]
    if ranks:
        return (f"no rank in --ranks keeps {target:g} of the energy in total (the largest, {best}, keeps "
                f"{kept:.3f}): " + (fp8 or "add larger ranks to --ranks or lower the target with --energy"))
    return (f"rank {best} keeps {kept:.3f} of the energy in total, short of the {target:g} target: " + (
        fp8 or "raise --rank (energy_by_rank in the report shows how it grows; --ranks 8,32,128 writes a fidelity "
               "report without a LoRA), or lower the target with --energy"))


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
    if (warning := _target_warning(report, energy, ranks)) is not None:
        report["warnings"].append(warning)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
