"""The workspace: the one folder the web app may read and write, and the only paths the browser can name.

Every path that comes from the browser is a workspace-relative string. ``Workspace.resolve`` refuses absolute
paths, ``..`` components, backslashes, NUL bytes and anything whose real path (symlinks followed) lands outside the
workspace's real path, so a request can never reach a file the user did not put in the workspace. It is the one
gate: a *name* the browser sends (``save.name``, a file in a folder) goes through ``name`` (one plain component,
then ``resolve``); every entry a listing returns or reads through ``confine`` (no symlink out: left out and
reported, never a failure of the whole listing); every folder a job will read through ``check_tree``. Uploads are
size-limited, must decode fully as an image (PIL ``verify`` then ``load``; PIL's decompression-bomb warning is an
error) and keep the format's own extension; captions are written atomically beside their image.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import unicodedata
import warnings
from pathlib import Path, PurePosixPath

from PIL import Image

from ..data.folders import IMAGE_EXTENSIONS  # what training reads
from ..data.masks import is_mask_file  # NAME.mask.png: an image's loss mask, never a training image
from ..errors import UserError
from ..outputs import temp_path, write_text

IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # what training reads (data.folders)
_UNSAFE = re.compile(r"[^\w.-]+")  # kept: Unicode letters and digits, '_', '.', '-'; anything else becomes '_'
MAX_STEM_BYTES = 150  # UTF-8 bytes of an uploaded name's stem (file systems allow 255 per name)
REPLACE_BOX = "replace files with the same name"  # the Dataset page's upload checkbox (sends ``overwrite``)


def safe_stem(filename: str) -> str:
    """An uploaded file's name reduced to a safe stem: its basename (no folders), NFC-normalised, with letters and
    digits of any script kept and everything else (spaces, punctuation, control characters) replaced by '_'; no
    leading '.', '_' or '-' (never a hidden file or an option-like name); 'image' when nothing is left."""
    base = PurePosixPath(filename.replace("\\", "/")).name
    stem = _UNSAFE.sub("_", unicodedata.normalize("NFC", Path(base).stem)).strip("._-")
    stem = stem.encode()[:MAX_STEM_BYTES].decode("utf-8", "ignore").rstrip("._-")  # never half a character
    return stem or "image"


class PathRefused(UserError):
    """A browser-supplied path that is not inside the workspace (or not well-formed)."""


class Workspace:
    """Path resolution and file operations confined to ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise UserError(f"workspace {root} is not a folder; create it or pass another --workspace")
        self.state = self.root / ".dev2pro-ui"  # job records and settings; hidden from listings

    # ------------------------------------------------------------------------------------------ paths
    def resolve(self, rel: str, must_exist: bool = False, within: Path | None = None) -> Path:
        """The real path of workspace-relative ``rel``; raises PathRefused for anything outside the workspace
        (or outside ``within``, a folder inside it). The one gate for every browser string that becomes a path."""
        if not isinstance(rel, str) or "\x00" in rel or "\\" in rel:
            raise PathRefused(f"path {rel!r} is not a plain workspace-relative path")
        rel = rel.strip()
        if len(rel) > 1000:
            raise PathRefused(f"path {rel[:40]!r}... is {len(rel)} characters long; the limit is 1000")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or re.match(r"^[A-Za-z]:", rel):
            raise PathRefused(f"path {rel!r} is absolute; give a path relative to the workspace")
        if ".." in pure.parts:
            raise PathRefused(f"path {rel!r} contains '..'; give a path inside the workspace")
        real = self.confine(self.root / pure, rel)
        if within is not None and real != within and within not in real.parents:
            raise PathRefused(f"path {rel!r} leads outside {self.rel(within)}")
        try:
            exists = real.exists()
        except OSError as e:  # a name too long for the file system, ...
            raise PathRefused(f"path {rel!r} cannot be used: {e.strerror}") from None
        if must_exist and not exists:
            raise PathRefused(f"path {rel!r} does not exist in the workspace")
        return real

    def confine(self, path: str | os.PathLike, label: str | None = None) -> Path:
        """The real path (symlinks followed) of ``path`` if it is inside the workspace and not the app's state
        folder; PathRefused otherwise. Listings call it on every entry so no read follows a symlink out."""
        label = label if label is not None else str(path)
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError) as e:
            raise PathRefused(f"path {label!r} cannot be used: {e}") from None
        if real != self.root and self.root not in real.parents:
            raise PathRefused(f"path {label!r} leads outside the workspace (through a symlink); move or copy "
                              f"the files into the workspace")
        if real == self.state or self.state in real.parents:
            raise PathRefused(f"path {label!r} is the web app's own state folder")
        return real

    def inside(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (after symlinks) is a readable workspace location (see ``confine``)."""
        try:
            self.confine(path)
            return True
        except PathRefused:
            return False

    def name(self, folder: Path, name: str, field: str, suffixes: tuple[str, ...] = ("",)) -> Path:
        """``folder/name`` for a browser-supplied file *name* (``save.name``, a config name): one plain path
        component whose files (``name + suffix``) stay inside ``folder``; PathRefused naming ``field`` otherwise."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or name.startswith(".") \
                or any(ord(c) < 32 for c in name) or len(name) > 200:
            raise PathRefused(f"{field} {name!r} must be a plain file name (no '/', no leading '.', no control "
                              f"characters, at most 200 characters), not a path")
        for suffix in suffixes:
            self.resolve(f"{self.rel(folder)}/{name}{suffix}".lstrip("/"), within=folder)
        return folder / name

    def check_tree(self, path: Path, label: str, max_entries: int = 200_000) -> Path:
        """``path`` if nothing in it (a file, or a folder at any depth) is a symlink out of the workspace; a job
        reading it could otherwise read outside. PathRefused naming the first few such entries."""
        path = self.confine(path, label)
        out, todo, seen, n = [], [path], {path}, 0
        while todo and n < max_entries and len(out) < 5:
            d = todo.pop()
            try:
                entries = list(os.scandir(d)) if d.is_dir() else []
            except OSError:
                continue
            for e in entries:
                n += 1
                if e.is_symlink():
                    if not self.inside(e.path):
                        out.append(self.rel(d) + "/" + e.name if d != self.root else e.name)
                        continue
                    real = Path(os.path.realpath(e.path))
                    if real.is_dir() and real not in seen:
                        seen.add(real)
                        todo.append(real)
                elif e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
        if out:
            raise PathRefused(f"{label}: {', '.join(out)} lead(s) outside the workspace (symlinks); the web app's "
                              f"jobs read only workspace files: move or copy them in")
        return path

    def rel(self, path: str | os.PathLike) -> str:
        """The workspace-relative form of a path inside the workspace (for showing and sending back)."""
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            lexical = Path(os.path.abspath(path))
            via = " (through a symlink)" if lexical == self.root or self.root in lexical.parents else ""
            raise PathRefused(f"path {path} leads outside the workspace{via}")
        return real.relative_to(self.root).as_posix()

    def find(self, pattern: str | tuple[str, ...], limit: int = 500, depth: int = 4,
             skipped: list | None = None) -> list[Path]:
        """Files/folders matching a glob, at most ``depth`` levels down, breadth first, skipping hidden folders
        and symlinked folders (never descended). A match that leads out of the workspace is left out (and its
        workspace-relative name appended to ``skipped``), so one such entry never breaks a whole listing."""
        patterns = (pattern,) if isinstance(pattern, str) else pattern
        match = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
        out: list[Path] = []
        level, seen, reals = [(self.root, self.root)], 0, {self.root}  # (path as listed, its real path)
        for _ in range(depth):
            nxt = []
            for d, real_d in level:
                try:
                    entries = sorted(os.scandir(d), key=lambda e: e.name)
                except OSError:
                    continue
                for e in entries:
                    seen += 1
                    if e.name.startswith(".") or seen > 50_000:  # bounded work on any workspace
                        continue
                    p = Path(e.path)
                    link = e.is_symlink()
                    if link and not self.inside(p):  # a folder, or a match, that would lead out: say so
                        if skipped is not None and (match(e.name) or os.path.isdir(p)):
                            skipped.append(p.relative_to(self.root).as_posix())
                        continue
                    real = Path(os.path.realpath(p)) if link else real_d / e.name
                    if real in reals:  # a place listed already (through a symlink that stays inside)
                        continue
                    reals.add(real)
                    if match(e.name):
                        out.append(p)
                        if len(out) >= limit:
                            return out
                    if real.is_dir():
                        nxt.append((p, real))
            level = nxt
        return out

    # ------------------------------------------------------------------------------------------ images
    def images(self, folder: Path, limit: int = 2000, skipped: list | None = None) -> list[Path]:
        """Up to ``limit`` image files in ``folder`` (sorted), as training takes them: loss masks (``NAME.mask.png``)
        left out; an entry that is a symlink out of the workspace is left out (its name appended to ``skipped``)."""
        out = []
        with os.scandir(folder) as it:  # at most 100k entries looked at: bounded work on any folder
            names = sorted(e.name for e, _ in zip(it, range(100_000)))
        for p in (folder / n for n in names):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or is_mask_file(p):
                continue
            if not self.inside(p):
                if skipped is not None:
                    skipped.append(p.name)
            elif p.is_file():
                out.append(p)
                if len(out) >= limit:
                    break
        return out

    def read_text(self, path: Path, max_bytes: int = 64_000) -> str | None:
        """The text of a workspace file (at most ``max_bytes``), or None if it is missing or leads outside."""
        if not self.inside(path) or not path.is_file():
            return None
        with open(path, "rb") as f:
            return f.read(max_bytes).decode("utf-8-sig", errors="replace")

    def save_upload(self, folder: Path, filename: str, data: bytes, max_bytes: int, overwrite: bool = False) -> Path:
        """Check ``data`` is an image within ``max_bytes`` and write it atomically into ``folder``."""
        return self.write_upload(self.plan_upload(folder, [(filename, data)], max_bytes, overwrite))[0]

    def plan_upload(self, folder: Path, files: list[tuple[str, bytes]], max_bytes: int,
                    overwrite: bool = False) -> list[dict]:
        """Where each uploaded ``(filename, data)`` goes, every file checked before anything is written: its size,
        that it decodes as an image, a safe name (``safe_stem`` + the decoded format's extension). Names that
        collide within the batch (after sanitising, ignoring case and extension: ``cat.png`` and ``cat.jpg`` would
        share ``cat.txt``) get ``-1``, ``-2``, ... (never a name an image in ``folder`` has). An image already in
        ``folder`` under a file's own name (same stem, any image extension) is refused unless ``overwrite``;
        with it, that image is replaced. UserError naming every problem; nothing is written here."""
        existing = {p.stem.casefold(): p for p in self.images(folder, limit=100_000)} if folder.is_dir() else {}
        taken, plan, clashes = set(), [], []
        for filename, data in files:
            if len(data) > max_bytes:
                raise UserError(f"upload {filename!r} is {len(data) / 2**20:.1f} MiB; the limit is "
                                f"{max_bytes / 2**20:.0f} MiB (--max-upload-mb); nothing was saved")
            ext = IMAGE_FORMATS[check_image(data, filename)]
            stem = safe_stem(filename)
            name, n = stem, 0
            while name.casefold() in taken or (n and name.casefold() in existing):
                n += 1
                name = f"{stem}-{n}"
            taken.add(name.casefold())
            dest = folder / (name + ext)
            self.confine(dest, f"{self.rel(folder)}/{dest.name}")  # an existing name may be a symlink out
            same = existing.get(name.casefold()) if not n else None
            if dest.exists() and (same is None or dest.is_dir()):  # a folder or a non-image under this name
                raise UserError(f"{self.rel(dest)} exists and is not an image; rename the file; nothing was saved")
            if same is not None and not overwrite:
                clashes.append(f"{self.rel(same)}" + (f" (for {filename!r})" if same.name != filename else ""))
            plan.append({"filename": filename, "dest": dest, "data": data, "replaces": same})
        if clashes:
            raise UserError(f"{', '.join(clashes[:5])}{' and more' if len(clashes) > 5 else ''} already "
                            f"exist{'s' if len(clashes) == 1 else ''}; rename the file(s) or tick '{REPLACE_BOX}'; "
                            f"nothing was saved")
        return plan

    def write_upload(self, plan: list[dict]) -> list[Path]:
        """Write a ``plan_upload`` plan: every file to a temp name first, then all renamed into place (a full
        disk leaves nothing half-written); a replaced image of another extension is then removed."""
        temps: list[Path] = []
        try:
            for item in plan:
                temps.append(temp_path(item["dest"]))
                temps[-1].write_bytes(item["data"])
        except OSError as e:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            raise UserError(f"could not write the upload into {self.rel(plan[0]['dest'].parent)} ({e.strerror}); "
                            f"nothing was saved") from None
        for item, tmp in zip(plan, temps):  # renames within one folder: no new space needed
            os.replace(tmp, item["dest"])
        for item in plan:
            if item["replaces"] is not None and item["replaces"] != item["dest"]:
                item["replaces"].unlink(missing_ok=True)  # cat.jpg replaced by cat.png: one image per caption
        return [item["dest"] for item in plan]

    def write_caption(self, image: Path, text: str) -> Path:
        """Atomically write ``image``'s same-stem .txt caption (what `dev2pro train` and `caption` read)."""
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            raise UserError(f"{self.rel(image)} is not an image in the workspace")
        txt = image.with_suffix(".txt")
        self.confine(txt, self.rel(image.parent) + "/" + txt.name)  # not a symlink out of the workspace
        return write_text(txt, text.strip() + "\n")


def check_image(data: bytes, name: str = "upload") -> str:
    """The PIL format of ``data`` if it fully decodes as a PNG/JPEG/WebP image; UserError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()  # structure and checksums
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # every pixel decodes (catches truncated files verify() passes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"upload {name!r} has more than {Image.MAX_IMAGE_PIXELS // 10**6} million pixels, more than "
                        f"images are decoded here (a decompression-bomb guard); downscale it, e.g. to 4096 px on the "
                        f"long side (training uses ~1 MP)") from None
    except Exception as e:  # PIL raises many types for bad input
        raise UserError(f"upload {name!r} is not a readable image ({type(e).__name__}); upload PNG, JPEG or WebP "
                        f"files") from None
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"upload {name!r} is a {fmt} image; upload PNG, JPEG or WebP (what training reads)")
    return fmt
