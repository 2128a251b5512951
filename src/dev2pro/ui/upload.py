"""Multipart uploads refused while they stream in: each file part and the whole body are counted as bytes arrive,
so an upload over the limit (chunked, or with a lying Content-Length) is refused at the first byte past it, not
after it has been received whole."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from ..errors import UserError
from .handlers import TooLarge


class _LimitedParser(MultiPartParser):
    """Starlette's parser with a per-file byte limit checked on every chunk of part data."""

    def __init__(self, *args, file_limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.file_limit = file_limit
        self.file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self.file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.file_limit:
                raise TooLarge(f"upload {self._current_part.file.filename!r} is over the limit of "
                               f"{self.file_limit / 2**20:.3g} MiB (--max-upload-mb)")
        super().on_part_data(data, start, end)


async def read_upload(request: Request, file_limit: int, total_limit: int, max_files: int) -> FormData:
    """The request's multipart form; TooLarge as soon as one file passes ``file_limit`` bytes or the body
    ``total_limit``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UserError("an upload must be sent as multipart/form-data (folder, overwrite, files)")

    async def counted():
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > total_limit:
                raise TooLarge(f"upload over {total_limit / 2**20:.0f} MiB in all")
            yield chunk
    parser = _LimitedParser(request.headers, counted(), max_files=max_files, max_fields=20,
                            file_limit=file_limit)
    return await parser.parse()

