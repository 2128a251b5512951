"""The Monitor page reads a run folder the way `dev2pro train` writes it: TensorBoard scalars (a resumed run's
repeated steps keep the newest value), speed and ETA from the event times, samples, LoRA files, states."""

import json

from PIL import Image

from dev2pro.ui.monitor import find_runs, run_info


def write_events(logs, steps, offset, t0):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(logs))
    for s in steps:
        w.add_scalar("loss/step", 1.0 / s + offset, s, walltime=t0 + s * 0.5)  # 2 steps per second
        w.add_scalar("loss/smoothed", 2.0 + offset, s, walltime=t0 + s * 0.5)
        w.add_scalar("lr", 1e-3, s, walltime=t0 + s * 0.5)
    w.close()


RUNNING = {"status": "running", "started": 0.0}  # a UI job training since before the events


def test_run_info_from_a_resumed_run_folder(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "samples").mkdir(parents=True)
    save_state(run / "state", 4)
    save_state(run / "state", 6, complete=False)  # cut short by the stop: not offered to Resume
    (run / "state" / ".tmp-step-000007").mkdir()
    (run / "config.toml").write_text("[train]\nsteps = 10\n")
    write_events(run / "logs", range(1, 7), 0.0, 1000.0)   # first session: steps 1-6, stopped
    write_events(run / "logs", range(5, 9), 10.0, 2000.0)  # resumed from the step-4 state: 5-8 again
    Image.new("RGB", (8, 8)).save(run / "samples" / "step000004.png")
    (run / "lora.safetensors").write_bytes(b"x")
    hidden = tmp_path / ".trash" / "b"
    hidden.mkdir(parents=True)
    (hidden / "config.toml").write_text("")
    (hidden / "summary.json").write_text("{}")

    assert find_runs(tmp_path) == [run]
    info = run_info(run, tmp_path, log_tail="train: 40%| 4/10 [mem=0.9G]\rtrain: 50%| 5/10 [mem=1.5G]", job=RUNNING)
    assert info["step"] == 8 and info["total_steps"] == 10
    loss = dict(info["scalars"]["loss"])
    assert sorted(loss) == list(range(1, 9))
    assert loss[4] == 0.25 and abs(loss[6] - (10 + 1 / 6)) < 1e-6  # steps 5-8 from the resumed session
    assert abs(info["steps_per_second"] - 2.0) < 1e-6 and abs(info["eta_seconds"] - 1.0) < 1e-6
    assert info["memory_gb"] == 1.5
    assert info["samples"] == ["runs/a/samples/step000004.png"] and info["loras"] == ["runs/a/lora.safetensors"]
    assert info["states"] == ["step-000004"] and not info["finished"]
    (run / "summary.json").write_text(json.dumps({"steps": 10, "losses": [1.0] * 10, "seconds": 5.0}))
    assert run_info(run, tmp_path)["summary"] == {"steps": 10, "seconds": 5.0}


def test_speed_and_eta_only_for_a_run_training_now(tmp_path):
    """A stopped, failed or finished run has no speed or ETA; right after a Resume, the new session's points
    only (none yet: no speed, not the old session's); a terminal's run (no UI job): its last point < 10 min old."""
    from dev2pro.ui.monitor import live_speed

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[train]\nsteps = 40\n")
    write_events(run / "logs", range(1, 11), 0.0, 1000.0)  # steps 1-10 at 2 it/s, walltime 1000.5 .. 1005
    for status in ("stopped", "failed", "done", "queued"):
        info = run_info(run, tmp_path, job={"status": status, "started": 0.0})
        assert info["steps_per_second"] is None and info["eta_seconds"] is None, status
    info = run_info(run, tmp_path, job={"status": "running", "started": 0.0})
    assert abs(info["steps_per_second"] - 2.0) < 1e-6 and abs(info["eta_seconds"] - 15.0) < 1e-6
    resumed = {"status": "running", "started": 1100.0}  # resumed after the points above: none of its own yet
    assert run_info(run, tmp_path, job=resumed)["steps_per_second"] is None
    pts = [[s, 0.1, 1100.0 + s] for s in (11, 12, 13)]  # the new session: 1 it/s
    assert live_speed([[s, 0.1, 1000 + s * 0.5] for s in range(1, 11)] + pts, resumed, False) == 1.0
    assert live_speed(pts, None, False, now=1113.0 + 60) == 1.0  # a terminal's run, fresh points
    assert live_speed(pts, None, False, now=1113.0 + 601) is None  # stale: not training now
    assert live_speed(pts, None, True, now=1114.0) is None  # finished (summary.json)
    assert "GPU memory allocated" in info["memory_label"]


