"""Benchmark `lora extract` at FLUX width: randomized truncated SVD vs the exact SVD, both measured in this run.

For full-width (3072) weight differences with three spectra -- a slow power law (the hard case for a randomized
range finder), a fast power law, and low rank plus noise -- it times ``decompose(exact=True)`` (torch.linalg.svd)
and ``decompose(exact=False)`` (torch.svd_lowrank, oversample 16, 4 power iterations) at the same rank and prints:
the speed ratio (goal >= 20x) and the retained energy of the rank-k LoRA each gives, with their relative difference
(goal <= 0.5% at rank 64). One torch thread unless --threads says otherwise (machines here are shared).

    python bench/extract.py [--width 3072] [--rank 64] [--threads 1] [--repeats 3] [--mlp] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch


def matrix(out: int, inp: int, spectrum: str, seed: int) -> torch.Tensor:
    """A weight-difference-like matrix with a chosen singular spectrum (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    i = torch.arange(1, n + 1, dtype=torch.float32)
    if spectrum == "power-0.5":
        s = i ** -0.5
    elif spectrum == "power-1.0":
        s = i ** -1.0
    else:  # a rank-32 signal over a noise floor 1% as strong
        s = torch.where(i <= 32, 1.0 / i.sqrt(), torch.full_like(i, 0.01))
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=g))
    return (u * s) @ v.T * 1e-3


def timed(fn, device: str):
    """CPU seconds of this process on the CPU (other jobs share these cores: wall time measures them too), wall
    seconds between synchronisations on a GPU."""
    if device == "cpu":
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(width: int, rank: int, mlp: bool, repeats: int, device: str) -> None:
    from dev2pro.lora.ops import decompose

    shapes = [(width, width)] + ([(width, 4 * width)] if mlp else [])
    clock = "CPU seconds of this process" if device == "cpu" else f"seconds on {torch.cuda.get_device_name()}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {clock}; rank {rank}; "
          f"fastest of {repeats} paired runs each (shared machine); "
          "energy = kept / total squared singular values of the rank-k LoRA")
    print(f"{'matrix':>12} {'spectrum':>10} {'exact s':>8} {'rand s':>8} {'speedup':>8} {'E exact':>9} "
          f"{'E rand':>9} {'rel diff':>9}")
    worst_speed, worst_diff = float("inf"), 0.0
    for shape in shapes:
        for spectrum in ("power-0.5", "power-1.0", "lowrank+noise"):
            d = matrix(*shape, spectrum, seed=0).to(device)
            te, tr = [], []
            for _ in range(repeats):  # paired: each exact run next to a randomized one, under the same load
                t, fe = timed(lambda: decompose(d, rank, exact=True, device=device), device)
                te.append(t)
                t, fr = timed(lambda: decompose(d, rank, exact=False, device=device), device)
                tr.append(t)
            te, tr = min(te), min(tr)
            ee, er = fe.energy(rank), fr.energy(rank)
            diff = abs(ee - er) / ee
            worst_speed, worst_diff = min(worst_speed, te / tr), max(worst_diff, diff)
            print(f"{shape[0]:>5}x{shape[1]:<6} {spectrum:>10} {te:8.2f} {tr:8.3f} {te / tr:7.1f}x {ee:9.5f} "
                  f"{er:9.5f} {diff:8.3%}")
    print(f"worst speedup {worst_speed:.1f}x (goal >= 20x): {'met' if worst_speed >= 20 else 'NOT met'}; "
          f"worst energy difference {worst_diff:.3%} (goal <= 0.5%): {'met' if worst_diff <= 0.005 else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to time the GPU path")
    p.add_argument("--repeats", type=int, default=3, help="time each SVD this many times, keep the fastest")
    p.add_argument("--mlp", action="store_true", help="also a width x 4*width (MLP-shaped) matrix")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run(a.width, a.rank, a.mlp, a.repeats, a.device)


if __name__ == "__main__":
    main()
