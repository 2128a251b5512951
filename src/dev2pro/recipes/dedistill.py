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

The story: config -> data (cached folders via the LoRA recipe's steps, or shards from `dev2pro cache`) -> student
(+ teacher) -> loop (loss, clip, AdamW, warmup/cosine, EMA, TensorBoard, sample grids at guidance 1 and true CFG,
resumable state) -> export through `flux.checkpoint.convert`: a BFL file (default), a diffusers folder and/or fp8.
The steps (objectives, data, state, samples, export) live in ``dedistill_steps``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SIZE_HELP, load_config, opt, render_toml, require, resolve_size, section
from ..errors import UserError
from ..outputs import write_json, write_text
from . import dedistill_steps as ds
from . import train_steps as steps
from .dedistill_steps import (COMPUTE_DTYPES, cfg_teacher_objective, export_model, flow_objective,
                              guidance_distill_objective, with_guidance_embedding)
from .train_lora import DataSection, TrainSection, quiet_libraries

__all__ = ["dedistill", "load_dedistill_config", "DedistillConfig", "flow_objective", "cfg_teacher_objective",
           "guidance_distill_objective", "with_guidance_embedding", "export_model"]  # the maths live in the steps

EXPORT_FORMATS = ("bfl", "diffusers", "fp8")
OBJECTIVES = ("flow", "cfg_teacher", "guidance_distill")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ModelSection:
    path: str = opt("", "model folder in the FLUX.1-dev diffusers layout (text encoders, tokenizers, VAE)")
    transformer: str = opt("", "start weights (any layout); empty = the folder's transformer")
    teacher: str = opt("", "cfg_teacher: the frozen guidance-distilled teacher (empty = the start weights); "
                           "guidance_distill: the CFG teacher (required)")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (needed at full size)")
    fp8_storage: bool = opt(False, "with train.adapter_rank: keep the frozen base in fp8 (bf16 compute)")
    t5_max_length: int = opt(512, "T5 tokens (512 for dev)")
    allow_pickle: bool = opt(False, "allow .ckpt/.pt model files (they can run code)")

    def validate(self):
        require(bool(self.path), "path: set model.path to a FLUX.1-dev-layout model folder")
        require(0 < self.t5_max_length <= 512, "t5_max_length must be in 1..512")


@dataclass
class DedistillData(DataSection):
    shards: str = opt("", "index.json written by `dev2pro cache` (used instead of [[data.folders]])")

    def validate(self):
        require(bool(self.folders) or bool(self.shards), "folders: add [[data.folders]] or set data.shards")
        require(0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)")
        require(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass
class TeacherSection:
    w_min: float = opt(1.0, "lowest CFG scale drawn per sample")
    w_max: float = opt(5.0, "highest CFG scale drawn per sample")
    flow_weight: float = opt(0.0, "weight of an extra flow-matching loss on the student's conditional output")

    def validate(self):
        require(0.0 <= self.w_min <= self.w_max, "w_min must be in [0, w_max]")
        require(self.flow_weight >= 0.0, "flow_weight must be >= 0")


@dataclass
class DedistillTrain(TrainSection):
    lr: float = opt(1e-5, "learning rate (full fine-tune: much lower than LoRA)")
    schedule: str = opt("cosine", "LR schedule after warmup", ("constant", "cosine", "linear"))
    warmup_steps: int = opt(100, "linear LR warmup steps")
    mixed_precision: str = opt("bf16", "autocast compute dtype over fp32 master weights", ("no", "bf16", "fp16"))
    ema_decay: float = opt(0.999, "EMA of the weights (0 = off); exported instead of the raw weights")
    distributed: str = opt("auto", "auto: FSDP under an accelerate FSDP config, else DDP; fsdp: shard each Flux "
                                   "block (e.g. under torchrun); ddp: replicate", ("auto", "ddp", "fsdp"))
    adapter_rank: int = opt(0, "> 0: de-distill as a LoRA of this rank on every linear of the frozen start model "
                               "(one base, fp8 possible) and export it as a training adapter (kohya + diffusers)")

    def validate(self):
        super().validate()
        require(self.guidance == 1.0, "guidance: the student trains at guidance 1.0 (the Dev2Pro recipe)")
        require(self.optimizer == "adamw", "optimizer: only adamw is supported for full fine-tunes here")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(self.adapter_rank >= 0, "adapter_rank must be >= 0 (0 = full fine-tune)")
        require(not (self.adapter_rank and self.distributed == "fsdp"),
                "distributed: adapter de-distillation (adapter_rank > 0) runs on one device or DDP; FSDP shards "
                "full fine-tunes")


@dataclass
class SampleSection:
    every: int = opt(0, "sample grids every N steps and at the end (0 = off)")
    prompts: list = opt([], "one grid row per prompt")
    seeds: list = opt([0], "one grid column per seed")
    steps: int = opt(20, "sampling steps")
    width: int = opt(512, "sample width (multiple of 16)")
    height: int = opt(512, "sample height (multiple of 16)")
    size: str = opt("", SIZE_HELP + "; the same as width/height, which it replaces")
    guidance: float = opt(3.5, "true-CFG scale of the second grid (the first is at guidance 1.0, no CFG)")

    def validate(self):
        resolve_size(self)
        require(self.every >= 0, "every must be >= 0")
        require(not self.every or bool(self.prompts), "prompts: set sample prompts (or sample.every = 0)")
        require(bool(self.seeds), "seeds: give at least one seed")
        require(self.width % 16 == 0 and self.height % 16 == 0, "width/height must be multiples of 16")
        require(self.steps > 0, "steps must be > 0")
        require(self.guidance >= 1.0, "guidance: the true-CFG scale must be >= 1")


@dataclass
class SaveSection:
    output_dir: str = opt("", "run folder: exported model, state, logs, resolved config")
    name: str = opt("dev2pro", "file name stem of the exported model")
    every: int = opt(0, "save resumable state every N steps (0 = off)")
    keep_last: int = opt(2, "training states kept for resume")
    formats: list = opt(["bfl"], "exports: bfl (single file), diffusers (transformer folder), fp8 (BFL fp8-scaled)")
    dtype: str = opt("bf16", "dtype of the bfl/diffusers exports", ("bf16", "fp16", "fp32"))
    keep_guidance: bool = opt(True, "keep the guidance embedding; false = pro-like model sampled with true CFG")
    overwrite: bool = opt(False, "allow reusing an output_dir that holds another run")

    def validate(self):
        require(bool(self.output_dir), "output_dir: set save.output_dir")
        for f in self.formats:
            require(f in EXPORT_FORMATS, f"formats: unknown export {f!r} ({'|'.join(EXPORT_FORMATS)})")


@dataclass
class DedistillConfig:
    objective: str = opt("flow", "flow: flow matching at guidance 1; cfg_teacher: match dev's guidance with CFG; "
                                 "guidance_distill: make a dev-like student from a CFG teacher",
                         OBJECTIVES)
    model: ModelSection = section(ModelSection, "base model")
    data: DedistillData = section(DedistillData, "dataset: folders (cached on the fly) or cache shards")
    teacher: TeacherSection = section(TeacherSection, "cfg_teacher objective")
    train: DedistillTrain = section(DedistillTrain, "optimisation")
    sample: SampleSection = section(SampleSection, "sample grids during training")
    save: SaveSection = section(SaveSection, "outputs")
    log_every: int = opt(10, "TensorBoard scalar interval and, with --no-progress, progress-line interval (steps)")

    def validate(self):
        require(not (self.train.adapter_rank and self.objective == "guidance_distill"),
                "objective: adapter de-distillation (train.adapter_rank > 0) supports flow and cfg_teacher")
        require(not (self.model.fp8_storage and not self.train.adapter_rank),
                "fp8_storage: only a frozen base can be stored in fp8; set train.adapter_rank > 0")


def load_dedistill_config(path, overrides=None, data=None) -> DedistillConfig:
    cfg = load_config(DedistillConfig, path, overrides, data)
    base = Path(path).parent if path else Path(".")
    # relative paths are relative to the config file, not to where the command runs
    for obj, name in [(cfg.model, "path"), (cfg.model, "transformer"), (cfg.model, "teacher"),
                      (cfg.save, "output_dir"), (cfg.data, "cache_dir"), (cfg.data, "shards")] + \
            [(f, "path") for f in cfg.data.folders]:
        value = getattr(obj, name)
        if value and not Path(value).is_absolute():
            setattr(obj, name, str((base / value).resolve()))
    return cfg


# ------------------------------------------------------------------------------------------------ recipe
def dedistill(cfg: DedistillConfig, resume: str | None = None, progress: bool = True) -> dict:
    """Run the whole job; returns a summary (losses, exported files).

    The run folder is locked by the main process; Ctrl-C saves a resumable state at the end of the step; with
    ``save.every`` set the last step saves one too, so an export that fails (full disk) or a larger ``train.steps``
    continues with ``--resume``.
    """
    from accelerate import Accelerator

    from ..train.run import RunLock, clean_stale_temps

    quiet_libraries()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    out, main = Path(cfg.save.output_dir), accelerator.is_main_process
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    lock = None
    try:
        if main:
            lock = RunLock.acquire(out)
            clean_stale_temps(out)  # a killed run's half-written files (we hold the lock: nobody writes them)
            steps.prepare_output_dir(out, resume, cfg.save.overwrite, say)
            write_text(out / "config.toml", render_toml(cfg))
        accelerator.wait_for_everyone()
        return _dedistill(cfg, accelerator, out, resume, progress, say)
    finally:
        if lock is not None:
            lock.release()


def _dedistill(cfg: DedistillConfig, accelerator, out: Path, resume, progress: bool, say) -> dict:
    from ..data.loader import BucketBatchSampler
    from ..train.ema import EMA
    from ..train.optim import build_optimizer, build_scheduler
    from ..train.progress import Progress
    from ..train.run import NonFiniteGuard, stop_on_interrupt
    from . import train_run as run

    tc = cfg.train
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main, barrier = accelerator.is_main_process, accelerator.wait_for_everyone
    fsdp = ds.fsdp_settings(tc.distributed, tc.mixed_precision)  # None: DDP (or one process)
    ds.warn_if_single_cpu_launch(world)
    state_dir = out / "state"
    torch.manual_seed(tc.seed)
    compute = COMPUTE_DTYPES[tc.mixed_precision]

    # 1. data (rank 0 fills the cache first, the others then read it)
    with accelerator.main_process_first():
        data = ds.load_data(cfg, out, device)
    # global batches, cut identically on every rank; drop_last: a partial batch cannot be split evenly
    sampler = BucketBatchSampler(data.buckets, cfg.data.batch_size * world, seed=tc.seed, drop_last=True)

    # 2. student: every weight trainable, fp32 master copy (autocast computes in bf16), FSDP2 shards when sharding;
    #    the frozen teacher is a replica on every rank
    #    (adapter de-distillation: a frozen base + a trainable LoRA; the cfg teacher is the base with the LoRA off)
    if tc.adapter_rank and fsdp:
        raise UserError("adapter de-distillation (train.adapter_rank > 0) runs on one device or DDP, not FSDP")
    student, start_from = ds.load_student(cfg, fsdp, device, compute)
    shared_teacher = bool(tc.adapter_rank) and cfg.objective == "cfg_teacher" and not cfg.model.teacher
    teacher = None if shared_teacher else ds.load_teacher(cfg, start_from, compute, device)
    trainable = [p for p in student.parameters() if p.requires_grad]  # all of them in a full fine-tune
    optimizer = build_optimizer(trainable, "adamw", tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.schedule)
    if not fsdp:
        student, optimizer = accelerator.prepare(student, optimizer)
    inner = student if fsdp else accelerator.unwrap_model(student)
    if shared_teacher:
        from ..lora.adapter import WithoutAdapters

        teacher = WithoutAdapters(inner)
    ema = EMA(trainable, tc.ema_decay) if tc.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(tc.seed)  # shared by all ranks: dropout, noise, sigmas, w
    start, smoothed, history = 0, None, []
    if resume is not None:
        start, smoothed, history = ds.restore(resume, state_dir, inner, optimizer, scheduler, ema, gen, sampler)
        say(f"resumed from step {start} ({ds.resumed_folder(resume, state_dir)})")
    if start > tc.steps:
        raise UserError(f"{out} is at step {start}, past train.steps = {tc.steps}: set train.steps above {start}")
    batches = steps.batches_forever(sampler)
    say(f"dedistill ({cfg.objective}) -> {out}: steps {tc.steps}, batch {cfg.data.batch_size} x {world} "
        f"process(es), lr {tc.lr:g}; TensorBoard: tensorboard --logdir {out / 'logs'}")

    def save_state(done: int) -> Path:
        path = ds.save_state(state_dir, done, inner, optimizer, scheduler, ema, gen, sampler, bar.smoothed,
                             tc.grad_accum, cfg.save.keep_last, rank, world, barrier,
                             full=bool(fsdp and fsdp.full_state), losses=run.finite_or_none(history))
        if main:
            run.plot_losses(run.finite_or_none(history), out)
        return path

    def grids(done: int):
        with ema.applied() if ema is not None else contextlib.nullcontext():  # what an export now would hold
            return ds.sample_grids(inner, data, cfg.sample, done, out / "samples", bar, main, accelerator.autocast,
                                   device)

    bar = Progress(tc.steps, start, "dedistill", out / "logs" if main else None, enabled=progress and main,
                   smoothed=smoothed, log_every=cfg.log_every, lines=not progress and main)
    note = bar.write if main else say
    losses: list[float] = []
    guard = NonFiniteGuard(tc.nan_policy, tc.nan_max_skips, lambda: run.stop_hint(state_dir, out).replace(
        "dev2pro train", "dev2pro dedistill"))
    t0, stop_after = time.perf_counter(), int(os.environ.get("DEV2PRO_STOP_AFTER_STEP", "0"))
    bar.start_clock()
    try:
        with stop_on_interrupt() as stop:
            for step in range(start, tc.steps):
                total, logged = _accumulate(cfg, accelerator, student, teacher, data, batches, gen, fsdp, compute)
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
                if ds.any_rank(stop.requested, accelerator) and not last:
                    note(f"interrupted at step {done}: state saved in {save_state(done)}; resume with: "
                         f"dev2pro dedistill {out / 'config.toml'} --resume")
                    raise KeyboardInterrupt
                if stop_after and done == stop_after:
                    bar.close()
                    os._exit(17)  # test hook: die like a killed process right after step k

        bar.end_bar()
        note = say
        # 3. export (EMA weights when kept), gathered from the shards to rank 0 one tensor at a time, then samples
        summary = {"losses": losses, "files": [], "steps": tc.steps, "world_size": world,
                   "seconds": time.perf_counter() - t0, "distributed": "fsdp" if fsdp else ("ddp" if world > 1 else
                                                                                            "none"),
                   "skipped_steps": guard.skipped}
        _export(cfg, inner, ema, rank, main, out, start_from, summary, history, start, note)
        barrier()
        if cfg.sample.every:
            note("rendering final samples...")
            grids(tc.steps)
        barrier()
        return summary
    finally:
        bar.close()


def _accumulate(cfg, accelerator, student, teacher, data, batches, gen, fsdp, compute) -> tuple[float, dict]:
    """Forward + backward over ``grad_accum`` global micro-batches (this rank's slice), then clip.

    Returns the step's loss (the global batch's: the mean over ranks) and the logged parts; ``grad_norm`` is the
    global norm, so every rank takes the same non-finite decision."""
    from ..train.fsdp import clip_grad_norm

    tc, rank, world, device = cfg.train, accelerator.process_index, accelerator.num_processes, accelerator.device
    total, logged = 0.0, {}
    for micro in range(tc.grad_accum):
        if fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            student.set_requires_gradient_sync(micro == tc.grad_accum - 1)
        x0, noise, sigmas, w_scale, text = ds.global_batch(data.dataset, next(batches), rank, world, data.empty,
                                                           cfg.data.caption_dropout, gen, teacher is not None,
                                                           cfg.teacher, tc)
        with accelerator.autocast():
            loss, parts = ds.objective_loss(cfg, student, teacher, x0, noise, sigmas, w_scale, text, data.empty,
                                            device, compute)
        accelerator.backward(loss / tc.grad_accum)
        total += accelerator.reduce(loss.detach(), "mean").item() / tc.grad_accum
        for k, v in parts.items():
            logged[k] = logged.get(k, 0.0) + v.item() / tc.grad_accum
    if tc.max_grad_norm > 0:
        logged["grad_norm"] = clip_grad_norm(student.parameters(), tc.max_grad_norm) if fsdp else \
            float(accelerator.clip_grad_norm_(student.parameters(), tc.max_grad_norm))
    return total, logged


def _export(cfg, inner, ema, rank: int, main: bool, out: Path, start_from, summary: dict, history, start, note):
    """Gather the (EMA) weights to rank 0 and export them; a full disk keeps the last state and says so."""
    from . import train_run as run

    adapter = cfg.train.adapter_rank  # adapter de-distillation: the LoRA alone, as adapter files (one process/DDP)
    state = {} if adapter else ds.final_weights(inner, ema, COMPUTE_DTYPES["no" if cfg.save.dtype == "fp32" else
                                                                           cfg.save.dtype], rank)
    if not main:
        return
    meta = {"dev2pro.recipe": "dedistill", "dev2pro.objective": cfg.objective, "dev2pro.steps": str(cfg.train.steps),
            "dev2pro.ema_decay": str(cfg.train.ema_decay), "dev2pro.start": Path(start_from).name}
    if adapter:
        files = ds.export_adapter(inner, ema, out, cfg.save.name, {**meta, "dev2pro.adapter_rank": str(adapter)})
    else:
        files = ds.export_or_keep_state(state, out, cfg.save, meta, out / "state")
    run.plot_losses(run.finite_or_none(history), out)
    note(f"exported: {', '.join(str(f) for f in files)}; loss curve: {out / 'loss.png'}")
    summary["files"] = [str(f) for f in files]
    write_json(out / "summary.json", {**summary, "losses": run.finite_or_none(summary["losses"]),
                                      "steps_per_second": (cfg.train.steps - start) / max(summary["seconds"], 1e-9)})


def add_dedistill_parser(sub):
    """The `dedistill` subcommand (built in cli_commands, which imports nothing heavy)."""
    from ..cli_commands import add_dedistill

    add_dedistill(sub)


def main(argv=None) -> int:
    """``python -m dev2pro.recipes.dedistill CONFIG`` (for torchrun -m before the CLI wires the subcommand)."""
    import argparse

    parser = argparse.ArgumentParser(prog="dev2pro")
    add_dedistill_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dedistill", *(argv if argv is not None else __import__("sys").argv[1:])])
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
