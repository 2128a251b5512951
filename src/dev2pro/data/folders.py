"""Training images and their captions: the one set of dataset rules that `train` and `cache` both apply.

A dataset is a list of folders, each with a repeat count and an optional folder-wide caption. Every image
(png / jpg / jpeg / webp / bmp, any case) in a folder is one item; its caption comes from the first of:

1. a ``.txt`` file with the same stem beside it (``cat.png`` -> ``cat.txt``; UTF-8, a BOM dropped, stripped),
2. the folder's ``caption``,
3. the kohya class token (``10_ohwx dog/`` -> ``ohwx dog``, for folders found under a kohya parent),
4. ``default_caption``.

kohya layout: a folder without images of its own whose subfolders are named ``N_name`` is a kohya
``train_data_dir``: each ``N_name`` subfolder is a folder with ``N`` repeats (times the parent's repeats) and the
class token ``name``; other subfolders are listed and not used, as kohya does. Folders are scanned
non-recursively unless ``recursive`` is set, in the order given, files sorted by path, so a run is reproducible.
A trigger word, when given, is prepended (``"trigger, caption"``) unless the caption already contains it.

Skipped and listed in one warning (or, with ``strict``, an error), never silently: files in image formats we do
not train on (``.gif``, ``.tiff``, ...), broken images (zero bytes, not decodable), images smaller than
``min_size`` on a side, and images whose aspect ratio is so far beyond the buckets' range that the crop would
keep less than half of them (a 4096x16 strip). Images a little beyond the range are kept, cropped to the
nearest bucket as kohya does, and listed with the fraction kept. Errors, because training on them silently
would waste the run: a missing folder, an empty dataset, images with no caption (an empty ``.txt`` says so),
caption files that are not UTF-8.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dev2pro.errors import UserError

from .masks import find_mask, is_mask_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# image formats people drop into datasets that we do not train on (animated, layered, raw or HDR): listed
UNSUPPORTED_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".ico", ".psd", ".svg",
                          ".jp2", ".tga", ".exr", ".hdr", ".dng", ".cr2", ".nef", ".arw", ".raw")
MIN_KEPT = 0.5  # below this fraction kept by the bucket crop, an image is skipped instead of cropped
MAX_UPSCALE = 2.0  # an image enlarged more than this to cover its bucket is listed: training sees it soft
REFERENCE_KEPT = 0.9  # a reference whose crop to its image's aspect ratio keeps less is listed (a pair is one shot)
KOHYA_NAME = re.compile(r"^(\d+)_(.+)$")  # a kohya folder: N_name (N repeats, class token name)
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_LIST_LIMIT = 20  # how many paths an error or warning spells out


@dataclass(frozen=True)
class DatasetFolder:
    """A folder of images: each repeated ``repeats`` times per epoch, ``caption`` used where no .txt exists.

    ``recursive`` also takes images from subfolders (same repeats and caption)."""

    path: Path | str
    repeats: int = 1
    caption: str | None = None
    recursive: bool = False
    masks: Path | str | None = None  # a folder of same-stem loss masks (white = learn; ``data/masks.py``)
    role: str = "train"  # "reg": regularization (class) images, weighted by ``data.reg_weight``
    resolutions: tuple[int, ...] = ()  # bucket each image at each of these; () = the dataset's
    controls: Path | str | Sequence[Path | str] | None = None  # folder(s) of same-stem references (edit pairs)


@dataclass(frozen=True)
class Item:
    """One training image. ``size`` is (width, height) in pixels after EXIF rotation; ``mask``: its loss mask
    (None: every pixel counts); ``role``, ``resolutions`` and ``controls`` come from its folder."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int] | None = None
    mask: Path | None = None
    role: str = "train"
    resolutions: tuple[int, ...] = ()
    controls: tuple[Path, ...] = ()  # its reference image(s) (the "before" of an edit pair), fitted to its bucket


@dataclass
class ScanResult:
    """Usable items plus what was left out (``skipped``) or kept but cropped hard (``cropped``), as
    ``"path (reason)"`` lines."""

    items: list[Item]
    skipped: list[str] = field(default_factory=list)
    cropped: list[str] = field(default_factory=list)


def _listing(paths: list, limit: int = _LIST_LIMIT) -> str:
    shown = "\n".join(f"  {p}" for p in paths[:limit])
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return shown + more


