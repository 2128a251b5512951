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


def test_run_info_from_a_resumed_run_folder(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "samples").mkdir(parents=True)
    (run / "state" / "step-000004").mkdir(parents=True)
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
    info = run_info(run, tmp_path, log_tail="train: 40%| 4/10 [mem=0.9G]\rtrain: 50%| 5/10 [mem=1.5G]")
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
