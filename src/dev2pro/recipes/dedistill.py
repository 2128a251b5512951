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
  a file without guidance embedding gets one, initialised to add nothing (it starts as the teacher); a FLUX.2
  student gets one only for a CFG range (``teacher.w_min < w_max``), one scale keeps klein's form. `dev2pro demo`
  makes its toy devs this way. Cost: 3 forwards per step (teacher at 2B, no grad; student at B, with grad).

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
``flux.convert.convert`` (``train.export``): a BFL file (default), a diffusers folder and/or fp8."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..config import render_toml
from ..data.loader import BucketBatchSampler, batches_forever
from ..data.prepare import load_training_data
from ..errors import UserError
from ..flux.checkpoint import DTYPE_CHOICES, open_checkpoint
from ..lora.adapter import WithoutAdapters
from ..noise import quiet_libraries
from ..outputs import write_json
from ..schemas import DedistillConfig, data_source
from ..train import fsdp as fsdpmod
from ..train import lifecycle as life, resuming
from ..train.datacheck import DataCheck
from ..train.ema import EMA
from ..train.export import export_adapter, export_or_keep_state, final_weights
from ..train.model import load_student, load_teacher
from ..train.rope import use_fused_rope
from ..train.optim import build_optimizer, build_scheduler
from ..train.preflight import check_resume, check_training_inputs
from ..train.progress import Progress
from ..train.loop import Draws, Events, Objective, Optimization, run_steps, step_loss
from ..train.run import NonFiniteGuard, RunFolder, RunLock, clean_stale_temps
from ..train.samples import GridSpec, dedistill_grids, dedistill_guidances
from ..train.state import restore_training_state, save_training_state

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ recipe
def dedistill(cfg: DedistillConfig, resume: str | None = None, progress: bool = True,
              changed_data: bool = False) -> dict:
    """Run the whole job; returns a summary (losses, exported files). ``changed_data``: see ``train.datacheck``.

    The run folder is locked by the main process; Ctrl-C saves a resumable state at the end of the step; with
    ``save.every`` set the last step saves one too, so an export that fails (full disk) or a larger ``train.steps``
    continues with ``--resume``."""
    m = cfg.model  # inputs that do not fit each other: one line now, before the run folder exists
    check_training_inputs(m.transformer or m.path, m.path, shards=cfg.data.shards,
                          needs_text=not cfg.data.shards or bool(cfg.sample.every), allow_pickle=m.allow_pickle,
                          family=m.family, text_dtype=m.text_encoder_dtype,
                          teacher=m.teacher if cfg.objective != "flow" else "", folders=cfg.data.folders)
    _check_exports(cfg)
    quiet_libraries()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    run, main = RunFolder(Path(cfg.save.output_dir), "dedistill"), accelerator.is_main_process
    check_resume(resume, run, m.transformer or m.path, cfg.train.adapter_rank, family=m.family)
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    lock = None
    try:
        if main:
            lock = RunLock.acquire(run.root)
            clean_stale_temps(run.root)  # a killed run's half-written files (we hold the lock: nobody writes them)
            life.prepare_output_dir(run, resume, cfg.save.overwrite, say, [cfg.save.name])
            resuming.write_config(run, resume, render_toml(cfg), say)  # on resume: what changed, the old one kept
        accelerator.wait_for_everyone()
        return _dedistill(cfg, accelerator, run, resume, progress, say, changed_data)
    finally:
        if lock is not None:
            life.release(run, lock, say)


def _check_exports(cfg: DedistillConfig) -> None:
    """What the run will write, checked now (a header read), not after hours of training; unused settings, said."""
    sv, m = cfg.save, cfg.model
    if cfg.objective == "flow" and m.teacher:
        log.warning("model.teacher is not used: the flow objective trains on the data alone (cfg_teacher uses it)")
    if cfg.train.adapter_rank:  # the adapter alone is exported: the full model's export settings do not apply
        if sv.formats != ["bfl"] or sv.dtype != "bf16" or not sv.keep_guidance:
            log.warning("save.formats / save.dtype / save.keep_guidance apply to a full de-distillation; adapter "
                        "de-distillation (train.adapter_rank) exports the adapter: NAME.safetensors and "
                        "NAME.diffusers.safetensors")
        return
    family = open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle, family=m.family).family
    if not sv.keep_guidance and family.name != "flux1":
        raise UserError(f"save.keep_guidance = false drops FLUX.1's guidance embedding; this base is "
                        f"{family.title}, whose export keeps it: set save.keep_guidance = true")


