"""The demo's numbers and words: per-seed metrics -> mean and 95% interval -> tables, a verdict, md/html/json.

The verdict is derived from the table, never written in advance. For each metric an arm is *clearly* better than
another only when the 95% interval of its per-seed improvement (arms are paired by seed) excludes zero; the main
setting is the one the Dev2Pro recipe is about: the full-length LoRA applied to dev and sampled at dev's usual
guidance. The guidances and the main setting are the caller's (``evaluate``'s arguments, the summary's
"guidances" and "main_setting"); sample files hold one array per guidance under ``arms.sample_key``.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..outputs import write_text
from .arms import load_samples, sample_key
from .judges import digit_accuracy, features, format_ci, frechet_distance, guidance_integrity, mean_ci, style_fidelity
from .world import grid, styled

# metric -> (label, direction): +1 higher is better, -1 lower is better, 0 closer to 1 is better
METRICS = {
    "style": ("style fidelity", +1),
    "digits": ("digit accuracy", +1),
    "fd_real": ("FD to real concept", -1),
    "fd_oracle": ("FD to oracle", -1),
    "pix_oracle": ("pixel dist. to oracle", -1),
    "integrity": ("guidance integrity", 0),
}
KEY_METRICS = ("style", "digits", "fd_oracle")  # what the verdict weighs
LENGTHS = {"short": "Short", "long": "Full-length"}  # each arm's LoRA after a short and the full training length
Main = tuple[str, float]  # the main setting: (LoRA length, sampling guidance)


def loss_change(losses: list[float], frac: float = 0.1) -> dict:
    """Mean training loss over the first and the last ``frac`` of the steps, and whether it went down."""
    n = max(1, int(len(losses) * frac))
    first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
    return {"first": first, "last": last, "improved": last < first, "steps": len(losses)}


def stage_losses(bases: dict[str, list[float]], results: list[dict]) -> dict[str, dict]:
    """``loss_change`` of every base (name -> losses) and of every arm's LoRA (results with "losses")."""
    stages = {name: loss_change(losses) for name, losses in bases.items()}
    return stages | {f"lora-{r['arm']}-seed{r['seed']}": loss_change(r["losses"]) for r in results if "losses" in r}


def evaluate(results: list[dict], judges, world, arms: list[str], oracle: str, seeds: int, per_class: int,
             guidances: Sequence[float], main: Main) -> dict:
    """Per-seed metrics for every (arm, length, guidance) and their mean +- 95% interval over seeds.

    The oracle's samples at the main guidance are the reference for the distances to the oracle; guidance
    integrity compares the lowest and the highest of ``guidances``."""
    lo, hi, key = sample_key(min(guidances)), sample_key(max(guidances)), sample_key(main[1])
    labels = np.repeat(np.arange(10), per_class)
    real = features(judges, styled(world.holdout_images))
    by = {(r["arm"], r["seed"]): r for r in results}
    per_seed: dict[tuple, dict[str, list]] = {}
    for s in range(seeds):
        ref = load_samples(by[("ref", s)]["samples"]["none"])
        for a in arms:
            for length in LENGTHS:
                samples = load_samples(by[(a, s)]["samples"][length])
                orc_rgb = load_samples(by[(oracle, s)]["samples"][length])[key]
                orc = features(judges, orc_rgb)
                integ = guidance_integrity(samples[lo], samples[hi], ref[lo], ref[hi])
                for g in guidances:
                    rgb = samples[sample_key(g)]
                    feats = features(judges, rgb)
                    row = per_seed.setdefault((a, length, g), {k: [] for k in METRICS})
                    row["style"].append(style_fidelity(judges, rgb))
                    row["digits"].append(digit_accuracy(judges, rgb, labels))
                    row["fd_real"].append(frechet_distance(feats, real))
                    if a != oracle:
                        row["fd_oracle"].append(frechet_distance(feats, orc))
                        row["pix_oracle"].append(float(np.abs(rgb - orc_rgb).mean()))
                        row["integrity"].append(integ)
    rows = []
    for (a, length, g), vals in per_seed.items():
        rows.append({"arm": a, "length": length, "guidance": g,
                     "metrics": {k: {**mean_ci(v), "values": [round(x, 6) for x in v]} for k, v in vals.items() if v}})
    refs = {"real concept (holdout)": _real_row(judges, world, labels)}
    for g in guidances:
        vals = {"style": [], "digits": [], "fd_real": []}
        for s in range(seeds):
            rgb = load_samples(by[("ref", s)]["samples"]["none"])[sample_key(g)]
            vals["style"].append(style_fidelity(judges, rgb))
            vals["digits"].append(digit_accuracy(judges, rgb, labels))
            vals["fd_real"].append(frechet_distance(features(judges, rgb), real))
        refs[f"dev without LoRA @ {g}"] = {k: mean_ci(v) for k, v in vals.items()}
    table = {"rows": rows, "references": refs}
    table["verdict"] = verdict(table, arms, oracle, main)
    extra = adapter_verdict(table, arms, main)
    if extra:
        table["verdict"] += " " + extra
    return table


