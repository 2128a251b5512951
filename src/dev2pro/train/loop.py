"""The one training-step driver of `train` (a LoRA) and `dedistill` (a full fine-tune or an adapter).

A step is: ``grad_accum`` micro-batches (``draw`` makes every random draw of the global batch in one order, then
this rank's slice; ``objectives.objective_loss`` is the one place the loss is chosen), backward, clip (or measure)
the gradient norm, then ``NonFiniteGuard`` decides whether the update is applied. Between steps, on a schedule:
states and files (``save``), sample grids (``sample``) -- the save first, so a crash while sampling loses nothing --
and Ctrl-C (or SIGTERM), which saves a resumable state at the end of the step and stops.

What differs between the recipes is passed in as small values (``Objective``, ``Draws``, ``Optimization``,
``Events``), not as flags: the loop itself has no idea which recipe runs it.

``after_step``: the one injection point for code that must run after every finished step (tests kill the process
there to prove resume, see ``tests/kill_after_step.py``); production never sets it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..data.loader import LoadedBatch, collate
from ..objectives import draw, objective_loss
from .fsdp import clip_grad_norm
from .progress import Progress
from .run import NonFiniteGuard, stop_on_interrupt

after_step: Callable[[int], None] | None = None  # see the module docstring

# Host syncs. A step reads the device once: loss, logged parts and gradient norm together (``read_once``), after
# the backward and the clip are queued. The batch goes to the device before the forward (x_t and the target are
# built there), cache reads happen in a loader thread (``data.loader.prefetch_batches``), and bf16 LoRA masters
# are cast on the device (``train.precision``). The one read stays because ``NonFiniteGuard`` must decide before
# ``optimizer.step`` whether the update is applied (nan_policy skip / stop on the step that went bad, never
# saving its weights). Deferring it to every ``log_every`` steps would need the skip done on the device (fused
# AdamW's ``found_inf``: torch's AdamW only, not adamw8bit / prodigy / adafactor) and would let "stop" stop up to
# ``log_every`` steps late. What the read costs is the GPU idling while the host queues the optimizer step and
# the next forward's first kernels: ~1-3 ms against 0.3-1 s steps.


@dataclass
class Objective:
    """What a step optimizes: the named objective (``objectives.OBJECTIVES``) and what it needs."""

    name: str = "flow"
    guidance: float = 1.0  # the flow objective's fixed guidance input
    teacher: object = None  # the frozen teacher of cfg_teacher / guidance_distill
    teacher_dtype: torch.dtype | None = None
    flow_weight: float = 0.0  # cfg_teacher: weight of the extra flow loss
    w_range: tuple[float, float] | None = None  # the teacher objectives' CFG scales, drawn per sample


@dataclass
class Draws:
    """How a micro-batch's randomness is drawn (``objectives.draw``)."""

    caption_dropout: float
    timestep_sampling: str
    sigmoid_scale: float
    shift: float


@dataclass
class Optimization:
    """The trainable side of a run: what the loop steps, clips and averages."""

    model: torch.nn.Module  # as called (DDP-wrapped when replicated; FSDP shards in place)
    params: list  # the trainable parameters (the LoRA's, or all of them)
    optimizer: torch.optim.Optimizer
    scheduler: object
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # > 0: clip to it; 0: only measure (non-finite gradients are still caught)
    ema: object = None  # ``train.ema.EMA``, updated after every applied step
    fsdp: bool = False  # FSDP2: gradient sync once per step, its own clip


@dataclass
class Events:
    """What happens between steps, each called with the number of steps done. ``save_last``: the scheduled save
    also runs after the last step (dedistill: its export may fail and needs a state); otherwise the recipe's final
    save does it."""

    save: Callable[[int], object] | None = None
    save_every: int = 0
    save_last: bool = False
    sample: Callable[[int], object] | None = None
    sample_every: int = 0
    validate: Callable[[int], object] | None = None  # after every step; it decides itself when it is due
    interrupted: Callable[[int], None] = lambda done: None  # Ctrl-C: save a resumable state and say how to resume
    any_rank: Callable[[bool], bool] = lambda flag: flag  # a Ctrl-C seen by any process stops them all


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)  # this run's steps
    skipped: list[int] = field(default_factory=list)  # steps whose update the guard skipped
    seconds: float = 0.0  # the loop's wall time, its periodic saves and samples included


