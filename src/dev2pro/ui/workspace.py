"""The workspace: the one folder the web app may read and write, and the only paths the browser can name.

Every path that comes from the browser is a workspace-relative string. ``Workspace.resolve`` refuses absolute
paths, ``..`` components, backslashes, NUL bytes and anything whose real path (symlinks followed) lands outside the
workspace's real path, so a request can never reach a file the user did not put in the workspace. Uploads are
size-limited, must decode fully as an image (PIL ``verify`` then ``load``; PIL's decompression-bomb warning is an
error) and keep the format's own extension; captions are written atomically beside their image.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path, PurePosixPath

from PIL import Image

from ..data.folders import IMAGE_EXTENSIONS  # what training reads
from ..errors import UserError
from ..outputs import atomic_path, write_text

IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # what training reads (data.folders)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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
    def resolve(self, rel: str, must_exist: bool = False) -> Path:
        """The real path of workspace-relative ``rel``; raises PathRefused for anything outside the workspace."""
        if not isinstance(rel, str) or "\x00" in rel or "\\" in rel:
            raise PathRefused(f"path {rel!r} is not a plain workspace-relative path")
        rel = rel.strip()
        pure = PurePosixPath(rel)
        if pure.is_absolute() or re.match(r"^[A-Za-z]:", rel):
            raise PathRefused(f"path {rel!r} is absolute; give a path relative to the workspace")
        if ".." in pure.parts:
            raise PathRefused(f"path {rel!r} contains '..'; give a path inside the workspace")
        real = Path(os.path.realpath(self.root / pure))
        if real != self.root and self.root not in real.parents:
            raise PathRefused(f"path {rel!r} leads outside the workspace (through a symlink)")
        if real == self.state or self.state in real.parents:
            raise PathRefused(f"path {rel!r} is the web app's own state folder")
        if must_exist and not real.exists():
            raise PathRefused(f"path {rel!r} does not exist in the workspace")
        return real

    def rel(self, path: str | os.PathLike) -> str:
        """The workspace-relative form of a path inside the workspace (for showing and sending back)."""
        return Path(os.path.realpath(path)).relative_to(self.root).as_posix()

    def find(self, pattern: str, limit: int = 500, depth: int = 4) -> list[Path]:
        """Files/folders matching a glob, at most ``depth`` levels down, skipping hidden folders."""
        out: list[Path] = []
        for d in range(1, depth + 1):
            for p in sorted(self.root.glob("/".join(["*"] * (d - 1) + [pattern]))):
                if any(part.startswith(".") for part in p.relative_to(self.root).parts):
                    continue
                out.append(p)
                if len(out) >= limit:
                    return out
        return out

    # ------------------------------------------------------------------------------------------ images
    def images(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def save_upload(self, folder: Path, filename: str, data: bytes, max_bytes: int, overwrite: bool = False) -> Path:
        """Check ``data`` is an image within ``max_bytes`` and write it atomically into ``folder``."""
        if len(data) > max_bytes:
            raise UserError(f"upload {filename!r} is {len(data) / 2**20:.1f} MiB; the limit is "
                            f"{max_bytes / 2**20:.0f} MiB (--max-upload-mb)")
        fmt = check_image(data, filename)
        stem = _SAFE_NAME.sub("_", Path(PurePosixPath(filename.replace("\\", "/")).name).stem).strip("._") or "image"
        dest = folder / (stem[:100] + IMAGE_FORMATS[fmt])
        if dest.exists() and not overwrite:
            raise UserError(f"{self.rel(dest)} already exists; rename the file or tick 'overwrite'")
        with atomic_path(dest, overwrite=overwrite, what="image") as tmp:
            tmp.write_bytes(data)
        return dest

    def write_caption(self, image: Path, text: str) -> Path:
        """Atomically write ``image``'s same-stem .txt caption (what `dev2pro train` and `caption` read)."""
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            raise UserError(f"{self.rel(image)} is not an image in the workspace")
        return write_text(image.with_suffix(".txt"), text.strip() + "\n")


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
    except Exception as e:  # PIL raises many types for bad input
        raise UserError(f"upload {name!r} is not a readable image ({type(e).__name__}); upload PNG, JPEG or WebP "
                        f"files") from None
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"upload {name!r} is a {fmt} image; upload PNG, JPEG or WebP (what training reads)")
    return fmt