def _real_row(judges, world, labels) -> dict:
    rgb = styled(world.holdout_images)
    train = features(judges, styled(world.train_images))
    return {"style": mean_ci([style_fidelity(judges, rgb)] * 2),
            "digits": mean_ci([digit_accuracy(judges, rgb, world.holdout_labels)] * 2),
            "fd_real": mean_ci([frechet_distance(features(judges, rgb), train)] * 2)}


def _row(table: dict, arm: str, length: str, g: float) -> dict | None:
    for r in table["rows"]:
        if r["arm"] == arm and r["length"] == length and r["guidance"] == g:
            return r["metrics"]
    return None


def compare(x: dict, y: dict, metric: str) -> int:
    """+1 if ``x`` is clearly better than ``y`` on ``metric``, -1 clearly worse, 0 within noise.

    ``x``, ``y``: ``mean_ci`` dicts. With per-seed ``values`` of equal length the arms are paired (same few-shot
    images, LoRA seed and sampling noise per seed), so the test is a paired one: the 95% interval of the per-seed
    improvement must exclude 0. Without them the two intervals must not overlap.
    """
    direction = METRICS[metric][1]
    xv, yv = x.get("values"), y.get("values")
    if xv is not None and yv is not None and len(xv) == len(yv) > 1:
        a, b = np.asarray(xv, dtype=float), np.asarray(yv, dtype=float)
        gain = np.abs(1 - b) - np.abs(1 - a) if direction == 0 else direction * (a - b)
        d = mean_ci(gain)
        return 1 if d["lo"] > 0 else -1 if d["hi"] < 0 else 0
    if not (np.isfinite(x["half"]) and np.isfinite(y["half"])):
        return 0  # one seed: no interval, no claim
    if direction == 0:  # closeness to 1: compare the intervals of |1 - v|
        x, y = _distance_to_one(x), _distance_to_one(y)
        direction = -1
    if direction > 0:
        return 1 if x["lo"] > y["hi"] else -1 if x["hi"] < y["lo"] else 0
    return 1 if x["hi"] < y["lo"] else -1 if x["lo"] > y["hi"] else 0


def saturated(table: dict, arms: list[str], main: Main) -> list[str]:
    """Fraction metrics on which every arm sits at its ceiling (>= 0.99) or at chance (digits <= 0.12) in the main
    setting: they cannot separate the arms, and the report says so instead of reading them as a result."""
    notes = []
    rows = [_row(table, a, *main) for a in arms]
    rows = [r for r in rows if r]
    for m, floor in (("style", None), ("digits", 0.12)):
        means = [r[m]["mean"] for r in rows if m in r]
        if means and min(means) >= 0.99:
            notes.append(f"{METRICS[m][0]} is at its ceiling for every arm: it does not separate them here")
        elif means and floor is not None and max(means) <= floor:
            notes.append(f"{METRICS[m][0]} is at chance for every arm: it does not separate them here")
    return notes


def _distance_to_one(d: dict) -> dict:
    lo, hi = abs(1 - d["lo"]), abs(1 - d["hi"])
    return {"lo": 0.0 if d["lo"] <= 1 <= d["hi"] else min(lo, hi), "hi": max(lo, hi)}


