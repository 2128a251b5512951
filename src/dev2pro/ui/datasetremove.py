"""The Dataset page's "Remove selected" and "Restore": images are moved, never deleted, into ``.removed/`` beside
them, with their caption (``NAME.txt``) and mask (``NAME.mask.*``) files and, when the request names reference
folders, each one's reference (into ``CONTROLS/.removed/``).

Training never reads a hidden folder (``data.folders`` scans a folder's own files, and skips dot-folders when
recursive), nor does the page's listing. A name already taken in ``.removed`` gets a number (``cat-1.png`` with
``cat-1.txt``); ``.removed/removed.json`` (written atomically) records where each file came from, so restore puts
every file back under its own name, and refuses while that name is taken again. A caption or mask file that an
image staying in the folder also uses (``cat.png`` and ``cat.jpg`` share ``cat.txt``) stays where it is.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from ..data.folders import KOHYA_NAME, locate_reference
from ..data.masks import MASK_MARK, MASK_SUFFIXES
from ..errors import UserError
from ..outputs import write_json
from .pairs import listed_images, reference_folders

REMOVED = ".removed"  # hidden: training and the page's listings skip it
MANIFEST = "removed.json"
MAX_FILES = 10_000  # images one request moves


def companions(image: Path) -> list[Path]:
    """The files that belong to ``image`` beside it: its caption and its masks (those that exist)."""
    names = [".txt"] + [MASK_MARK + s for s in MASK_SUFFIXES]
    return [p for p in (image.with_name(image.stem + n) for n in names) if p.is_file()]


def _manifest(ws, removed_dir: Path) -> dict:
    """``removed_dir``'s records: removed image name -> {"original", "files": [[from, to], ...], "at"}."""
    path = removed_dir / MANIFEST
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())["entries"]
        if not isinstance(entries, dict):
            raise TypeError
        return entries
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{ws.rel(path)} is damaged; fix it or move it away (the files in "
                        f"{ws.rel(removed_dir)} stay there)") from None


def _save_manifest(removed_dir: Path, entries: dict) -> None:
    write_json(removed_dir / MANIFEST, {"entries": entries})


def _free_stem(dest_dir: Path, stem: str, tails: list[str], taken: set[Path]) -> str:
    """``stem``, else ``stem-1``, ``stem-2``, ...: the first under which no file of ``tails`` exists in ``dest_dir``."""
    n, name = 0, stem
    while any(os.path.lexists(dest_dir / (name + t)) or dest_dir / (name + t) in taken for t in tails):
        n += 1
        name = f"{stem}-{n}"
    return name


def _chosen(ws, folder: Path, files) -> tuple[list[tuple[Path, str, str]], set[Path]]:
    """(the named images as (image, key, stem), the images that stay); UserError naming 'files' otherwise."""
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise UserError("'files' must be a non-empty list of image paths: tick the images to remove")
    if len(files) > MAX_FILES:
        raise UserError(f"'files' names {len(files)} images; remove at most {MAX_FILES} at a time")
    listed = {img: (img, key, stem) for img, key, stem in listed_images(ws, folder, 100_000, [])}
    chosen = {}
    for f in files:
        image = ws.resolve(f)
        if image not in listed:
            raise UserError(f"'files': {f} is not an image in {ws.rel(folder)}; send the paths the folder "
                            "listing gives")
        chosen[image] = listed[image]
    return list(chosen.values()), set(listed) - set(chosen)


def _plan(ws, folder: Path, files, controls: list[str]) -> list[dict]:
    """Per image: where it and its files go (``moves``: [(from, to), ...]); nothing is moved here."""
    chosen, staying = _chosen(ws, folder, files)
    refs = reference_folders(ws, folder, controls)
    shared = {c for img in staying for c in companions(img)}
    taken: set[Path] = set()
    plan = []
    for image, key, stem in chosen:
        dest = ws.confine(image.parent / REMOVED, ws.rel(image.parent) + "/" + REMOVED)
        group = [image] + [c for c in companions(image) if c not in shared and c not in taken]
        tails = [p.name[len(image.stem):] for p in group]
        name = _free_stem(dest, image.stem, tails, taken)
        moves = [(p, dest / (name + t)) for p, t in zip(group, tails)]
        for r in refs:
            ref, problem = locate_reference(key, stem, r.dir, readable=ws.inside)
            if ref is None or problem == "outside" or ref in taken or not ref.is_file():
                continue
            ref_dest = ws.confine(ref.parent / REMOVED, ws.rel(ref.parent) + "/" + REMOVED)
            moves.append((ref, ref_dest / (_free_stem(ref_dest, ref.stem, [ref.suffix], taken) + ref.suffix)))
        taken.update(p for m in moves for p in m)
        plan.append({"image": image, "moves": moves})
    return plan


def _move_all(ws, moves: list[tuple[Path, Path]]) -> None:
    """Rename every (from, to); on a failure the ones done are moved back and a UserError says nothing moved."""
    done = []
    try:
        for src, dst in moves:
            dst.parent.mkdir(exist_ok=True)
            if os.path.lexists(dst):  # checked when planned; a file that appeared since is never overwritten
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            os.rename(src, dst)
            done.append((src, dst))
    except OSError as e:
        for src, dst in reversed(done):
            os.rename(dst, src)
        raise UserError(f"could not move {e.filename or ''}: {e.strerror or e}; nothing was moved") from None


