"""Block swap: keep the frozen base weights of N transformer blocks in (pinned) host RAM, copy each to the GPU
just before it runs, and drop the copy after. The host copy is the master: weights only travel host -> device.

Why not diffusers' ``apply_group_offloading(..., offload_type="block_level", use_stream=True)``: it is built for
inference. It moves whole modules, LoRA parameters included, and offloads after each forward by copying the
group back (``param.data = cpu_copy``), so (a) peft's trainable LoRA weights would leave the GPU and their
``.grad`` and the optimizer's state would no longer sit beside them, (b) it swaps storage *in place* on the module's
Parameter objects, which autograd may still hold for backward, and (c) its stream prefetch follows the order
recorded in the first forward only, while training with per-block gradient checkpointing re-runs each block's
forward during backward in *reverse* order. What we need is small: per block, the list of its frozen tensors
(never LoRA ones), a host master for each, and a forward pre-hook that makes the block resident, evicts the
others beyond a window, and starts copying the next block in the current direction on a side stream.

How it works. The 57 Flux blocks (``transformer_blocks`` then ``single_transformer_blocks``) in execution order;
N of them are swapped, largest first (``swap_positions``): double blocks hold ~2.4x a single block's weights, so
N = 16 moves 16 double blocks (5.4 GB of FLUX.1 in fp8) where the last 16 blocks would move 2.3 GB; the copy
time per byte is the same either way. Making a block
resident installs *new* Parameter objects holding device copies (``module._parameters[name] = Parameter(copy)``);
evicting puts the host masters back. New objects, not ``param.data = ...``, because a tensor autograd saved for
backward keeps pointing at the copy it saw, so eviction can never change what backward computes. Direction: a
block's pre-hook firing for the block after the last one seen (or on a new model call) is the forward pass; the
same block again or the one before is backward recomputation (diffusers' per-block checkpointing calls
``block.__call__`` again, so hooks fire in reverse). Eviction happens at the *next* block's pre-hook, not in a
post-hook: non-reentrant checkpointing can stop a recomputation early and skip post-hooks, and in backward a
block's gradients are done once the engine asks for the block before it.

At any point at most ``window`` swapped blocks are resident (default 2: the one computing, the one arriving), so
the device holds at most ``(num_blocks - N) + window`` blocks; ``BlockSwap.trace`` (when ``record=True``) logs the
resident set at every hook so tests can check it. On CUDA the copies run on a side stream with pinned sources; the
compute stream waits on the copy's event and the copies are ``record_stream``-ed onto it so the caching allocator
does not reuse their memory while queued kernels still read it. On CPU the "device copy" is a real copy (clone),
so the bookkeeping and the swap path are exercised by tests exactly as on a GPU.

Without gradient checkpointing, autograd keeps every block's device weights for backward, so the memory does not
drop (results stay correct); the recipes warn about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import families
from ..errors import UserError

log = logging.getLogger(__name__)


def flux_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers Flux transformer in execution order (double blocks, then single): its
    family's ``blocks``."""
    return families.of_model(model).blocks(model)


def swap_positions(num_double: int, num_single: int, n: int) -> list[int]:
    """Execution positions of the ``n`` swapped blocks: the last double blocks first, then the last single ones."""
    if not 0 <= n <= num_double + num_single:
        raise UserError(f"blocks_to_swap = {n} (model.blocks_to_swap, or sample's --blocks-to-swap): this model has "
                        f"{num_double + num_single} blocks; use 0..{num_double + num_single}")
    doubles = min(n, num_double)
    singles = n - doubles
    return list(range(num_double - doubles, num_double)) + \
        list(range(num_double + num_single - singles, num_double + num_single))


def _is_trainable_name(name: str) -> bool:
    return any(part.startswith(("lora_", "lokr_", "hada_")) for part in name.split("."))  # LoRA/DoRA, LoKr, LoHa