def decode_caption(data: bytes, where: str) -> str:
    """Caption bytes -> stripped text; a UTF-8 BOM (some editors write one) is dropped."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UserError(f"caption file {where} is not UTF-8 text; re-save it with UTF-8 encoding") from None


def add_trigger(caption: str, trigger: str | None) -> str:
    """``"trigger, caption"`` unless the caption already contains the trigger as a whole word."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def crop_kept(size: tuple[int, int], buckets) -> tuple[float, tuple[int, int]]:
    """(fraction of the image the bucket crop keeps, that bucket) for an image of ``size`` = (width, height)."""
    from .buckets import assign_bucket  # lazy: buckets loads torch; caption's and the ui's --help import this module

    w, h = size
    bw, bh = assign_bucket(w, h, list(buckets))
    return min((w / h) / (bw / bh), (bw / bh) / (w / h)), (bw, bh)


class Scanner:
    """Applies the rules of the module docstring one file at a time and remembers every skip; ``finish()``
    raises the errors and logs the listings. Used for folders here and for tar members in ``shards``."""

    def __init__(self, min_size: int = 16, buckets=None, default_caption: str | None = None,
                 trigger: str | None = None, strict: bool = False):
        self.min_size, self.buckets, self.strict = min_size, list(buckets) if buckets else None, strict
        self.default_caption, self.trigger = default_caption, trigger
        self.skipped: list[str] = []
        self.cropped: list[str] = []
        self.ignored: list[str] = []  # subfolders of a kohya parent that are not N_name
        self.uncaptioned: list[str] = []
        self.empty_captions: list[str] = []
        self.unmasked: list[str] = []  # images of a folder with a masks folder that have no mask there
        self.uncontrolled: list[str] = []  # images of a folder with a controls folder without a usable reference
        self.controls_seen: dict[Path, str] = {}  # reference -> the image it was found for
        self.reference_crops: list[str] = []  # references of another aspect ratio than their image's
        self.upscaled: list[str] = []  # images enlarged more than MAX_UPSCALE to cover their bucket

    # ---------------------------------------------------------------- one image
    def image_size(self, src: Path | bytes, label: str) -> tuple[int, int] | None:
        """(width, height) after EXIF rotation of a usable image; None (and listed) for one to skip."""
        size, reason = decoded_size(src)
        if size and min(size) < self.min_size:
            reason = f"{size[0]}x{size[1]} px, smaller than {self.min_size} px on a side"
        elif size and self.buckets:
            kept, (bw, bh) = crop_kept(size, self.buckets)
            ratio = f"{max(size) / min(size):.1f}:1"
            if kept < MIN_KEPT:
                reason = (f"{size[0]}x{size[1]} px: aspect ratio {ratio} is beyond the buckets' range; the crop to "
                          f"{bw}x{bh} would keep {kept:.0%} of it")
            elif kept < 0.999 and not _within_range(size, self.buckets):
                self.cropped.append(f"{label} ({size[0]}x{size[1]} px, {ratio}: cropped to {bw}x{bh}, "
                                    f"{kept:.0%} kept)")
            if not reason and (scale := max(bw / size[0], bh / size[1])) > MAX_UPSCALE:
                self.upscaled.append(f"{label} ({size[0]}x{size[1]} px: enlarged {scale:.1f}x to {bw}x{bh})")
        if reason:
            self.skipped.append(f"{label} ({reason})")
            return None
        return size

    def unsupported(self, label: str, ext: str) -> None:
        self.skipped.append(f"{label} (unsupported format {ext.lower()}; convert it to PNG, JPEG or WebP)")

    def caption(self, txt: str | None, label: str, txt_label: str, fallbacks=()) -> str | None:
        """The caption of an image from its .txt text (None: no file), else the first fallback set."""
        for c in ([txt] if txt else []) + [f for f in fallbacks if f] + [self.default_caption]:
            if c:
                return add_trigger(c, self.trigger)
        (self.empty_captions if txt is not None else self.uncaptioned).append(txt_label if txt is not None
                                                                              else label)
        return None

    def references(self, folder: "DatasetFolder", key: str, stem: str, label: str, size) -> tuple[Path, ...]:
        """The reference(s) of one image of ``folder``, one per controls folder in order; () without controls or
        when one is unusable (one line per image, each folder's problem, listed for ``finish``, which refuses)."""
        found = [self.control(d, key, stem, label, size) for d in control_dirs(folder)]
        if problems := [why for _, why in found if why]:
            self.uncontrolled.append(f"{label} ({'; '.join(problems)})")
        paths = tuple(path for path, _ in found)
        return paths if all(paths) else ()

    def control(self, controls: Path, key: str, stem: str, label: str, size) -> tuple[Path | None, str | None]:
        """(reference, None) of one image in the folder ``controls`` (``locate_reference``: ``controls/KEY.*``,
        e.g. ``10_cat/001`` in a kohya parent, else ``controls/STEM.*``), or (None, why it cannot be used):
        missing or unreadable; (reference, why) for one shared by images of different kohya subfolders."""
        control, problem = locate_reference(key, stem, controls)
        if problem is not None:
            return None, (f"its reference {control} is in a format we do not train on: convert it to "
                          f"{', '.join(IMAGE_EXTENSIONS)}" if problem == "unsupported" else
                          f"no {controls / key}.png/.jpg/... in a supported format: {', '.join(IMAGE_EXTENSIONS)}")
        ref_size, why = decoded_size(control)
        if why is not None:
            return None, f"its reference {control} is {why}"
        if (kept := aspect_kept(ref_size, size)) < REFERENCE_KEPT:
            self.reference_crops.append(f"{control} ({reference_crop_note(ref_size, size, kept)})")
        if self.controls_seen.setdefault(control, label) != label:
            return control, (f"its reference {control} is also {self.controls_seen[control]}'s: in a kohya parent, "
                          "put references in controls/N_name/ as the images are")
        return control, None

    # ---------------------------------------------------------------- folders
    def folders(self, folders: list[DatasetFolder]) -> list[tuple[Item, str]]:
        """(item, key) of every usable image; key is the path below its folder without the suffix."""
        out = []
        for folder in folders:
            controls = set(distinct_control_dirs(folder))
            for root, repeats, token, recursive in self._expand(folder):
                for path in _folder_files(root, recursive):
                    if controls & set(path.resolve().parents):
                        continue  # a controls folder inside a recursive dataset folder: references, not targets
                    label = str(path)
                    ext = path.suffix.lower()
                    if ext in UNSUPPORTED_EXTENSIONS:
                        self.unsupported(label, ext)
                        continue
                    size = self.image_size(path, label)
                    if size is None:
                        continue
                    txt = path.with_suffix(".txt")
                    text = decode_caption(txt.read_bytes(), str(txt)) if txt.is_file() else None
                    caption = self.caption(text, label, str(txt), (folder.caption, token))
                    if caption is not None:
                        key = path.relative_to(Path(folder.path).expanduser()).with_suffix("").as_posix()
                        mask = find_mask(path, path.relative_to(root).with_suffix("").as_posix(), folder.masks)
                        if mask is None and folder.masks:
                            self.unmasked.append(label)
                        refs = self.references(folder, key, path.relative_to(root).with_suffix("").as_posix(),
                                               label, size)
                        out.append((Item(path, caption, repeats, size, mask, folder.role,
                                         tuple(folder.resolutions), refs), key))
        return out

    def _expand(self, folder: DatasetFolder) -> list[tuple[Path, int, str | None, bool]]:
        """(folder, repeats, class token, recursive) to scan for one configured folder (kohya parents expand)."""
        root = Path(folder.path).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise UserError(f"dataset folder {root} {what}; fix the path in the dataset's folder list")
        if folder.repeats < 1:
            raise UserError(f"dataset folder {root}: repeats must be >= 1, got {folder.repeats}")
        if _folder_files(root, False, supported_only=True):
            return [(root, folder.repeats, None, folder.recursive)]
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        kohya = [(d, KOHYA_NAME.match(d.name)) for d in subdirs]
        if any(m for _, m in kohya):
            parts = []
            controls = {c.resolve() for c in control_dirs(folder)}
            for d, m in kohya:
                if not m:
                    if d.resolve() in controls:
                        continue  # the references of this parent's images, not a folder it forgets
                    if _folder_files(d, folder.recursive, supported_only=True):
                        self.ignored.append(f"{d} (not named N_name, e.g. 10_{d.name})")
                elif not _folder_files(d, folder.recursive, supported_only=True):
                    self.ignored.append(f"{d} (no images)")
                else:
                    parts.append((d, int(m.group(1)) * folder.repeats, m.group(2).strip(), folder.recursive))
            if parts:
                return parts
        if folder.recursive and _folder_files(root, True, supported_only=True):
            return [(root, folder.repeats, None, True)]
        nested = [d.name for d in subdirs if _folder_files(d, True, supported_only=True)]
        hint = (f" (subfolders {', '.join(nested[:5])} have images: list them as folders, name them N_name for "
                "the kohya layout, or set recursive = true)" if nested else "")
        raise UserError(f"dataset folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}){hint}; add images "
                        "or remove the folder from the dataset")

    # ---------------------------------------------------------------- the end
    def finish(self, items: list) -> None:
        """Raise for captionless images and an empty dataset; list (or, strict, refuse) the skips."""
        if self.ignored:
            log.warning("%d subfolder(s) of a kohya-layout parent are not used (kohya reads only N_name "
                        "folders, N = repeats):\n%s", len(self.ignored), _listing(self.ignored))
        if self.skipped:
            message = f"{len(self.skipped)} image(s) cannot be used:\n{_listing(self.skipped)}"
            if self.strict:
                raise UserError(f"{message}\nfix or delete them, or turn strict checking off to skip them")
            log.warning("%s\nskipping them", message)
        if self.unmasked:
            log.warning("%d image(s) have no mask in their folder's masks folder and are trained on whole (a "
                        "mask of 1):\n%s", len(self.unmasked), _listing(self.unmasked))
        if self.reference_crops:
            log.warning("%d reference image(s) have another aspect ratio than their image and are cropped to its "
                        "bucket (a pair is usually the same shot at the same size):\n%s", len(self.reference_crops),
                        _listing(self.reference_crops))
        if self.cropped:
            log.warning("%d image(s) are wider or taller than every bucket and are cropped to the nearest one:\n%s",
                        len(self.cropped), _listing(self.cropped))
        if self.upscaled:
            log.warning("%d image(s) are much smaller than their bucket and are enlarged more than %gx (training sees "
                        "them soft; use larger images or a lower data.resolution):\n%s", len(self.upscaled),
                        MAX_UPSCALE, _listing(self.upscaled))
        if self.uncontrolled:
            raise UserError(
                f"{len(self.uncontrolled)} image(s) have no usable reference image in their folder's controls "
                f"folder:\n{_listing(self.uncontrolled, 5)}\nan edit pair needs both: add or fix the reference (same "
                "name, a supported image format) or move the image out of the folder")
        if self.empty_captions:
            raise UserError(
                f"{len(self.empty_captions)} empty caption file(s):\n{_listing(self.empty_captions, 5)}\n"
                "write the caption into it, or delete it to use the folder caption or default caption instead")
        if self.uncaptioned:
            raise UserError(
                f"{len(self.uncaptioned)} image(s) have no caption:\n{_listing(self.uncaptioned, 5)}\n"
                "add a .txt file with the same name beside each image, give the folder a caption, or set a "
                "default caption (data.default_caption, or --default-caption for `dev2pro cache`)")
        if not items:
            raise UserError("the dataset is empty: no usable images; add images or fix the folder list")


