"""The Dataset page's caption tools: one edit (prepend, append, replace, remove) over a folder's captions, previewed
(``dry_run``) or written, and the undo of the last one per folder.

Captions are the same-stem ``.txt`` files training reads (``data.folders``); two images sharing one caption file
(``cat.png``, ``cat.jpg``) are edited once. A caption that is a symlink out of the workspace or not UTF-8 is left
alone and reported. Written captions go through ``Workspace.write_caption`` (atomic); before the first one is
written, the previous text of every caption the edit changes (or None: it had no file) is saved atomically to
``STATE/caption-undo/<folder hash>.json``, so ``undo`` puts back exactly the bytes that were there.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from ..errors import UserError
from ..outputs import write_json, write_text
from .pairs import listed_images

OPS = ("prepend", "append", "replace", "remove")
SEP = ", "  # how `dev2pro caption --trigger` and training's trigger join a word to a caption (folders.add_trigger)
MAX_CAPTIONS = 20_000  # caption files one edit looks at
MAX_LISTED = 2000  # per-file results sent back (all are counted)
MAX_CAPTION_BYTES = 1_000_000


# ------------------------------------------------------------------------------------------------ the edit
def _bounded(phrase: str, *, start: bool = True, end: bool = True) -> str:
    """A regex for ``phrase`` as plain text, not inside a longer word: a side that is a letter/digit must not
    touch another one (``sks`` is not found in ``sksdog``; ``, sks`` needs no boundary before its comma)."""
    pattern = re.escape(phrase)
    if start and re.match(r"\w", phrase):
        pattern = r"(?<!\w)" + pattern
    if end and re.search(r"\w$", phrase):
        pattern += r"(?!\w)"
    return pattern


def tidy(caption: str) -> str:
    """A caption after a phrase was cut out: one space between words, no space before punctuation, no empty
    list items (``a, , b``), no separator left at either end."""
    caption = re.sub(r"\s+", " ", caption)
    caption = re.sub(r" ([,.;:!?])", r"\1", caption)
    caption = re.sub(r"([,;])(?:\s*[,;])+", r"\1", caption)
    return re.sub(r"^[\s,;:.]+|[\s,;:]+$", "", caption)


def edit_caption(caption: str, op: str, text: str, find: str = "", whole_word: bool = True) -> str:
    """``caption`` (stripped) after one edit; unchanged when there is nothing to do. prepend/append: ``text, caption``
    / ``caption, text`` unless it already starts/ends with ``text`` (a whole word); replace: every ``find`` -> ``text``
    (plain text, case-sensitive); remove: every ``text`` cut out and the separators tidied."""
    if op == "prepend":
        if re.match(_bounded(text, start=False), caption):
            return caption
        return f"{text}{SEP}{caption}" if caption else text
    if op == "append":
        if re.search(_bounded(text, end=False) + r"$", caption):
            return caption
        return f"{caption}{SEP}{text}" if caption else text
    if op == "replace":
        pattern = _bounded(find) if whole_word else re.escape(find)
        return re.sub(pattern, lambda m: text, caption).strip()
    if op == "remove":
        pattern = _bounded(text) if whole_word else re.escape(text)
        cut = re.sub(pattern, "", caption)
        return caption if cut == caption else tidy(cut)
    raise UserError(f"'op' {op!r} is not one of {', '.join(OPS)}")


def check_edit(op, text: str, find: str) -> tuple[str, str]:
    """(text, find) checked for ``op``; UserError naming the field and what to send otherwise."""
    if op not in OPS:
        raise UserError(f"'op' {op!r} is not one of {', '.join(OPS)}")
    if op == "replace":
        if not find:
            raise UserError("'find' is empty: type the word or phrase to replace")
        if not text:
            raise UserError("'text' is empty: type what replaces 'find' (to delete it, use op 'remove')")
        return text, find
    if find:
        raise UserError(f"'find' is only for op 'replace'; op {op!r} uses 'text'")
    if not text.strip():
        raise UserError(f"'text' is empty: type the word or phrase to {op}")
    return text.strip(), find


# ------------------------------------------------------------------------------------------------ captions
def _read(ws, txt: Path) -> tuple[str | None, str | None]:
    """(raw text or None when there is no file, why it cannot be edited or None)."""
    if not ws.inside(txt):
        return None, "a symlink out of the workspace (not read)"
    if not txt.exists():
        return None, None
    if not txt.is_file():
        return None, "not a file"
    with open(txt, "rb") as f:
        data = f.read(MAX_CAPTION_BYTES + 1)
    if len(data) > MAX_CAPTION_BYTES:
        return None, f"over {MAX_CAPTION_BYTES // 1000} kB"
    try:
        return data.decode("utf-8"), None  # a BOM stays in the raw text: undo writes back the same bytes
    except UnicodeDecodeError:
        return None, "not UTF-8 text (training refuses it too); re-save it as UTF-8"


def _text(raw: str) -> str:
    """The caption training reads from a file's text (``data.folders.decode_caption``: BOM dropped, stripped)."""
    return raw.removeprefix("\ufeff").strip()