@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor  # the master (a Parameter for parameters), pinned on CUDA


@dataclass
class _Slot:
    entries: list[_Entry]
    event: object = None  # CUDA event of the pending copy
    copies: list[torch.Tensor] = field(default_factory=list)


class BlockSwap:
    """Hooks that stream the frozen weights of ``n`` blocks of ``model`` (``swap_positions``) from host RAM to
    ``device``.

    Create it after the LoRA is injected (its weights are told apart by name and always live on ``device``),
    then call ``place()`` instead of ``model.to(device)``.
    """

    def __init__(self, model: nn.Module, n: int, device, window: int = 2, record: bool = False):
        self.blocks = flux_blocks(model)
        base = getattr(model, "module", model)
        self.swapped = swap_positions(len(base.transformer_blocks), len(base.single_transformer_blocks), n)
        if window < 1:
            raise ValueError("window must be >= 1")
        self.model, self.n, self.window, self.record = model, n, window, record
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots: dict[int, _Slot] = {p: _Slot(e) for p, e in self._make_masters().items()}
        self.resident: set[int] = set()  # swapped blocks whose device copies are installed
        self.trace: list[tuple[str, int, frozenset]] = []
        self.max_resident = 0
        self.loads = 0
        self._last: int | None = None
        self._handles = [b.register_forward_pre_hook(self._make_hook(p)) for p, b in enumerate(self.blocks)
                         if n > 0]
        if n > 0:
            self._handles.append(getattr(model, "module", model).register_forward_pre_hook(self._new_pass))

    # ---------------------------------------------------------------------------------------------- setup
    def _frozen(self, block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
        """(module, name, is_param, tensor) of every non-LoRA parameter and buffer of ``block``."""
        found = []
        for mname, module in block.named_modules():
            if _is_trainable_name(mname):
                continue
            found += [(module, n, True, p) for n, p in module._parameters.items()
                      if p is not None and not _is_trainable_name(n)]
            found += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
        return found

    def _make_masters(self) -> dict[int, list[_Entry]]:
        """Copy the swapped blocks' frozen tensors into one host buffer (pinned on CUDA) and install views of it.

        One buffer rather than a pin per tensor: PyTorch's pinned-memory allocator rounds each request up to a
        power of two, which would cost up to twice the swapped bytes in host RAM.
        """
        found = {p: self._frozen(self.blocks[p]) for p in self.swapped}
        sizes = {id(t): -(-t.numel() * t.element_size() // 64) * 64 for f in found.values() for *_, t in f}
        total = sum(sizes.values())
        buf = None
        if self.cuda:
            try:
                buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:  # a host that refuses page-locked memory: copies still work, synchronously
                log.warning("block swap: cannot pin %.1f GB of host memory (%s); copies will not overlap compute",
                            total / 1024**3, e)
        if buf is None:
            buf = torch.empty(total, dtype=torch.uint8)
        self.host_buffer, offset, entries = buf, 0, {}
        for p, items in found.items():
            entries[p] = []
            for module, name, is_param, t in items:
                nbytes = t.numel() * t.element_size()
                view = buf[offset:offset + nbytes].view(t.dtype).view(t.shape) if nbytes else \
                    torch.empty(t.shape, dtype=t.dtype)
                view.copy_(t.detach())
                offset += sizes[id(t)]
                host = nn.Parameter(view, requires_grad=False) if is_param else view
                (module._parameters if is_param else module._buffers)[name] = host
                entries[p].append(_Entry(module, name, is_param, host))
        return entries

    def _swapped_ids(self) -> set[int]:
        return {id(e.host) for s in self.slots.values() for e in s.entries}

    def place(self) -> "BlockSwap":
        """Move everything except the swapped blocks' frozen tensors to the device (LoRA weights included)."""
        skip = self._swapped_ids()
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in skip and p.device != self.device:
                    p.data = p.data.to(self.device)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in skip and b.device != self.device:
                    module._buffers[name] = b.to(self.device)
        return self

    def unplace(self) -> "BlockSwap":
        """Evict every swapped block and move the rest to the CPU (e.g. an inference base between samples)."""
        for p in list(self.resident):
            self._evict(p)
        self._last = None
        skip = self._swapped_ids()
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in skip and p.device.type != "cpu":
                    p.data = p.data.to("cpu")
            for name, b in module._buffers.items():
                if b is not None and id(b) not in skip and b.device.type != "cpu":
                    module._buffers[name] = b.to("cpu")
        return self

    def remove(self):
        """Drop the hooks and evict: the swapped blocks' weights stay on the host."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in list(self.resident):
            self._evict(p)

    # ---------------------------------------------------------------------------------------------- moves
    def _load(self, p: int):
        """Install device copies of block ``p`` (on the side stream on CUDA)."""
        slot = self.slots[p]
        if self.cuda:
            # no wait on the compute stream: the sources are immutable host masters, so the copy overlaps compute
            with torch.cuda.stream(self.stream):
                copies = [e.host.detach().to(self.device, non_blocking=True) for e in slot.entries]
                slot.event = torch.cuda.Event()
                slot.event.record(self.stream)
        else:
            copies = [e.host.detach().clone() for e in slot.entries]
        for e, c in zip(slot.entries, copies):
            if e.is_param:
                e.module._parameters[e.name] = nn.Parameter(c, requires_grad=False)
            else:
                e.module._buffers[e.name] = c
        slot.copies = copies
        self.resident.add(p)
        self.loads += 1

    def _ready(self, p: int):
        """Make the compute stream wait for block ``p``'s copy; keep its memory until queued kernels are done."""
        slot = self.slots[p]
        if self.cuda and slot.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.event)
            for c in slot.copies:
                c.record_stream(stream)
            slot.event = None

    def _evict(self, p: int):
        slot = self.slots[p]
        for e in slot.entries:
            if e.is_param:
                e.module._parameters[e.name] = e.host
            else:
                e.module._buffers[e.name] = e.host
        slot.copies, slot.event = [], None
        self.resident.discard(p)

    # ---------------------------------------------------------------------------------------------- hooks
    def _new_pass(self, module, args):
        self._last = None

    def _next_swapped(self, p: int, step: int) -> int | None:
        q = p + step
        while 0 <= q < len(self.blocks):
            if q in self.slots:
                return q
            q += step
        return None

    def _make_hook(self, p: int):
        def hook(module, args):
            self.enter(p)
        return hook

    def enter(self, p: int):
        """Block ``p`` is about to run: evict beyond the window, make ``p`` resident, prefetch the next one."""
        backward = self._last is not None and p in (self._last, self._last - 1)
        self._last = p
        step = -1 if backward else 1
        want = [p] if p in self.slots else []
        nxt = self._next_swapped(p, step)
        if nxt is not None and len(want) < self.window:
            want.append(nxt)
        for q in list(self.resident):
            if q not in want:
                self._evict(q)
        for q in want:
            if q not in self.resident:
                self._load(q)
        if p in self.slots:
            self._ready(p)
        self.max_resident = max(self.max_resident, len(self.resident))
        if self.record:
            self.trace.append(("backward" if backward else "forward", p, frozenset(self.resident)))

    def swapped_bytes(self) -> int:
        return sum(e.host.numel() * e.host.element_size() for s in self.slots.values() for e in s.entries)


def enable_block_swap(model: nn.Module, n: int, device, window: int = 2, record: bool = False) -> BlockSwap | None:
    """Swap ``n`` blocks of ``model`` (``swap_positions``) and place the rest on ``device``.

    Returns the ``BlockSwap``, or ``None`` for ``n = 0`` (then the whole model is moved)."""
    if n <= 0:
        model.to(device)
        return None
    return BlockSwap(model, n, device, window=window, record=record).place()
