"""`dev2pro demo --quick` end to end (slow: ~2 min each on 2 cores); the report's pieces are tested in tests/lab."""

import json
import math

import pytest

from dev2pro.recipes.demo import ADAPTER_RANKS, GUIDANCES, MAIN, PROFILES, run_demo
from tiny_run import same_tensors

SEEDS = 2  # the quick profile's every path with one seed fewer than --quick's 3 (CI time); >1 keeps the paired stats


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "quick"
    summary = run_demo(str(root), profile="quick", seeds=SEEDS, progress=False)
    return root, summary


@pytest.mark.slow
def test_quick_demo_report_structure_and_every_stage_learns(quick):
    root, summary = quick
    p = PROFILES["quick"]
    saved = json.loads((root / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(summary["table"]))
    arms = list(saved["arms"])
    assert saved["guidances"] == list(GUIDANCES) and saved["main_setting"] == {"length": MAIN[0], "guidance": MAIN[1]}
    assert arms == ["A", "B", "C", "C-ext", "C-lora", "D", "E"]
    rows = {(r["arm"], r["length"], r["guidance"]): r["metrics"] for r in saved["table"]["rows"]}
    assert set(rows) == {(a, length, g) for a in arms for length in ("short", "long") for g in GUIDANCES}
    for (arm, _, _), metrics in rows.items():
        expected = {"style", "digits", "fd_real"} | (set() if arm == "D" else {"fd_oracle", "pix_oracle", "integrity"})
        assert set(metrics) == expected
        for m in metrics.values():
            assert m["n"] == SEEDS and len(m["values"]) == SEEDS
            assert m["lo"] <= m["mean"] <= m["hi"] and math.isfinite(m["half"])
    for arm in arms:
        for m in ("style", "digits"):
            assert 0.0 <= rows[(arm, *MAIN)][m]["mean"] <= 1.0
    # every model stage improved its own loss: 3 bases and every LoRA
    stages = saved["stages"]
    assert set(stages) == {"pro", "dev", "dev2pro", "dev2pro_cfg", "dev2pro_lora"} | \
        {f"lora-{a}-seed{s}" for a in arms for s in range(SEEDS)}
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
def test_redone_stages_are_bit_identical_and_resume_reuses_the_rest(quick, tmp_path):
    """A copy of the finished folder with one base and two arms deleted: the same command redoes them -- the base
    through `dedistill`, the arms in this process with one worker instead of the spawned pair -- to the same bytes
    and the same table; a finished folder reuses every stage. (A from-scratch rerun proves no more and costs 2 min.)"""
    import shutil

    root, summary = quick
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    redo = ["runs/dev2pro", "arms/C-seed1", "arms/A-seed0"]
    for d in redo:
        shutil.rmtree(copy / d)
    again = run_demo(str(copy), profile="quick", seeds=SEEDS, progress=False, workers=1)
    assert json.dumps(again["table"], sort_keys=True) == json.dumps(summary["table"], sort_keys=True)
    base = "dev2pro.safetensors"
    assert (copy / redo[0] / base).read_bytes() == (root / redo[0] / base).read_bytes()
    for arm in redo[1:]:  # the same tensors (the metadata names the run's folder and time)
        assert same_tensors(copy / arm / "lora.safetensors", root / arm / "lora.safetensors"), arm
    resumed = run_demo(str(root), profile="quick", seeds=SEEDS, progress=False)
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
