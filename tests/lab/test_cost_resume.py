"""A demo run's cost accounting (wall/CPU seconds per stage) and its resumable folder."""

import json

import pytest

from dev2pro.errors import UserError
from dev2pro.lab.cost import StageClock, cpu_seconds, done_line
from dev2pro.lab.resume import MARKER, finished_stage, prepare_run_folder


def _spin(seconds: float) -> None:
    start = cpu_seconds()
    while cpu_seconds() - start < seconds:
        sum(i * i for i in range(1000))


def test_stage_clock_measures_each_stage_and_the_idle_estimate():
    clock = StageClock()
    _spin(0.2)
    clock.mark("data")
    clock.mark("arms")
    assert clock.cpu["data"] >= 0.2 and clock.cpu["arms"] < 0.1
    assert clock.wall["data"] >= clock.cpu["data"] - 0.05  # one thread: CPU time cannot run ahead of wall time
    wall = clock.wall_seconds(("data",))
    assert list(wall) == ["data", "total"] and wall["total"] == round(sum(clock.wall.values()), 1)
    clock.cpu = {"data": 1.04, "arms": 4.0, "report": 0.5}  # serial 1.5 s, arms 4 s over 2 workers
    assert clock.cpu_summary(workers=2) == {"data": 1.0, "arms": 4.0, "report": 0.5, "total": 5.5,
                                            "idle_wall_estimate": 3.5}
    assert clock.cpu_summary(workers=1)["idle_wall_estimate"] == 5.5


def test_run_folder_new_resume_other_overwrite(tmp_path, capsys):
    root, stamp = tmp_path / "demo", {"version": 1, "profile": "quick"}
    assert prepare_run_folder(root, stamp, overwrite=False) is False  # new
    assert json.loads((root / MARKER).read_text()) == stamp
    (root / "runs").mkdir()
    (root / "runs" / "kept.txt").write_text("stage output")
    assert prepare_run_folder(root, stamp, overwrite=False) is True  # the same demo again: resumed, outputs kept
    assert (root / "runs" / "kept.txt").is_file() and "resuming" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overwrite"):
        prepare_run_folder(root, {**stamp, "profile": "full"}, overwrite=False)
    assert (root / "runs" / "kept.txt").is_file()
    (root / "notes.txt").write_text("mine")  # a file the demo does not write: --overwrite refuses the folder
    with pytest.raises(UserError, match="would delete notes.txt, which this command does not write"):
        prepare_run_folder(root, {**stamp, "profile": "full"}, overwrite=True)
    assert (root / "notes.txt").read_text() == "mine" and (root / "runs" / "kept.txt").is_file()
    (root / "notes.txt").unlink()
    assert prepare_run_folder(root, {**stamp, "profile": "full"}, overwrite=True) is False  # made anew
    assert not (root / "runs").exists() and json.loads((root / MARKER).read_text())["profile"] == "full"


def test_finished_stage(tmp_path):
    assert finished_stage(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({"losses": [1.0]}))
    assert finished_stage(tmp_path) == {"losses": [1.0]}


def test_done_line_says_a_resumed_demos_times_are_this_sessions():
    summary = {"timings_seconds": {"total": 12.4}, "cpu_seconds": {"total": 20.0, "idle_wall_estimate": 11.0}}
    assert done_line(summary, 2) == "done in 12 s (20 CPU-s; on 2 idle cores about 11 s)"
    assert done_line({**summary, "resumed": True}, lead="Wall time") == \
        "Wall time 12 s this session (resumed: the reused stages are not timed again) (20 CPU-s)"