def remove_images(ws, folder: Path, files, controls: list[str] = ()) -> dict:
    """Move the named images (workspace paths of images listed in ``folder``) with their caption and mask files,
    and their reference in each of ``controls``, into ``.removed/``. Reply: ``moved`` (per image: ``path`` in
    .removed, ``original``, ``files`` as [from, to] workspace paths) and ``kept`` (files other images still use)."""
    plan = _plan(ws, folder, files, list(controls))
    by_dir: dict[Path, dict] = {}
    for item in plan:
        d = item["moves"][0][1].parent
        if d not in by_dir:
            by_dir[d] = _manifest(ws, d) if d.is_dir() else {}
    _move_all(ws, [m for item in plan for m in item["moves"]])
    moved = []
    for item in plan:
        image, to = item["moves"][0]
        record = {"original": _rel(ws, image), "files": [[_rel(ws, a), _rel(ws, b)] for a, b in item["moves"]],
                  "at": time.time()}
        by_dir[to.parent][to.name] = record
        moved.append({"path": _rel(ws, to), **record})
    for d, entries in by_dir.items():
        _save_manifest(d, entries)
    kept = {c for item in plan for c in companions(item["image"])}  # still beside the moved image: shared files
    return {"folder": ws.rel(folder), "moved": moved, "kept": sorted(ws.rel(p) for p in kept)}


def _rel(ws, path: Path) -> str:
    """The workspace-relative name of a path below the (real) workspace root, as it is (not followed)."""
    return path.relative_to(ws.root).as_posix()


# ------------------------------------------------------------------------------------------------ restore
def _removed_dirs(ws, folder: Path) -> list[Path]:
    """The ``.removed`` folders of ``folder`` and of its kohya ``N_name`` subfolders (those that exist)."""
    dirs = [folder]
    with os.scandir(folder) as it:
        dirs += sorted(Path(e.path) for e, _ in zip(it, range(100_000))
                       if KOHYA_NAME.match(e.name) and e.is_dir() and ws.inside(e.path))
    return [d / REMOVED for d in dirs if (d / REMOVED).is_dir() and ws.inside(d / REMOVED)]


def removed_list(ws, folder: Path) -> list[dict]:
    """What ``remove_images`` moved out of ``folder`` and is still in ``.removed``: ``path`` (the image there),
    ``name`` (its original name in the folder), ``files`` (how many files go back), ``at``."""
    out = []
    for d in _removed_dirs(ws, folder):
        try:
            entries = _manifest(ws, d)
        except UserError:
            continue  # listed as nothing; remove/restore name the damaged file
        for name, record in sorted(entries.items()):
            if (d / name).is_file() and isinstance(record, dict) and isinstance(record.get("original"), str):
                original = ws.root / record["original"]
                shown = original.relative_to(folder).as_posix() if folder in original.parents else record["original"]
                out.append({"path": ws.rel(d / name), "name": shown, "original": record["original"],
                            "files": len(record.get("files") or []), "at": record.get("at")})
    return out


def _restore_moves(ws, folder: Path, d: Path, name: str, record) -> list[tuple[Path, Path]]:
    """(from in .removed, back to) of one record, each path confined to the workspace (the manifest is a file
    anyone can edit); files no longer in .removed are left out."""
    moves = []
    try:
        pairs = [(str(a), str(b)) for a, b in record["files"]]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{ws.rel(d / MANIFEST)}: the record of {name} is damaged") from None
    for original, removed in pairs:
        src, back = ws.resolve(removed), ws.resolve(original)
        if src.parent.name != REMOVED or back.parent != src.parent.parent:
            raise UserError(f"{ws.rel(d / MANIFEST)}: {removed} -> {original} is not a move out of .removed")
        if src.is_file():
            moves.append((src, back))
    if not moves or moves[0][0] != d / name:
        raise UserError(f"'files': {ws.rel(d / name)} is no longer in {ws.rel(d)}")
    return moves


def restore_images(ws, folder: Path, files) -> dict:
    """Move the named removed images (``removed_list``'s ``path``) and their files back under their own names;
    refused, with nothing moved, while any of those names is taken."""
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise UserError("'files' must be a non-empty list of removed images (the Removed list's paths)")
    dirs = {d: _manifest(ws, d) for d in _removed_dirs(ws, folder)}
    plan, taken = [], []
    for f in dict.fromkeys(files):
        path = ws.resolve(f)
        d = path.parent
        if d not in dirs or path.name not in dirs[d]:
            raise UserError(f"'files': {f} is not an image removed from {ws.rel(folder)}")
        moves = _restore_moves(ws, folder, d, path.name, dirs[d][path.name])
        taken += [ws.rel(back) for _, back in moves if os.path.lexists(back)]
        plan.append((d, path.name, moves))
    if taken:
        one = len(taken) == 1
        raise UserError(f"'files': {', '.join(taken[:5])}{' and more' if len(taken) > 5 else ''} "
                        f"{'exists' if one else 'exist'} again; rename or remove {'it' if one else 'them'} first; "
                        "nothing was restored")
    _move_all(ws, [m for _, _, moves in plan for m in moves])
    for d, name, _ in plan:
        del dirs[d][name]
    for d in {d for d, _, _ in plan}:
        _save_manifest(d, dirs[d])
    return {"folder": ws.rel(folder), "restored": [{"path": ws.rel(moves[0][1]),
                                                   "files": [ws.rel(b) for _, b in moves]} for _, _, moves in plan]}
