"""`dev2pro dedistill CONFIG.toml`: make your own dev2pro -- a full fine-tune of FLUX.1-dev away from its
guidance distillation.

FLUX.1-dev was distilled to take the CFG scale as an input (``guidance``) and answer in one forward what pro needs
two for. Two objectives undo that, a third does it:

- ``flow``: plain flow-matching on real data with the guidance input fixed at 1.0 (the Flux-Dev2Pro recipe). The
  model relearns the conditional velocity; all weights train (fp32 master weights, bf16 autocast). 1 forward.
- ``cfg_teacher``: a frozen copy of the original dev is the teacher. Per sample ``w ~ U[w_min, w_max]``; the
  student, at guidance 1.0, predicts on the caption and on the empty prompt, and its CFG combination must match the
  teacher at guidance ``w``: ``MSE(u + w (c - u), teacher(x_t, c, guidance=w)) [+ flow_weight * flow loss]``.
  The student then works with true CFG the way the teacher's guidance did. Cost: 3 forwards per step (teacher at
  B, no grad; student at 2B -- caption and empty prompt batched into one forward -- with grad).
- ``guidance_distill``: the opposite direction, how dev was made from pro (Meng et al., "On Distillation of Guided
  Diffusion Models", Algorithm 1): the teacher is a model sampled with true CFG (pro), the student has a guidance
  embedding and must answer at guidance ``w`` what the teacher's ``u + w (c - u)`` gives. A student started from
  a file without guidance embedding gets one, initialised to add nothing (it starts as the teacher). `dev2pro
  demo` makes its toy dev this way. Cost: 3 forwards per step (teacher at 2B, no grad; student at B, with grad).

Distributed (accelerate / torchrun): DDP, or FSDP2 per transformer block (``train.distributed``, or an accelerate
FSDP config; see ``train.fsdp`` for why the recipe shards itself). Every rank walks the same *global* batch list
(``BucketBatchSampler`` with batch ``batch_size * world_size``) and draws all randomness (caption dropout, noise,
sigmas, w) for the global batch from one shared generator, then keeps its slice ``[rank * B, (rank + 1) * B)``.
Gradients averaged over ranks are then those of the global batch, so N processes give the weights one process
gets with the same global batch. The resumable state is sharded (each rank writes its rows) and loads on any
number of processes.

The story: config -> data (folders cached on the fly, or shards from `dev2pro cache`: ``data.prepare``) -> student
(+ teacher: ``train.model``) -> loop (``objectives``, clip, AdamW, warmup/cosine, EMA, TensorBoard, sample grids at
guidance 1 and true CFG: ``train.samples``, resumable state: ``train.state``) -> export through
``flux.checkpoint.convert`` (``train.export``): a BFL file (default), a diffusers folder and/or fp8.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..cli_commands import add_dedistill
from ..config import render_toml
from ..data.loader import BucketBatchSampler, batches_forever, collate
from ..data.prepare import load_training_data
from ..errors import UserError
from ..flux.checkpoint import DTYPE_CHOICES
from ..lora.adapter import WithoutAdapters
from ..noise import quiet_libraries
from ..objectives import draw, objective_loss
from ..outputs import write_json, write_text
from ..schemas import DedistillConfig, data_source
from ..train import fsdp as fsdpmod
from ..train import lifecycle as life
from ..train.ema import EMA
from ..train.export import export_adapter, export_or_keep_state, final_weights
from ..train.fsdp import clip_grad_norm
from ..train.model import load_student, load_teacher
from ..train.optim import build_optimizer, build_scheduler
from ..train.progress import Progress
from ..train.run import NonFiniteGuard, RunLock, clean_stale_temps, stop_on_interrupt
from ..train.samples import GridSpec, dedistill_grids, dedistill_guidances
from ..train.state import restore_training_state, save_training_state

# ------------------------------------------------------------------------------------------------ recipe
def dedistill(cfg: DedistillConfig, resume: str | None = None, progress: bool = True) -> dict:
    """Run the whole job; returns a summary (losses, exported files).

    The run folder is locked by the main process; Ctrl-C saves a resumable state at the end of the step; with
    ``save.every`` set the last step saves one too, so an export that fails (full disk) or a larger ``train.steps``
    continues with ``--resume``.
    """
    quiet_libraries()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    out, main = Path(cfg.save.output_dir), accelerator.is_main_process
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    lock = None
    try:
        if main:
            lock = RunLock.acquire(out)
            clean_stale_temps(out)  # a killed run's half-written files (we hold the lock: nobody writes them)
            life.prepare_output_dir(out, resume, cfg.save.overwrite, say)
            write_text(out / "config.toml", render_toml(cfg))
        accelerator.wait_for_everyone()
        return _dedistill(cfg, accelerator, out, resume, progress, say)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Models:
    student: torch.nn.Module  # as the loop calls it (DDP-wrapped when replicated)
    inner: torch.nn.Module  # the module itself (FSDP shards in place)
    teacher: object
    trainable: list
    start_from: str


def _models(cfg: DedistillConfig, accelerator, fsdp, compute) -> _Models:
    """Student (every weight trainable, fp32 master copy, FSDP2 shards when sharding; or a LoRA on a frozen base)
    and the frozen teacher (a replica on every rank; with an adapter and no teacher file: the base, LoRA off)."""
    m, tc, device = cfg.model, cfg.train, accelerator.device
    if cfg.objective == "guidance_distill" and not m.teacher:
        raise UserError("model.teacher: the guidance_distill objective needs a CFG teacher (a pro-like model)")
    start_from = m.transformer or m.path
    student = load_student(start_from, device, compute, grow_guidance=cfg.objective == "guidance_distill",
                           gradient_checkpointing=m.gradient_checkpointing, adapter_rank=tc.adapter_rank,
                           fp8_storage=m.fp8_storage, fsdp=fsdp, allow_pickle=m.allow_pickle)
    shared_teacher = bool(tc.adapter_rank) and cfg.objective == "cfg_teacher" and not m.teacher
    teacher = None if shared_teacher else load_teacher(cfg.objective, m.teacher or start_from, compute, device,
                                                       m.allow_pickle)
    trainable = [p for p in student.parameters() if p.requires_grad]  # all of them in a full fine-tune
    return _Models(student, student, teacher, trainable, start_from)


def _dedistill(cfg: DedistillConfig, accelerator, out: Path, resume, progress: bool, say) -> dict:
    tc, m = cfg.train, cfg.model
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main, barrier, state_dir = accelerator.is_main_process, accelerator.wait_for_everyone, out / "state"
    fsdp = fsdpmod.settings_for(tc.distributed, tc.mixed_precision)  # None: DDP (or one process)
    if tc.adapter_rank and fsdp:
        raise UserError("adapter de-distillation (train.adapter_rank > 0) runs on one device or DDP, not FSDP")
    fsdpmod.warn_if_single_cpu_launch(world)
    torch.manual_seed(tc.seed)
    compute = DTYPE_CHOICES["fp32" if tc.mixed_precision == "no" else tc.mixed_precision]
    prompts = list(cfg.sample.prompts) if cfg.sample.every else []
    d = cfg.data
    with accelerator.main_process_first():  # rank 0 fills the cache first, the others then read it
        data = load_training_data(Path(m.path), device, **data_source(d, out), t5_max_length=m.t5_max_length,
                                  prompts=prompts)
    # global batches, cut identically on every rank; drop_last: a partial batch cannot be split evenly
    sampler = BucketBatchSampler(data.dataset.buckets(), d.batch_size * world, seed=tc.seed, drop_last=True)
    models = _models(cfg, accelerator, fsdp, compute)
    optimizer = build_optimizer(models.trainable, "adamw", tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.schedule)
    if not fsdp:
        models.student, optimizer = accelerator.prepare(models.student, optimizer)
        models.inner = accelerator.unwrap_model(models.student)
    if models.teacher is None and cfg.objective != "flow":
        models.teacher = WithoutAdapters(models.inner)
    ema = EMA(models.trainable, tc.ema_decay) if tc.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(tc.seed)  # shared by all ranks: dropout, noise, sigmas, w
    start, smoothed, history = 0, None, []
    if resume is not None:
        r = restore_training_state(resume, state_dir, models.inner, optimizer, scheduler, gen, sampler, ema)
        start, smoothed, history = r.step, r.smoothed, r.losses
        say(f"resumed from step {start} ({r.folder})")
    if start > tc.steps:
        raise UserError(f"{out} is at step {start}, past train.steps = {tc.steps}: set train.steps above {start}")
    say(f"dedistill ({cfg.objective}) -> {out}: steps {tc.steps}, batch {d.batch_size} x {world} process(es), "
        f"lr {tc.lr:g}; TensorBoard: tensorboard --logdir {out / 'logs'}")
    bar = Progress(tc.steps, start, "dedistill", out / "logs" if main else None, enabled=progress and main,
                   smoothed=smoothed, log_every=cfg.log_every, lines=not progress and main)

    def save_state(done: int) -> Path:
        path = save_training_state(state_dir, done, models.inner, optimizer, scheduler, gen, sampler,
                                   smoothed=bar.smoothed, grad_accum=tc.grad_accum, keep_last=cfg.save.keep_last,
                                   losses=life.finite_or_none(history), ema=ema, rank=rank, world=world,
                                   barrier=barrier, full=bool(fsdp and fsdp.full_state))
        if main:
            life.plot_losses(life.finite_or_none(history), out)
        return path

    sc = cfg.sample
    spec = GridSpec(sc.prompts, [int(s) for s in sc.seeds], data.sample_embeds, data.negative, sc.steps, sc.width,
                    sc.height)
    guidances = dedistill_guidances(models.inner.config.guidance_embeds, sc.cfg)

    def grids(done: int):
        with ema.applied() if ema is not None else contextlib.nullcontext():  # what an export now would hold
            return dedistill_grids(models.inner, spec, data.components, guidances, done, out / "samples", bar,
                                   main, accelerator.autocast, device)

    try:
        losses, skipped, t0 = _loop(cfg, accelerator, models, data, sampler, gen, optimizer, scheduler, ema, fsdp,
                                    compute, start, history, bar, save_state, grids, out)
        bar.end_bar()
        # export (EMA weights when kept), gathered from the shards to rank 0 one tensor at a time, then samples
        summary = {"losses": losses, "files": [], "steps": tc.steps, "world_size": world,
                   "seconds": time.perf_counter() - t0,
                   "distributed": "fsdp" if fsdp else ("ddp" if world > 1 else "none"), "skipped_steps": skipped}
        _export(cfg, models, ema, rank, main, out, summary, history, start, say)
        barrier()
        if sc.every:
            say("rendering final samples...")
            grids(tc.steps)
        barrier()
        return summary
    finally:
        bar.close()


def _loop(cfg, accelerator, models: _Models, data, sampler, gen, optimizer, scheduler, ema, fsdp, compute,
          start: int, history: list, bar, save_state, grids, out: Path) -> tuple[list, list, float]:
    """Steps ``start..train.steps`` with states, grids and Ctrl-C on schedule; -> (losses, skipped, start time)."""
    tc, main = cfg.train, accelerator.is_main_process
    note = bar.write if main else (lambda message: None)
    batches = batches_forever(sampler)
    losses: list[float] = []
    guard = NonFiniteGuard(tc.nan_policy, tc.nan_max_skips, lambda: life.stop_hint(out / "state", out, "dedistill"))
    t0, stop_after = time.perf_counter(), int(os.environ.get("DEV2PRO_STOP_AFTER_STEP", "0"))
    bar.start_clock()
    with stop_on_interrupt() as stop:
        for step in range(start, tc.steps):
            total, logged = _accumulate(cfg, accelerator, models, data, batches, gen, fsdp, compute)
            done = step + 1
            if guard.check(done, total, logged.get("grad_norm")):
                optimizer.step()
                if ema is not None:
                    ema.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            history.append(total)
            bar.update(done, total, scheduler.get_last_lr()[0], logged)
            last = done == tc.steps
            if cfg.save.every and (done % cfg.save.every == 0 or last):  # the last state: extend or re-export
                note(f"saved state at step {done}: {save_state(done)}")
            if cfg.sample.every and done % cfg.sample.every == 0 and not last:
                grids(done)
            if life.any_rank(stop.requested, accelerator) and not last:
                note(f"interrupted at step {done}: state saved in {save_state(done)}; resume with: "
                     f"{life.resume_hint(out, 'dedistill')}")
                raise KeyboardInterrupt
            if stop_after and done == stop_after:
                bar.close()
                os._exit(17)  # test hook: die like a killed process right after step k
    return losses, guard.skipped, t0


def _accumulate(cfg, accelerator, models: _Models, data, batches, gen, fsdp, compute) -> tuple[float, dict]:
    """Forward + backward over ``grad_accum`` global micro-batches (this rank's slice), then clip.

    Returns the step's loss (the global batch's: the mean over ranks) and the logged parts; ``grad_norm`` is the
    global norm, so every rank takes the same non-finite decision."""
    tc, rank, world, device = cfg.train, accelerator.process_index, accelerator.num_processes, accelerator.device
    w_range = (cfg.teacher.w_min, cfg.teacher.w_max) if models.teacher is not None else None
    total, logged = 0.0, {}
    for micro in range(tc.grad_accum):
        if fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            models.student.set_requires_gradient_sync(micro == tc.grad_accum - 1)
        indices = next(batches)
        per = len(indices) // world
        batch = draw(collate([data.dataset[i] for i in indices[rank * per:(rank + 1) * per]]), gen,
                     dropout_p=cfg.data.caption_dropout, empty=data.empty, timestep_sampling=tc.timestep_sampling,
                     sigmoid_scale=tc.sigmoid_scale, shift=tc.shift, w_range=w_range, rank=rank, world=world)
        with accelerator.autocast():  # the student computes in fp32 under autocast
            loss, parts = objective_loss(cfg.objective, models.student, models.teacher, batch, data.empty, device,
                                         torch.float32, compute, flow_weight=cfg.teacher.flow_weight)
        accelerator.backward(loss / tc.grad_accum)
        total += accelerator.reduce(loss.detach(), "mean").item() / tc.grad_accum
        for k, v in parts.items():
            logged[k] = logged.get(k, 0.0) + v.item() / tc.grad_accum
    if tc.max_grad_norm > 0:
        logged["grad_norm"] = clip_grad_norm(models.student.parameters(), tc.max_grad_norm) if fsdp else \
            float(accelerator.clip_grad_norm_(models.student.parameters(), tc.max_grad_norm))
    return total, logged


def _export(cfg, models: _Models, ema, rank: int, main: bool, out: Path, summary: dict, history, start, say):
    """Gather the (EMA) weights to rank 0 and export them; a full disk keeps the last state and says so."""
    adapter, sv = cfg.train.adapter_rank, cfg.save  # adapter de-distillation: the LoRA alone, as adapter files
    state = {} if adapter else final_weights(models.inner, ema, DTYPE_CHOICES[sv.dtype], rank)
    if not main:
        return
    meta = {"dev2pro.recipe": "dedistill", "dev2pro.objective": cfg.objective, "dev2pro.steps": str(cfg.train.steps),
            "dev2pro.ema_decay": str(cfg.train.ema_decay), "dev2pro.start": Path(models.start_from).name}
    if adapter:
        files = export_adapter(models.inner, ema, out, sv.name, {**meta, "dev2pro.adapter_rank": str(adapter)})
    else:
        files = export_or_keep_state(state, out, sv.name, sv.formats, sv.dtype, sv.keep_guidance, meta, out / "state",
                                     life.resume_hint(out, "dedistill"))
    life.plot_losses(life.finite_or_none(history), out)
    say(f"exported: {', '.join(str(f) for f in files)}; loss curve: {out / 'loss.png'}")
    summary["files"] = [str(f) for f in files]
    write_json(out / "summary.json", {**summary, "losses": life.finite_or_none(summary["losses"]),
                                      "steps_per_second": (cfg.train.steps - start) / max(summary["seconds"], 1e-9)})


def main(argv=None) -> int:
    """``python -m dev2pro.recipes.dedistill CONFIG`` (for torchrun -m before the CLI wires the subcommand)."""
    parser = argparse.ArgumentParser(prog="dev2pro")
    add_dedistill(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dedistill", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
