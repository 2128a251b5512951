"""The numbers behind `dev2pro lora extract`: B - A streamed per linear layer, its SVD energy and output error per
rank, the recommended rank for an energy target, and how much of the difference is fp8 rounding when one side is
stored in fp8 (``recipes.lora_tools.extract_lora`` is the recipe that writes the LoRA and the report)."""

from __future__ import annotations

import torch

from .. import families
from ..errors import UserError
from ..flux import fp8 as fp8mod
from ..flux import keys as keymod
from ..flux.fp8 import FP8_DTYPES
from .formats import LoraModule
from .ops import decompose, rank_errors


FP8_PROBE_LAYERS = 16  # layers whose fp8 rounding extract measures: one quantise round trip each, cheap beside an SVD


def stored_fp8(ckpt, parts) -> torch.dtype | None:
    """The fp8 dtype the checkpoint stores a (planned) tensor's pieces in, or None when they are not fp8."""
    return next((ckpt.dtypes[k] for k, *_ in parts if ckpt.dtypes.get(k) in FP8_DTYPES), None)


def layer_pairs(ca, cb, a: str, b: str, report: dict):
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
        yield key[: -len(".weight")], wa, wb - wa, (stored_fp8(ca, pa[key]), stored_fp8(cb, pb[key]))


def fp8_probe(ca, cb, a: str, b: str) -> dict | None:
    """The fp8 sides of an extraction (read from the headers), and the rounding measured on them so far; None when
    neither file stores fp8 weights."""
    sides = {flag: {"path": str(p), "format": c.fp8_format} for flag, c, p in (("--base", ca, a), ("--tuned", cb, b))
             if c.fp8_format != "none"}
    return {"sides": sides, "layers": 0, "rounding": 0.0, "delta": 0.0} if sides else None


def probe_layer(probe: dict, ca, cb, wa: torch.Tensor, delta: torch.Tensor, dtypes) -> None:
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


def fp8_report(probe: dict) -> tuple[dict, str]:
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


def total(layers: dict, field: str, k: int) -> float:
    """Energy-weighted total over layers: sum of kept squared singular values / sum of totals."""
    den = sum(v["delta_energy"] for v in layers.values())
    return sum(v[field][k] * v["delta_energy"] for v in layers.values()) / den if den > 0 else 1.0


def recommend(by_rank: dict[int, float], target: float) -> tuple[int, bool]:
    """(the smallest rank keeping ``target`` of the energy, True), or (the best rank there is, False)."""
    ok = [k for k, e in sorted(by_rank.items()) if e >= target]
    return (ok[0], True) if ok else (max(by_rank), False)


def extract_layer(wa: torch.Tensor, delta: torch.Tensor, rank: int, energy: float | None, ranks, inputs: dict,
                   n_inputs: int, **svd) -> tuple[dict, LoraModule | None]:
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


def totals(report: dict, ranks: list[int] | None) -> None:
    """``report["total"]``: energy by rank over every layer and, per mode, the output error by rank or the energy
    the written LoRA retains."""
    layers = report["layers"]
    ladder = sorted(ranks) if ranks else sorted(set.intersection(*(set(v["energy_by_rank"]) for v in layers.values())))
    report["total"] = {"energy_by_rank": {k: round(total(layers, "energy_by_rank", k), 6) for k in ladder}}
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


def target_warning(report: dict, energy: float | None, ranks: list[int] | None) -> str | None:
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
