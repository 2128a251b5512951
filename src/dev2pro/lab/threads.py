"""One thread for the demo's numerics, so its numbers depend on its seeds and not on the machine running it.

A multi-threaded BLAS (numpy/scipy's OpenBLAS, torch's MKL) splits a matrix product differently at each thread
count, and the split changes the float round-off; a classifier's argmax near a tie can then flip (issue 18,
item 9: four digit-accuracy cells of the demo's guidance-1.0 table moved between machines). The demo's matrices
are tiny, so one thread costs nothing here (on busy cores it is faster).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits


@contextmanager
def one_thread():
    """Run the block with torch and every BLAS/OpenMP pool (numpy, scipy, scikit-learn) on one thread; the
    caller's thread counts come back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)
