"""Jobs: one at a time with a queue, detached from the web app, re-attached by a new JobManager after a restart,
stopped like Ctrl-C, and honest about processes that vanished (or whose pid was reused)."""

import json
import os
import subprocess
import sys
import time

from dev2pro.ui.jobs import JobManager

# A stand-in for a long `dev2pro` command (the real CLI path runs in the browser test): sleeps argv[1] seconds.
SLEEPER = [sys.executable, "-c", "import sys, time; print('started', flush=True); time.sleep(float(sys.argv[1])); "
           "print('slept', flush=True)"]


def wait_for(predicate, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_queue_reattach_after_restart_and_stop(tmp_path):
    m1 = JobManager(tmp_path / "state", tmp_path, command=SLEEPER)
    a = m1.submit("sleep", ["60"])["id"]
    b = m1.submit("sleep", ["0.1"])["id"]
    assert m1.get(a)["status"] == "running" and m1.get(b)["status"] == "queued"  # one job at a time
    wait_for(lambda m=m1: "started" in m.log_tail(a))
    runner_pid = m1.get(a)["pid"]
    del m1  # the web app "crashes": nothing stops the job, it lives in its own session

    m2 = JobManager(tmp_path / "state", tmp_path, command=SLEEPER)
    assert m2.get(a)["status"] == "running" and m2.get(a)["pid"] == runner_pid  # re-attached by pid + start time
    m2.schedule()
    assert m2.get(b)["status"] == "queued"
    stopped = m2.stop(a)
    assert stopped["stop_requested"]
    job = m2.wait(a, timeout=30)
    assert job["status"] == "stopped" and job["returncode"] != 0
    assert "slept" not in m2.log_tail(a)
    job = m2.wait(b, timeout=30)  # the queue moves on once the first job ended
    assert job["status"] == "done" and job["returncode"] == 0 and "slept" in m2.log_tail(b)
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "state" / "jobs").glob("*/job.json")}
    assert records[a]["status"] == "stopped" and records[b]["status"] == "done"


def test_vanished_or_reused_pids_are_not_running(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    jobs = tmp_path / "state" / "jobs"
    for name, pid, started in [("gone", dead.pid, 1.0), ("reused", os.getpid(), 123.0)]:
        (jobs / name).mkdir(parents=True)
        (jobs / name / "job.json").write_text(json.dumps({
            "id": name, "kind": "train", "title": name, "args": [], "run_dir": "", "out": "", "status": "running",
            "created": time.time(), "started": time.time(), "ended": None, "pid": pid, "pid_started": started,
            "returncode": None, "stop_requested": False, "error": ""}))
    (jobs / "cut").mkdir()
    (jobs / "cut" / "job.json").write_text('{"id": "cut", "kin')  # a record cut short by a crash is skipped
    m = JobManager(tmp_path / "state", tmp_path, command=SLEEPER)
    assert m.get("gone")["status"] == "failed" and "without recording" in m.get("gone")["error"]
    assert m.get("reused")["status"] == "failed"  # our own pid, but not the process that was recorded
    assert m.get("cut") is None


def test_failed_and_finished_jobs_and_log_tail(tmp_path):
    m = JobManager(tmp_path / "state", tmp_path, command=[sys.executable, "-c",
                                                          "import sys; print('a\\rb\\rc'); sys.exit(int(sys.argv[1]))"])
    bad = m.submit("x", ["3"])["id"]
    assert m.wait(bad)["status"] == "failed" and m.get(bad)["returncode"] == 3
    good = m.submit("x", ["0"])["id"]
    assert m.wait(good)["status"] == "done"
    assert m.log_tail(good, lines=2) == "b\nc"  # progress-bar redraws count as lines
