"""A safetensors header we can trust before reading any data.

The format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape, ``data_offsets``
[begin, end) into the data that follows), then the data. A damaged or hostile file can claim any shape: one that
says a 1e6 x 1e6 weight made `inspect` report a trillion parameters, `convert` ask for terabytes of free space and
`train` die inside diffusers. So every entry is checked against the file: a known dtype, a shape of non-negative
integers, offsets in order and inside the data, and exactly shape x itemsize bytes -- one line naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CheckpointError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}
MAX_HEADER = 100 * 1024**2


def read_header(path: Path) -> dict:
    """Parse and check a safetensors header; CheckpointError (one line naming ``path``) for anything wrong."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 1 or n > min(size - 8, MAX_HEADER):
                raise ValueError("header length is not plausible")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}). dev2pro reads .safetensors checkpoints; "
                              f"pickle files (.ckpt/.pt) need --allow-pickle") from None
    data = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((_end(v) for v in tensors.values()), default=0)
    if end > data:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}. The download or copy was interrupted -- fetch the file again")
    total = 0
    for key, v in tensors.items():
        total += _check_entry(path, key, v, data)
    if total > data:
        raise CheckpointError(f"{path} has a damaged header: its tensors claim {total} bytes of data but the file "
                              f"holds {data}. Download or convert the file again")
    return header


def _end(v) -> int:
    try:
        return int(v["data_offsets"][1])
    except (TypeError, KeyError, IndexError, ValueError):
        return 0  # _check_entry names the broken entry


def _check_entry(path: Path, key: str, v, data: int) -> int:
    """The byte size of one header entry, after checking it against the data region; else CheckpointError."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} has a damaged header: tensor {key!r} {why}. The file is corrupt or not a "
                               f"real checkpoint -- download or convert it again")
    if not isinstance(v, dict):
        raise bad("is not described by a dtype, shape and data_offsets")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise bad(f"has an unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data):
        raise bad(f"has data_offsets {offsets!r} outside the file's {data} data bytes")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise bad(f"claims shape {tuple(shape)} ({dtype}, {nbytes} bytes) but holds {offsets[1] - offsets[0]} "
                  f"bytes")
    return nbytes
