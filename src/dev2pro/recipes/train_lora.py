"""`dev2pro train CONFIG.toml`: train a Flux LoRA on a (de-distilled) base at guidance 1.0, sample it on dev.

The story, top to bottom: resolve the config and output folder -> scan the dataset and pick buckets -> cache
latents and text embeddings (then free the VAE and text encoders) -> load the base transformer (any layout,
optionally fp8 storage) -> add the LoRA with peft -> epoch settings as steps -> loop: flow-matching loss at the
fixed guidance, AdamW, progress, samples on the inference base, LoRA files and resumable state every N steps."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from ..arguments import model_name
from ..config import render_toml
from ..data.loader import BucketBatchSampler, batches_forever, prefetch_batches
from ..data.prepare import load_training_data
from ..flux.checkpoint import DTYPE_CHOICES, open_checkpoint
from ..lora import adapter as adaptermod
from ..lora.formats import kohya_dataset_fields, kohya_metadata
from ..lora.peft_adapters import check_layouts, kohya_fields as adapter_fields
from ..noise import quiet_libraries
from ..outputs import write_json
from ..schemas import TrainConfig, data_source, plan_inputs
from ..recipe_inputs import attention_backend, gradient_checkpointing, references_per_image
from ..train import epochs, lifecycle as life, resuming
from ..train.datacheck import DataCheck
from ..train.export import lora_paths, save_lora_files
from ..train.preflight import check_resume, check_training_inputs, print_plan
from ..train.model import add_lora, check_blocks_to_swap, load_base, place_base
from ..train.optim import build_optimizer, build_scheduler
from ..train.compiled import CompileStats
from ..train.precision import lora_in_compute_dtype
from ..train.progress import Progress
from ..train.loop import Draws, Events, Objective, Optimization, run_steps, step_loss
from ..train.run import NonFiniteGuard, RunFolder, RunLock, clean_stale_temps
from ..train.samples import GridSpec, LoraSampler, samples_line
from ..train.startup import dataset_lines, guidance_line, guidance_warnings, saves_line, steps_line
from ..train.state import restore_training_state, save_training_state
from ..train.validation import Holdout
from ..train.watch import check_inputs, make_watch, open_sinks

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ recipe
@dataclass
class _Run:
    """How this run saves and samples (closures over its model, optimizer and folders)."""
    save_lora: Callable[[str], list]
    save_state: Callable[[int], Path]
    sample: Callable[[int], Path]
    describe: Callable[[], str]  # what one round of samples renders
    record: dict = field(default_factory=dict)  # summary.json's record of the epoch settings (train.epochs)


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True, quiet: bool = False,
          changed_data: bool = False) -> dict:
    """Run the whole job; returns a summary (losses, paths). ``quiet``: no console lines (the demo's workers);
    ``changed_data``: a resume continues on a dataset that changed since its state (``train.datacheck``).

    One process trains in a run folder at a time (a lock file). Ctrl-C saves a resumable state at the end of the
    step; the last step saves one too, so ``--resume`` with a larger ``train.steps`` continues from the end.
    """
    check_inputs(cfg.validation.folder, cfg.logging.wandb, cfg.train.optimizer, cfg.data.folders)  # before writes
    quiet_libraries()
    m = cfg.model  # inputs that do not fit each other: one line now, before the run folder exists
    check_training_inputs(m.transformer or m.path, m.path, adapter=m.adapter, inference_base=m.inference_base,
                          shards=cfg.data.shards, reference=cfg.sample.control,
                          needs_text=not cfg.data.shards or bool(cfg.sample.prompts), allow_pickle=m.allow_pickle,
                          family=m.family, text_dtype=m.text_encoder_dtype, folders=cfg.data.folders)
    run = RunFolder(Path(cfg.save.output_dir), "train")
    check_resume(resume, run, m.transformer or m.path, family=m.family)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=1,
                              cpu=not torch.cuda.is_available())
    quiet = quiet or not accelerator.is_main_process
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    lock = None
    try:
        if accelerator.is_main_process:  # one process checks, locks and writes the folder; the others wait
            lock = RunLock.acquire(run.root)
            clean_stale_temps(run.root)  # a killed run's half-written files (we hold the lock: nobody writes them)
            life.prepare_output_dir(run, resume, cfg.save.overwrite, say, [cfg.save.name])
            if resume is None:  # a resume's config is compared and written once its epochs are counted (_train)
                resuming.write_config(run, None, render_toml(cfg), say)
            if not quiet:
                print_plan(lambda: plan_inputs(cfg), cfg.model.vram or None)
        accelerator.wait_for_everyone()
        return _train(cfg, accelerator, run, resume, progress, say, quiet, changed_data)
    finally:
        if lock is not None:
            life.release(run, lock, say)


def _load(cfg: TrainConfig, device, dtype, out: Path):
    """Data (cached latents + text; the encoders are freed), then the base with its LoRA (and training adapter),
    placed on the device. Returns (data, transformer, checkpoint, trainable params, block swap)."""
    torch.manual_seed(cfg.train.seed)  # the LoRA's initial weights (and anything drawn before the loop's generator)
    d, m, lc, tc = cfg.data, cfg.model, cfg.lora, cfg.train
    base = m.transformer or m.path
    family = (header := open_checkpoint(base, allow_pickle=m.allow_pickle, family=m.family)).family  # header only
    check_layouts(lc.type, family.name, cfg.save.formats)  # before minutes of caching, not at the first save
    check_blocks_to_swap(base, m.blocks_to_swap, m.allow_pickle, m.family)  # before caching the data
    data = load_training_data(Path(m.path), device, **data_source(d, out), t5_max_length=m.t5_max_length,
                              prompts=cfg.sample.prompts, negative=cfg.sample.negative,
                              text_device=torch.device("cpu") if m.text_encoder == "cpu" else device,
                              text_dtype=DTYPE_CHOICES[m.text_encoder_dtype], family=family, spec=header.spec(),
                              holdout=Holdout.of(cfg.validation.folder, cfg.validation.fraction))
    checkpointing = gradient_checkpointing(cfg)  # "auto": off when the plan says the step fits the card
    transformer, ckpt = load_base(base, dtype, device, fp8_storage=m.fp8_storage, fp8_keep=m.fp8_keep,
                                  gradient_checkpointing=checkpointing, blocks_to_swap=m.blocks_to_swap,
                                  allow_pickle=m.allow_pickle, family=m.family)
    spec = ckpt.spec()
    for warning in guidance_warnings(spec.guidance_embeds, tc.guidance, lc.extra_targets):
        log.warning(warning)
    names = ckpt.family.lora_targets(lc.targets, spec.num_double, spec.num_single, lc.extra_targets,
                                     [int(i) for i in lc.double_blocks] or None,
                                     [int(i) for i in lc.single_blocks] or None, spec.guidance_embeds)
    params = add_lora(transformer, names, lc.rank, lc.alpha, lc.dropout, kind=lc.type, lokr_factor=lc.lokr_factor,
                      lokr_decompose_both=lc.lokr_decompose_both)
    # bf16 GEMMs over fp32 masters: plain LoRA (DoRA / LoKr / LoHa keep fp32 compute, not measured in bf16 yet)
    lora_in_compute_dtype(transformer, params, tc.lora_dtype if lc.type == "lora" else "fp32", dtype)
    if m.adapter:  # frozen side branch on top of the base, beside the trained LoRA (lora/adapter.py)
        adaptermod.attach_file(transformer, m.adapter, m.adapter_scale,
                               torch.float32 if dtype == torch.float32 else torch.bfloat16)
    swap = place_base(transformer, device, blocks_to_swap=m.blocks_to_swap, gradient_checkpointing=checkpointing,
                      attention_backend=attention_backend(cfg, transformer, device), compile=tc.compile,
                      fused_rope=tc.fused_rope)
    return data, transformer, ckpt, params, swap


def _sampler(cfg: TrainConfig, data, ckpt, dtype, device) -> LoraSampler:
    m, sc = cfg.model, cfg.sample
    spec = GridSpec(sc.prompts, sc.seeds, data.sample_embeds, data.negative, sc.steps, sc.width, sc.height, sc.control)
    return LoraSampler(spec, data.components, device, dtype, guidance=sc.guidance, cfg=sc.cfg,
                       inference_base=m.inference_base, training_spec=ckpt.spec(),
                       adapter=m.adapter, with_adapter=sc.with_adapter, fp8_storage=m.fp8_storage,
                       fp8_keep=m.fp8_keep, blocks_to_swap=m.blocks_to_swap, vae_tiling=m.vae_tiling,
                       allow_pickle=m.allow_pickle, family=ckpt.family.name, training_metadata=ckpt.metadata)


def _lora_metadata(cfg: TrainConfig, ckpt, dataset) -> dict:
    m, tc, lc = cfg.model, cfg.train, cfg.lora
    images = {e.image: (str(e.image), e.caption, e.repeats) for e in getattr(dataset, "entries", ())
              if e.image and e.role == "train"}  # one per image (an entry per resolution); shards name none
    extra = {"ss_steps": tc.steps, "ss_learning_rate": tc.lr, "dev2pro.train_base_variant": ckpt.spec().variant,
             "dev2pro.inference_base": model_name(m.inference_base) if m.inference_base else "",
             "dev2pro.training_adapter": Path(m.adapter).name if m.adapter else "",
             "dev2pro.references": str(references_per_image(cfg)),  # an edit LoRA: > 0
             **adapter_fields(lc.type, lc.rank, lc.alpha, lc.lokr_factor, lc.lokr_decompose_both)}
    return kohya_dataset_fields(list(images.values()), cfg.data.resolution, cfg.save.name, time.time()) | \
        kohya_metadata(lc.rank, lc.alpha, tc.guidance, tc.timestep_sampling, model_name(m.transformer or m.path),
                       extra=extra)


def _epochs(cfg: TrainConfig, dataset, resume, run: RunFolder) -> tuple:
    """The dataset's batch sampler, ``cfg`` with its epoch settings as steps for the sampler's batches per epoch (a
    copy), what resolved, and the config.toml text to write once the resume is accepted (None: a fresh run without
    epochs wrote it at the start)."""
    sampler = BucketBatchSampler(dataset.buckets(), cfg.data.batch_size, seed=cfg.train.seed)
    per_epoch, cfg = len(sampler), copy.deepcopy(cfg)
    fields = {key: key.split(".") for key in (*epochs.TARGETS, *epochs.TARGETS.values())}  # section, name
    resolved = epochs.resolve({k: getattr(getattr(cfg, s), n) for k, (s, n) in fields.items()}, per_epoch,
                              cfg.train.grad_accum, resume and epochs.started_with(resume, run.state, run.config))
    for key, value in epochs.settings(resolved).items():
        setattr(getattr(cfg, fields[key][0]), fields[key][1], value)
    write = resume is not None or resolved
    return sampler, cfg, resolved, epochs.note(resolved) + render_toml(cfg) if write else None


def _train(cfg: TrainConfig, accelerator, run: RunFolder, resume, progress: bool, say, quiet, changed_data) -> dict:
    device, main, dtype = accelerator.device, accelerator.is_main_process, DTYPE_CHOICES[cfg.model.dtype]
    data, transformer, ckpt, params, swap = _load(cfg, device, dtype, run.root)
    sampler, cfg, resolved, text = _epochs(cfg, data.dataset, resume, run)
    tc, v = cfg.train, cfg.validation
    optimizer = build_optimizer(params, tc.optimizer, tc.lr, tc.weight_decay, warmup_steps=tc.warmup_steps)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.schedule)
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[swap is None, True])
    watch = make_watch(params, optimizer, tc.ema_decay, tc.steps, data.validation, v.sigmas, v.seeds, v.every,
                       tc.guidance, device, dtype, cfg.data.batch_size, accelerator.autocast, tc.warmup_steps,
                       v.folder or f"validation.fraction {v.fraction:g}", cfg.logging.wandb and run.root / "wandb")
    gen = torch.Generator().manual_seed(tc.seed)  # caption dropout, noise, timesteps
    model = lambda: accelerator.unwrap_model(transformer)  # noqa: E731
    start, smoothed, history = 0, None, []  # history: the loss of every step so far (loss.png)
    check = DataCheck.of(data.dataset, changed_data, tc.grad_accum)
    if resume is not None:
        r = restore_training_state(resume, run.state, model(), optimizer, scheduler, gen, sampler, watch.ema,
                                   data=check)
        start, smoothed, history = r.step, r.smoothed, r.losses
        watch.restore(r.validation, start)
        resuming.announce(r, run, tc.steps, say, cfg.save.name if main else None, epochs.further(resolved, r.step),
                          (resume, text) if main else None)  # its config.toml: written once the state is accepted
    elif main and text is not None:  # a fresh run counted in epochs: its config.toml now its steps are known
        resuming.write_config(run, None, text, say)
    samples = _sampler(cfg, data, ckpt, dtype, device)
    if main and start < tc.steps:
        for line in _startup_lines(cfg, data.dataset, len(sampler), sum(p.numel() for p in params),
                                   ckpt.spec(), start, run, samples.guidance, resolved) + watch.notes:
            say(line)
    sinks = open_sinks(cfg.logging.wandb and main and start < tc.steps, cfg.logging.project, cfg.logging.mode,
                       run.root, run.config)
    bar = watch.bar = Progress(tc.steps, start, "train", run.logs if main else None, enabled=progress and main,
                               smoothed=smoothed, log_every=cfg.log_every, lines=not progress and main and not quiet,
                               sinks=sinks)
    meta = _lora_metadata(cfg, ckpt, data.dataset)
    acts = _Run(
        save_lora=lambda suffix: save_lora_files(model(), run.root, cfg.save.name, cfg.save.formats, meta, suffix),
        save_state=lambda done: save_training_state(
            run.state, done, model(), optimizer, scheduler, gen, sampler, smoothed=bar.smoothed,
            grad_accum=tc.grad_accum, keep_last=cfg.save.keep_last, losses=life.finite_or_none(history),
            ema=watch.ema, validation=watch.validator.history if watch.validator else None, recipe="train",
            data=check.fingerprint),
        sample=lambda step: samples.sample(model(), step, run.samples, bar, progress and main),
        describe=samples.describe, record={"epochs": epochs.summary(resolved)} if resolved else {})
    acts.save_lora, acts.sample = watch.published(acts.save_lora), watch.published(acts.sample)
    batches = None  # the loader thread: stopped and joined on every way out (Ctrl-C included)
    try:
        if start == tc.steps:  # a finished run: only the final files, if a full disk kept them from being written
            files = lora_paths(run.root, cfg.save.name, cfg.save.formats)
            return life.already_finished(files, start, say, epochs.further(resolved, start)) or \
                _finish(cfg, run, start, history, [], [], acts, None, say, watch=watch)
        if main and cfg.sample.prompts and cfg.sample.baseline and start == 0:
            say(f"rendering step-0 samples (the base before training; {acts.describe()})...")
            say(f"samples: {acts.sample(0)}")
        if main and start == 0:
            watch.validate(model(), 0)  # the base before training: the curve's first point
        opt = Optimization(transformer, params, optimizer, scheduler, tc.grad_accum, tc.max_grad_norm, watch.ema)
        objective = Objective("flow", guidance=tc.guidance)
        draws = Draws(cfg.data.caption_dropout, tc.timestep_sampling, tc.sigmoid_scale, tc.shift)
        batches = prefetch_batches(batches_forever(sampler), data.dataset)  # cache reads in a loader thread
        note = bar.write  # console lines that do not break the bar
        events = Events(
            save=(lambda done: life.save_periodic(acts.save_lora, acts.save_state, done, history, run, note,
                                                  cfg.save.name, cfg.save.keep_loras)) if main else None,
            save_every=cfg.save.every,
            sample=acts.sample if main and cfg.sample.prompts else None, sample_every=cfg.sample.every,
            validate=(lambda done: watch.validate(model(), done)) if main and watch.validator else None,
            interrupted=lambda done: life.save_on_interrupt(acts.save_state, done, run, note) if main else None)
        transformer.train()
        result = run_steps(start, tc.steps,
                           lambda: step_loss(opt, objective, draws, data, batches, gen, accelerator, dtype),
                           opt, NonFiniteGuard(tc.nan_policy, tc.nan_max_skips, lambda: life.stop_hint(run)), bar,
                           events, history)
        bar.end_bar()
        return _finish(cfg, run, tc.steps, history, result.losses, result.skipped, acts, acts.save_state, say,
                       result.seconds, start, watch)
    finally:
        bar.close()
        if batches is not None:
            batches.close()


def _finish(cfg, run: RunFolder, done, history, losses, skipped, acts: _Run, save_state, say, seconds=0.0,
            start=None, watch=None) -> dict:
    """Final state, final LoRA files, then the final samples (a crash there loses nothing), then the summary."""
    files = life.finish(acts.save_lora, save_state, done, life.finite_or_none(history), run,
                        run.root / f"{cfg.save.name}.safetensors", say)
    life.prune_step_loras(run.root, cfg.save.name, cfg.save.keep_loras, say)  # e.g. an extended run's old final
    if cfg.sample.prompts:
        life.final_samples(lambda: acts.sample(done), acts.describe(), files, say)
    trained = 0 if start is None else done - start  # steps this process ran (a finished run rerun: none)
    # seconds: this session's loop time over its session_steps (periodic saves and samples in, the final ones out)
    summary = {"losses": losses, "files": [str(f) for f in files], "steps": done, "session_steps": trained,
               "seconds": seconds, "steps_per_second": trained / max(seconds, 1e-9), "skipped_steps": list(skipped),
               **acts.record}
    if cfg.train.compile == "blocks":  # compile time is part of `seconds`: said apart (torch._dynamo's counters)
        summary["compile"] = CompileStats.now().as_dict()
        say(CompileStats.now().line())
    if watch is not None:  # validation history and early-stopping advice
        summary.update(watch.finish(lambda s: lora_paths(run.root, cfg.save.name, cfg.save.formats, "" if s == done
                                                         else f"-step{s:06d}")[0], cfg.validation.every, say))
    write_json(run.summary, {**summary, "losses": life.finite_or_none(history)})  # the whole run's, resumed or not
    return summary


def _startup_lines(cfg, ds, per_epoch: int, n_params: int, spec, start: int, run: RunFolder, guidance,
                   resolved: list) -> list[str]:
    """The run at a glance: data and buckets, steps and epochs, LoRA size, guidance, bases, outputs."""
    tc, sc, sv = cfg.train, cfg.sample, cfg.save
    lines = [
        f"dev2pro train -> {run.root}",
        *dataset_lines(ds, cfg.data.shards or ", ".join(f.path for f in cfg.data.folders)),
        *(f"  {r.said()}" for r in resolved),  # train.epochs = 16 -> 2400 steps (150 batches per epoch)
        steps_line(tc.steps, start, cfg.data.batch_size, tc.grad_accum, per_epoch),
        f"  LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} (scale {cfg.lora.alpha / cfg.lora.rank:g}), "
        f"{cfg.lora.targets}, {n_params:,} trainable parameters; lr {tc.lr:g} ({tc.optimizer}, {tc.schedule})",
        guidance_line(spec.guidance_embeds, tc.guidance, cfg.model.transformer or cfg.model.path, spec.variant),
    ]
    if sc.prompts:
        lines.append(samples_line(sc, guidance, cfg.model.inference_base or "the training base", run.samples,
                                  references_per_image(cfg) > 0))
    lines += [saves_line(sv.every, sv.keep_loras, run.root / f"{sv.name}.safetensors", sv.formats, run.state),
              f"  TensorBoard: tensorboard --logdir {run.logs}"]
    return lines
