"""How every output is written: atomically, only over what the command itself replaces, finite, streamed.

Atomic: data goes to a temp sibling named ``.dev2pro-tmp-<name>-<pid>@<host>-<random>`` and is renamed into place
(``os.replace``), so a crash leaves either the old output or nothing -- never half a file that a later run would
trust. A killed process cannot clean up after itself, so every writer removes, once per folder and process, the
temp entries of *dead* processes of this host that it finds beside its output (the next run of the same command
on the same destination cleans what the killed one left; a live writer's temps are never touched).

Guarded: ``check_output`` refuses an existing output without ``overwrite``, a file over a folder, a write onto the
command's own input, and replacing a folder that holds anything the writer does not write itself (``owned``);
without ``owned``, model folders (``model_index.json``, a diffusers component) are refused. So ``--overwrite``
replaces the command's own earlier output and nothing else.

Disk errors: ENOSPC, EDQUOT, EROFS, EACCES and EPERM while writing become one-line ``UserError``s naming the path
and the free space needed (the temp is removed, existing files are untouched); a known size is checked up front.

Streaming safetensors: the format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor, plus ``__metadata__``), then the raw bytes. Since shapes and dtypes are known before any
tensor is computed, we write the header first and then each tensor as it is produced: peak memory is one tensor,
not the model (``safetensors.torch.save_file`` needs every tensor in memory at once). Every floating tensor is
checked for NaN/inf as it is written: a non-finite weight is never saved silently.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError

from .errors import UserError

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TMP_PREFIX = ".dev2pro-tmp-"
_TMP_RE = re.compile(r"^\.dev2pro-tmp-(?P<name>.*)-(?P<pid>\d+)@(?P<host>[^/]*)-[0-9a-f]{8}(?:-old)?$")
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
# Rust writers (safetensors' save_file, used by diffusers/transformers save_pretrained) report errno in text
_RUST_OS_ERROR = re.compile(r"(?:code: |os error )(\d+)")
MODEL_MARKERS = ("model_index.json",)


class NonFiniteError(UserError):
    """A tensor about to be written or loaded holds NaN or inf."""


# ------------------------------------------------------------------------------------------------ guard
def check_output(path: str | os.PathLike, overwrite: bool, what: str = "output", *, folder: bool | None = None,
                 owned: Sequence[str] | None = None, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output path before anything is computed; returns it as a Path.

    ``folder``: the output is a folder (True), a file (False) or either (None). ``owned``: glob patterns of the
    entries this writer puts in its folder; an existing folder holding anything else is refused (with None, only
    model folders are). ``sources``: the command's inputs, which the output may neither be nor contain.
    """
    path = Path(path)
    _check_not_source(path, what, sources)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{what} {path} already exists; pass --overwrite to replace it, "
                            f"or choose another path")
        if path.is_dir():
            _check_replaceable_folder(path, what, folder, owned)
        elif folder:
            raise UserError(f"{what} {path} is a file but this output is a folder; choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the directory for {what} {path} does not exist: create {parent} first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {what} {path}: directory {parent} is not writable")
    return path


def _check_not_source(path: Path, what: str, sources: Iterable[str | os.PathLike]) -> None:
    target = path.resolve()
    for src in sources:
        s = Path(src).resolve()
        if target == s or target in s.parents:
            relation = "is" if target == s else ("is the model folder holding" if is_model_folder(target)
                                                  else "holds")
            raise UserError(f"{what} {path} {relation} the input {src}: writing it would replace what this command "
                            f"reads. Write to a new path (and move it into place afterwards)")


def _check_replaceable_folder(path: Path, what: str, folder: bool | None, owned: Sequence[str] | None) -> None:
    if folder is False:
        raise UserError(f"{what} {path} is a folder, and a file cannot replace it (nothing was deleted); give a "
                        f"file path such as {path / 'model.safetensors'}")
    if owned is None:
        if is_model_folder(path):
            raise UserError(f"{path} is a model folder (it has {_model_marker(path)}): replacing it with a {what} "
                            f"would delete its other components. Choose a new folder")
        return
    foreign = foreign_entries(path, owned)
    if foreign:
        kind = f"a model folder (it has {_model_marker(path)})" if is_model_folder(path) else "a folder"
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UserError(f"{path} is {kind}: writing a {what} there would delete {shown}, which this command does "
                        f"not write. Nothing was deleted; choose a new or empty folder")


