"""``python -m dev2pro.ui.runner JOB_DIR -- COMMAND...``: run a job's command and record how it ended.

The web app starts every job through this small wrapper, in its own session, so the job outlives the web app
(a crash or restart of the UI never kills a run) and its exit status is still known afterwards: the child's pid is
written to ``JOB_DIR/child.pid`` when it starts and its return code to ``JOB_DIR/rc`` when it ends (both atomic).
Stopping a job sends SIGINT to the child, which ends `dev2pro` the way Ctrl-C does in a terminal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def _write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m dev2pro.ui.runner JOB_DIR -- COMMAND...", file=sys.stderr)
        return 2
    job_dir, command = Path(argv[0]), argv[2:]
    child = subprocess.Popen(command)
    _write(job_dir / "child.pid", str(child.pid))
    # The wrapper must outlive the child to record its status: forward stop signals instead of dying from them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    rc = child.wait()
    _write(job_dir / "rc", str(rc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