def verdict(table: dict, arms: list[str], oracle: str, main: Main, recipe: str = "C",
            rivals: tuple = ("A", "B")) -> str:
    """A sentence from the numbers: how the Dev2Pro arm compares with the dev-trained arms in the main setting."""
    c = _row(table, recipe, *main)
    parts, better, worse = [], set(), set()
    for rival in rivals:
        r = _row(table, rival, *main)
        if c is None or r is None:
            continue
        res = {m: compare(c[m], r[m], m) for m in KEY_METRICS if m in c and m in r}
        win = [METRICS[m][0] for m, v in res.items() if v > 0]
        lose = [METRICS[m][0] for m, v in res.items() if v < 0]
        even = [METRICS[m][0] for m, v in res.items() if v == 0]
        better |= {rival} if win else set()
        worse |= {rival} if lose else set()
        parts.append(f"vs {rival}: clearly better on {', '.join(win) or 'nothing'}; clearly worse on "
                     f"{', '.join(lose) or 'nothing'}; within noise on {', '.join(even) or 'nothing'}")
    if not parts:
        return "no verdict: the Dev2Pro arm or its rivals are missing"
    if better == set(rivals) and not worse:
        outcome = "supports the Dev2Pro claim at this scale"
    elif worse and not better:
        outcome = "contradicts the Dev2Pro claim at this scale"
    else:
        outcome = "does not settle the Dev2Pro claim at this scale (mixed or within noise)"
    notes = saturated(table, [recipe, *rivals], main)
    return (f"{LENGTHS[main[0]]} LoRAs applied to dev at guidance {main[1]}, paired 95% intervals over seeds: the "
            f"Dev2Pro arm "
            f"{recipe} "
            + "; ".join(parts) + f". This run {outcome}." + "".join(f" Note: {n}." for n in notes))


def adapter_verdict(table: dict, arms: list[str], main: Main, adapter_arms: tuple = ("C-ext", "C-lora"),
                    reference: str = "C", rival: str = "B") -> str:
    """A sentence per adapter arm: is training on dev + adapter within noise of training on dev2pro (C), and does
    it keep C's edge over B? Paired 95% intervals in the main setting, on the verdict's key metrics."""
    parts = []
    for arm in [a for a in adapter_arms if a in arms]:
        x = _row(table, arm, *main)
        said = []
        for other in (reference, rival):
            y = _row(table, other, *main)
            if x is None or y is None:
                continue
            res = {m: compare(x[m], y[m], m) for m in KEY_METRICS if m in x and m in y}
            win = [METRICS[m][0] for m, v in res.items() if v > 0]
            lose = [METRICS[m][0] for m, v in res.items() if v < 0]
            if not win and not lose:
                said.append(f"within noise of {other} on every key metric")
            else:
                said.append(f"vs {other} clearly better on {', '.join(win) or 'nothing'}, clearly worse on "
                            f"{', '.join(lose) or 'nothing'}")
        if said:
            parts.append(f"{arm} is " + "; ".join(said))
    return ("Adapter arms (one base: dev + a dev -> dev2pro adapter while training): " + "; ".join(parts) + ".") \
        if parts else ""


# ------------------------------------------------------------------------------------------------ writing
def _fmt(d: dict | None, digits: int = 3) -> str:
    if d is None:
        return "—"
    return format_ci(d, digits) if np.isfinite(d.get("half", np.nan)) else f"{d['mean']:.{digits}f}"


def main_setting(summary: dict) -> Main:
    """The summary's main setting as (length, guidance)."""
    m = summary["main_setting"]
    return m["length"], m["guidance"]


def _settings(guidances: Sequence[float], main: Main, short_steps: int) -> list[tuple[str, float, str]]:
    """(length, guidance, title) of the report's tables: the main setting, the main length at the other
    guidances, the other length at the main guidance."""
    out = [(main[0], g) for g in [main[1], *(g for g in guidances if g != main[1])]]
    out += [(length, main[1]) for length in LENGTHS if length != main[0]]
    titles = []
    for length, g in out:
        what = f"Short LoRA ({short_steps} steps), guidance {g}" if length == "short" else \
            f"{LENGTHS[length]} LoRA, sampled at guidance {g}"
        titles.append((length, g, what + (" (main setting)" if (length, g) == main else "")))
    return titles