def control_dirs(folder: DatasetFolder) -> tuple[Path, ...]:
    """The controls folder(s) of ``folder``, one per reference image, in order; () without."""
    c = folder.controls
    return tuple(Path(x).expanduser() for x in ([c] if isinstance(c, (str, Path)) else list(c or ())) if x)


def distinct_control_dirs(folder: DatasetFolder) -> list[Path]:
    """The resolved controls folders of ``folder``; UserError for one listed twice (two spellings of one folder:
    every image would get the same reference twice) or one that is the dataset folder or holds it (its images
    would all be taken for references)."""
    root, seen = Path(folder.path).expanduser().resolve(), {}
    for d in control_dirs(folder):
        r = d.resolve()
        if r in seen:
            raise UserError(f"controls of {folder.path}: {seen[r]} and {d} are the same folder; list each reference "
                            "folder once (one reference per image from each)")
        if r == root or r in root.parents:
            raise UserError(f"controls of {folder.path}: {d} is the dataset folder itself or holds it; put the "
                            "reference images in a folder of their own")
        seen[r] = d
    return list(seen)


def find_control(key: str, controls_dir: Path | str | None) -> Path | None:
    """The reference image of the image ``key`` (its path below its folder without suffix) in ``controls_dir``:
    ``KEY.<any image suffix>`` (musubi's and ai-toolkit's same-name rule); None without a folder or a match."""
    if not controls_dir:
        return None
    control, problem = locate_reference(key, key, controls_dir)
    return control if problem is None else None