def _captions(ws, folder: Path, files) -> dict[Path, list[Path]]:
    """Caption file -> its images (several when images share one), for the folder's images or the ``files`` named
    (workspace paths of images in the folder, as the Dataset page lists them)."""
    images = listed_images(ws, folder, MAX_CAPTIONS + 1, [])
    if len(images) > MAX_CAPTIONS:
        raise UserError(f"{ws.rel(folder)} has over {MAX_CAPTIONS} images; select the files to edit ('files')")
    chosen = [img for img, _, _ in images]
    if files:
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files) or len(files) > MAX_CAPTIONS:
            raise UserError(f"'files' must be a list of at most {MAX_CAPTIONS} image paths")
        known = set(chosen)
        chosen = []
        for f in dict.fromkeys(files):
            image = ws.resolve(f)
            if image not in known:
                raise UserError(f"'files': {f} is not an image in {ws.rel(folder)}; send the paths the folder "
                                "listing gives")
            chosen.append(image)
    out: dict[Path, list[Path]] = {}
    for img in chosen:
        out.setdefault(img.with_suffix(".txt"), []).append(img)
    return out


def bulk_edit(ws, folder: Path, op: str, text: str, find: str = "", whole_word: bool = True, files=None,
              dry_run: bool = True) -> dict:
    """One edit over the folder's captions (or ``files``' captions). Reply: ``counts`` (changed, created, unchanged,
    skipped, captions), ``files`` (each changed/created/skipped caption: its images, ``before``/``after``),
    ``emptied`` (captions the edit leaves empty: training refuses those images until they get one). An image
    without a caption file gets one only from prepend/append. Not ``dry_run``: the undo is saved, then each
    changed caption is written atomically."""
    text, find = check_edit(op, text, find)
    counts = {"changed": 0, "created": 0, "unchanged": 0, "skipped": 0}
    results, undo = [], []
    for txt, images in _captions(ws, folder, files).items():
        raw, why = _read(ws, txt)
        entry = {"caption": ws.rel(txt) if why is None else txt.relative_to(ws.root).as_posix(),
                 "images": [ws.rel(i) for i in images], "before": None if raw is None else _text(raw)}
        if why is not None:
            counts["skipped"] += 1
            results.append({**entry, "status": "skipped", "reason": why})
            continue
        if raw is None and op in ("replace", "remove"):
            counts["unchanged"] += 1  # no caption to edit; only prepend/append create one
            continue
        after = edit_caption(entry["before"] or "", op, text, find, whole_word)
        if raw is not None and after == entry["before"]:
            counts["unchanged"] += 1
            continue
        status = "created" if raw is None else "changed"
        counts[status] += 1
        results.append({**entry, "after": after, "status": status})
        undo.append({"image": entry["images"][0], "caption": entry["caption"], "before": raw, "after": after})
    if not dry_run and undo:
        _save_undo(ws, folder, {"folder": ws.rel(folder), "op": op, "text": text, "find": find, "at": time.time(),
                                "files": undo})
        for item in undo:
            ws.write_caption(ws.resolve(item["image"]), item["after"])
    counts["captions"] = sum(counts.values())
    emptied = [r["caption"] for r in results if r.get("after") == ""]  # training refuses an empty caption file
    return {"folder": ws.rel(folder), "op": op, "dry_run": dry_run, "counts": counts, "emptied": emptied,
            "files": results[:MAX_LISTED], "truncated": len(results) > MAX_LISTED, "undo": bool(undo) and not dry_run}


# ------------------------------------------------------------------------------------------------ undo
def undo_path(ws, folder: Path) -> Path:
    """Where the last bulk edit of ``folder`` keeps the captions it replaced (the web app's state folder)."""
    digest = hashlib.sha256(ws.rel(folder).encode()).hexdigest()[:16]
    return ws.state / "caption-undo" / f"{digest}.json"


def _save_undo(ws, folder: Path, record: dict) -> None:
    path = undo_path(ws, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def undo(ws, folder: Path) -> dict:
    """Put back the captions the folder's last bulk edit replaced (a caption it created is deleted). A caption
    changed since that edit is left as it is and named (``changed_since``). The undo is then used up."""
    path = undo_path(ws, folder)
    try:
        record = json.loads(path.read_text())
        items = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"no bulk caption edit of {ws.rel(folder)} to undo") from None
    restored, deleted, changed = 0, 0, []
    for item in items:
        image = ws.resolve(item["image"], within=folder)
        txt = image.with_suffix(".txt")
        raw, why = _read(ws, txt)
        if why is not None or _text(raw or "") != item["after"] or not image.is_file():
            changed.append(item["caption"])  # edited by hand (or removed) since: the newer text wins
            continue
        if item["before"] is None:
            txt.unlink()
            deleted += 1
        else:
            write_text(txt, item["before"])  # the exact previous bytes (BOM, no final newline, ...)
            restored += 1
    path.unlink()
    return {"folder": ws.rel(folder), "op": record.get("op"), "restored": restored + deleted, "deleted": deleted,
            "changed_since": changed}
