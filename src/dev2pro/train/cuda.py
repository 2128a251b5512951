"""CUDA settings the training recipes apply before the first step.

``avoid_cudnn_attention``: on the lent H200 (torch 2.11.0+cu130, 2026-11-28), a full-size FLUX.1 LoRA step with
gradient checkpointing died in backward with "CUDA error: an illegal memory access" under PyTorch's default SDPA
backend choice: in our step and in a plain diffusers + peft step alike, at 512^2 and 1024^2. With the cuDNN
attention backend turned on explicitly (`bench/gpu_train.py --cudnn-sdp`) 1024^2 failed the same way; with it
off, every row of `bench/gpu_session.sh` ran in three separate runs (flash/memory-efficient attention are chosen
instead). A lone SDPA backward on contiguous tensors of the same shape passed on every backend, so the failure
needs the model's layouts; we do not know which cuDNN/torch versions are affected, so training turns the backend
off on every CUDA device (it costs nothing measurable here). ``train.attention_backend`` (diffusers' dispatcher)
still selects a specific kernel for users who want one.
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
