"""The run folder's life: its status, the lock that keeps one trainer per folder, Ctrl-C, the non-finite guard."""

import errno
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dev2pro import outputs
from dev2pro.errors import UserError
from dev2pro.outputs import write_error_message
from dev2pro.train.run import (LOCK_NAME, RUN_SUBFOLDERS, NonFiniteGuard, RunLock, clean_stale_temps, folder_status,
                               os_error_message, stop_on_interrupt)


def test_folder_status_tells_a_failed_start_from_a_saved_run(tmp_path):
    run = tmp_path / "run"
    assert folder_status(run) == "absent"
    run.mkdir()
    assert folder_status(run) == "empty"
    (run / "config.toml").write_text("")
    (run / "cache").mkdir()
    (run / "logs").mkdir()
    (run / ".config.toml.abc.tmp").mkdir()  # a temp left by an atomic write
    assert folder_status(run) == "started"
    (run / "state" / "step-000004").mkdir(parents=True)  # an incomplete state: nothing a resume can read
    assert folder_status(run) == "started"
    (run / "state" / "step-000004" / "common.json").write_text("{}")
    (run / "state" / "step-000004" / "common.safetensors").write_bytes(b"x")
    assert folder_status(run) == "saved"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"x")
    assert folder_status(other) == "foreign"
    lora_only = tmp_path / "old"
    lora_only.mkdir()
    (lora_only / "config.toml").write_text("")
    (lora_only / "lora.safetensors").write_bytes(b"x")
    assert folder_status(lora_only) == "saved"


def _failed_first_save(run):
    """What a full disk at the first state save leaves: the step LoRA, a partial state temp, no usable state."""
    (run / "state" / ".step-000004.tmp").mkdir(parents=True)
    (run / "state" / ".step-000004.tmp" / "rank-00000-of-00001.safetensors").write_bytes(b"x")
    (run / "state" / "step-000002").mkdir()  # a state folder without its common files
    for name in ("config.toml", "lora-step000004.safetensors", "lora-step000004.diffusers.safetensors"):
        (run / name).write_bytes(b"x")
    (run / "logs").mkdir()


def test_a_failed_first_save_is_a_start_to_redo_and_resume_says_so(tmp_path):
    """Issue 18.8: after a full disk at the first state save, --resume and the plain command each sent the user
    to the other. Now: no usable state => not an existing run."""
    from dev2pro.train.lifecycle import prepare_output_dir
    from dev2pro.train.run import RunFolder

    run = tmp_path / "run"
    _failed_first_save(run)
    assert folder_status(run) == "started"
    with pytest.raises(UserError) as e:
        prepare_output_dir(RunFolder(run), "latest", False, say=lambda m: None)
    assert str(e.value) == (f"nothing to resume: {run} was started but never saved a usable training state (a failed "
                            f"start, a first save that failed, e.g. on a full disk, or a run stopped before its first "
                            f"save); run the same command without --resume to start it")
    said = []
    assert prepare_output_dir(RunFolder(run), None, False, say=said.append) == run / "state"  # the plain command starts again
    assert said == [f"reusing {run}: an earlier start never saved a usable state (cached latents and text are reused "
                    f"when valid)"]
    (run / "summary.json").write_text("{}")  # a finished run whose final state failed: --resume cannot help
    with pytest.raises(UserError, match=r"holds a finished run but no usable training state; run the same command "
                                        r"without --resume to start it again with --overwrite$"):
        prepare_output_dir(RunFolder(run), "latest", False, say=lambda m: None)
    with pytest.raises(UserError) as e:
        prepare_output_dir(RunFolder(run), None, False, say=lambda m: None)
    assert "--resume" not in str(e.value) and "set save.overwrite = true (--overwrite) to start over" in str(e.value)


def test_save_overwrite_starts_over_in_a_run_never_over_other_files(tmp_path):
    from dev2pro.train.lifecycle import prepare_output_dir
    from dev2pro.train.run import RunFolder

    run = tmp_path / "run"
    (run / "state" / "step-000004").mkdir(parents=True)
    for name in ("common.json", "common.safetensors"):
        (run / "state" / "step-000004" / name).write_text("{}")
    for name in ("config.toml", "lora.safetensors", "summary.json", "loss.png"):
        (run / name).write_text("x")
    (run / "samples").mkdir()
    (run / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"would delete notes.md, which this command does not write. Nothing was "
                                        r"deleted"):
        prepare_output_dir(RunFolder(run), None, True, say=lambda m: None)
    assert (run / "notes.md").read_text() == "mine" and (run / "state" / "step-000004").is_dir()
    (run / "notes.md").unlink()
    prepare_output_dir(RunFolder(run), None, True, say=lambda m: None)  # the run's own files: it starts over
    assert not (run / "state").exists()