def foreign_entries(folder: Path, owned: Sequence[str], prefix: str = "") -> list[str]:
    """Entries below ``folder`` (relative POSIX paths) that no pattern of ``owned`` matches: an owned folder is
    owned whole; an unowned folder is searched, and counts as foreign itself only when empty. Temps are skipped."""
    foreign = []
    for e in sorted(folder.iterdir(), key=lambda e: e.name):
        rel = prefix + e.name
        if (not prefix and e.name.startswith(TMP_PREFIX)) or any(fnmatch.fnmatchcase(rel, p) for p in owned):
            continue
        if e.is_dir() and not e.is_symlink() and any(e.iterdir()):
            foreign += foreign_entries(e, owned, rel + "/")
        else:
            foreign.append(rel + ("/" if e.is_dir() and not e.is_symlink() else ""))
    return foreign


def is_model_folder(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (``model_index.json``) or one of its component folders (config + weights)."""
    path = Path(path)
    return _model_marker(path) is not None


def _model_marker(path: Path) -> str | None:
    for m in MODEL_MARKERS:
        if (path / m).exists():
            return m
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return "config.json + safetensors weights"
    return None


# ------------------------------------------------------------------------------------------------ temps
def temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh recognisable temp name beside ``path`` (nothing is created)."""
    return path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}" \
                         f"{suffix}"


_cleaned: set[tuple[int, str]] = set()


# what killed writers of a run folder leave without a PID in the name: state temps (``.step-N.<random>.tmp``),
# replaced folders (``.NAME.old``) and dedistill's export source (``.NAME.export.safetensors``)
_LOCKED_TEMP_ENDINGS = (".tmp", ".old", ".export.safetensors")


def clean_stale_temps(folder: str | os.PathLike, force: bool = False, *, locked: bool = False,
                      subfolders: Sequence[str] = ()) -> list[Path]:
    """Remove the temp entries that dead processes of this host left in ``folder`` (and its ``subfolders``);
    returns what was removed.

    Runs once per folder and process unless ``force``. Entries of live processes and of other hosts (a shared
    file system) are kept: they may still be written. ``locked``: the caller holds the folder's ``RunLock``, so
    nobody else writes there and the PID-less hidden temps (``_LOCKED_TEMP_ENDINGS``) go too; it always scans.
    """
    removed = []
    for d in [Path(folder)] + [Path(folder) / s for s in subfolders]:
        key = (os.getpid(), str(d.resolve()) if d.exists() else str(d))
        if (key in _cleaned and not (force or locked)) or not d.is_dir():
            continue
        _cleaned.add(key)
        host = socket.gethostname()
        for entry in d.iterdir():
            m = _TMP_RE.match(entry.name)
            if m and m["host"] == host and not pid_alive(int(m["pid"])) or \
                    locked and not m and entry.name.startswith(".") and entry.name.endswith(_LOCKED_TEMP_ENDINGS):
                _remove(entry)
                removed.append(entry)
    return removed


def _clean_legacy_temps(path: Path) -> None:
    """Temps that dev2pro before this naming left for this very output (``.NAME.<8 random>.tmp/``, ``.NAME.old``):
    they carry no pid, so only the next write of the same destination removes them."""
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)$")
    for entry in parent.glob(f".{glob.escape(path.name)}.*"):
        if pattern.match(entry.name) and entry.is_dir():
            _remove(entry)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a PID we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ------------------------------------------------------------------------------------------------ disk errors
