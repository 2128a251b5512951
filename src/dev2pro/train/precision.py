"""LoRA compute in the base's dtype (bf16) over fp32 master weights and fp32 optimizer state.

With fp32 LoRA weights on a bf16 base, peft casts every LoRA input to fp32, runs fp32 GEMMs and casts back -- in
forward, checkpoint recompute and backward (~590 GB of extra traffic per checkpointed 1024^2 FLUX.1 step). Here the
LoRA runs in the compute dtype while the optimizer still steps fp32 numbers.

The trick is that each LoRA ``Parameter`` keeps its identity and only its ``.data`` changes between two views:

- **master view** (the rest state): ``p.data`` is the fp32 master, ``p.grad`` the fp32 gradient. The optimizer,
  gradient clipping, the NaN guard, saved LoRA files and resumable states all see exactly what the fp32 path shows
  them, so nothing outside this module changes and resume stays bit-identical.
- **compute view** (only inside a forward/backward with grad): a forward pre-hook on the model casts the masters to
  the compute dtype into persistent buffers (one fused ``_foreach_copy_``) and points ``p.data`` at them; any fp32
  gradient of earlier micro-batches is set aside. A callback queued on the autograd engine at the end of the
  backward points ``p.data`` back at the masters and accumulates the low-precision gradients into fp32.

Forwards without grad (samples, validation) stay in the master view, as before. Not for DDP (its reducer reads
``p.grad`` during backward): ``dev2pro train`` is one process.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

LORA_DTYPES = ("compute", "fp32")  # train.lora_dtype


def lora_compute_dtype(choice: str, compute: torch.dtype) -> torch.dtype:
    """``train.lora_dtype``: "compute" -> the base's compute dtype, "fp32" -> fp32 (the pre-0.x path)."""
    return compute if choice == "compute" else torch.float32


class MasterWeights:
    """LoRA parameters computed in ``dtype`` with fp32 masters (see the module docstring). ``params`` are fp32."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], dtype: torch.dtype):
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("MasterWeights needs fp32 parameters (the masters)")
        self.params, self.dtype = list(params), dtype
        self.buffers = [torch.empty_like(p, dtype=dtype) for p in self.params]  # the compute copies
        self.masters: list[torch.Tensor] = []  # set while in the compute view
        self.set_aside: list[torch.Tensor | None] = []  # fp32 grads of earlier micro-batches
        self.queued = False
        self.hooks = [model.register_forward_pre_hook(self._to_compute)]
        self.hooks += [p.register_post_accumulate_grad_hook(self._queue) for p in self.params]

    @property
    def in_compute_view(self) -> bool:
        return bool(self.masters)

    def _to_compute(self, module, args) -> None:
        if not torch.is_grad_enabled() or self.in_compute_view:
            return
        self.masters = [p.data for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, self.masters)  # cast + copy, fused
        self.set_aside = [p.grad for p in self.params]
        for p, b in zip(self.params, self.buffers):
            p.grad = None
            p.data = b

    def _queue(self, p) -> None:
        # once per backward: the switch back runs when the engine is done (every grad, used or not, is final)
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.to_master)

    def to_master(self) -> None:
        """Back to the master view: fp32 ``.data``, gradients accumulated in fp32. Idempotent."""
        self.queued = False
        if not self.in_compute_view:
            return
        grads = [p.grad for p in self.params]
        for p, m in zip(self.params, self.masters):
            p.grad = None
            p.data = m
        for p, g, old in zip(self.params, grads, self.set_aside):
            if g is None:
                p.grad = old
            elif old is None:
                p.grad = g.float()
            else:
                p.grad = old.add_(g)  # add_ promotes the bf16 gradient into the fp32 sum
        self.masters, self.set_aside = [], []

    def remove(self) -> None:
        """Detach the hooks and return to the master view (the parameters are plain fp32 again)."""
        self.to_master()
        for h in self.hooks:
            h.remove()


def lora_in_compute_dtype(model, params: list[torch.nn.Parameter], choice: str,
                          compute: torch.dtype) -> MasterWeights | None:
    """``train.lora_dtype`` applied to a LoRA'd model (after ``add_lora``); None when the LoRA computes in fp32."""
    dtype = lora_compute_dtype(choice, compute)
    if dtype == torch.float32:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        log.warning("train.lora_dtype = 'compute' is single-process only: the LoRA computes in fp32 here")
        return None
    return MasterWeights(model, params, dtype)
