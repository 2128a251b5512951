"""What `convert` writes, produced at disk speed in about one tensor of RAM: plain reads, fused checks, chunked casts.

- ``TensorFile`` reads a tensor's bytes from a safetensors file with ``readinto`` (no mmap: pages of an mmap'd
  source count in the process RSS while it stays mapped), whole or in flat chunks.
- ``stream_quantize``: fp8 (plain or per-tensor scaled) from a single-piece source in chunks: pass 1 takes the
  absolute maximum (one ``aminmax`` per chunk, no temporary) and refuses NaN/inf there; pass 2 (the same bytes,
  from the page cache) divides in fp32 and casts into the fp8 output. The results are those of ``fp8.quantize``
  bit for bit; RAM is the fp8 output plus two chunks.
- ``check_finite``: the finite check on an already-converted tensor in one reduction (``aminmax``: NaN propagates,
  inf shows), the exact count only for the error message.
- ``prefetched``: the write of tensor i overlaps the production (read + cast) of tensor i + 1 in one worker thread
  (file writes and torch kernels release the GIL); two tensors in flight at most.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..outputs import ST_DTYPES, NonFiniteError, count_nonfinite
from .fp8 import FP8_DTYPES

ST_TO_TORCH = {name: dtype for dtype, name in ST_DTYPES.items()}

CHUNK = 1 << 22  # values per chunk: 8 MB of bf16 source, 16 MB of fp32 work space


class TensorFile:
    """One tensor of a safetensors file: ``read()`` all of it, or ``chunks()`` of ``CHUNK`` values (flat)."""

    def __init__(self, path: Path, key: str):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            info = json.loads(f.read(n))[key]
        self.path, self.dtype = path, ST_TO_TORCH[info["dtype"]]
        self.shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        self.start, self.nbytes = 8 + n + begin, end - begin
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()

    def _read(self, f, offset: int, count: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        buf = torch.empty(count * self.itemsize, dtype=torch.uint8) if buf is None else buf[:count * self.itemsize]
        f.seek(self.start + offset * self.itemsize)
        if f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise OSError(f"{self.path}: truncated tensor data")
        return buf.view(self.dtype)

    def read(self) -> torch.Tensor:
        with open(self.path, "rb", buffering=0) as f:
            return self._read(f, 0, self.nbytes // self.itemsize).reshape(self.shape)

    def chunks(self, size: int | None = None):
        """(offset, flat chunk) pairs; each chunk is only valid until the next (one reused buffer: fresh large
        allocations cost a page fault per 4 KB)."""
        total, size = self.nbytes // self.itemsize, size or CHUNK
        buf = torch.empty(min(size, total) * self.itemsize, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            for i in range(0, total, size):
                yield i, self._read(f, i, min(size, total - i), buf)


def _abs_max(chunks) -> torch.Tensor:
    amax = torch.zeros((), dtype=torch.float32)
    for _, c in chunks:
        lo, hi = torch.aminmax(c)
        amax = torch.maximum(amax, torch.maximum(-lo.float(), hi.float()))  # NaN propagates through maximum
    return amax


def stream_quantize(src: TensorFile, key: str, scaled: bool, fmt: torch.dtype):
    """(q, scale) as ``fp8.quantize(src.read(), scaled, fmt)`` returns them; NonFiniteError for NaN/inf."""
    fmax = torch.finfo(fmt).max
    amax = _abs_max(src.chunks())
    if not torch.isfinite(amax):
        raise NonFiniteError(f"tensor {key} holds NaN/inf values")
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)) if scaled else None
    q = torch.empty(src.shape, dtype=fmt)
    flat = q.view(-1)
    space = torch.empty(min(CHUNK, q.numel()), dtype=torch.float32)
    for i, c in src.chunks():
        work = space[:c.numel()].copy_(c)  # the fp32 divide: rounding once, to fp8, is the only loss
        if scaled:
            work.div_(scale)
        flat[i:i + c.numel()].copy_(work.clamp_(-fmax, fmax))
    return q, scale


def check_finite(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself; NonFiniteError (with the count) if it holds NaN/inf. fp8 is read from its bits."""
    if t.numel() == 0 or not t.is_floating_point():
        return t
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # e4m3fn: NaN = exponent and mantissa all ones;
        mask = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C  # e5m2: inf/NaN = exponent all ones
        suspect = bool((t.view(torch.uint8) & mask).amax() == mask)  # (v & mask) <= mask: the max tells
    elif t.dtype in FP8_DTYPES:  # fnuz formats: the exact count
        suspect = True
    else:  # min and max propagate NaN and show inf: one reduction, no temporary
        lo, hi = torch.aminmax(t)
        suspect = not bool(torch.isfinite(lo) & torch.isfinite(hi))
    bad = count_nonfinite(t) if suspect else 0
    if bad:
        raise NonFiniteError(f"tensor {key} holds {bad} NaN/inf value(s) of {t.numel()}")
    return t


def prefetched(entries: list) -> list:
    """``stream_safetensors`` entries whose ``produce`` runs one entry ahead in a worker thread, in file order."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="dev2pro-convert")
    ahead: dict[int, Future] = {}

    def produce(i: int):
        job = ahead.pop(i, None) or pool.submit(entries[i][3])
        if i + 1 < len(entries):
            ahead[i + 1] = pool.submit(entries[i + 1][3])
        try:
            return job.result()
        except BaseException:
            for f in ahead.values():
                f.cancel()
            pool.shutdown(wait=True)
            raise
        finally:
            if i + 1 == len(entries):
                pool.shutdown(wait=False)

    return [(k, d, shape, (lambda i=i: produce(i))) for i, (k, d, shape, _) in enumerate(entries)]
