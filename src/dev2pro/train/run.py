"""The life of a run folder: what is in it, what state it is in, one trainer at a time, Ctrl-C, non-finite steps.

- ``RunFolder`` (``train/folder.py``, torch-free): the named places of a run (state/, samples/, logs/, config.toml,
  summary.json, loss.png, the lock) and the command that continues it; `train`, `dedistill`, their lifecycle and the
  web app all name them through it.
- ``folder_status``: a folder that a failed start left behind (resolved config, caches, logs; no state, no LoRA) is
  "started" and a plain rerun reuses it; "saved" runs need ``--resume`` (or ``save.overwrite``); anything else in
  the folder makes it "foreign" and it is never reused without the flag.
- ``RunLock``: a lock file holding the trainer's PID. ``fcntl.flock`` where available: the kernel drops the lock
  when the process dies (kill -9 included), so a stale file is simply taken over; elsewhere ``O_EXCL`` plus a check
  that the recorded PID is alive.
- ``stop_on_interrupt``: the first Ctrl-C (or SIGTERM: `docker stop`, systemd, Slurm preemption) becomes a request
  the loop honours at the end of the step (it saves a resumable state); a second one interrupts at once. SIGTERM
  ends in ``Terminated`` (the CLI exits 143, as a process killed by it would).
- ``NonFiniteGuard``: ``train.nan_policy`` -- stop at the first non-finite loss or gradient norm (the default), or
  skip such updates and stop after ``max_skips`` in a row.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from .. import outputs
from ..errors import UserError
from ..outputs import pid_alive
from .state import latest_state

try:
    import fcntl
except ImportError:  # Windows: RunLock falls back to O_EXCL + a PID check
    fcntl = None

from .folder import LOCK_NAME, STATE_DIR, RunFolder  # noqa: E402,F401 -- the run folder's names live there
# What a start leaves before its first save: the resolved config, caches, logs (TensorBoard, W&B), baseline samples,
# the lock.
STARTED_ENTRIES = {"config.toml", "cache", "logs", "wandb", "samples", "loss.png", LOCK_NAME}
_STEP_FILE = re.compile(r"-step\d{6}(?:\.[a-z]+)?\.safetensors$")  # export.lora_paths' step files
RUN_SUBFOLDERS = (STATE_DIR, "samples")  # where a run's atomic writes happen, besides the folder itself


def folder_status(folder: Path) -> str:
    """"absent" | "empty" | "started" (a start that never saved) | "saved" (a state or a LoRA) | "foreign"."""
    folder = Path(folder)
    if not folder.exists():
        return "absent"
    names = [p.name for p in folder.iterdir()]
    if all(n.startswith(".") for n in names):  # nothing, or only our lock / atomic-write temps
        return "empty"
    shown = [n for n in names if not n.startswith(".")]
    # a run "saved" when it can be resumed (a usable state) or has finished (summary, a final LoRA or export); a
    # save that failed (a full disk at the first save) leaves step files or a partial state: a start to redo
    if latest_state(folder / STATE_DIR) or any(n == "summary.json" or n.endswith(".safetensors")
                                                and not _STEP_FILE.search(n) for n in shown):
        return "saved"
    # hidden names are atomic-write temps and the lock
    if all(n in STARTED_ENTRIES or n.startswith(".") or n == STATE_DIR or _STEP_FILE.search(n) for n in names):
        return "started"
    return "foreign"


# What a run may replace when started over (save.overwrite): the started entries, its state, summary and files
RUN_OWNED = (*STARTED_ENTRIES, STATE_DIR, "summary.json", "*.safetensors", "*-diffusers", ".*", "config.step-*.toml")


def check_no_foreign(folder: Path) -> None:
    """Starting over in ``folder`` (save.overwrite) writes only a run's own entries: refuse one holding others."""
    if Path(folder).is_dir():
        outputs.check_output(folder, True, "training run", folder=True, owned=RUN_OWNED)


def clean_stale_temps(folder: Path, subfolders=RUN_SUBFOLDERS) -> list[Path]:
    """``outputs.clean_stale_temps`` for a run folder and its subfolders; call it holding the folder's
    ``RunLock`` (then the PID-less hidden temps of killed writers go too)."""
    return outputs.clean_stale_temps(folder, locked=True, subfolders=subfolders)