def disk_errno(exc: BaseException) -> int | None:
    """The errno of a disk-full / read-only / permission error (OSError or a Rust writer's message), else None."""
    e: BaseException | None = exc
    for _ in range(4):  # the exception, then what it was raised from
        if e is None or isinstance(e, UserError):
            return None
        if isinstance(e, OSError):
            if e.errno in DISK_ERRNOS:
                return e.errno
        else:
            m = _RUST_OS_ERROR.search(str(e))
            if m and int(m.group(1)) in DISK_ERRNOS:
                return int(m.group(1))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failure(doing: str, path: str | os.PathLike, code: int | None, reason: str = "",
                  needed: int | None = None, written: int | None = None) -> str:
    """The one wording of a failed write, for every writer: ``cannot DOING PATH: WHY`` and, for a disk error
    (``code`` in DISK_ERRNOS), the free and needed space or what to do; other errors keep their ``reason``."""
    path = Path(path)
    msg = f"cannot {doing} {path}: {DISK_ERRNOS.get(code) or reason or 'unknown error'}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path.parent)
        need = f"about {human_bytes(needed)}" if needed else \
            (f"more than the {human_bytes(written)} written" if written else "more")
        have = f"{human_bytes(free)} free" if free is not None else "free space unknown"
        msg += f" ({have} on its file system, {need} needed); free some space or choose another destination"
    elif code == errno.EROFS:
        msg += "; choose a destination on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        msg += "; choose a folder you can write to or fix its permissions"
    return msg


