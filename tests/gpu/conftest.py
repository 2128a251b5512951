"""GPU tests train the way the recipes do: without the cuDNN SDPA backend (see dev2pro/train/cuda.py)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_cudnn_attention():
    from dev2pro.train.cuda import avoid_cudnn_attention

    avoid_cudnn_attention()