@dataclass
class _Models:
    student: torch.nn.Module  # as the loop calls it (DDP-wrapped when replicated)
    inner: torch.nn.Module  # the module itself (FSDP shards in place)
    teacher: object
    trainable: list
    start_from: str


def _models(cfg: DedistillConfig, accelerator, fsdp, compute, family) -> _Models:
    """Student (every weight trainable, fp32 master copy, FSDP2 shards when sharding; or a LoRA on a frozen base)
    and the frozen teacher (a replica on every rank; with an adapter and no teacher file: the base, LoRA off)."""
    m, tc, device = cfg.model, cfg.train, accelerator.device
    # FLUX.1's dev got a guidance embedding from pro, and so does a FLUX.2 student asked for a CFG range (FLUX.2
    # dev's form); with one fixed scale (teacher.w_min == teacher.w_max) a FLUX.2 student keeps none: klein's
    # distilled form. A student that has an embedding already keeps it (``load_student`` grows only when missing).
    grow = cfg.objective == "guidance_distill" and (family.name == "flux1" or cfg.teacher.w_min != cfg.teacher.w_max)
    if grow and family.name != "flux1" and (Path(m.path) / "model_index.json").is_file():
        try:  # the grown model is a FLUX.2 dev: its folder must hold dev's text stack (not klein's Qwen3)
            family.check_folder(Path(m.path), open_checkpoint(m.transformer or m.path).spec().with_guidance())
        except UserError as e:
            raise UserError(f"teacher.w_min/w_max: a CFG range grows a guidance embedding (FLUX.2 dev's form), but "
                            f"{e}; set teacher.w_min = teacher.w_max for klein's one-scale form") from None
    start_from = m.transformer or m.path
    use_fused_rope(tc.fused_rope)  # student and teacher alike: one process-wide switch (train/rope.py)
    student = load_student(start_from, device, compute, grow_guidance=grow,
                           gradient_checkpointing=m.gradient_checkpointing, adapter_rank=tc.adapter_rank,
                           fp8_storage=m.fp8_storage, fsdp=fsdp, allow_pickle=m.allow_pickle,
                           blocks_to_swap=m.blocks_to_swap)
    shared_teacher = bool(tc.adapter_rank) and cfg.objective == "cfg_teacher" and not m.teacher
    teacher = None if shared_teacher else load_teacher(cfg.objective, m.teacher or start_from, compute, device,
                                                       m.allow_pickle)
    trainable = [p for p in student.parameters() if p.requires_grad]  # all of them in a full fine-tune
    return _Models(student, student, teacher, trainable, start_from)