def os_error_message(e: OSError, path: Path, doing: str) -> str:
    """One line for a failed write at ``path`` (``outputs.write_failure``'s wording)."""
    return outputs.write_failure(doing, path, e.errno, e.strerror or str(e))


class RunLock:
    """Exclusive use of a run folder by one process; ``acquire`` creates the folder (and its parents)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd, self.released = path, fd, False
        self.created = False  # ``acquire`` made the folder: a start refused before writing anything removes it

    @classmethod
    def acquire(cls, folder: Path, what: str = "training") -> "RunLock":
        folder = Path(folder)
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(os_error_message(e, folder, "create the run folder")) from None
        lock = cls._acquire(folder / LOCK_NAME, folder, what)
        lock.created = created
        return lock

    @classmethod
    def _acquire(cls, path: Path, folder: Path, what: str) -> "RunLock":
        if fcntl is None:  # Windows: no flock
            return cls._acquire_exclusive(path, what)
        for _ in range(5):  # retry if the file we locked was replaced (released and unlinked) meanwhile
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(os_error_message(e, folder, f"use the run folder (lock file {LOCK_NAME}) in"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(path)
                os.close(fd)
                raise UserError(_busy(folder, holder, what)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _write_pid(fd)
                return cls(path, fd)
            os.close(fd)
        raise UserError(f"{folder}: could not take the lock {LOCK_NAME} (it keeps changing); is another dev2pro "
                        f"process starting there?")

    @classmethod
    def _acquire_exclusive(cls, path: Path, what: str) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_pid(path)
                if holder is not None and pid_alive(holder):
                    raise UserError(_busy(path.parent, holder, what)) from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            _write_pid(fd)
            return cls(path, fd)
        raise UserError(_busy(path.parent, _read_pid(path), what))

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with contextlib.suppress(OSError):
            self.path.unlink()  # before closing: nobody can take the old file's lock once it is unlinked
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(folder: Path, pid: int | None, what: str) -> str:
    who = f"PID {pid}" if pid is not None else "an unknown PID"
    return (f"{folder} is in use: another dev2pro process ({who}) is {what} in it; wait for it to finish or stop "
            f"it (kill {pid if pid is not None else 'PID'}), or choose another save.output_dir")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


class Terminated(KeyboardInterrupt):
    """A run stopped by SIGTERM (after saving, like Ctrl-C); the CLI exits with ``exit_code``."""
    exit_code = 128 + signal.SIGTERM


class StopRequest:
    requested = False
    signum = signal.SIGINT  # the signal that asked

    def interrupt(self) -> KeyboardInterrupt:
        """What the loop raises once it has saved: ``Terminated`` for SIGTERM, KeyboardInterrupt for Ctrl-C."""
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[StopRequest]:
    """Within the block the first SIGINT or SIGTERM sets ``.requested`` (and ``.signum``); a second one raises
    KeyboardInterrupt (``Terminated`` for SIGTERM) at once."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt
        stop.requested, stop.signum = True, signum

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler_before is None else handler_before)


class NonFiniteGuard:
    """Decides what a step with a non-finite loss or gradient norm does (see ``train.nan_policy``).

    ``check`` returns True to apply the update, False to skip it; it raises ``UserError`` to stop, with
    ``context()`` appended (where the last good state is, how to go on).
    """

    def __init__(self, policy: str, max_skips: int, context: Callable[[], str]):
        self.policy, self.max_skips, self.context = policy, max(1, int(max_skips)), context
        self.skipped: list[int] = []
        self.in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float | None) -> bool:
        bad = None
        if not math.isfinite(loss):
            bad = f"non-finite loss ({loss}) at step {step}"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            bad = f"non-finite gradients ({grad_norm}) at step {step}"
        if bad is None:
            self.in_a_row = 0
            return True
        if self.policy == "skip":
            self.in_a_row += 1
            if self.in_a_row < self.max_skips:
                self.skipped.append(step)
                return False
            bad = f"{bad}: {self.in_a_row} steps in a row were non-finite (train.nan_max_skips = {self.max_skips})"
        raise UserError(f"{bad}; training stopped without saving these weights. {self.context()}")
