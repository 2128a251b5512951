"""The Dataset page's edit pairs: each listed image's reference in a controls folder, found and judged by training's
own rules (``data.folders.locate_reference``, ``decoded_size``, ``aspect_kept``), and the references no image uses.

Bounded work like the image listing: a reference is looked up per listed image (at most ``MAX_IMAGES``), a huge
one is judged from its header and never decoded, and an entry that is a symlink out of the workspace is named but
never opened (the workspace's rule, as ``Workspace.images`` and ``read_text`` apply it).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..data.folders import (IMAGE_EXTENSIONS, KOHYA_NAME, REFERENCE_KEPT, UNSUPPORTED_EXTENSIONS, DatasetFolder,
                            distinct_control_dirs, aspect_kept, decoded_size, locate_reference, reference_crop_note)
from ..choices import MAX_REFERENCES
from ..errors import UserError
from .workspace import PathRefused

MAX_CHECK_PIXELS = 40_000_000  # larger images are flagged from their header, never decoded by a page request
MAX_FOLDERS = MAX_REFERENCES  # reference folders checked per request (one reference per edit from each)
MAX_UNUSED = 50  # unused references spelled out (all are counted)
_MAX_ENTRIES = 100_000  # entries of the controls folder looked at for unused references
OUTSIDE = "a symlink out of the workspace (not read)"


def too_large(path: Path) -> str | None:
    """Why ``path`` is not decoded by a page request (over ``MAX_CHECK_PIXELS`` by its header), else None; an
    unreadable header is the decoder's to explain."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 -- PIL raises many types; decoded_size says why
        return None
    if w * h > MAX_CHECK_PIXELS:
        return f"{w}x{h} px is over {MAX_CHECK_PIXELS // 10**6} megapixels (not decoded here; downscale it)"
    return None


def listed_images(ws, folder: Path, limit: int, skipped: list) -> list[tuple[Path, str, str]]:
    """(image, key, stem) of the folder's images as training names them: its own images (key = stem = the name
    without suffix), or for a kohya parent (no images of its own) those of its ``N_name`` subfolders (key
    ``10_cat/001``, stem ``001``). At most ``limit``; entries that are symlinks out appended to ``skipped``."""
    own = ws.images(folder, limit=limit, skipped=skipped)
    if own:
        return [(p, p.stem, p.stem) for p in own]
    with os.scandir(folder) as it:  # bounded like Workspace.images
        subs = sorted(e.name for e, _ in zip(it, range(100_000)) if KOHYA_NAME.match(e.name) and e.is_dir())
    out: list[tuple[Path, str, str]] = []
    for name in subs:
        sub = folder / name
        if not ws.inside(sub):
            skipped.append(name)
            continue
        found = []
        out += [(p, f"{name}/{p.stem}", p.stem) for p in ws.images(sub, limit=limit - len(out), skipped=found)]
        skipped += [f"{name}/{n}" for n in found]
        if len(out) >= limit:
            break
    return out


def reference_folders(ws, folder: Path, controls: list[str]) -> list["References"]:
    """One ``References`` per controls folder, in order (one reference per image from each, as training reads
    ``controls = [a, b]``); each confined to the workspace, and refused as training refuses them: one listed twice
    under any spelling, or the dataset folder itself or one holding it (``data.folders``'s own check)."""
    if len(controls) > MAX_FOLDERS:
        raise UserError(f"{len(controls)} reference folders; check at most {MAX_FOLDERS} at a time")
    seen: dict[Path, str] = {}  # shared, as training's scanner shares it across its controls folders
    refs = [References(ws, c, seen) for c in controls]
    try:  # the lexical spellings (confined above), so the message names the two the user typed
        distinct_control_dirs(DatasetFolder(folder, controls=[ws.root / c.strip() for c in controls]))
    except UserError as e:
        # in workspace paths, as the page shows them ('.': the workspace itself)
        raise UserError(str(e).replace(f"{ws.root}/", "").replace(str(ws.root), ".")) from None
    return refs


