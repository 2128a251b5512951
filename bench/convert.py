"""Benchmark `dev2pro convert` bf16 -> fp8-scaled on a synthetic multi-GB BFL checkpoint.

Prints (1) conversion throughput as a ratio to a plain copy of the same file, measured in the same run (these
machines are noisy, absolute MB/s are not comparable across runs), and (2) the converter's peak RSS as a multiple
of the largest tensor in the file. Each measured step runs in a fresh subprocess so its ru_maxrss is its own.

    python bench/convert.py --gb 2 [--dir /tmp/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dev2pro.flux.keys import plan
from dev2pro.flux.spec import FLUX_DEV, build_transformer
from dev2pro.outputs import stream_safetensors


def synth_checkpoint(path: Path, gb: float) -> tuple[int, int]:
    """A bf16 BFL file with full-width FLUX.1 blocks, as many as fit in ``gb``. Returns (bytes, largest tensor)."""
    per_double, per_single = 339_000_000 * 2, 141_600_000 * 2
    n_single = max(1, int(gb * 1e9 * 0.6 / per_single))
    n_double = max(1, int((gb * 1e9 - n_single * per_single) / per_double))
    spec = FLUX_DEV.with_(num_double=n_double, num_single=n_single)
    shapes = {k: tuple(v.shape) for k, v in build_transformer(spec, device="meta").state_dict().items()}
    steps = plan(shapes, "diffusers", "bfl")
    entries = []
    for key, parts in steps.items():
        rows = sum(((p[2][1] - p[2][0]) if p[2] else shapes[p[0]][0]) for p in parts) if len(parts) > 1 \
            else shapes[parts[0][0]][0]
        shape = (rows, *shapes[parts[0][0]][1:])
        gen = torch.Generator().manual_seed(len(entries))
        entries.append((key, torch.bfloat16, shape,
                        lambda shape=shape, gen=gen: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)))
    stream_safetensors(entries, path, overwrite=True)
    largest = max(2 * _numel(e[2]) for e in entries)
    return path.stat().st_size, largest


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# Peak RSS is read from /proc/self/status VmHWM: ru_maxrss would include the forking parent's pages.
CHILD = """
import sys, time, json, shutil
from dev2pro.flux.convert import convert
t = time.perf_counter()
if sys.argv[1] == "copy":
    shutil.copyfile(sys.argv[2], sys.argv[3])
elif sys.argv[1] == "convert":
    convert(sys.argv[2], sys.argv[3], dtype="fp8-scaled", overwrite=True)
dt = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"s": dt, "rss": int(hwm) * 1024}))
"""


def run_child(mode: str, src: Path, dst: Path, pythonpath: str | None = None) -> dict:
    """One measured step in a fresh process; the dirty pages of earlier steps are flushed first (``sync``), so a
    step does not pay for the write-back of the one before it."""
    os.sync()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--before", default=None, help="the src/ folder of another dev2pro tree: its convert is measured "
                                                   "in the same run (before/after on the same disk, same minute)")
    ap.add_argument("--repeat", type=int, default=2, help="measurements per step; the fastest counts")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="dev2pro-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "synthetic-bf16.safetensors"
    size, largest = synth_checkpoint(src, args.gb)
    run_child("copy", src, work / "baseline.safetensors")  # warms the page cache
    arms = [("convert", None)] + ([("convert (before)", args.before)] if args.before else [])
    best: dict[str, dict] = {}
    for _ in range(max(1, args.repeat)):  # interleaved, so a slow minute of the disk hits every arm alike
        for name, path in [("copy", None), *arms]:
            r = run_child("copy" if name == "copy" else "convert", src, work / f"{name[:4]}.safetensors", path)
            best[name] = r if name not in best else {"s": min(best[name]["s"], r["s"]),
                                                      "rss": max(best[name]["rss"], r["rss"])}
    copy_s = best["copy"]["s"]
    python_rss = run_child("idle", src, work / "unused")["rss"]  # python + torch + dev2pro imported
    print(f"input: {size / 1e9:.2f} GB bf16 BFL, largest tensor {largest / 1e6:.1f} MB; best of {args.repeat}")
    print(f"copy: {copy_s:.2f} s ({size / copy_s / 1e6:.0f} MB/s)")
    for name, _ in arms:
        conv = best[name]
        print(f"{name} -> fp8-scaled: {conv['s']:.2f} s ({size / conv['s'] / 1e6:.0f} MB/s) = "
              f"{copy_s / conv['s']:.2f}x of copy speed; peak RSS {conv['rss'] / 1e6:.0f} MB = "
              f"{conv['rss'] / largest:.1f}x largest tensor ({(conv['rss'] - python_rss) / largest:.1f}x above a "
              f"bare python+torch process of {python_rss / 1e6:.0f} MB)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