def _dedistill(cfg: DedistillConfig, accelerator, run: RunFolder, resume, progress: bool, say, changed_data) -> dict:
    tc = cfg.train
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main, barrier = accelerator.is_main_process, accelerator.wait_for_everyone
    fsdp = fsdpmod.settings_for(tc.distributed, tc.mixed_precision)  # None: DDP (or one process)
    if tc.adapter_rank and fsdp:
        raise UserError("adapter de-distillation (train.adapter_rank > 0) runs on one device or DDP, not FSDP")
    fsdpmod.warn_if_single_cpu_launch(world)
    torch.manual_seed(tc.seed)
    compute = DTYPE_CHOICES["fp32" if tc.mixed_precision == "no" else tc.mixed_precision]
    data, family = _data(cfg, accelerator, run)
    # global batches, cut identically on every rank; drop_last: a partial batch cannot be split evenly
    sampler = BucketBatchSampler(data.dataset.buckets(), cfg.data.batch_size * world, seed=tc.seed, drop_last=True)
    models = _models(cfg, accelerator, fsdp, compute, family)
    optimizer = build_optimizer(models.trainable, "adamw", tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.schedule)
    if not fsdp:
        swapped = getattr(models.student, "block_swap", None) is not None  # placed by load_student already
        models.student, optimizer = accelerator.prepare(models.student, optimizer, device_placement=[not swapped, True])
        models.inner = accelerator.unwrap_model(models.student)
    if models.teacher is None and cfg.objective != "flow":
        models.teacher = WithoutAdapters(models.inner)
    ema = EMA(models.trainable, tc.ema_decay) if tc.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(tc.seed)  # shared by all ranks: dropout, noise, sigmas, w
    start, smoothed, history, check = 0, None, [], DataCheck.of(data.dataset, changed_data, tc.grad_accum)
    if resume is not None:
        r = restore_training_state(resume, run.state, models.inner, optimizer, scheduler, gen, sampler, ema,
                                   rank_setting="train.adapter_rank", recipe="dedistill", data=check)
        start, smoothed, history = r.step, r.smoothed, r.losses
        resuming.announce(r, run, tc.steps, say)  # a state past train.steps: refused before the resumed line
    say(f"dedistill ({cfg.objective}) -> {run.root}: steps {tc.steps}, batch {cfg.data.batch_size} x {world} "
        f"process(es), lr {tc.lr:g}; TensorBoard: tensorboard --logdir {run.logs}")
    bar = Progress(tc.steps, start, "dedistill", run.logs if main else None, enabled=progress and main,
                   smoothed=smoothed, log_every=cfg.log_every, lines=not progress and main)
    note = bar.write if main else (lambda message: None)

    def save_state(done: int) -> Path:
        path = save_training_state(run.state, done, models.inner, optimizer, scheduler, gen, sampler,
                                   smoothed=bar.smoothed, grad_accum=tc.grad_accum, keep_last=cfg.save.keep_last,
                                   losses=life.finite_or_none(history), ema=ema, rank=rank, world=world,
                                   barrier=barrier, full=bool(fsdp and fsdp.full_state), recipe="dedistill",
                                   data=check.fingerprint)
        if main:
            life.plot_losses(life.finite_or_none(history), run)
        return path

    sc = cfg.sample
    spec = GridSpec(sc.prompts, [int(s) for s in sc.seeds], data.sample_embeds, data.negative, sc.steps, sc.width,
                    sc.height)
    guidances = dedistill_guidances(models.inner.config.guidance_embeds, sc.cfg)

    def grids(done: int):
        with ema.applied() if ema is not None else contextlib.nullcontext():  # what an export now would hold
            return dedistill_grids(models.inner, spec, data.components, guidances, done, run.samples, bar,
                                   main, accelerator.autocast, device)

    objective, opt, draws = _step_parts(cfg, models, optimizer, scheduler, ema, fsdp, compute)
    events = _events(cfg, note, save_state, grids, run, accelerator)
    batches = batches_forever(sampler)
    try:
        # the student computes in fp32 under autocast
        result = run_steps(start, tc.steps, lambda: step_loss(opt, objective, draws, data, batches, gen,
                                                              accelerator, torch.float32, rank, world),
                           opt, NonFiniteGuard(tc.nan_policy, tc.nan_max_skips, lambda: life.stop_hint(run)), bar,
                           events, history)
        bar.end_bar()
        # export (EMA weights when kept), gathered from the shards to rank 0 one tensor at a time, then samples
        summary = {"losses": result.losses, "files": [], "steps": tc.steps, "session_steps": tc.steps - start,
                   "world_size": world, "seconds": result.seconds, "skipped_steps": result.skipped,  # this session's
                   "distributed": "fsdp" if fsdp else ("ddp" if world > 1 else "none")}
        _export(cfg, models, ema, rank, main, run, summary, history, start, say)
        barrier()
        if sc.every:
            _final_grids(grids, tc.steps, say)
        barrier()
        return summary
    finally:
        bar.close()