class References:
    """The reference of each listed image (``check``) and the pair counts and unused references (``summary``)."""

    def __init__(self, ws, controls: str, seen: dict[Path, str] | None = None):
        try:
            self.dir = ws.resolve(controls, must_exist=True)
        except PathRefused as e:
            raise UserError(f"reference folder (controls): {e}") from None
        if not self.dir.is_dir():
            raise UserError(f"reference folder {controls} is a file, not a folder; give the folder of the "
                            "'before' images")
        self.ws, self.rel = ws, ws.rel(self.dir)
        self.counts = {"paired": 0, "cropped": 0, "missing": 0, "unusable": 0}
        self.used: set[Path] = set()
        # reference -> the image that claimed it first (training refuses a second)
        self.seen: dict[Path, str] = {} if seen is None else seen

    def _lexical(self, path: Path) -> str:
        """The workspace-relative name as listed (a symlink's own name, never its target)."""
        return path.relative_to(self.ws.root).as_posix()

    def _result(self, status: str, path: Path | None = None, size=None, problem: str | None = None) -> dict:
        self.counts[status] += 1
        return {"path": self._lexical(path) if path else None, "size": list(size) if size else None,
                "status": status, "problem": problem}

    def check(self, image: str, key: str, stem: str, size) -> dict:
        """``{"path", "size", "status", "problem"}`` of one image's reference; status: paired, cropped (another
        aspect ratio: cropped to the image's bucket, still trained on), missing or unusable (training refuses)."""
        path, problem = locate_reference(key, stem, self.dir, readable=self.ws.inside)
        if path is not None:
            self.used.add(path)
        if problem == "missing":
            names = " or ".join(f"{self.rel}/{k}.*" for k in dict.fromkeys((key, stem)))
            return self._result("missing", problem=f"no reference: no {names} in {'/'.join(IMAGE_EXTENSIONS)}")
        if problem == "outside":
            return self._result("unusable", path, problem=OUTSIDE)
        if problem == "unsupported":
            return self._result("unusable", path, problem=f"{path.suffix.lower()} is a format we do not train on: "
                                                            f"convert it to {', '.join(IMAGE_EXTENSIONS)}")
        if why := too_large(path):
            return self._result("unusable", path, problem=why)
        ref_size, why = decoded_size(path)
        if why is not None:
            return self._result("unusable", path, problem=why)
        if (first := self.seen.setdefault(path, image)) != image:
            return self._result("unusable", path, ref_size, f"also {first}'s reference: in a kohya parent, put "
                                                            f"references in {self.rel}/N_name/ as the images are")
        if size and (kept := aspect_kept(ref_size, size)) < REFERENCE_KEPT:
            return self._result("cropped", path, ref_size, "another aspect ratio: "
                                + reference_crop_note(ref_size, size, kept) + " (cropped to the image's bucket)")
        return self._result("paired", path, ref_size)

    def summary(self, complete: bool) -> dict:
        """Pair counts; ``unused``: references in the folder (and its subfolders, a kohya parent's ``N_name``) that
        no listed image uses, the first ``MAX_UNUSED`` of them; None when the image list was cut at its limit."""
        out = {"controls": self.rel, "paired": self.counts["paired"] + self.counts["cropped"],
               "cropped": self.counts["cropped"], "missing": self.counts["missing"],
               "problem": self.counts["unusable"], "unused": None, "unused_count": None}
        if complete:
            unused = [p for p in self._references() if p not in self.used]
            out["unused"] = [self._lexical(p) for p in unused[:MAX_UNUSED]]
            out["unused_count"] = len(unused)
        return out

    def _references(self) -> list[Path]:
        """Image files (any format we list) in the folder and its subfolders one level down, hidden ones and
        symlinked folders out left out; at most ``_MAX_ENTRIES`` entries looked at."""
        exts = IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS
        out, todo, n = [], [(self.dir, 0)], 0
        while todo and n < _MAX_ENTRIES:
            d, depth = todo.pop(0)
            with os.scandir(d) as it:
                entries = sorted((e for e, _ in zip(it, range(_MAX_ENTRIES - n))), key=lambda e: e.name)
            n += len(entries)
            for e in entries:
                p = Path(e.path)
                if e.name.startswith("."):
                    continue
                if p.suffix.lower() in exts and (p in self.used or not self.ws.inside(p) or p.is_file()):
                    out.append(p)
                elif depth == 0 and e.is_dir() and self.ws.inside(p):
                    todo.append((p, 1))
        return sorted(out)
