"""`dev2pro demo --quick` end to end (slow: ~2 min each on 2 cores), and the report's pieces on constructed inputs."""

import json
import math

import numpy as np
import pytest

from dev2pro.lab import report
from dev2pro.recipes.demo import ADAPTER_RANKS, ARMS, GUIDANCES, PROFILES, run_demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "quick"
    summary = run_demo(str(root), profile="quick", progress=False)
    return root, summary


@pytest.mark.slow
def test_quick_demo_report_structure_and_every_stage_learns(quick):
    root, summary = quick
    p = PROFILES["quick"]
    saved = json.loads((root / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(summary["table"]))
    arms = list(saved["arms"])
    assert arms == ["A", "B", "C", "C-ext", "C-lora", "D", "E"]
    rows = {(r["arm"], r["length"], r["guidance"]): r["metrics"] for r in saved["table"]["rows"]}
    assert set(rows) == {(a, length, g) for a in arms for length in ("short", "long") for g in GUIDANCES}
    for (arm, _, _), metrics in rows.items():
        expected = {"style", "digits", "fd_real"} | (set() if arm == "D" else {"fd_oracle", "pix_oracle", "integrity"})
        assert set(metrics) == expected
        for m in metrics.values():
            assert m["n"] == p.seeds and len(m["values"]) == p.seeds
            assert m["lo"] <= m["mean"] <= m["hi"] and math.isfinite(m["half"])
    for arm in arms:
        for m in ("style", "digits"):
            assert 0.0 <= rows[(arm, "long", 3.5)][m]["mean"] <= 1.0
    # every model stage improved its own loss: 3 bases and every LoRA
    stages = saved["stages"]
    assert set(stages) == {"pro", "dev", "dev2pro", "dev2pro_cfg", "dev2pro_lora"} | \
        {f"lora-{a}-seed{s}" for a in arms for s in range(p.seeds)}
    assert all(st["improved"] for st in stages.values()), stages
    md = (root / "report.md").read_text()
    assert "**Verdict.**" in md and saved["table"]["verdict"] in md
    for title in ("main setting", "guidance 1.0", "Short LoRA", "References", "improved its own training loss"):
        assert title in md
    html = (root / "report.html").read_text()
    assert html.count("<img") == 3 + 2 * len(arms) and "<table>" in html
    assert (root / "runs" / "dev" / "dev.safetensors").is_file()
    # LoRA files in the format users load elsewhere (kohya), one per length
    assert (root / "arms" / "C-seed0" / "lora.safetensors").is_file()
    assert (root / "arms" / "C-seed0" / f"lora-step{p.lora_short:06d}.safetensors").is_file()


@pytest.mark.slow
def test_quick_demo_adapter_arms(quick):
    from dev2pro.lora.formats import load_lora

    root, summary = quick
    fid = summary["adapters"]
    rank = fid["recommended_rank"]
    assert rank in ADAPTER_RANKS and sorted(map(int, fid["energy_by_rank"])) == list(ADAPTER_RANKS)
    energies = [fid["energy_by_rank"][str(k)] for k in ADAPTER_RANKS]
    assert energies == sorted(energies) and 0.9 <= energies[-1] <= 1.0
    kept = [fid["energy_by_rank"][str(k)] for k in ADAPTER_RANKS if k < rank]
    assert all(e < fid["energy_target"] for e in kept) and fid["energy_by_rank"][str(rank)] >= fid["energy_target"]
    model = fid["model"]
    unexplained = [model[f"extracted r{k}"]["unexplained"] for k in ADAPTER_RANKS]
    assert unexplained[-1] < unexplained[0] < 1.0 and model["dev (no adapter)"]["unexplained"] == 1.0
    assert f"de-distilled LoRA r{rank}" in model
    assert (root / "adapters" / f"extracted-r{rank}.safetensors").is_file()
    lora_adapter = load_lora(root / "runs" / "dev2pro_lora" / "dev2pro_lora-adapter.safetensors")
    assert all(m.rank == rank for m in lora_adapter.values())
    # the arms' LoRA files hold the trained LoRA only, never the adapter they trained with
    plain = set(load_lora(root / "arms" / "C-seed0" / "lora.safetensors"))
    for arm in ("C-ext", "C-lora"):
        assert set(load_lora(root / "arms" / f"{arm}-seed0" / "lora.safetensors")) == plain
    md = (root / "report.md").read_text()
    assert "## Adapter fidelity by rank" in md and "| C-ext − C |" in md and "| C-lora − B |" in md
    table = md.split("## Adapter fidelity by rank")[1]
    assert [int(line.split("|")[1]) for line in table.splitlines() if line[:3] in ("| 2", "| 4", "| 8", "| 1", "| 3")
            and line.split("|")[1].strip().isdigit()] == list(ADAPTER_RANKS)  # rows in rank order
    assert "Adapter arms (one base" in summary["table"]["verdict"]
    assert summary["timings_seconds"]["adapters"] > 0


@pytest.mark.slow
def test_same_seed_same_table_and_resume_reuses_stages(quick, tmp_path):
    root, summary = quick
    again = run_demo(str(tmp_path / "again"), profile="quick", progress=False, workers=1)
    assert json.dumps(again["table"], sort_keys=True) == json.dumps(summary["table"], sort_keys=True)
    # the same command on a finished folder reuses every stage and gives the same table again
    resumed = run_demo(str(root), profile="quick", progress=False)
    assert resumed["table"] == summary["table"]
    assert resumed["timings_seconds"]["bases"] < 5


def test_other_folder_needs_overwrite(tmp_path):
    from dev2pro.errors import UserError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        run_demo(str(tmp_path / "x"), profile="quick")
    assert (tmp_path / "x" / "file.txt").read_text() == "mine"
    with pytest.raises(UserError, match="profile"):
        run_demo(str(tmp_path / "y"), profile="huge")


def _ci(values):
    from dev2pro.lab.judges import mean_ci

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


def _table(c_style, a_style, b_style):
    rows = []
    for arm, vals in (("A", a_style), ("B", b_style), ("C", c_style)):
        metrics = {m: _ci(vals) for m in ("style", "digits")}
        metrics["fd_oracle"] = _ci([1.0, 1.1, 1.2])
        rows.append({"arm": arm, "length": "long", "guidance": 3.5, "metrics": metrics})
    return {"rows": rows}


def test_verdict_follows_the_numbers():
    good, bad, mid = [0.9, 0.92, 0.91], [0.3, 0.32, 0.31], [0.6, 0.62, 0.61]
    assert "supports" in report.verdict(_table(good, bad, mid), list(ARMS), "D")
    assert "contradicts" in report.verdict(_table(bad, good, mid), list(ARMS), "D")
    assert "does not settle" in report.verdict(_table(mid, good, bad), list(ARMS), "D")
    assert "does not settle" in report.verdict(_table(mid, mid, mid), list(ARMS), "D")


def test_loss_change():
    assert report.loss_change([2.0] * 10 + [1.0] * 10) == {"first": 2.0, "last": 1.0, "improved": True, "steps": 20}
    assert not report.loss_change([1.0, 1.0, 1.0])["improved"]


def test_markdown_html_tables_render():
    md = "# T\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\ntext\n"
    html = report._html(md)
    assert html == "<h1>T</h1><table><tr><td>a</td><td>b</td></tr><tr><td><b>1</b></td><td><code>x</code></td></tr>" \
                   "</table><p>text</p>"
    assert np.isfinite(_ci([1, 2, 3])["half"])


def test_saturated_metrics_are_called_out():
    t = _table([1.0, 1.0, 1.0], [1.0, 0.99, 1.0], [1.0, 1.0, 1.0])
    assert "style fidelity is at its ceiling for every arm: it does not separate them here" in \
        report.saturated(t, ["A", "B", "C"])
    assert "ceiling" in report.verdict(t, ["A", "B", "C"], "D")
    low = _table([0.1, 0.11, 0.1], [0.1, 0.1, 0.09], [0.1, 0.12, 0.1])
    assert any("digit accuracy is at chance" in n for n in report.saturated(low, ["A", "B", "C"]))
    assert report.saturated(_table([0.9, 0.8, 0.85], [0.5, 0.6, 0.7], [1.0, 1.0, 1.0]), ["A", "B", "C"]) == []


def test_compare_pairs_arms_by_seed():
    from dev2pro.lab.judges import mean_ci

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
