"""`dev2pro train CONFIG.toml`: train a Flux LoRA on a (de-distilled) base at guidance 1.0, sample it on dev.

The story, top to bottom: resolve the config and output folder -> scan the dataset and pick buckets -> cache
latents and text embeddings (then free the VAE and text encoders) -> load the base transformer (any layout,
optionally fp8 storage) -> add the LoRA with peft -> loop: flow-matching loss at the fixed guidance, AdamW,
progress, samples on the inference base, LoRA files and resumable state every N steps.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SIZE_HELP, load_config, opt, render_toml, require, resolve_size, section
from ..errors import UserError
from ..flow import TIMESTEP_MODES
from ..outputs import write_text
from . import train_steps as steps

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ModelSection:
    path: str = opt("", "model folder in the FLUX.1-dev diffusers layout (text encoders, tokenizers, VAE)")
    transformer: str = opt("", "optional transformer file overriding the folder's (e.g. a dev2pro fp8 file)")
    inference_base: str = opt("", "transformer used for samples (e.g. the original FLUX.1-dev); empty = the "
                                  "training base")
    adapter: str = opt("", "training adapter: a LoRA (e.g. dev -> dev2pro from `lora extract` or `dedistill` with "
                           "train.adapter_rank) applied as a frozen side branch while training, off for samples; "
                           "the training base is then dev and inference_base stays empty")
    adapter_scale: float = opt(1.0, "strength of the training adapter")
    dtype: str = opt("bf16", "compute dtype", ("bf16", "fp16", "fp32"))
    fp8_storage: bool = opt(False, "store base weights in fp8 (bf16 compute); lowers memory with checkpointing")
    fp8_keep: list = opt(["norms", "biases", "embedders", "modulation", "final"],
                         "groups kept in high precision under fp8 storage (drop 'modulation' to save ~27%)")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (needed for fp8 to pay off)")
    blocks_to_swap: int = opt(0, "blocks (of FLUX.1's 57, double blocks first) whose frozen weights stay in pinned "
                                 "host RAM and are copied to the GPU just before use; needs gradient_checkpointing")
    vram: int = opt(0, "GPU-size preset in GB (8|12|16|24|48): picks fp8 storage, checkpointing, blocks_to_swap, "
                       "optimizer, text-encoder placement, VAE tiling; settings you write win; 0 = no preset")
    text_encoder: str = opt("gpu", "where CLIP + T5 run while caching captions", ("gpu", "cpu"))
    text_encoder_dtype: str = opt("fp32", "CLIP + T5 dtype while caching (bf16 halves T5-XXL's 19 GB)",
                                  ("fp32", "bf16"))
    vae_tiling: bool = opt(False, "decode samples in tiles (less memory for large samples)")
    t5_max_length: int = opt(512, "T5 tokens: 512 for dev and de-distilled bases (kohya's 256 is schnell's)")
    allow_pickle: bool = opt(False, "allow .ckpt/.pt model files (they can run code)")

    def validate(self):
        require(bool(self.path), "path: set model.path to a FLUX.1-dev-layout model folder")
        require(0 < self.t5_max_length <= 512, "t5_max_length must be in 1..512")
        require(self.blocks_to_swap >= 0, "blocks_to_swap must be >= 0")
        require(self.vram in (0, 8, 12, 16, 24, 48), f"vram = {self.vram}: choose 8, 12, 16, 24 or 48 (GB), or 0")


@dataclass
class FolderSection:
    path: str = opt("", "folder of images with same-stem .txt captions")
    repeats: int = opt(1, "times each image is seen per epoch")
    caption: str = opt("", "caption for images without a .txt file in this folder")
    recursive: bool = opt(False, "also read images in subfolders (a kohya parent of N_name folders is "
                                 "recognised without it)")

    def validate(self):
        require(bool(self.path), "path: each [[data.folders]] needs a path")
        require(self.repeats >= 1, "repeats must be >= 1")


@dataclass
class DataSection:
    folders: list[FolderSection] = opt([], "[[data.folders]] tables: path, repeats, caption, recursive; a path "
                                           "may be a kohya parent of N_name folders")
    shards: str = opt("", "index.json written by `dev2pro cache` (pre-encoded latents + text), instead of folders")
    default_caption: str = opt("", "caption for images without a .txt file")
    trigger: str = opt("", "trigger word prepended to every caption")
    caption_dropout: float = opt(0.0, "probability of training on the empty caption")
    resolution: int = opt(512, "bucket target side: buckets have about resolution^2 pixels")
    bucket_step: int = opt(64, "bucket sides are multiples of this (>= 16)")
    min_size: int = opt(16, "images smaller than this on a side are skipped (listed in a warning)")
    strict: bool = opt(False, "stop on unreadable/tiny images instead of skipping them")
    cache_dir: str = opt("", "latent/text cache folder (default: <output_dir>/cache)")
    batch_size: int = opt(1, "images per step (per device)")

    def validate(self):
        require(len(self.folders) > 0 or bool(self.shards),
                "folders: add at least one [[data.folders]] table with a path (or set data.shards)")
        require(0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)")
        require(self.bucket_step >= 16 and self.bucket_step % 16 == 0, "bucket_step must be a multiple of 16")
        require(self.resolution >= self.bucket_step, "resolution must be >= bucket_step")
        require(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass
class LoraSection:
    rank: int = opt(16, "LoRA rank")
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = opt(0.0, "LoRA dropout")
    targets: str = opt("all_linear", "target preset", ("attention", "all_linear"))
    extra_targets: list = opt([], "extra targets: modulation, embedders")
    double_blocks: list = opt([], "train only these double-block indices (empty = all)")
    single_blocks: list = opt([], "train only these single-block indices (empty = all)")

    def validate(self):
        require(self.rank > 0, f"rank must be > 0, got {self.rank}")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


@dataclass
class TrainSection:
    steps: int = opt(1000, "optimiser steps")
    lr: float = opt(1e-4, "learning rate")
    optimizer: str = opt("adamw", "optimizer", ("adamw", "adamw8bit", "prodigy", "adafactor"))
    weight_decay: float = opt(0.0, "weight decay")
    warmup_steps: int = opt(0, "linear LR warmup steps")
    schedule: str = opt("constant", "LR schedule after warmup", ("constant", "cosine", "linear"))
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    seed: int = opt(42, "seed for LoRA init, noise, timesteps and data order")
    guidance: float = opt(1.0, "guidance input during training: 1.0 is the Dev2Pro recipe")
    timestep_sampling: str = opt("sigmoid", "how sigmas are drawn", TIMESTEP_MODES)
    sigmoid_scale: float = opt(1.0, "logit-normal scale for sigmoid/shift/flux_shift")
    shift: float = opt(3.0, "shift value for timestep_sampling = 'shift'")
    mixed_precision: str = opt("no", "accelerate mixed precision", ("no", "bf16", "fp16"))
    compile: bool = opt(False, "regional torch.compile of the repeated blocks (diffusers compile_repeated_blocks); "
                               "the first steps are slow; not with blocks_to_swap")
    attention_backend: str = opt("", "diffusers attention backend (e.g. flash, _native_cudnn, sage); empty = "
                                     "PyTorch SDPA")
    nan_policy: str = opt("stop", "on a non-finite loss or gradient: stop (keep the last good state) or skip the "
                                  "update", ("stop", "skip"))
    nan_max_skips: int = opt(10, "skip policy: stop after this many non-finite steps in a row")

    def validate(self):
        require(self.steps > 0, "steps must be > 0")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}")
        require(self.nan_max_skips >= 1, "nan_max_skips must be >= 1")
        require(self.grad_accum >= 1, "grad_accum must be >= 1")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")


@dataclass
class SampleSection:
    every: int = opt(0, "render samples every N steps (0 = only at the end if prompts are set)")
    prompts: list = opt([], "sample prompts")
    negative: str = opt("", "negative prompt for true CFG (bases without guidance embedding)")
    seeds: list = opt([0], "one column per seed")
    guidance: float = opt(3.5, "embedded guidance on guidance-distilled bases (dev): 3.5 is dev's default")
    cfg: float = opt(3.5, "true CFG scale for bases without guidance embedding")
    steps: int = opt(20, "sampling steps")
    width: int = opt(512, "sample width (multiple of 16)")
    height: int = opt(512, "sample height (multiple of 16)")
    with_adapter: bool = opt(False, "with model.adapter: also render each grid with the adapter on (the LoRA on "
                                    "dev2pro), as step*-adapter.png")
    size: str = opt("", SIZE_HELP + "; the same as width/height, which it replaces")
    baseline: bool = opt(True, "render a step-0 grid (the base before training) to compare the others with")

    def validate(self):
        resolve_size(self)
        require(self.width % 16 == 0 and self.height % 16 == 0, "width/height must be multiples of 16")
        require(self.steps > 0, "steps must be > 0")


@dataclass
class SaveSection:
    output_dir: str = opt("", "run folder: LoRA files, samples, state, logs, resolved config")
    name: str = opt("lora", "file name stem of the saved LoRA")
    every: int = opt(0, "save LoRA + training state every N steps (0 = only at the end)")
    keep_last: int = opt(2, "training states kept for resume")
    formats: list = opt(["kohya"], "LoRA layouts written: kohya (ComfyUI/Forge), diffusers, comfy")
    overwrite: bool = opt(False, "allow reusing an output_dir that holds another run")

    def validate(self):
        require(bool(self.output_dir), "output_dir: set save.output_dir")
        for f in self.formats:
            require(f in ("kohya", "diffusers", "comfy"), f"formats: unknown layout {f!r} (kohya|diffusers|comfy)")


@dataclass
class TrainConfig:
    model: ModelSection = section(ModelSection, "base model")
    data: DataSection = section(DataSection, "dataset")
    lora: LoraSection = section(LoraSection, "LoRA shape")
    train: TrainSection = section(TrainSection, "optimisation")
    sample: SampleSection = section(SampleSection, "samples during training")
    save: SaveSection = section(SaveSection, "outputs")
    log_every: int = opt(10, "progress-bar postfix and TensorBoard scalar interval (steps)")


def load_train_config(path: str | None, overrides: list[str] | None = None, data: dict | None = None) -> TrainConfig:
    cfg = load_config(TrainConfig, path, overrides, data)
    base = Path(path).parent if path else Path(".")
    # Relative paths in a config are relative to the config file, not to where the command is run.
    for obj, name in [(cfg.model, "path"), (cfg.model, "transformer"), (cfg.model, "inference_base"),
                      (cfg.model, "adapter"),
                      (cfg.save, "output_dir"), (cfg.data, "cache_dir"), (cfg.data, "shards")] + [(f, "path") for f in cfg.data.folders]:
        value = getattr(obj, name)
        if value and not Path(value).is_absolute():
            setattr(obj, name, str((base / value).resolve()))
    if cfg.model.vram:  # the preset fills only what the user left unset
        from .plan import apply_vram_preset, explicit_keys

        apply_vram_preset(cfg, explicit_keys(path, overrides, data))
    return cfg


# ------------------------------------------------------------------------------------------------ recipe
def quiet_libraries():
    """Our progress bar is the one users watch: silence diffusers'/transformers' per-component loading bars."""
    from ..noise import quiet_third_party

    quiet_third_party()  # also in processes that did not start from the CLI (demo workers, torchrun -m)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True, quiet: bool = False) -> dict:
    """Run the whole job; returns a summary (losses, paths). ``quiet``: no console lines (the demo's workers).

    One process trains in a run folder at a time (a lock file). Ctrl-C saves a resumable state at the end of the
    step; the last step saves one too, so ``--resume`` with a larger ``train.steps`` continues from the end.
    """
    if cfg.model.adapter and cfg.model.inference_base:
        # one base in memory is the point of an adapter: samples with it off already are "the LoRA on dev". (Checked
        # here, not in validate(): the config editor probes every path field with a value at once.)
        raise UserError("model.adapter: set model.adapter or model.inference_base, not both (with an adapter the "
                        "training base is dev and samples are rendered on it with the adapter off)")
    from accelerate import Accelerator

    from ..train.run import RunLock, clean_stale_temps

    quiet_libraries()
    out = Path(cfg.save.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=1,
                              cpu=not torch.cuda.is_available())
    quiet = quiet or not accelerator.is_main_process
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    lock = None
    try:
        if accelerator.is_main_process:  # one process checks, locks and writes the folder; the others wait
            lock = RunLock.acquire(out)
            clean_stale_temps(out)  # a killed run's half-written files (we hold the lock: nobody writes them)
            steps.prepare_output_dir(out, resume, cfg.save.overwrite, say)
            write_text(out / "config.toml", render_toml(cfg))
            if not quiet:
                from .plan import print_plan_safely

                print_plan_safely(cfg)
        accelerator.wait_for_everyone()
        return _train(cfg, accelerator, out, out / "state", resume, progress, say, quiet)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, accelerator, out: Path, state_dir: Path, resume, progress: bool, say, quiet) -> dict:
    from ..train.optim import build_optimizer, build_scheduler
    from ..train.progress import Progress
    from ..train.run import NonFiniteGuard, stop_on_interrupt
    from . import train_run as run

    torch.manual_seed(cfg.train.seed)
    device, tc = accelerator.device, cfg.train
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.model.dtype]

    # 1. data -> cached latents and text embeddings (encoders are freed afterwards)
    data = steps.prepare_data(cfg, out, device)
    # 2. base transformer + LoRA
    transformer, ckpt = steps.load_base(cfg, dtype, device)
    if ckpt.spec().guidance_embeds and cfg.train.guidance != 1.0:
        log.warning("training a guidance-distilled base at guidance %.2f: the Dev2Pro recipe trains at 1.0; other "
                    "values pull the guidance embedding off its distilled meaning and the LoRA tends to collapse "
                    "or blur when used on dev", cfg.train.guidance)
    params = steps.add_lora(transformer, cfg, ckpt.spec())
    if cfg.model.adapter:  # frozen side branch on top of the base, beside the trained LoRA (lora/adapter.py)
        from ..lora import adapter

        adapter.attach_file(transformer, cfg.model.adapter, cfg.model.adapter_scale,
                            torch.float32 if dtype == torch.float32 else torch.bfloat16)
    swap = steps.place_base(transformer, cfg, device)  # block swap keeps part of the base in host RAM
    optimizer = build_optimizer(params, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, cfg.train.steps, cfg.train.schedule)
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[swap is None, True])
    gen = torch.Generator().manual_seed(cfg.train.seed)  # noise, timesteps, caption dropout
    sampler = data.sampler
    start, smoothed, history = 0, None, []  # history: the loss of every step so far (loss.png)
    if resume is not None:
        r = steps.resume_state(resume, state_dir, accelerator.unwrap_model(transformer), optimizer, scheduler,
                               sampler, gen)
        start, smoothed, history = r.step, r.smoothed, r.losses
        say(f"resumed from step {start} ({r.folder})")
    sampler_iter = steps.batches_forever(sampler)
    inference = steps.InferenceBase(cfg, ckpt, dtype, data, device)
    main = accelerator.is_main_process
    model = lambda: accelerator.unwrap_model(transformer)  # noqa: E731
    save_lora = lambda suffix: steps.save_lora_files(model(), cfg, ckpt, out, suffix)  # noqa: E731

    def save_state(done: int) -> Path:
        return steps.save_state(state_dir, done, model(), optimizer, scheduler, sampler, gen, bar.smoothed,
                                tc.grad_accum, cfg.save.keep_last, run.finite_or_none(history))

    def sample(step: int) -> Path:
        return inference.sample(model(), step, out / "samples", bar, progress and main)

    if start > tc.steps:
        raise UserError(f"{out} is at step {start}, past train.steps = {tc.steps}: set train.steps above {start} "
                        f"to train further")
    if main and start < tc.steps:
        for line in run.startup_lines(cfg, data, sum(p.numel() for p in params), ckpt.spec().variant, start, out):
            say(line)
    bar = Progress(tc.steps, start, "train", out / "logs" if main else None, enabled=progress and main,
                   smoothed=smoothed, log_every=cfg.log_every, lines=not progress and main and not quiet)
    note = say if quiet else bar.write  # console lines that do not break the bar
    try:
        if start == tc.steps:  # a finished run: only the final files, if a full disk kept them from being written
            return run.already_finished(cfg, out, start, say) or _finish(cfg, out, state_dir, start, history, [],
                                                                         [], save_lora, None, sample, say)
        if main and cfg.sample.prompts and cfg.sample.baseline and start == 0:
            say("rendering step-0 samples (the base before training)...")
            say(f"samples: {sample(0)}")
        losses: list[float] = []
        guard = NonFiniteGuard(tc.nan_policy, tc.nan_max_skips, lambda: run.stop_hint(state_dir, out))
        transformer.train()
        bar.start_clock()
        t0, stop_after = time.perf_counter(), int(os.environ.get("DEV2PRO_STOP_AFTER_STEP", "0"))
        with stop_on_interrupt() as stop:
            for step in range(start, tc.steps):
                total = _accumulate(accelerator, transformer, data, sampler_iter, gen, tc, device, dtype)
                done = step + 1
                if guard.check(done, total, run.grad_norm(accelerator, params, tc.max_grad_norm)):
                    optimizer.step()  # a skipped step (nan_policy = "skip") leaves the weights as they were
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
                history.append(total)
                bar.update(done, total, scheduler.get_last_lr()[0])
                if main:
                    if cfg.sample.prompts and cfg.sample.every and done % cfg.sample.every == 0 and done < tc.steps:
                        sample(done)
                    if cfg.save.every and done % cfg.save.every == 0 and done < tc.steps:
                        run.save_periodic(save_lora, save_state, done, history, out, note)
                if stop.requested and done < tc.steps:
                    if main:
                        run.save_on_interrupt(save_state, done, out, note)
                    raise KeyboardInterrupt
                if stop_after and done == stop_after:
                    bar.close()
                    os._exit(17)  # test hook: die like a killed process right after step k's state
        bar.end_bar()
        return _finish(cfg, out, state_dir, tc.steps, history, losses, guard.skipped, save_lora, save_state, sample,
                       say, t0, start)
    finally:
        bar.close()


def _accumulate(accelerator, transformer, data, batches, gen, tc, device, dtype) -> float:
    """Forward + backward over ``grad_accum`` micro-batches; returns the step's loss."""
    total = 0.0
    for _ in range(tc.grad_accum):
        batch = data.collate([data.dataset[i] for i in next(batches)], gen)
        with accelerator.autocast():
            loss = steps.flow_matching_loss(transformer, batch, tc, gen, device, dtype)
        accelerator.backward(loss / tc.grad_accum)
        total += loss.item() / tc.grad_accum
    return total


def _finish(cfg, out, state_dir, done, history, losses, skipped, save_lora, save_state, sample, say, t0=None,
            start=None) -> dict:
    """Final state, final LoRA files, then the final samples (a crash there loses nothing), then the summary."""
    from . import train_run as run

    files = run.finish(save_lora, save_state, done, run.finite_or_none(history), out, state_dir,
                       out / f"{cfg.save.name}.safetensors", say)
    if cfg.sample.prompts:
        run.final_samples(lambda: sample(done), len(cfg.sample.prompts) * len(cfg.sample.seeds), cfg.sample.steps,
                          files, say)
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    summary = {"losses": losses, "files": [str(f) for f in files], "steps": done, "seconds": elapsed,
               "steps_per_second": (done - (start or done)) / max(elapsed, 1e-9), "skipped_steps": list(skipped)}
    from ..outputs import write_json

    write_json(out / "summary.json", {**summary, "losses": run.finite_or_none(losses)})
    return summary


def add_train_parser(sub):
    """The `train` subcommand (built in cli_commands, which imports nothing heavy)."""
    from ..cli_commands import add_train

    add_train(sub)
