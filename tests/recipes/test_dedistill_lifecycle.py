"""`dev2pro dedistill`'s run lifecycle: reusable failed starts, the lock, Ctrl-C, the last state, extending a run,
the export before the final samples, a full disk at the export, the non-finite guard, progress lines."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from dev2pro.errors import UserError
from dev2pro.recipes import dedistill as ds
from dev2pro.train import loop  # the one loss call site of both recipes
from dev2pro.train import export
from dev2pro.recipes.dedistill import dedistill
from dev2pro.schemas import load_dedistill_config
from tiny_run import model_and_data
from tiny_run import same_tensors as _same


def _toml(root, model_dir, images, out="run", steps=8, every=4, extra=""):
    text = model_and_data(model_dir, images, root / "cache") + f"""

[train]
steps = {steps}
lr = 2e-3
warmup_steps = 2
schedule = "constant"
seed = 5
mixed_precision = "no"
ema_decay = 0.9

[save]
output_dir = "{root / out}"
every = {every}
formats = ["bfl"]
dtype = "fp32"
{extra}
"""
    path = root / f"{out}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dev_dir, sk_images):
    root = tmp_path_factory.mktemp("dd-reference")
    runs = {}
    for n in (6, 9):
        summary = dedistill(load_dedistill_config(_toml(root, tiny_dev_dir, sk_images, out=f"ref{n}", steps=n)),
                            progress=False)
        runs[n] = (summary, root / f"ref{n}" / "dev2pro.safetensors")
    return runs


def test_failed_start_reruns_and_resume_explains(tmp_path, tiny_dev_dir, sk_images):
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, steps=2)
    with pytest.raises(UserError, match=r"model.path: .*nope does not exist"):  # refused before the run folder
        dedistill(load_dedistill_config(cfg_path, [f'model.path="{tmp_path / "nope"}"']), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"data.folders\[0\].path: .*nope does not exist"):  # before it, too
        dedistill(load_dedistill_config(cfg_path, [f'data.folders=[{{path="{tmp_path / "nope"}"}}]']),
                  progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):  # a failure after the run folder exists: a data folder without images
        dedistill(load_dedistill_config(cfg_path, [f'data.folders=[{{path="{tmp_path / "empty"}"}}]']),
                  progress=False)
    assert (tmp_path / "run" / "config.toml").exists()
    with pytest.raises(UserError, match=r"never saved.*without --resume"):
        dedistill(load_dedistill_config(cfg_path), resume="latest", progress=False)
    assert len(dedistill(load_dedistill_config(cfg_path), progress=False)["losses"]) == 2


def test_lock_refuses_a_second_process(tmp_path, tiny_dev_dir, sk_images):
    code = ("import sys, time; from pathlib import Path; from dev2pro.train.run import RunLock; "
            "lock = RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"PID {holder.pid}\b"):
            dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, sk_images, steps=2)), progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_saves_a_state_then_resume_and_extend_match_uninterrupted_runs(tmp_path, tiny_dev_dir, sk_images,
                                                                              reference, monkeypatch, capsys):
    real, calls = loop.objective_loss, []

    def ctrl_c_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step finishes, then the state is saved
        return real(*a, **k)

    monkeypatch.setattr(loop, "objective_loss", ctrl_c_in_step_3)
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, steps=6)
    with pytest.raises(KeyboardInterrupt):
        dedistill(load_dedistill_config(cfg_path), progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step-000003"]
    assert "interrupted at step 3" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = dedistill(load_dedistill_config(cfg_path), resume="latest", progress=False)
    assert f"resumed from step 3 ({out / 'state' / 'step-000003'})" in capsys.readouterr().out
    assert resumed["losses"] == reference[6][0]["losses"][3:]
    assert _same(out / "dev2pro.safetensors", reference[6][1])
    assert (out / "state" / "step-000006").is_dir()  # the last step saved a state: the run can be extended
    more = dedistill(load_dedistill_config(cfg_path, ["train.steps=9"]), resume="latest", progress=False)
    assert more["losses"] == reference[9][0]["losses"][6:]
    assert _same(out / "dev2pro.safetensors", reference[9][1])


def test_export_comes_before_final_samples_and_a_full_disk_keeps_the_state(tmp_path, tiny_dev_dir, sk_images,
                                                                           reference, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_model", full)
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, steps=6)
    with pytest.raises(UserError, match=r"(?i)no space left.*state.*step-000006.*--resume"):
        dedistill(load_dedistill_config(cfg_path), progress=False)
    out = tmp_path / "run"
    assert (out / "state" / "step-000006").is_dir() and not (out / "dev2pro.safetensors").exists()
    monkeypatch.undo()
    (out / ".dev2pro.export.safetensors").write_bytes(b"half an export, as kill -9 leaves it")
    (out / ".dev2pro.safetensors.k3j.tmp").mkdir()

    def crash(*a, **k):
        raise RuntimeError("out of memory while sampling (simulated)")

    monkeypatch.setattr(ds, "dedistill_grids", crash)
    extra = '[sample]\nevery = 100\nprompts = ["a cat"]\nsteps = 1\nwidth = 32\nheight = 32\n'
    with pytest.raises(RuntimeError, match="simulated"):  # resume writes the export, then the samples fail
        dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, sk_images, steps=6, extra=extra)),
                  resume="latest", progress=False)
    assert _same(out / "dev2pro.safetensors", reference[6][1])
    assert not list(out.glob(".*.tmp")) and not (out / ".dev2pro.export.safetensors").exists()


def test_non_finite_loss_stops_with_the_step_and_the_last_state(tmp_path, tiny_dev_dir, sk_images, monkeypatch):
    real, calls = loop.objective_loss, []

    def nan_at_6(*a, **k):
        calls.append(1)
        loss, parts = real(*a, **k)
        return (loss * float("nan"), parts) if len(calls) == 6 else (loss, parts)

    monkeypatch.setattr(loop, "objective_loss", nan_at_6)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 6.*state/step-000004"):
        dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, sk_images, steps=8)), progress=False)
    assert not (tmp_path / "run" / "dev2pro.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == ["step-000004"]


def test_no_progress_prints_lines_and_save_messages(tmp_path, tiny_dev_dir, sk_images, capsys):
    dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, sk_images, steps=4, every=2),
                                    ["log_every=2"]), progress=False)
    text = capsys.readouterr().out
    out = tmp_path / "run"
    for needle in ("dedistill step 2/4", "dedistill step 4/4", f"saved state at step 2: {out / 'state'}",
                   f"tensorboard --logdir {out / 'logs'}", "loss.png"):
        assert needle in text, needle
    from PIL import Image
    with Image.open(out / "loss.png") as im:
        im.verify()
