"""Training images and their captions, read from kohya-style folders.

A dataset is a list of folders, each with a repeat count and an optional folder-wide caption. Every image
(png / jpg / jpeg / webp, any case) in a folder is one item; its caption comes from the first of:

1. a ``.txt`` file with the same stem beside it (``cat.png`` -> ``cat.txt``, UTF-8, stripped; empty counts as none),
2. the folder's ``caption``,
3. ``default_caption``.

A trigger word, when given, is prepended (``"trigger, caption"``) unless the caption already contains it.
Folders are scanned non-recursively, in the order given, files sorted by name, so a run is reproducible.

Broken images (zero bytes, not decodable, too small) are the common real-world mess: they are skipped with one
warning listing them all (or, with ``strict``, rejected). A missing folder, an empty dataset or images nobody
captioned are errors, because training on them silently would waste the whole run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dev2pro.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_LIST_LIMIT = 20  # how many paths an error or warning spells out


@dataclass(frozen=True)
class DatasetFolder:
    """A folder of images: each repeated ``repeats`` times per epoch, ``caption`` used where no .txt exists."""

    path: Path | str
    repeats: int = 1
    caption: str | None = None


@dataclass(frozen=True)
class Item:
    """One training image. ``size`` is (width, height) in pixels after EXIF rotation."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int] | None = None


def _listing(paths: list, limit: int = _LIST_LIMIT) -> str:
    shown = "\n".join(f"  {p}" for p in paths[:limit])
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return shown + more


def _image_size(path: Path, min_size: int) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for a usable image, (None, reason) for one to skip."""
    if path.stat().st_size == 0:
        return None, "empty file"
    try:
        with Image.open(path) as im:
            im.verify()  # checks structure (PNG chunk CRCs etc.) without decoding pixels; must come first
        with Image.open(path) as im:  # verify() leaves the image unusable, so reopen (reads the header only)
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                w, h = h, w
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None, f"unreadable: {type(e).__name__}: {e}"
    if min(w, h) < min_size:
        return None, f"{w}x{h} px, smaller than {min_size} px on a side"
    return (w, h), None


def _read_caption(txt: Path) -> str | None:
    if not txt.is_file():
        return None
    try:
        text = txt.read_text(encoding="utf-8-sig").strip()  # -sig drops a BOM some editors write
    except UnicodeDecodeError:
        raise UserError(f"caption file {txt} is not UTF-8 text; re-save it with UTF-8 encoding") from None
    return text or None


def add_trigger(caption: str, trigger: str | None) -> str:
    """``"trigger, caption"`` unless the caption already contains the trigger as a whole word."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_dataset(
    folders: list[DatasetFolder],
    default_caption: str | None = None,
    trigger: str | None = None,
    min_size: int = 16,
    strict: bool = False,
) -> list[Item]:
    """All usable images of ``folders`` with their captions and repeats, in a deterministic order."""
    items: list[Item] = []
    bad: list[str] = []
    uncaptioned: list[Path] = []
    for folder in folders:
        root = Path(folder.path).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise UserError(f"dataset folder {root} {what}; fix the path in the dataset's folder list")
        if folder.repeats < 1:
            raise UserError(f"dataset folder {root}: repeats must be >= 1, got {folder.repeats}")
        images = _folder_images(root)
        if not images:
            nested = [d.name for d in sorted(root.iterdir()) if d.is_dir() and _folder_images(d)]
            hint = f" (subfolders {', '.join(nested[:5])} have images: list them as folders)" if nested else ""
            raise UserError(
                f"dataset folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}){hint}; "
                "add images or remove the folder from the dataset"
            )
        for path in images:
            size, reason = _image_size(path, min_size)
            if reason:
                bad.append(f"{path} ({reason})")
                continue
            caption = _read_caption(path.with_suffix(".txt"))
            caption = caption if caption is not None else folder.caption
            caption = caption if caption is not None else default_caption
            if caption is None:
                uncaptioned.append(path)
                continue
            items.append(Item(path, add_trigger(caption, trigger), folder.repeats, size))

    if bad:
        message = f"{len(bad)} image(s) cannot be used:\n{_listing(bad)}"
        if strict:
            raise UserError(f"{message}\nfix or delete them, or turn strict checking off to skip them")
        log.warning("%s\nskipping them", message)
    if uncaptioned:
        raise UserError(
            f"{len(uncaptioned)} image(s) have no caption:\n{_listing(uncaptioned, 5)}\n"
            "add a .txt file with the same name beside each image, give the folder a caption, or set default_caption"
        )
    if not items:
        names = ", ".join(str(Path(f.path)) for f in folders) or "(no folders given)"
        raise UserError(f"the dataset is empty: no usable images in {names}; add images or fix the folder list")
    return items
