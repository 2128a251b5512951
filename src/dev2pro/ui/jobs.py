"""Jobs: `dev2pro` subcommands run as detached subprocesses, one at a time, recorded as JSON in the workspace.

A job is ``dev2pro ARGS`` (train, caption, convert, compare, sample) started through ``dev2pro.ui.runner`` in its
own session with its output in a log file. Jobs share the accelerator, so they run one at a time: submitting
queues, and a scheduler thread starts the oldest queued job once nothing runs. Each job's record
(``.dev2pro-ui/jobs/<id>/job.json``) holds its arguments, status and the runner's pid + process start time, so a
restarted web app re-attaches: a live runner with the same start time is still running, a written ``rc`` file says
how a job ended while the UI was away, and a vanished runner without one is marked failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ACTIVE = ("queued", "running")
# terminal escape sequences (tqdm's cursor-up ESC[A between nested bars, colours, OSC titles): a log box shows text
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_PROGRESS = re.compile(r"^\s*[^:]{0,60}:?\s*\d+%\|")  # a tqdm bar line: "caption:  40%|####  | 4/10 [...]"
_ERROR = re.compile(r"^dev2pro [\w-]+: error: ")
_INTERRUPTED = re.compile(r"interrupted at step (\d+): state saved in (\S+?);")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def end_reason(status: str, tail: str, returncode: int | None) -> str:
    """Why a job ended as it did, from its last output lines: a stopped run's saved state ("stopped: state saved at
    step N"), a failure's error line (the CLI's "error: ..." or a traceback's last line); "" for a finished job."""
    if status == "done":
        return ""
    lines = [ln.strip() for ln in strip_ansi(tail).replace("\r", "\n").split("\n") if ln.strip()]
    saved = next((m for ln in reversed(lines) if (m := _INTERRUPTED.search(ln))), None)
    if saved:
        return f"stopped: state saved at step {saved.group(1)} ({saved.group(2)}); Resume continues from it"
    if status == "stopped":
        return "stopped on request" + ("" if returncode in (None, 0, 130, -2) else f" (exit code {returncode})")
    error = next((ln for ln in reversed(lines) if _ERROR.match(ln)), None)
    if error is None:
        error = next((ln for ln in reversed(lines) if not _PROGRESS.match(ln)), None)
    if error is None:
        return f"failed with exit code {returncode}" if returncode is not None else "failed"
    error = _ERROR.sub("", error)
    return error if len(error) <= 600 else error[:600] + "…"


def run_status(job: dict | None, finished_at: float | None) -> str | None:
    """A run's status for its UI job: the job's own, unless the job failed or stopped before the run folder's
    finished summary was written (``finished_at``: its mtime) - e.g. refused by the run-folder lock while another
    process finished the run - where the run is "finished". None without a job."""
    if job is None:
        return None
    if job["status"] in ("failed", "stopped") and finished_at is not None and finished_at >= (job["created"] or 0):
        return "finished"
    return job["status"]


