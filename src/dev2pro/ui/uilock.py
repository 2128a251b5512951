"""One `dev2pro ui` per workspace: the app's job queue runs one job at a time, and that rule only holds if one
process owns the queue. A second app on the same workspace (another port, another terminal) would keep a queue of
its own beside the first and start a second training on the same GPU, and neither would list the other's jobs; so
it is refused, naming the address of the one already running (the user opens that instead).

The lock is an OS file lock (``flock``) on ``.dev2pro-ui/ui.lock``, held for the life of the process: it is released
by the kernel however the process ends (Ctrl-C, a crash, SIGKILL), so a stale lock can never block a restart. The
file also holds the owner's PID, start time and address, for the message. Without ``fcntl`` (Windows) the PID and
its start time are checked instead (a dead or reused PID is stale). Jobs started by the app do not inherit the lock:
a run that outlives its app never blocks the next one, which re-attaches to it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

from ..errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _read(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _alive(info: dict) -> bool:
    try:
        return abs(psutil.Process(int(info["pid"])).create_time() - float(info["started"])) < 0.01
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _busy(root: Path, info: dict) -> UserError:
    where = f" at {info['url']}" if info.get("url") else ""
    pid = f" (PID {info['pid']})" if info.get("pid") else ""
    return UserError(f"another dev2pro ui{pid} is already serving the workspace {root}{where}: open that one, or stop "
                     f"it first (Ctrl-C in its terminal); one app per workspace keeps its jobs one at a time")


def hold(state: Path, url: str):
    """Take the workspace's UI lock (``state``: its ``.dev2pro-ui`` folder) for this process; UserError naming the
    running app's PID and address if another live process holds it. Returns the open lock file: keep it."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "ui.lock"
    f = open(path, "a+", encoding="utf-8")
    f.seek(0)
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _read(f.read())
            f.close()
            raise _busy(state.parent, info) from None
    else:  # pragma: no cover - Windows: a live PID with the recorded start time holds it
        info = _read(f.read())
        if _alive(info) and int(info["pid"]) != os.getpid():
            f.close()
            raise _busy(state.parent, info)
    f.seek(0)
    f.truncate()
    me = psutil.Process()
    f.write(json.dumps({"pid": me.pid, "started": me.create_time(), "url": url, "since": time.time()}))
    f.flush()
    return f