def test_latest_grids_of_a_klein_run_come_side_by_side(tmp_path):
    """A LoRA trained on klein Base: the latest step's grid on the distilled model (as used) first, then Base."""
    from dev2pro.ui.monitor import latest_grids

    names = ["step000000-base.png", "step000000.png", "step000004-base.png", "step000004.png", "loss.png"]
    got = latest_grids([tmp_path / n for n in names])
    assert [(label, p.name) for label, p in got] == [("inference base (as used)", "step000004.png"),
                                                      ("training base (Base)", "step000004-base.png")]
    assert latest_grids([tmp_path / "step000002-g1.png", tmp_path / "step000002-cfg.png"])[0][0] == \
        "guidance 1, no CFG"
    assert latest_grids([]) == []


def save_state(state, step, complete=True):
    """A state folder as train/state.py leaves it: complete (common.json + common.safetensors) or cut short."""
    folder = state / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "common.json").write_text(json.dumps({"step": step}))
    if complete:
        (folder / "common.safetensors").write_bytes(b"x")


def test_a_run_stopped_between_logged_steps_shows_the_step_it_saved(tmp_path):
    """log_every 5, stopped at step 13 (Ctrl-C saves state step-000013): the logs end at 10, the run reached 13."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[train]\nsteps = 20\n")
    write_events(run / "logs", [5, 10], 0.0, 1000.0)
    save_state(run / "state", 10)
    save_state(run / "state", 13)
    save_state(run / "state", 14, complete=False)  # a save cut short by a kill: not a step the run has
    info = run_info(run, tmp_path, job=RUNNING)
    assert info["step"] == 13 and info["logged_step"] == 10
    assert info["step_from"] == "saved state step-000013; the last logged step is 10"
    assert abs(info["eta_seconds"] - 7 / 2.0) < 1e-6  # (20 - 13) steps at 2 steps per second
    assert dict(info["scalars"]["loss"]).keys() == {5, 10}  # the curve itself stays what was logged
    # the logs ahead of the newest state (a resumed run past its state): the logs' step, nothing to explain
    write_events(run / "logs", [15], 0.0, 1010.0)
    info = run_info(run, tmp_path)
    assert (info["step"], info["step_from"], info["logged_step"]) == (15, None, 15)
    # a finished run: summary.json's steps
    (run / "summary.json").write_text(json.dumps({"steps": 20, "losses": []}))
    info = run_info(run, tmp_path)
    assert (info["step"], info["step_from"]) == (20, "summary.json; the last logged step is 15")


def test_a_killed_run_with_no_logged_point_shows_its_saved_state(tmp_path):
    """No event file at all (killed before the first log_every) but a saved state: not step 0."""
    run = tmp_path / "runs" / "b"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[train]\nsteps = 100\n")
    save_state(run / "state", 3)
    info = run_info(run, tmp_path)
    assert (info["step"], info["logged_step"]) == (3, 0)
    assert info["step_from"] == "saved state step-000003; the last logged step is 0"


def test_the_monitor_route_says_the_saved_step(web_app, asgi):
    app, ws_dir, _, _ = web_app
    run = ws_dir / "runs" / "r1"  # conftest's run: config.toml and an empty logs/
    save_state(run / "state", 7)
    status, body = asgi(app, "GET", "/api/run?run=runs/r1")
    assert status == 200, body
    info = json.loads(body)
    assert (info["step"], info["total_steps"]) == (7, 10)
    assert info["step_from"] == "saved state step-000007; the last logged step is 0"