class JobManager:
    def __init__(self, state_dir: Path, cwd: Path, poll_s: float = 0.5, command: list[str] | None = None):
        """``command``: what a job's args are appended to (default: this Python running the `dev2pro` CLI)."""
        self.command = command or [sys.executable, "-m", "dev2pro.cli"]
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cwd = Path(cwd)
        self.poll_s = poll_s
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}  # runners started by this process (reaped here)
        self.jobs: dict[str, dict] = {}
        for f in sorted(self.dir.glob("*/job.json")):
            try:
                job = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a record cut short by a crash: skip it rather than refuse to start
            self.jobs[job["id"]] = job
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ records
    def _save(self, job: dict):
        d = self.dir / job["id"]
        d.mkdir(exist_ok=True)
        tmp = d / ".job.json.tmp"
        tmp.write_text(json.dumps(job, indent=1))
        os.replace(tmp, d / "job.json")

    def reserve_id(self, kind: str) -> str:
        """A new job id, unique for good (its record folder is created now): name a job's own files (its config,
        its output folder) after it before ``submit``, so two jobs never share one."""
        with self.lock:
            n = len(self.jobs) + 1
            while True:
                job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{n:03d}-{kind}"
                try:
                    (self.dir / job_id).mkdir()
                    return job_id
                except FileExistsError:
                    n += 1

    def submit(self, kind: str, args: list[str], title: str = "", run_dir: str = "", out: str = "",
               job_id: str | None = None, **extra) -> dict:
        """Queue ``dev2pro ARGS``; returns the job record (``out``: the folder it writes, workspace-relative;
        ``job_id``: one from ``reserve_id``; ``extra``: more fields for the record, e.g. its config)."""
        with self.lock:
            job_id = job_id or self.reserve_id(kind)
            job = {**extra, "id": job_id, "kind": kind, "title": title or kind, "args": [str(a) for a in args],
                   "run_dir": run_dir, "out": out, "status": "queued", "created": time.time(), "started": None,
                   "ended": None, "pid": None, "pid_started": None, "returncode": None, "stop_requested": False,
                   "error": ""}
            self.jobs[job_id] = job
            self._save(job)
        self.schedule()
        return job

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return dict(job) if job else None

    def list(self) -> list[dict]:
        with self.lock:
            return [dict(j) for j in sorted(self.jobs.values(), key=lambda j: j["created"], reverse=True)]

    def log_path(self, job_id: str) -> Path:
        return self.dir / job_id / "log.txt"

    def log_tail(self, job_id: str, lines: int = 40, max_bytes: int = 64_000) -> str:
        """The last ``lines`` lines of a job's output, terminal escape codes removed; progress-bar redraws (\\r)
        count as lines."""
        path = self.log_path(job_id)
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = strip_ansi(f.read().decode("utf-8", "replace"))
        parts = [p for p in text.replace("\r", "\n").split("\n") if p.strip()]
        return "\n".join(parts[-lines:])

    # ------------------------------------------------------------------------------------------ processes
    def _start(self, job: dict):
        d = self.dir / job["id"]
        d.mkdir(exist_ok=True)
        log = open(d / "log.txt", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "dev2pro.ui.runner", str(d), "--", *self.command, *job["args"]]
        proc = subprocess.Popen(argv,
                                cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # own session: survives the UI
        log.close()
        self.procs[job["id"]] = proc
        job.update(status="running", started=time.time(), pid=proc.pid,
                   pid_started=psutil.Process(proc.pid).create_time())
        self._save(job)

    def _alive(self, job: dict) -> bool:
        proc = self.procs.get(job["id"])
        if proc is not None:
            return proc.poll() is None
        try:  # a runner from an earlier UI process: same pid *and* same start time (pids are reused)
            p = psutil.Process(job["pid"])
            return abs(p.create_time() - job["pid_started"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, TypeError):
            return False

    def refresh(self):
        """Update running jobs from their runners: still alive, or ended (rc file) or vanished."""
        with self.lock:
            for job in self.jobs.values():
                if job["status"] != "running":
                    continue
                rc_file = self.dir / job["id"] / "rc"
                if rc_file.exists():
                    rc = int(rc_file.read_text().strip() or -1)
                    status = "done" if rc == 0 else "stopped" if job["stop_requested"] else "failed"
                    job.update(status=status, returncode=rc, ended=time.time(),
                               error=end_reason(status, self.log_tail(job["id"], lines=60), rc))
                elif not self._alive(job):
                    job.update(status="stopped" if job["stop_requested"] else "failed", ended=time.time(),
                               error="the job's process ended without recording a status (killed?)")
                else:
                    continue
                self.procs.pop(job["id"], None)
                self._save(job)

    def schedule(self):
        """Start the oldest queued job if none is running (one accelerator job at a time)."""
        with self.lock:
            self.refresh()
            if any(j["status"] == "running" for j in self.jobs.values()):
                return
            queued = sorted((j for j in self.jobs.values() if j["status"] == "queued"), key=lambda j: j["created"])
            if queued:
                self._start(queued[0])

    def stop(self, job_id: str) -> dict:
        """Cancel a queued job, or send SIGINT (like Ctrl-C) to a running one; it ends as 'stopped'."""
        with self.lock:
            job = self.jobs[job_id]
            if job["status"] == "queued":
                job.update(status="stopped", ended=time.time(), stop_requested=True,
                           error="cancelled before it started")
            elif job["status"] == "running":
                job["stop_requested"] = True
                pid_file = self.dir / job_id / "child.pid"
                if pid_file.exists():
                    try:
                        os.kill(int(pid_file.read_text()), signal.SIGINT)
                    except (ProcessLookupError, ValueError):
                        pass
                else:  # the child has not started yet: stop the runner before it does
                    try:
                        os.kill(job["pid"], signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            self._save(job)
            return dict(job)

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        """Block until a job has ended (for tests and scripts)."""
        end = time.time() + timeout
        while time.time() < end:
            self.schedule()
            job = self.get(job_id)
            if job["status"] not in ACTIVE:
                return job
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")

    # ------------------------------------------------------------------------------------------ thread
    def start_scheduler(self):
        def loop():
            while not self._stop.wait(self.poll_s):
                self.schedule()
        self._thread = threading.Thread(target=loop, name="dev2pro-ui-jobs", daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
