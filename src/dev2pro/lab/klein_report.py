"""The klein demo's numbers and words: per-seed judges' metrics per arm -> mean and 95% interval, paired
differences (``report.compare``: the 95% interval of the per-seed difference must exclude 0), and the calibrated
strength against the strength that measured best -- whichever way it comes out.

Arms (rows): ``B->D @ s`` (the Base-trained LoRA on the distilled model at strength s), ``B->D @ cal.`` (at the
strength `calibrate` recommended for that seed), ``D->D`` (a LoRA trained on the distilled model), ``B->B`` (the
Base-trained LoRA on Base with true CFG: the oracle, the reference of the distances "to oracle").
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..outputs import write_text
from .judges import digit_accuracy, features, format_ci, frechet_distance, mean_ci, style_fidelity
from .klein import load_samples, save_grid, strength_key
from .report import METRICS, compare
from .world import styled

ROW_METRICS = ("style", "digits", "fd_real", "fd_oracle", "pix_oracle")
KEY_METRICS = ("style", "digits", "fd_oracle")
ORACLE = "B->B"
CALIBRATED = "B->D @ cal."
BEST_BY = "fd_oracle"  # "the strength that measured best": the lowest mean FD to the oracle


def fixed(s: float) -> str:
    return f"B->D @ {s:g}"


def arm_samples(results: list[dict], seed: int, strengths: Sequence[float]) -> dict[str, np.ndarray]:
    """{row name: RGB samples} of one seed, from the jobs' samples files."""
    by = {(r["arm"], r["seed"]): r for r in results}
    b, d = by[("B", seed)]["samples"], by[("D", seed)]["samples"]
    on_distilled = load_samples(b["distilled"])
    rows = {fixed(s): on_distilled[strength_key(s)] for s in strengths}
    if "calibrated" in b:
        rows[CALIBRATED] = next(iter(load_samples(b["calibrated"]).values()))
    rows["D->D"] = load_samples(d["distilled"])[strength_key(1.0)]
    rows[ORACLE] = load_samples(b["base"])[strength_key(1.0)]
    return rows


def evaluate(results: list[dict], judges, world, *, seeds: int, per_class: int, strengths: Sequence[float]) -> dict:
    """Per-seed metrics of every row, their mean +- 95% interval, references, calibration and the verdict."""
    labels = np.repeat(np.arange(10), per_class)
    real = features(judges, styled(world.holdout_images))
    by = {(r["arm"], r["seed"]): r for r in results}
    per_seed: dict[str, dict[str, list]] = {}
    refs: dict[str, dict[str, list]] = {}
    for s in range(seeds):
        rows = arm_samples(results, s, strengths)
        orc = rows[ORACLE]
        orc_f = features(judges, orc)
        for name, rgb in rows.items():
            m = per_seed.setdefault(name, {k: [] for k in ROW_METRICS})
            f = features(judges, rgb)
            m["style"].append(style_fidelity(judges, rgb))
            m["digits"].append(digit_accuracy(judges, rgb, labels))
            m["fd_real"].append(frechet_distance(f, real))
            if name != ORACLE:
                m["fd_oracle"].append(frechet_distance(f, orc_f))
                m["pix_oracle"].append(float(np.abs(rgb - orc).mean()))
        ref = by[("ref", s)]["samples"]
        for name, file in (("distilled without LoRA", ref["distilled"]), ("Base without LoRA + CFG", ref["base"])):
            rgb = load_samples(file)["none"]
            m = refs.setdefault(name, {"style": [], "digits": [], "fd_real": []})
            m["style"].append(style_fidelity(judges, rgb))
            m["digits"].append(digit_accuracy(judges, rgb, labels))
            m["fd_real"].append(frechet_distance(features(judges, rgb), real))
    table = {"rows": {name: {k: {**mean_ci(v), "values": [round(x, 6) for x in v]} for k, v in m.items() if v}
                      for name, m in per_seed.items()},
             "references": {name: {k: mean_ci(v) for k, v in m.items()} for name, m in refs.items()}}
    table["calibration"] = calibration_summary(results, table, seeds, strengths)
    table["verdict"] = verdict(table, strengths)
    return table


def best_strength(values_by_strength: dict[float, Sequence[float]], direction: int = -1) -> float:
    """The strength whose mean metric is best (``direction`` -1: lowest, +1: highest); ties go to the smaller."""
    return min(values_by_strength, key=lambda s: (-direction * float(np.mean(values_by_strength[s])), s))


