"""Probe functions for tests/train/test_attention_auto.py, importable by name in the spawned probe process (tests/
is on the path: pyproject's pythonpath)."""

import os

from dev2pro.train import attention as A


def crashing_probe(backend, config, tokens, device):
    """A kernel that takes the process down (as an illegal memory access does on CUDA) for "_native_flash"."""
    if backend == "_native_flash":
        os.abort()
    return A.probe(backend, config, tokens, device, steps=1)
