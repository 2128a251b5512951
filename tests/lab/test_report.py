"""The demo report's pieces on constructed inputs: interval comparisons, the verdict, tables, and the guidance list
and main setting coming from the caller (no guidance value written into the report module)."""

import re
from pathlib import Path

import numpy as np
import pytest

from dev2pro.lab import report
from dev2pro.lab.arms import load_samples, sample_key
from dev2pro.lab.judges import fit_judges, mean_ci
from dev2pro.lab.world import load_digits_world, plain, styled

MAIN = ("long", 3.5)
ARMS = ["A", "B", "C", "C-ext", "C-lora", "D", "E"]


def _ci(values):
    return mean_ci(values)


def test_compare_needs_separated_intervals():
    hi, lo, near = _ci([0.9, 0.92, 0.91]), _ci([0.5, 0.52, 0.51]), _ci([0.88, 0.95, 0.90])
    assert report.compare(hi, lo, "style") == 1 and report.compare(lo, hi, "style") == -1
    assert report.compare(hi, near, "style") == 0
    assert report.compare(lo, hi, "fd_oracle") == 1  # lower distance is better
    # integrity: closeness to 1 wins, from either side
    assert report.compare(_ci([0.98, 1.0, 1.02]), _ci([0.5, 0.52, 0.51]), "integrity") == 1
    assert report.compare(_ci([1.5, 1.52, 1.51]), _ci([0.97, 1.0, 1.01]), "integrity") == -1
    assert report.compare(_ci([0.9]), _ci([0.1]), "style") == 0  # one seed: no interval, no claim


def _table(c_style, a_style, b_style, main=MAIN):
    rows = []
    for arm, vals in (("A", a_style), ("B", b_style), ("C", c_style)):
        metrics = {m: _ci(vals) for m in ("style", "digits")}
        metrics["fd_oracle"] = _ci([1.0, 1.1, 1.2])
        rows.append({"arm": arm, "length": main[0], "guidance": main[1], "metrics": metrics})
    return {"rows": rows}


def test_verdict_follows_the_numbers():
    good, bad, mid = [0.9, 0.92, 0.91], [0.3, 0.32, 0.31], [0.6, 0.62, 0.61]
    assert "supports" in report.verdict(_table(good, bad, mid), ARMS, "D", MAIN)
    assert "contradicts" in report.verdict(_table(bad, good, mid), ARMS, "D", MAIN)
    assert "does not settle" in report.verdict(_table(mid, good, bad), ARMS, "D", MAIN)
    assert "does not settle" in report.verdict(_table(mid, mid, mid), ARMS, "D", MAIN)


def test_verdict_reads_the_main_setting_it_is_given():
    good, bad = [0.9, 0.92, 0.91], [0.3, 0.32, 0.31]
    t = _table(good, bad, bad, main=("long", 4.0))
    assert report.verdict(t, ARMS, "D", ("long", 4.0)).startswith("Full-length LoRAs applied to dev at guidance 4.0")
    assert "supports" in report.verdict(t, ARMS, "D", ("long", 4.0))
    assert report.verdict(t, ARMS, "D", MAIN).startswith("no verdict")  # no rows at 3.5


def test_loss_change_and_stage_losses():
    assert report.loss_change([2.0] * 10 + [1.0] * 10) == {"first": 2.0, "last": 1.0, "improved": True, "steps": 20}
    assert not report.loss_change([1.0, 1.0, 1.0])["improved"]
    results = [{"arm": "ref", "seed": 0}, {"arm": "A", "seed": 0, "losses": [3.0, 1.0]}]
    stages = report.stage_losses({"pro": [1.0, 2.0]}, results)
    assert list(stages) == ["pro", "lora-A-seed0"]
    assert not stages["pro"]["improved"] and stages["lora-A-seed0"]["last"] == 1.0


def test_markdown_html_tables_render():
    md = "# T\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\ntext\n"
    html = report._html(md)
    assert html == "<h1>T</h1><table><tr><td>a</td><td>b</td></tr><tr><td><b>1</b></td><td><code>x</code></td></tr>" \
                   "</table><p>text</p>"
    assert np.isfinite(_ci([1, 2, 3])["half"])


def test_saturated_metrics_are_called_out():
    t = _table([1.0, 1.0, 1.0], [1.0, 0.99, 1.0], [1.0, 1.0, 1.0])
    assert "style fidelity is at its ceiling for every arm: it does not separate them here" in \
        report.saturated(t, ["A", "B", "C"], MAIN)
    assert "ceiling" in report.verdict(t, ["A", "B", "C"], "D", MAIN)
    low = _table([0.1, 0.11, 0.1], [0.1, 0.1, 0.09], [0.1, 0.12, 0.1])
    assert any("digit accuracy is at chance" in n for n in report.saturated(low, ["A", "B", "C"], MAIN))
    assert report.saturated(_table([0.9, 0.8, 0.85], [0.5, 0.6, 0.7], [1.0, 1.0, 1.0]), ["A", "B", "C"], MAIN) == []


def test_compare_pairs_arms_by_seed():
    def ci(v):
        return {**mean_ci(v), "values": v}

    # overlapping intervals, but better on every seed by a steady margin: paired, that is clear
    x, y = ci([0.50, 0.70, 0.60, 0.80, 0.55]), ci([0.45, 0.66, 0.55, 0.76, 0.50])
    assert x["lo"] < y["hi"]
    assert report.compare(x, y, "digits") == 1 and report.compare(y, x, "digits") == -1
    assert report.compare(y, x, "fd_oracle") == 1  # lower is better
    # better on some seeds, worse on others: within noise
    assert report.compare(ci([0.5, 0.7, 0.6]), ci([0.6, 0.6, 0.6]), "digits") == 0
    assert report.compare(ci([0.9, 1.0, 1.1]), ci([0.5, 0.6, 0.55]), "integrity") == 1