def locate_reference(key: str, stem: str, controls_dir: Path | str,
                     readable: Callable[[Path], bool] | None = None) -> tuple[Path | None, str | None]:
    """Where the reference of one image is and whether training can use the file: ``(path, None)`` for
    ``KEY.<supported suffix>`` (``key``: the image's path below the configured folder without suffix, e.g.
    ``10_cat/001`` in a kohya parent), else ``STEM.*`` (``stem``: below its own folder); ``(path, "unsupported")``
    for one in a format we list but do not train on (``.gif``, ...); ``(None, "missing")``. ``readable`` (the web
    app's workspace rule) False for an entry there: ``(path, "outside")``, and the entry is never opened."""
    base = Path(controls_dir).expanduser()
    if not base.is_dir():
        raise UserError(f"controls folder {base} does not exist or is not a folder; fix the folder's controls path")
    keys = (key,) if stem == key else (key, stem)
    if readable is not None:  # a subfolder (10_cat/) that is a symlink out: nothing below it is looked at
        for k in keys:
            if (sub := (base / k).parent) != base and os.path.lexists(sub) and not readable(sub):
                return sub, "outside"
    for exts, problem in ((IMAGE_EXTENSIONS, None), (UNSUPPORTED_EXTENSIONS, "unsupported")):
        for candidate in (base / f"{k}{e}" for k in keys for ext in exts for e in (ext, ext.upper())):
            if readable is not None and os.path.lexists(candidate) and not readable(candidate):
                return candidate, "outside"
            if candidate.is_file():
                return candidate, problem
    return None, "missing"