def disk_error(code: int, what: str, path: Path, needed: int | None = None, written: int | None = None) -> UserError:
    """The one-line error for an output write that failed with ``code`` (an errno in DISK_ERRNOS)."""
    return UserError(write_failure(f"write {what}", path, code, needed=needed, written=written)
                     + ". Existing files were left as they were")


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError from Python writes, SafetensorError from the Rust writer (which reports
    a full disk as "... (os error 28)"), UserError where an output guard already explained it."""
    return OSError, UserError, SafetensorError


def write_error_message(e: BaseException, path: str | os.PathLike, doing: str) -> str:
    """One line (``write_failure``'s wording) for any of ``write_errors()``; an OSError's own file name wins."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return write_failure(doing, e.filename or path, e.errno, e.strerror or str(e))
    m = _RUST_OS_ERROR.search(str(e))
    code = int(m.group(1)) if m else None
    return write_failure(doing, path, code, os.strerror(code) if code else str(e))


def make_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Create the folders above ``path``; a full or read-only disk is a one-line UserError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise disk_error(code, what, path) from None
    return path


def check_free_space(path: Path, needed: int, what: str = "output") -> None:
    """Refuse up front when the destination's file system has less than ``needed`` bytes free."""
    free = free_bytes(path.parent if str(path.parent) else Path("."))
    if free is not None and needed > free:
        raise disk_error(errno.ENOSPC, what, path, needed)


def _size_of(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0


# ------------------------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, what: str = "output", *,
                folder: bool | None = None, owned: Sequence[str] | None = None,
                sources: Iterable[str | os.PathLike] = (), size: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (not created: write a file there or mkdir it); on success rename it into
    place. The guard arguments are those of ``check_output``; ``size`` (bytes, when known) is checked against the
    free space first."""
    path = check_output(path, overwrite, what, folder=folder, owned=owned, sources=sources)
    # a file written inside an outer writer's temp folder: that writer reports errors, for its own destination
    nested = any(t in path.parents for t in _active)
    if not nested:
        clean_stale_temps(path.parent if str(path.parent) else Path("."))
        _clean_legacy_temps(path)
        if size:
            check_free_space(path, size, what)
    tmp = temp_path(path)
    _active.append(tmp)
    try:
        yield tmp
        _commit(tmp, path, what)
    except Exception as e:
        code = disk_errno(e)
        if nested or code is None or (code in (errno.EACCES, errno.EPERM) and not _is_ours(e, tmp, path)):
            raise
        raise disk_error(code, what, path, size, _size_of(tmp)) from None
    finally:
        _active.remove(tmp)
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


_active: list[Path] = []  # temps of the writes in progress in this process (innermost last)


def _is_ours(e: BaseException, tmp: Path, path: Path) -> bool:
    """A permission error on our temp or destination (not on an input the body was reading)."""
    name = getattr(e, "filename", None)
    return name is None or str(name).startswith(str(tmp)) or Path(name) in (path, path.parent)


def _commit(tmp: Path, path: Path, what: str) -> None:
    if path.is_dir() and not path.is_symlink():
        if not tmp.is_dir():
            raise UserError(f"{what} {path} is a folder, and a file cannot replace it (nothing was deleted)")
        old = Path(f"{temp_path(path)}-old")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ text, JSON
def write_text(path: str | os.PathLike, text: str, overwrite: bool = True, what: str = "output") -> Path:
    """Atomically write a text file (used for configs, reports, JSON)."""
    data = text.encode()
    with atomic_path(path, overwrite=overwrite, what=what, folder=False, size=len(data)) as tmp:
        with open(tmp, "wb") as f:
            write_bytes(f, data)
    return Path(path)


def finite_json(obj) -> tuple[object, list[str]]:
    """``obj`` with every NaN/inf float replaced by None, and the JSON paths (``losses[3]``) that were replaced.

    JSON has no NaN: Python writes a bare ``NaN`` that strict readers (JavaScript, jq) reject.
    """
    replaced: list[str] = []

    def walk(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            replaced.append(f"{where}={x}")
            return None
        if isinstance(x, Mapping):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x
    return walk(obj, ""), replaced


def write_json(path: str | os.PathLike, obj, overwrite: bool = True) -> Path:
    """Strict JSON: non-finite numbers are written as null and listed under ``"nonfinite"`` (dicts) -- never NaN."""
    clean, replaced = finite_json(obj)
    if replaced and isinstance(clean, dict):
        clean["nonfinite"] = replaced
    text = json.dumps(clean, indent=2, sort_keys=True, default=str, allow_nan=False)
    return write_text(path, text + "\n", overwrite=overwrite)


# ------------------------------------------------------------------------------------------------ safetensors
def count_nonfinite(t: torch.Tensor) -> int:
    """NaN/inf entries of a tensor (0 for integer dtypes); fp8 is read from its bits, without an upcast."""
    if t.dtype == torch.float8_e4m3fn:  # no inf; NaN = exponent and mantissa all ones
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if t.dtype == torch.float8_e5m2:  # inf/NaN = exponent all ones
        return int(((t.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False, what: str = "output",
                     finite: bool = True, sources: Iterable[str | os.PathLike] = (), fsync: bool = True) -> Path:
    """Atomically save an in-memory dict of tensors."""
    items = [(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in tensors.items()]
    return stream_safetensors(items, path, metadata, overwrite, what=what, finite=finite, sources=sources,
                              fsync=fsync)


def stream_safetensors(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                       path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                       overwrite: bool = False, progress: Callable[[int], None] | None = None,
                       what: str = "output", finite: bool = True, sources: Iterable[str | os.PathLike] = (),
                       fsync: bool = True) -> Path:
    """Write a safetensors file tensor by tensor: ``entries`` = (key, dtype, shape, produce()) in file order.

    ``produce`` is called once per tensor, when its bytes are written; its result must match dtype and shape.
    ``finite``: refuse (NonFiniteError, nothing written) a floating tensor holding NaN/inf.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape, _ in entries:
        n = tensor_nbytes(dtype, shape)
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    size = 8 + len(blob) + offset
    with atomic_path(path, overwrite=overwrite, what=what, folder=False, sources=sources, size=size) as tmp:
        with open(tmp, "wb") as f:
            write_bytes(f, struct.pack("<Q", len(blob)))
            write_bytes(f, blob)
            for key, dtype, shape, produce in entries:
                t = produce()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{key}: produced {t.dtype}{tuple(t.shape)}, header says {dtype}{shape}")
                bad = count_nonfinite(t) if finite else 0
                if bad:
                    raise NonFiniteError(f"refusing to write {what} {path}: tensor {key} holds {bad} NaN/inf "
                                         f"value(s) of {t.numel()}; nothing was written")
                write_bytes(f, _tensor_bytes(t))
                if progress:
                    progress(t.numel() * t.element_size())
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return Path(path)


def write_bytes(f, data) -> None:
    """Every byte our writers put on disk passes here (tests simulate a full disk by replacing it)."""
    f.write(data)


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes a tensor of this dtype and shape holds (for free-space checks and shard sizes)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # Reinterpret as bytes (little-endian hosts): exact for every dtype incl. bf16/fp8, which numpy lacks.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