def test_no_guidance_value_or_sample_key_is_written_into_the_report_module():
    src = Path(report.__file__).read_text()
    for literal in (r"\b3\.5\b", r"\b1\.0\b", r'"g3\.5"', r'"g1\.0"', r"f\"g\{"):
        assert not re.search(literal, src), literal


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def world():
    return load_digits_world(seed=0)


@pytest.fixture(scope="module")
def judges(world):
    return fit_judges(world, seed=0)


def _samples(path: Path, arrays: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return str(path)


def _fake_run(tmp: Path, world, guidances, per_class, seeds) -> tuple[list[dict], dict]:
    """Samples with known metrics: C draws the concept exactly (the held-out digits, styled), A and the oracle D
    plain digits; every arm moves by 0.1 between the lowest and the highest guidance, dev without LoRA by 0.2."""
    idx = np.concatenate([np.flatnonzero(world.holdout_labels == k)[:per_class] for k in range(10)])
    concept, base = styled(world.holdout_images[idx]) * 0.9, plain(world.holdout_images[idx]) * 0.9
    lo, hi = min(guidances), max(guidances)

    def arrays(rgb, step):
        return {sample_key(g): rgb + (step if g == hi else 0.0) for g in guidances if g in (lo, hi)}

    results, expected = [], {}
    for s in range(seeds):
        results.append({"arm": "ref", "seed": s,
                        "samples": {"none": _samples(tmp / f"ref{s}" / "none.npz", arrays(base, 0.2))}})
        for arm, rgb in (("A", base), ("C", concept), ("D", base)):
            files = {length: _samples(tmp / f"{arm}{s}" / f"{length}.npz", arrays(rgb, 0.1))
                     for length in ("short", "long")}
            results.append({"arm": arm, "seed": s, "samples": files})
    expected["pix_C"] = float(np.abs(concept - base).mean())
    return results, expected


def test_evaluate_and_markdown_take_the_guidances_and_main_setting_from_the_caller(tmp_path, world, judges):
    guidances, main, per_class, seeds = (4.0, 1.5), ("long", 4.0), 2, 3
    results, expected = _fake_run(tmp_path, world, guidances, per_class, seeds)
    assert set(load_samples(results[0]["samples"]["none"])) == {"g4.0", "g1.5"}
    table = report.evaluate(results, judges, world, arms=["A", "C", "D"], oracle="D", seeds=seeds,
                            per_class=per_class, guidances=guidances, main=main)
    rows = {(r["arm"], r["length"], r["guidance"]): r["metrics"] for r in table["rows"]}
    assert set(rows) == {(a, length, g) for a in "ACD" for length in ("short", "long") for g in guidances}
    c, a = rows[("C", *main)], rows[("A", *main)]
    assert c["style"]["mean"] == pytest.approx(1.0) and a["style"]["mean"] == pytest.approx(0.0)
    assert c["integrity"]["mean"] == pytest.approx(0.5) and a["integrity"]["mean"] == pytest.approx(0.5)
    assert c["pix_oracle"]["mean"] == pytest.approx(expected["pix_C"], rel=1e-6)
    assert a["pix_oracle"]["mean"] == pytest.approx(0.0, abs=1e-9) and a["fd_oracle"]["mean"] < 1e-6
    assert "fd_oracle" not in rows[("D", *main)]
    assert list(table["references"]) == ["real concept (holdout)", "dev without LoRA @ 4.0", "dev without LoRA @ 1.5"]
    v = table["verdict"]  # C vs A only (no B here): C is in style, A sits on the oracle
    assert v.startswith("Full-length LoRAs applied to dev at guidance 4.0") and "vs B" not in v
    assert re.search(r"vs A: clearly better on [^;]*style fidelity", v)
    assert re.search(r"clearly worse on [^;]*FD to oracle", v)

    summary = {"command": "dev2pro demo --test", "settings": {"seeds": seeds, "lora_short": 7, "eval_per_class": 2},
               "arms": {"A": "dev @ 4.0", "C": "dev2pro @ 1.5", "D": "oracle"}, "oracle": "D",
               "guidances": list(guidances), "main_setting": {"length": "long", "guidance": 4.0},
               "table": table, "stages": {}, "adapters": None}
    md = report.markdown(summary)
    titles = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert titles[:3] == ["Full-length LoRA, sampled at guidance 4.0 (main setting)",
                          "Full-length LoRA, sampled at guidance 1.5", "Short LoRA (7 steps), guidance 4.0"]
    assert "changes between guidance 1.5 and 4.0" in md and "3.5" not in md
    (tmp_path / "out").mkdir()
    report.write_reports(tmp_path / "out", summary, results, world)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("<img") == 1 + 2 + 2 * 3 and "dev without LoRA, guidance 1.5" in html


def test_the_adapter_section_says_when_no_rank_keeps_the_energy_target():
    from dev2pro.lab.report import _fidelity_section

    fid = {"recommended_rank": 8, "energy_target": 0.9, "energy_by_rank": {"8": 0.31},
           "layer_error_by_rank": {"8": 0.5}, "model": {}, "not_linear": 0}
    met = "\n".join(_fidelity_section(fid))
    assert "Recommended rank (smallest keeping 0.9 of the energy): **8**" in met
    unmet = "\n".join(_fidelity_section({**fid, "energy_target_met": False}))
    assert "No rank measured keeps 0.9 of the energy; the largest, **8**, is used" in unmet
    assert "Recommended" not in unmet
