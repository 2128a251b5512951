"""Probe functions for tests/train/test_attention_auto.py, imported by name in the probe process
(``python -m dev2pro.train.attention`` gets the test run's import path, which holds tests/: pyproject's pythonpath)."""

import os

from dev2pro.train import attention as A


def crashing_probe(backend, config, tokens, device):
    """A kernel that takes the process down (as an illegal memory access does on CUDA) for "_native_flash"."""
    if backend == "_native_flash":
        os.abort()
    return A.probe(backend, config, tokens, device, steps=1)
