"""How every output is written: atomically, never over an existing output without a flag, safetensors streamed.

Atomic: data goes to a hidden temp sibling and is renamed into place (``os.replace``), so a crash leaves either
the old output or nothing -- never half a file that a later run would trust.

Streaming safetensors: the format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor, plus ``__metadata__``), then the raw bytes. Since shapes and dtypes are known before any
tensor is computed, we write the header first and then each tensor as it is produced: peak memory is one tensor,
not the model (``safetensors.torch.save_file`` needs every tensor in memory at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .errors import UserError

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def check_output(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Validate an output path: parent exists and is writable; refuse an existing one unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} already exists; pass --overwrite (or overwrite=true) to replace it, "
                        f"or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the directory for {what} {path} does not exist: create {parent} first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {what} {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it into place (file or directory)."""
    path = check_output(path, overwrite, what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        elif path.is_dir():
            shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Atomically write a text file (used for configs, reports, JSON)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite=overwrite)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Atomically save an in-memory dict of tensors."""
    items = [(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in tensors.items()]
    return stream_safetensors(items, path, metadata, overwrite)


def stream_safetensors(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                       path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                       overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write a safetensors file tensor by tensor: ``entries`` = (key, dtype, shape, produce()) in file order.

    ``produce`` is called once per tensor, when its bytes are written; its result must match dtype and shape.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape, _ in entries:
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, dtype, shape, produce in entries:
                t = produce()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{key}: produced {t.dtype}{tuple(t.shape)}, header says {dtype}{shape}")
                f.write(_tensor_bytes(t))
                if progress:
                    progress(t.numel() * t.element_size())
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
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