def step_loss(opt: Optimization, objective: Objective, draws: Draws, data, batches: Iterator[list[int]],
              gen: torch.Generator, accelerator, dtype: torch.dtype, rank: int = 0, world: int = 1
              ) -> tuple[float, dict]:
    """Forward + backward over ``grad_accum`` micro-batches (each a global batch of ``world`` slices; this rank
    keeps its own), then clip or measure the gradient norm. Returns the step's loss (the mean over ranks) and the
    logged parts (the objective's, ``grad_norm``). ``dtype``: what the model's inputs are cast to."""
    total, logged, device, pending = 0.0, {}, accelerator.device, []
    for micro in range(opt.grad_accum):
        if opt.fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            opt.model.set_requires_gradient_sync(micro == opt.grad_accum - 1)
        got = next(batches)
        if isinstance(got, LoadedBatch):  # read by the loader thread (data.loader.prefetch_batches)
            items = got.items
        else:
            per = len(got) // world
            items = [data.dataset[i] for i in got[rank * per:(rank + 1) * per]]
        batch = draw(collate(items), gen,
                     dropout_p=draws.caption_dropout, empty=data.empty, timestep_sampling=draws.timestep_sampling,
                     sigmoid_scale=draws.sigmoid_scale, shift=draws.shift, w_range=objective.w_range, rank=rank,
                     world=world).to(device)  # x_t and the target are then built on the device, before the forward
        with accelerator.autocast():
            loss, parts = objective_loss(objective.name, opt.model, objective.teacher, batch, data.empty, device,
                                         dtype, objective.teacher_dtype, guidance=objective.guidance,
                                         flow_weight=objective.flow_weight)
        accelerator.backward(loss / opt.grad_accum)
        pending.append(("loss", accelerator.reduce(loss.detach(), "mean")))  # kept on the device: no sync
        pending += [(k, v.detach()) for k, v in parts.items()]
    pending.append(("grad_norm", _grad_norm(opt, accelerator)))
    for k, v in read_once(pending, device):  # summed in Python floats, in the order the .item() calls did
        if k == "grad_norm":
            logged[k] = v
        elif k == "loss":
            total += v / opt.grad_accum
        else:
            logged[k] = logged.get(k, 0.0) + v / opt.grad_accum
    return total, logged


def read_once(pending: list, device) -> list[tuple[str, float]]:
    """(name, tensor or float) pairs as floats, read from the device in one transfer: the step's one sync (see
    the module docstring)."""
    exact = torch.float32 if torch.device(device).type == "mps" else torch.float64  # fp32 -> fp64 is exact
    values = [torch.as_tensor(v).to(device, exact).reshape(()) for _, v in pending]
    return list(zip([k for k, _ in pending], torch.stack(values).tolist()))


def _grad_norm(opt: Optimization, accelerator):
    """The total gradient norm (a device tensor, or a float), clipped to ``max_grad_norm`` when > 0; non-finite
    when any gradient is."""
    if opt.max_grad_norm > 0:
        if opt.fsdp:
            return clip_grad_norm(opt.model.parameters(), opt.max_grad_norm)
        return accelerator.clip_grad_norm_(opt.params, opt.max_grad_norm)
    grads = [p.grad for p in opt.params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else 0.0


def _sample(sample: Callable[[int], object], done: int, bar: Progress) -> None:
    """A scheduled grid and its console line, as the step-0 and final grids get theirs (a rank that writes no
    grid returns nothing and says nothing)."""
    t0 = time.perf_counter()
    written = sample(done)
    paths = written if isinstance(written, (list, tuple)) else [written] if written else []
    if paths:
        bar.note(f"samples: {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.1f} s)")


def run_steps(start: int, steps: int, compute: Callable[[], tuple[float, dict]], opt: Optimization,
              guard: NonFiniteGuard, bar: Progress, events: Events, history: list) -> LoopResult:
    """Steps ``start..steps``: ``compute`` one step, apply it unless the guard skips it, then the scheduled saves,
    samples and Ctrl-C. Every step's loss is appended to ``history`` (the whole run's, for loss.png)."""
    result = LoopResult()
    bar.start_clock()
    t0 = time.perf_counter()
    with stop_on_interrupt() as stop:
        for step in range(start, steps):
            total, logged = compute()
            done, last = step + 1, step + 1 == steps
            if guard.check(done, total, logged.get("grad_norm")):
                opt.optimizer.step()  # a skipped step (nan_policy = "skip") leaves the weights as they were
                if opt.ema is not None:
                    opt.ema.update()
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            history.append(total)
            bar.update(done, total, opt.scheduler.get_last_lr()[0], logged)
            if events.validate:
                events.validate(done)
            if events.save and events.save_every and (done % events.save_every == 0 and not last or
                                                      last and events.save_last):
                events.save(done)
            if events.sample and events.sample_every and done % events.sample_every == 0 and not last:
                _sample(events.sample, done, bar)
            if events.any_rank(stop.requested) and not last:
                events.interrupted(done)
                raise stop.interrupt()
            if after_step is not None:
                after_step(done)
    result.skipped, result.seconds = guard.skipped, time.perf_counter() - t0
    return result
