"""CUDA settings the training recipes apply before the first step.

``avoid_cudnn_attention``: on an H200 with torch 2.11 (cu130), the backward of PyTorch's SDPA through the cuDNN
attention backend raised "CUDA error: an illegal memory access" for a full-width Flux block (24 heads x 128, 1536
tokens, bf16) in both our step and a plain diffusers + peft step, while the MATH backend ran (2026-11-28,
`bench/gpu_session.sh`). PyTorch prefers cuDNN attention on Hopper for some shapes, so training turns that one
backend off; SDPA then picks flash / memory-efficient attention, which are exact enough and fast on these GPUs.
``train.attention_backend`` (diffusers' dispatcher) still overrides this for users who want a specific kernel.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def avoid_cudnn_attention() -> bool:
    """Disable PyTorch's cuDNN SDPA backend when CUDA is in use; returns whether it was on before."""
    if not torch.cuda.is_available():
        return False
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    if was:
        log.info("cuDNN SDPA backend disabled for training (illegal memory access in its backward on Hopper)")
    return was