def _data(cfg: DedistillConfig, accelerator, run: RunFolder):
    """(training data, model family): the family read off the start weights' header, the data cached by rank 0
    first (the others then read the cache)."""
    m = cfg.model
    header = open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle, family=m.family)
    with accelerator.main_process_first():
        data = load_training_data(Path(m.path), accelerator.device, **data_source(cfg.data, run.root),
                                  t5_max_length=m.t5_max_length, family=header.family, spec=header.spec(),
                                  text_device=torch.device("cpu") if m.text_encoder == "cpu" else accelerator.device,
                                  text_dtype=DTYPE_CHOICES[m.text_encoder_dtype],
                                  prompts=list(cfg.sample.prompts) if cfg.sample.every else [])
    return data, header.family


def _final_grids(grids, steps: int, say) -> None:
    """The grids after the export, with a line before and after (as every grid of the loop gets its line)."""
    say("rendering final samples...")
    if paths := grids(steps):  # the main process's grids (other ranks render and write none)
        say(f"samples: {', '.join(str(p) for p in paths)}")


def _step_parts(cfg: DedistillConfig, models: _Models, optimizer, scheduler, ema, fsdp, compute):
    """(Objective, Optimization, Draws) of a de-distillation step: the objective's teacher and CFG-scale range, the
    trainable side (EMA, FSDP), how batches are drawn."""
    tc = cfg.train
    teacher = models.teacher if cfg.objective != "flow" else None
    objective = Objective(cfg.objective, teacher=teacher, teacher_dtype=compute, flow_weight=cfg.teacher.flow_weight,
                          w_range=(cfg.teacher.w_min, cfg.teacher.w_max) if teacher is not None else None)
    opt = Optimization(models.student, models.trainable, optimizer, scheduler, tc.grad_accum, tc.max_grad_norm,
                       ema=ema, fsdp=bool(fsdp))
    return objective, opt, Draws(cfg.data.caption_dropout, tc.timestep_sampling, tc.sigmoid_scale, tc.shift)


def _events(cfg: DedistillConfig, note, save_state, grids, run: RunFolder, accelerator) -> Events:
    """States every ``save.every`` steps and after the last one, grids every ``sample.every``, Ctrl-C on any rank."""
    return Events(
        save=lambda done: note(f"saved state at step {done}: {save_state(done)}"), save_every=cfg.save.every,
        save_last=True,  # the last state: extend the run, or export again after a failed export
        sample=grids, sample_every=cfg.sample.every,
        interrupted=lambda done: note(f"interrupted at step {done}: state saved in {save_state(done)}; resume "
                                      f"with: {run.resume_hint()}"),
        any_rank=lambda flag: life.any_rank(flag, accelerator))


def _export(cfg, models: _Models, ema, rank: int, main: bool, run: RunFolder, summary: dict, history, start,
            say):
    """Gather the (EMA) weights to rank 0 and export them; a full disk keeps the last state and says so."""
    adapter, sv = cfg.train.adapter_rank, cfg.save  # adapter de-distillation: the LoRA alone, as adapter files
    state = {} if adapter else final_weights(models.inner, ema, DTYPE_CHOICES[sv.dtype], rank)
    if not main:
        return
    meta = {"dev2pro.recipe": "dedistill", "dev2pro.objective": cfg.objective, "dev2pro.steps": str(cfg.train.steps),
            "dev2pro.ema_decay": str(cfg.train.ema_decay), "dev2pro.start": Path(models.start_from).name,
            "dev2pro.base_guidance_embeds": str(bool(models.inner.config.guidance_embeds)).lower()}  # preflight
    if adapter:
        files = export_adapter(models.inner, ema, run.root, sv.name,
                               {**meta, "dev2pro.adapter_rank": str(adapter)})
    else:
        files = export_or_keep_state(state, run.root, sv.name, sv.formats, sv.dtype, sv.keep_guidance, meta,
                                     run.state, run.resume_hint())
    life.plot_losses(life.finite_or_none(history), run)
    say(f"exported: {', '.join(str(f) for f in files)}; loss curve: {run.loss_plot}")
    summary["files"] = [str(f) for f in files]
    write_json(run.summary, {**summary, "losses": life.finite_or_none(history),  # the whole run's, resumed or not
                                      "steps_per_second": summary["session_steps"] / max(summary["seconds"], 1e-9)})