def test_a_real_full_disk_at_the_first_state_save_then_one_clear_path(tmp_path, tiny_dev_dir, sk_images,
                                                                      monkeypatch, capsys):
    from dev2pro.cli import main
    from dev2pro.train import state
    from tiny_run import model_and_data

    config = tmp_path / "run.toml"
    config.write_text(model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache", model='dtype = "fp32"') +
                      f'[lora]\nrank = 4\n[train]\nsteps = 4\n[save]\noutput_dir = "{tmp_path / "run"}"\n'
                      f'every = 2\n')
    real = state.save_safetensors

    def full_disk(tensors, path, *a, **k):
        if path.name == "common.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(state, "save_safetensors", full_disk)
    argv = ["train", str(config), "--no-progress"]
    assert main(argv) == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "run the same command without --resume to start it" in err, err
    monkeypatch.setattr(state, "save_safetensors", real)  # space freed: the plain command starts again
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "lora.safetensors").is_file() and state.latest_state(tmp_path / "run" / "state")


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dev2pro.train.run import RunLock
    lock = RunLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold_lock(folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_and_names_its_pid(tmp_path):
    run = tmp_path / "run"
    proc = _hold_lock(run)
    try:
        with pytest.raises(UserError, match=rf"PID {proc.pid}\b.*{run.name}|{run.name}.*PID {proc.pid}\b"):
            RunLock.acquire(run)
    finally:
        proc.kill()
        proc.wait()
    # the holder died without cleaning up: its lock file (naming a dead PID) is stale and is taken over
    assert (run / LOCK_NAME).exists()
    with RunLock.acquire(run) as lock:
        assert (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(UserError, match="PID"):  # the same process cannot take it twice either
            RunLock.acquire(run)
    assert not (run / LOCK_NAME).exists()  # released cleanly: nothing left behind
    assert lock.released


def test_lock_creates_missing_parents_and_reports_read_only_folders(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with RunLock.acquire(run):
        assert run.is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write read-only folders (root)")
        with pytest.raises(UserError, match="ro"):
            RunLock.acquire(ro / "run")
    finally:
        os.chmod(ro, 0o755)


def test_first_ctrl_c_is_a_request_the_second_interrupts():
    with stop_on_interrupt() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested  # no KeyboardInterrupt: the step finishes and the loop saves
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_guard_stops_on_the_first_non_finite_step_by_default():
    guard = NonFiniteGuard("stop", max_skips=3, context=lambda: "last state: none")
    assert guard.check(1, 0.5, 1.0)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 2.*last state: none"):
        guard.check(2, math.nan, 1.0)
    with pytest.raises(UserError, match=r"non-finite gradients \(inf\) at step 3"):
        guard.check(3, 0.5, math.inf)


def test_guard_skip_mode_counts_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard("skip", max_skips=3, context=lambda: "")
    assert not guard.check(1, math.nan, 1.0)
    assert guard.check(2, 0.4, 1.0)
    assert not guard.check(3, 0.4, math.nan)
    assert not guard.check(4, math.inf, 1.0)
    assert guard.skipped == [1, 3, 4]
    with pytest.raises(UserError, match="3 steps in a row"):
        guard.check(5, math.nan, 1.0)


def test_stale_temps_of_killed_writers_are_cleaned(tmp_path):
    """One cleanup (outputs.clean_stale_temps): under the run lock it also takes the PID-less hidden temps."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    run = tmp_path / "run"
    (run / "state" / ".step-000004.abc.tmp").mkdir(parents=True)
    (run / "state" / ".step-000004.abc.tmp" / "lora.safetensors").write_bytes(b"half")
    (run / "state" / ".step-000002.old").mkdir()
    (run / ".lora.safetensors.x1.tmp").write_bytes(b"half")
    (run / ".dev2pro.export.safetensors").write_bytes(b"half")
    (run / "samples").mkdir()
    (run / "samples" / f".dev2pro-tmp-s.png-{dead.pid}@{host}-0a1b2c3d").write_bytes(b"half")
    (run / "state" / "step-000002").mkdir()
    live = run / f".dev2pro-tmp-lora.safetensors-{os.getpid()}@{host}-0a1b2c3d"
    keep = [run / "lora.safetensors", run / ".dev2pro.lock", run / "config.toml", live]
    for k in keep:
        k.write_bytes(b"x")
    # without the lock only dead writers' PID-tagged temps may go; the PID-less ones could be a live writer's
    assert [p.name for p in outputs.clean_stale_temps(run, force=True, subfolders=RUN_SUBFOLDERS)] == \
        [f".dev2pro-tmp-s.png-{dead.pid}@{host}-0a1b2c3d"]
    assert len(clean_stale_temps(run)) == 4  # the run's thin wrapper: locked, state/ and samples/
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == sorted(
        [".dev2pro.lock", "config.toml", "lora.safetensors", live.name, "samples", "state", "state/step-000002"])


def test_write_errors_have_one_wording(tmp_path):
    """A training write (OSError, or the Rust writer's "os error 28") reads like an output write's disk error."""
    from safetensors import SafetensorError

    path = tmp_path / "run" / "lora.safetensors"
    full = outputs.disk_error(errno.ENOSPC, "LoRA", path).args[0]
    assert full.startswith(f"cannot write LoRA {path}: no space left on the device (")
    for e in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("I/O error (os error 28)")):
        line = write_error_message(e, path, "write LoRA")
        assert line == full.removesuffix(". Existing files were left as they were"), line
    ro = os_error_message(OSError(errno.EROFS, "Read-only file system"), tmp_path, "create the run folder")
    assert ro == f"cannot create the run folder {tmp_path}: the file system is read-only; choose a destination on " \
                 f"a writable disk"
    other = write_error_message(OSError(errno.ENOENT, "No such file or directory", str(path)), tmp_path, "save")
    assert other == f"cannot save {path}: No such file or directory"  # the OSError's own file, its own reason
    assert write_error_message(UserError("already explained"), path, "save") == "already explained"


def test_sigterm_is_a_stop_request_like_the_first_ctrl_c():
    from dev2pro.train.run import Terminated

    with stop_on_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGTERM  # the process lives on: the step finishes
        assert isinstance(stop.interrupt(), Terminated) and stop.interrupt().exit_code == 143
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)  # a second one: at once
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