def markdown(summary: dict) -> str:
    t = summary["table"]
    arms = summary["arms"]
    main, guidances = main_setting(summary), summary["guidances"]
    lines = [f"# dev2pro demo — `{summary['command']}`", "",
             f"Toy {summary.get('family_title', 'FLUX.1')} family (real diffusers classes, "
             f"{summary['settings']['seeds']} LoRA seeds per arm, "
             f"mean ± 95% t-interval). Arms: " + "; ".join(f"**{a}** {d}" for a, d in arms.items()) + ".", "",
             f"**Verdict.** {t['verdict']}", ""]
    for length, g, title in _settings(guidances, main, summary["settings"]["lora_short"]):
        lines += [f"## {title}", "", "| arm | " + " | ".join(METRICS[m][0] for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for a, desc in arms.items():
            row = _row(t, a, length, g)
            lines.append(f"| {a} {desc} | " + " | ".join(_fmt(row.get(m) if row else None) for m in METRICS) + " |")
        lines.append("")
    lines += _paired_section(t, list(arms), main)
    lines += _fidelity_section(summary.get("adapters"))
    lines += ["## References", "", "| set | style fidelity | digit accuracy | FD to real concept |",
              "|---|---|---|---|"]
    for name, r in t["references"].items():
        lines.append(f"| {name} | {_fmt(r['style'])} | {_fmt(r['digits'])} | {_fmt(r['fd_real'])} |")
    lines += ["", "## Every stage improved its own training loss", "", "| stage | first 10% | last 10% | improved |",
              "|---|---|---|---|"]
    for name, st in summary["stages"].items():
        lines.append(f"| {name} | {st['first']:.4f} | {st['last']:.4f} | {'yes' if st['improved'] else 'NO'} |")
    lines += ["", "Metrics: style fidelity = fraction a classifier trained on real concept digits vs near misses "
              "(plain, orange on black, white on blue, half-way blends, inverted palette, noise) calls in style; "
              "digit accuracy = a digit classifier trained on real styled "
              "digits agrees with the prompt; FD = Fréchet distance in a fixed PCA space of real digits, to held-out "
              "real concept images and to the oracle's samples (same prompts and seeds); pixel distance to oracle "
              "= mean |arm - oracle| per prompt+seed; guidance integrity = how much dev+LoRA still changes between "
              f"guidance {min(guidances)} and {max(guidances)}, relative to dev without LoRA (1 = intact). "
              "Guidance lowers diversity, so FD to real data favours low guidance; read it beside the oracle "
              "distance. The oracle (D) is a LoRA "
              "trained on pro and sampled with true CFG: the concept on the model dev imitates. The verdict and the "
              "paired table compare arms seed by seed (same shots, LoRA seed and sampling noise).", ""]
    return "\n".join(lines) + "\n"


def _paired_section(table: dict, arms: list[str], main: Main) -> list[str]:
    """Per-seed differences between the non-oracle arms in the main setting (what the verdict is made of)."""
    pairs = [(a, b) for a, b in (("C", "A"), ("C", "B"), ("B", "A"), ("E", "C"), ("C-ext", "C"), ("C-lora", "C"),
                                 ("C-ext", "B"), ("C-lora", "B")) if a in arms and b in arms]
    metrics = [m for m in METRICS if m != "style"]
    lines = ["## Paired differences, main setting (first arm minus second, per seed; * = 95% interval excludes 0)",
             "", "| pair | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for a, b in pairs:
        ra, rb = _row(table, a, *main), _row(table, b, *main)
        cells = []
        for m in metrics:
            if not (ra and rb and m in ra and m in rb and len(ra[m]["values"]) > 1):
                cells.append("—")
                continue
            d = mean_ci(np.asarray(ra[m]["values"]) - np.asarray(rb[m]["values"]))
            cells.append(format_ci(d) + (" *" if compare(ra[m], rb[m], m) else ""))
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines + [""]


def _fidelity_section(fid: dict | None) -> list[str]:
    """The dev -> dev2pro adapters: per rank, layer-level (lora extract --ranks) and model-level fidelity."""
    if not fid:
        return []
    rank, target = fid["recommended_rank"], f"{fid['energy_target']:g}"
    chosen = (f"Recommended rank (smallest keeping {target} of the energy): **{rank}**"
              if fid.get("energy_target_met", True)
              else f"No rank measured keeps {target} of the energy; the largest, **{rank}**, is used")
    lines = ["## Adapter fidelity by rank (dev + adapter vs dev2pro)", "",
             f"{chosen}; C-ext trains with that extracted adapter, C-lora with a LoRA of the same rank de-distilled "
             f"directly (`dedistill`, `train.adapter_rank`).", "",
             "| rank | retained energy | layer output error | model output error | unexplained share | moved |",
             "|---|---|---|---|---|---|"]
    for k, e in fid["energy_by_rank"].items():
        m = fid["model"].get(f"extracted r{k}", {})
        lines.append(f"| {k} | {e:.3f} | {fid['layer_error_by_rank'][k]:.3f} | "
                     f"{m.get('output_error', float('nan')):.4f} | {m.get('unexplained', float('nan')):.3f} | "
                     f"{m.get('moved', float('nan')):.3f} |")
    for name, m in fid["model"].items():
        if not name.startswith("extracted"):
            lines.append(f"| {name} | — | — | {m['output_error']:.4f} | {m['unexplained']:.3f} | "
                         f"{m['moved']:.3f} |")
    lines += ["", "Layer output error: each linear on random inputs, summed over layers; model output error: "
              "||f(dev + adapter) - f(dev2pro)|| / ||f(dev2pro)|| on the concept prompts and seeded noise at four "
              "noise levels; unexplained share: the same distance over ||f(dev) - f(dev2pro)|| (1 = no adapter); "
              "moved: ||f(dev + adapter) - f(dev)|| in the same unit. The de-distilled LoRA is its own "
              "de-distillation run, "
              "not a copy of this dev2pro: it may move dev as far in another direction (high unexplained share, "
              "moved near 1), so the arms, not this table, judge it."
              + (f" {fid['not_linear']} bias/norm tensors also differ; a LoRA cannot carry them." if fid["not_linear"]
                 else ""), ""]
    return lines


def _png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_reports(root: Path, summary: dict, results: list[dict], world) -> None:
    """report.md (tables + verdict) and report.html (the same plus image grids of seed 0); grids/ as PNGs too."""
    write_text(root / "report.md", markdown(summary))
    per_class = summary["settings"]["eval_per_class"]
    by = {(r["arm"], r["seed"]): r for r in results}
    grids_dir = root / "grids"
    grids_dir.mkdir(exist_ok=True)
    figures = []
    idx = np.concatenate([np.flatnonzero(world.holdout_labels == k)[:per_class] for k in range(10)])
    real = grid(styled(world.holdout_images[idx]), rows=10, cols=per_class, scale=4)
    figures.append(("real concept images (held out)", real))
    ref = load_samples(by[("ref", 0)]["samples"]["none"])
    guidances, length = summary["guidances"], main_setting(summary)[0]
    for g in guidances:
        figures.append((f"dev without LoRA, guidance {g}", grid(ref[sample_key(g)], rows=10, cols=per_class,
                                                                  scale=4)))
    for a, desc in summary["arms"].items():
        s = load_samples(by[(a, 0)]["samples"][length])
        for g in guidances:
            figures.append((f"{a} {desc}, applied to {'pro + CFG' if a == summary['oracle'] else 'dev'}, "
                            f"guidance {g}", grid(s[sample_key(g)], rows=10, cols=per_class, scale=4)))
    cells = []
    for i, (title, im) in enumerate(figures):
        im.save(grids_dir / f"{i:02d}.png")
        cells.append(f'<figure><img src="{_png_uri(im)}" width="{im.width * 2}"><figcaption>{html.escape(title)}'
                     f'</figcaption></figure>')
    page = ("<!doctype html><meta charset='utf-8'><title>dev2pro demo</title><style>body{font-family:sans-serif;"
            "max-width:1200px;margin:auto} table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;"
            "padding:3px 8px} figure{display:inline-block;margin:8px;vertical-align:top;width:260px} "
            "img{image-rendering:pixelated}</style>" + _html(markdown(summary))
            + "<h2>Samples (seed 0; rows: digits 0-9, columns: sampling seeds)</h2>" + "".join(cells))
    write_text(root / "report.html", page)


def _html(md: str) -> str:
    """Our own markdown (headings, pipe tables, paragraphs, **bold**, `code`) as HTML."""
    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out, rows = [], []
    for line in md.split("\n") + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append(line.strip("|").split("|"))
            continue
        if rows:
            out.append("<table>" + "".join("<tr>" + "".join(f"<td>{inline(c.strip())}</td>" for c in r) + "</tr>"
                                           for r in rows) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "".join(out)