def calibration_summary(results: list[dict], table: dict, seeds: int, strengths: Sequence[float]) -> dict:
    """Calibrated strength per seed vs the fixed strength that measured best (per seed and on the mean)."""
    by = {(r["arm"], r["seed"]): r for r in results}
    cal = [by[("B", s)].get("calibration", {}).get("recommended_strength") for s in range(seeds)]
    direction = METRICS[BEST_BY][1]
    rows = table["rows"]
    per_seed_best = [best_strength({x: [rows[fixed(x)][BEST_BY]["values"][s]] for x in strengths}, direction)
                     for s in range(seeds)]
    best = best_strength({x: rows[fixed(x)][BEST_BY]["values"] for x in strengths}, direction)
    found = [c for c in cal if c is not None]
    ref_effects = [by[("B", s)].get("calibration", {}).get("reference_effect") for s in range(seeds)]
    return {"per_seed": [None if c is None else round(c, 4) for c in cal], "calibrated": mean_ci(found) if found
            else None, "best_fixed_by": BEST_BY, "best_fixed": best, "best_per_seed": per_seed_best,
            "reference_effects": ref_effects,
            "missing": sum(c is None for c in cal)}


def _claim(x: dict, y: dict) -> str:
    res = {m: compare(x[m], y[m], m) for m in KEY_METRICS if m in x and m in y}
    win = [METRICS[m][0] for m, v in res.items() if v > 0]
    lose = [METRICS[m][0] for m, v in res.items() if v < 0]
    if not win and not lose:
        return "within noise on every key metric"
    return f"clearly better on {', '.join(win) or 'nothing'}, clearly worse on {', '.join(lose) or 'nothing'}"


def verdict(table: dict, strengths: Sequence[float]) -> str:
    """Sentences from the numbers: B->D at 1.0 / the best fixed strength / the calibrated one vs D->D, and the
    calibrated strength vs the best fixed one."""
    rows, cal = table["rows"], table["calibration"]
    best = cal["best_fixed"]
    parts = [f"B->D @ 1 vs D->D: {_claim(rows[fixed(1.0)], rows['D->D'])}"]
    if best != 1.0:
        parts.append(f"B->D @ {best:g} (best fixed strength by mean FD to oracle) vs D->D: "
                     f"{_claim(rows[fixed(best)], rows['D->D'])}; vs B->D @ 1: "
                     f"{_claim(rows[fixed(best)], rows[fixed(1.0)])}")
    else:
        parts.append("the best fixed strength by mean FD to oracle is 1")
    if CALIBRATED in rows:
        parts.append(f"B->D at the calibrated strength vs D->D: {_claim(rows[CALIBRATED], rows['D->D'])}; vs B->D "
                     f"@ 1: {_claim(rows[CALIBRATED], rows[fixed(1.0)])}")
    c = cal["calibrated"]
    if c is None:
        cal_text = "`calibrate` recommended no strength (the effect on the distilled model never reached Base's)"
    else:
        lo, hi = min(strengths), max(strengths)
        where = "inside" if lo <= c["mean"] <= hi else "outside"
        cal_text = (f"`calibrate` recommends {_ci(c)} (per seed: "
                    f"{', '.join('—' if v is None else f'{v:.2f}' for v in cal['per_seed'])}), {where} the measured "
                    f"range; the best fixed strength by mean FD to oracle is {best:g} (per seed: "
                    f"{', '.join(f'{v:g}' for v in cal['best_per_seed'])})")
    notes = []
    means = [rows[n]["style"]["mean"] for n in rows if n != ORACLE]
    if means and min(means) >= 0.99:
        notes.append("style fidelity is at its ceiling for every arm: it does not separate them here")
    return ("Paired 95% intervals over seeds, key metrics style fidelity, digit accuracy, FD to oracle: "
            + "; ".join(parts) + ". " + cal_text + "." + "".join(f" Note: {n}." for n in notes))


def _ci(d: dict | None, digits: int = 3) -> str:
    if d is None:
        return "—"
    return format_ci(d, digits) if np.isfinite(d.get("half", np.nan)) else f"{d['mean']:.{digits}f}"


def _pairs(rows: dict, strengths: Sequence[float], best: float) -> list[tuple[str, str]]:
    pairs = [(fixed(s), "D->D") for s in strengths]
    if CALIBRATED in rows:
        pairs += [(CALIBRATED, "D->D"), (CALIBRATED, fixed(1.0))]
    if best != 1.0:
        pairs.append((fixed(best), fixed(1.0)))
    if CALIBRATED in rows:
        pairs.append((CALIBRATED, fixed(best)))
    return list(dict.fromkeys(p for p in pairs if p[0] != p[1]))