def decoded_size(src: Path | bytes) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) after EXIF rotation, None) of a readable image, else (None, why): every byte is read, as a
    cut JPEG only shows in a decode."""
    if (len(src) if isinstance(src, bytes) else Path(src).stat().st_size) == 0:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.verify()  # checks structure (PNG chunk CRCs etc.) without decoding pixels; must come first
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:  # verify() spends it
            w, h = im.size
            rotated = im.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS
            if im.format != "PNG":  # verify() checks PNG chunk CRCs; a cut JPEG only shows in a decode
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG: 1/8 scale, every byte read
                im.load()
        return ((h, w) if rotated else (w, h)), None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None, f"unreadable: {type(e).__name__}: {e}"


def aspect_kept(src: tuple[int, int], dst: tuple[int, int]) -> float:
    """The fraction of ``src`` a cover + centre crop to ``dst``'s aspect ratio keeps."""
    a, b = src[0] / src[1], dst[0] / dst[1]
    return min(a / b, b / a)


def reference_crop_note(ref_size: tuple[int, int], size: tuple[int, int], kept: float) -> str:
    """How a reference of another aspect ratio than its image is cropped, for the warning and the web app."""
    return f"{ref_size[0]}x{ref_size[1]} px for a {size[0]}x{size[1]} image: {kept:.0%} of it kept"


def _within_range(size: tuple[int, int], buckets) -> bool:
    ratios = [math.log(w / h) for w, h in buckets]
    return min(ratios) - 1e-9 <= math.log(size[0] / size[1]) <= max(ratios) + 1e-9


def _folder_files(folder: Path, recursive: bool, supported_only: bool = False) -> list[Path]:
    """Images (and, unless ``supported_only``, files in unsupported image formats) of a folder, sorted by path;
    hidden files (macOS ``._x.png`` and the like) left out."""
    exts = IMAGE_EXTENSIONS if supported_only else IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in exts and p.is_file() and not is_mask_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan(folders: list[DatasetFolder], default_caption: str | None = None, trigger: str | None = None,
         min_size: int = 16, strict: bool = False, buckets=None) -> ScanResult:
    """All usable images of ``folders`` with captions and repeats, in a deterministic order, plus the skips.

    ``buckets`` ((width, height) list, optional) turns on the aspect-ratio rule."""
    scanner = Scanner(min_size, buckets, default_caption, trigger, strict)
    items = [it for it, _ in scanner.folders(folders)]
    scanner.finish(items)
    return ScanResult(items, scanner.skipped, scanner.cropped)


def scan_dataset(folders: list[DatasetFolder], default_caption: str | None = None, trigger: str | None = None,
                 min_size: int = 16, strict: bool = False, buckets=None) -> list[Item]:
    """The usable items of ``scan()`` (skips are logged there)."""
    return scan(folders, default_caption, trigger, min_size, strict, buckets).items
