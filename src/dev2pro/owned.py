"""The one rule for ``--overwrite``: a command replaces only files it owns, never a folder's foreign files.

A command owns (1) the files it is about to write and (2) the files an earlier run of the *same* command wrote
into that folder, which it lists in a manifest (``.dev2pro-outputs.json``, written atomically with the folder).
Anything else in the folder -- a user's photos, notes, subfolders, another command's outputs -- is foreign: the
command refuses the folder and lists them, and nothing is deleted. (Names alone cannot tell: a sample folder made
with other prompts holds other file names, which only the manifest can vouch for.)

``owned_folder`` is the writer for commands that build their output folder whole (``sample``, ``compare``, the
tiny captioner): it checks, builds the folder in a temp sibling, records the manifest and renames it into place.
``check_owned_folder`` is the same check up front, before minutes of rendering.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .outputs import atomic_path, check_output, write_json

MANIFEST = ".dev2pro-outputs.json"


def recorded(folder: str | os.PathLike, command: str) -> list[str]:
    """The files (paths relative to ``folder``) an earlier run of ``command`` recorded there; [] without a
    readable manifest of that command."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("command") != command or not isinstance(data.get("files"), list):
        return []
    return [f for f in data["files"] if isinstance(f, str)]


def owned_patterns(folder: str | os.PathLike, command: str, names: Iterable[str] = (),
                   patterns: Sequence[str] = ()) -> list[str]:
    """The glob patterns (``check_output``'s ``owned``) of what ``command`` may replace in ``folder``: the manifest,
    the ``names`` it will write, what its earlier run recorded (names are escaped: a prompt may hold ``[``)."""
    exact = {MANIFEST, *names, *recorded(folder, command)}
    return [glob.escape(n) for n in sorted(exact)] + list(patterns)


def files_under(folder: str | os.PathLike) -> list[str]:
    """Every file (or link) below ``folder`` as a relative POSIX path, the manifest excepted."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(folder: str | os.PathLike, command: str, files: Sequence[str] | None = None) -> Path:
    """Record ``files`` (default: every file below ``folder``) as written by ``command`` (atomic JSON)."""
    files = files_under(folder) if files is None else sorted(files)
    return write_json(Path(folder) / MANIFEST, {"command": command, "files": files})


def check_owned_folder(out: str | os.PathLike, overwrite: bool, command: str, names: Iterable[str] = (),
                       what: str = "output folder") -> bool:
    """Check an output folder before the work: absent or empty is free; otherwise it needs ``overwrite`` and may
    hold only files ``command`` owns (else a UserError lists the foreign ones). Returns the overwrite to use."""
    out = Path(out)
    empty = out.is_dir() and not any(out.iterdir())
    check_output(out, overwrite or empty, what, folder=True, owned=owned_patterns(out, command, names))
    return overwrite or empty


@contextlib.contextmanager
def owned_folder(out: str | os.PathLike, overwrite: bool, command: str, names: Iterable[str] | None = (),
                 what: str = "output folder", sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temp folder to fill; on success it replaces ``out`` with a manifest of its files.

    ``names``: the files the command will write, checked before the body runs (None: not known until written);
    the files actually written are checked again before the rename, so a folder that holds anything else -- or
    gained it meanwhile -- is refused with nothing deleted."""
    out = Path(out)
    sources = list(sources)
    up_front = owned_patterns(out, command, names) if names is not None else ["*"]
    empty = out.is_dir() and not any(out.iterdir())
    overwrite = overwrite or empty
    with atomic_path(out, overwrite=overwrite, what=what, folder=True, owned=up_front, sources=sources) as tmp:
        tmp.mkdir()
        yield tmp
        written = files_under(tmp)
        check_output(out, overwrite, what, folder=True, owned=owned_patterns(out, command, written),
                     sources=sources)
        write_manifest(tmp, command, written)