def markdown(summary: dict) -> str:
    t, st = summary["table"], summary["settings"]
    rows, cal = t["rows"], t["calibration"]
    strengths = summary["strengths"]
    lines = [f"# dev2pro demo — `{summary['command']}`", "",
             f"Toy FLUX.2 [klein] family (diffusers' Flux2Transformer2DModel, 128 wide, in Flux2KleinPipeline; tiny "
             f"random Qwen3 text encoder with scaled token embeddings; a fixed 32-channel pixel codec in FLUX.2's "
             f"latent layout; {st['seeds']} LoRA seeds, mean ± 95% t-interval). **Base**: flow matching from scratch, "
             f"10% caption dropout, sampled with true CFG {summary['cfg']:g} and {st['base_sample_steps']} steps. "
             f"**Distilled**: guidance-distilled from Base at CFG {summary['cfg']:g} (one scale, no guidance "
             f"embedding) -- NOT step-distilled -- sampled as klein distilled is used: "
             f"{summary['distilled_steps']} steps, no CFG. Arms: **B->D @ s** LoRA trained on Base, applied to the "
             f"distilled model at strength s; **B->D @ cal.** the same at the strength `calibrate` recommends for "
             f"that seed; **D->D** LoRA trained on the distilled model; **B->B** the Base LoRA on Base with CFG "
             f"(the oracle). Same shots, steps ({st['lora_steps']}) and seed per arm.", "",
             f"**Verdict.** {t['verdict']}", "",
             "## Arms", "", "| arm | " + " | ".join(METRICS[m][0] for m in ROW_METRICS) + " |",
             "|---" * (len(ROW_METRICS) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_ci(m.get(k)) for k in ROW_METRICS) + " |")
    metrics = [m for m in ROW_METRICS if m != "style"]
    lines += ["", "## Paired differences (first minus second, per seed; * = 95% interval excludes 0)", "",
              "| pair | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for a, b in _pairs(rows, strengths, cal["best_fixed"]):
        cells = []
        for m in metrics:
            ra, rb = rows[a].get(m), rows[b].get(m)
            if not (ra and rb and len(ra["values"]) > 1):
                cells.append("—")
                continue
            d = mean_ci(np.asarray(ra["values"]) - np.asarray(rb["values"]))
            cells.append(_ci(d) + (" *" if compare(ra, rb, m) else ""))
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Strength: calibrated vs measured best", "",
              "| seed | calibrated (`calibrate`) | Base effect at 1.0 | best fixed strength by FD to oracle |",
              "|---|---|---|---|"]
    for s, (c, e, b) in enumerate(zip(cal["per_seed"], cal["reference_effects"], cal["best_per_seed"])):
        lines.append(f"| {s} | {'—' if c is None else f'{c:.3f}'} | {'—' if e is None else f'{e:.4f}'} | {b:g} |")
    lines.append(f"| mean | {_ci(cal['calibrated'])} | | {cal['best_fixed']:g} (lowest mean) |")
    lines += ["", "## References", "", "| set | style fidelity | digit accuracy | FD to real concept |",
              "|---|---|---|---|"]
    for name, r in t["references"].items():
        lines.append(f"| {name} | {_ci(r['style'])} | {_ci(r['digits'])} | {_ci(r['fd_real'])} |")
    lines += ["", "## Every stage improved its own training loss", "", "| stage | first 10% | last 10% | improved |",
              "|---|---|---|---|"]
    for name, sl in summary["stages"].items():
        lines.append(f"| {name} | {sl['first']:.4f} | {sl['last']:.4f} | {'yes' if sl['improved'] else 'NO'} |")
    lines += ["", "Metrics as in `dev2pro demo` (style and digit classifiers fitted on real digits, Fréchet distance "
              "in a fixed PCA space); the distances to the oracle compare each arm with B->B on the same prompts and "
              "noise seeds. `calibrate`: the strength at which the Base LoRA's effect (RMS change of fixed-seed final "
              "latents) on the distilled model (4 steps, no CFG) equals its effect at 1.0 on Base (true CFG); no "
              "judge involved. The best fixed strength is judged by the lowest mean FD to the oracle.", ""]
    return "\n".join(lines) + "\n"


def write_report(root: Path, summary: dict, results: list[dict]) -> None:
    """report.md and grids/ (seed 0: one PNG per arm, rows digits 0-9)."""
    write_text(root / "report.md", markdown(summary))
    grids = root / "grids"
    grids.mkdir(exist_ok=True)
    per_class = summary["settings"]["eval_per_class"]
    for name, rgb in arm_samples(results, 0, summary["strengths"]).items():
        safe = name.replace("->", "-to-").replace(" @ ", "-at-").replace(" ", "").replace(".", "_")
        save_grid(rgb, grids / f"{safe}.png", per_class)
