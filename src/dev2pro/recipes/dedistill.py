"""`dev2pro dedistill CONFIG.toml`: make your own dev2pro -- a full fine-tune of FLUX.1-dev away from its
guidance distillation.

FLUX.1-dev was distilled to take the CFG scale as an input (``guidance``) and answer in one forward what pro needs
two for. Two objectives undo that:

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

Distributed (accelerate / torchrun, DDP or FSDP): every rank walks the same *global* batch list
(``BucketBatchSampler`` with batch ``batch_size * world_size``) and draws all randomness (caption dropout, noise,
sigmas, w) for the global batch from one shared generator, then keeps its slice ``[rank * B, (rank + 1) * B)``.
Gradients averaged over ranks are then those of the global batch, so N processes give the weights one process
gets with the same global batch, and resuming is the same single state on every rank.

The story: config -> data (cached folders via the LoRA recipe's steps, or shards from `dev2pro cache`) -> student
(+ teacher) -> loop (loss, clip, AdamW, warmup/cosine, EMA, TensorBoard, resumable state) -> export through
`flux.checkpoint.convert`: a BFL file (default), a diffusers folder and/or fp8, with or without guidance keys.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..config import load_config, opt, render_toml, require, section
from ..errors import UserError
from ..flow import flow_loss, flow_target, noisy_input, sample_sigmas
from ..outputs import write_json, write_text
from . import train_steps as steps
from .train_lora import DataSection, TrainSection, quiet_libraries

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("bfl", "diffusers", "fp8")
OBJECTIVES = ("flow", "cfg_teacher", "guidance_distill")
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ModelSection:
    path: str = opt("", "model folder in the FLUX.1-dev diffusers layout (text encoders, tokenizers, VAE)")
    transformer: str = opt("", "start weights (any layout); empty = the folder's transformer")
    teacher: str = opt("", "cfg_teacher: the frozen guidance-distilled teacher (empty = the start weights); "
                           "guidance_distill: the CFG teacher (required)")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (needed at full size)")
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

    def validate(self):
        super().validate()
        require(self.guidance == 1.0, "guidance: the student trains at guidance 1.0 (the Dev2Pro recipe)")
        require(self.optimizer == "adamw", "optimizer: only adamw is supported for full fine-tunes here")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")


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
    save: SaveSection = section(SaveSection, "outputs")


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


# ------------------------------------------------------------------------------------------------ maths
def predict(model, x_t, sigmas, guidance, prompt_embeds, pooled, h: int, w: int, device, dtype) -> torch.Tensor:
    """Velocity (B, T, C*4) in fp32; ``guidance`` (B,) is ignored by models without a guidance embedding."""
    from ..flux.latents import image_ids, text_ids

    inner = model.module if hasattr(model, "module") else model
    g = guidance.to(device, dtype) if inner.config.guidance_embeds else None
    out = model(hidden_states=x_t.to(device, dtype), timestep=sigmas.to(device, dtype), guidance=g,
                pooled_projections=pooled.to(device, dtype), encoder_hidden_states=prompt_embeds.to(device, dtype),
                txt_ids=text_ids(prompt_embeds.shape[1], device=device), img_ids=image_ids(h, w, device=device),
                return_dict=False)[0]
    return out.float()


def flow_objective(student, x0, noise, sigmas, text, device, dtype) -> tuple[torch.Tensor, dict]:
    """Flow matching at guidance 1.0 (the same maths as ``train_steps.flow_matching_loss``, noise given)."""
    from ..flux.latents import pack

    b, _, h, w = x0.shape
    x_t = pack(noisy_input(x0, noise, sigmas))  # (B, T, C*4)
    pred = predict(student, x_t, sigmas, torch.ones(b), text["prompt_embeds"], text["pooled"], h, w, device, dtype)
    loss = flow_loss(pred, pack(flow_target(x0, noise)).to(device))
    return loss, {"loss/flow": loss.detach()}


def cfg_teacher_objective(student, teacher, x0, noise, sigmas, w_scale, text, empty, flow_weight, device, dtype,
                          teacher_dtype) -> tuple[torch.Tensor, dict]:
    """MSE(u + w (c - u), teacher(x_t, c, guidance=w)) [+ flow_weight * flow loss on c]; student at guidance 1.

    Caption and empty prompt go through the student as one 2B batch: one forward with grad instead of two.
    """
    from ..flux.latents import pack

    b, _, h, w = x0.shape
    x_t = pack(noisy_input(x0, noise, sigmas))  # (B, T, C*4)
    pe, pooled = text["prompt_embeds"], text["pooled"]
    pe2 = torch.cat([pe, empty["prompt_embeds"].expand_as(pe)])  # (2B, seq, D): caption rows, then empty rows
    pooled2 = torch.cat([pooled, empty["pooled"].expand_as(pooled)])
    both = predict(student, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]), torch.ones(2 * b), pe2, pooled2,
                   h, w, device, dtype)
    cond, uncond = both[:b], both[b:]
    guided = uncond + w_scale.to(device).view(b, 1, 1) * (cond - uncond)
    with torch.no_grad():
        target = predict(teacher, x_t, sigmas, w_scale, pe, pooled, h, w, device, teacher_dtype)
    distill = F.mse_loss(guided, target)
    parts = {"loss/distill": distill.detach()}
    loss = distill
    if flow_weight > 0:
        fl = flow_loss(cond, pack(flow_target(x0, noise)).to(device))
        parts["loss/flow"] = fl.detach()
        loss = loss + flow_weight * fl
    return loss, parts


def guidance_distill_objective(student, teacher, x0, noise, sigmas, w_scale, text, empty, device, dtype,
                               teacher_dtype) -> tuple[torch.Tensor, dict]:
    """MSE(student(x_t, c, guidance=w), u + w (c - u)) with u, c the teacher's outputs (Meng et al., Alg. 1)."""
    from ..flux.latents import pack

    b, _, h, w = x0.shape
    x_t = pack(noisy_input(x0, noise, sigmas))  # (B, T, C*4)
    pe, pooled = text["prompt_embeds"], text["pooled"]
    with torch.no_grad():  # caption and empty prompt through the teacher as one 2B batch
        both = predict(teacher, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]), torch.ones(2 * b),
                       torch.cat([pe, empty["prompt_embeds"].expand_as(pe)]),
                       torch.cat([pooled, empty["pooled"].expand_as(pooled)]), h, w, device, teacher_dtype)
        cond, uncond = both[:b], both[b:]
        target = uncond + w_scale.to(device).view(b, 1, 1) * (cond - uncond)
    pred = predict(student, x_t, sigmas, w_scale, pe, pooled, h, w, device, dtype)
    loss = F.mse_loss(pred, target)
    return loss, {"loss/distill": loss.detach()}


def with_guidance_embedding(model):
    """A copy of a model without guidance embedding that has one, initialised to add nothing (output unchanged)."""
    from ..flux.spec import build_transformer, spec_from_diffusers_config

    spec = spec_from_diffusers_config(dict(model.config)).with_(guidance_embeds=True,
                                                                axes_dim=tuple(model.config.axes_dims_rope))
    grown = build_transformer(spec, dtype=next(model.parameters()).dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("guidance_embedder" not in k for k in missing):
        raise ValueError(f"cannot add a guidance embedding: missing {missing[:3]}, unexpected {unexpected[:3]}")
    last = grown.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)  # guidance adds zero to the conditioning vector until it learns otherwise
    torch.nn.init.zeros_(last.bias)
    return grown


# ------------------------------------------------------------------------------------------------ data
def load_data(cfg: DedistillConfig, out: Path, device):
    """(dataset, bucket of each index, empty-prompt text tensors) from shards or from cached folders."""
    if cfg.data.shards:
        from ..data.shards import ShardDataset

        ds = ShardDataset(cfg.data.shards)
        return ds, ds.buckets(), ds.empty_text()
    # the LoRA recipe's data step reads these fields only; no sample prompts, so its "negative" is the empty prompt
    view = SimpleNamespace(data=cfg.data, model=cfg.model, train=cfg.train,
                           sample=SimpleNamespace(prompts=[], negative=""))
    prepared = steps.prepare_data(view, out, device)
    pe, pooled = prepared.negative_embeds
    return prepared.dataset, prepared.dataset.buckets(), {"prompt_embeds": pe[0], "pooled": pooled[0]}


def global_batch(dataset, indices, rank: int, world: int, empty: dict, dropout_p: float, gen, draw_w, dc, tc):
    """This rank's slice of a global batch, with every random draw made for the whole global batch first."""
    from ..data.loader import collate

    n = len(indices)
    per = n // world
    mine = indices[rank * per:(rank + 1) * per]
    batch = collate([dataset[i] for i in mine])
    drop = torch.rand(n, generator=gen) < dropout_p if dropout_p > 0 else torch.zeros(n, dtype=torch.bool)
    x0 = batch["latents"]
    _, c, h, w = x0.shape
    noise = torch.randn((n, c, h, w), generator=gen)
    sigmas = sample_sigmas(n, tc.timestep_sampling, gen, sigmoid_scale=tc.sigmoid_scale, shift=tc.shift,
                           image_seq_len=(h // 2) * (w // 2))
    w_scale = torch.rand(n, generator=gen) * (dc.w_max - dc.w_min) + dc.w_min if draw_w else torch.ones(n)
    sl = slice(rank * per, (rank + 1) * per)
    text = {k: batch[k].clone() for k in ("prompt_embeds", "pooled")}
    for j, dropped in enumerate(drop[sl].tolist()):
        if dropped:
            for k in text:
                text[k][j] = empty[k]
    return x0, noise[sl], sigmas[sl], w_scale[sl], text


# ------------------------------------------------------------------------------------------------ state/export
def _parts(model_sd, optimizer, scheduler, ema, gen, sampler, step, smoothed, accum) -> dict:
    from ..train.state import rng_state

    return {"model": {k: v.detach().float().cpu() for k, v in model_sd.items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema else {}, "rng": rng_state({"train": gen}),
            "progress": {"step": step, "smoothed": smoothed, "sampler": sampler.state_dict(batches_done=step * accum)}}


def restore(resume: str, state_dir: Path, model, optimizer, scheduler, ema, gen, sampler):
    """Load a saved state into the live objects; returns (step, smoothed loss)."""
    from ..train.state import latest_state, load_state, set_rng_state

    folder = latest_state(state_dir) if resume == "latest" else Path(resume)
    if folder is None or not folder.is_dir():
        raise UserError(f"nothing to resume: no training state in {state_dir}" if resume == "latest" else
                        f"--resume {resume}: not a state folder (expected .../state/step-NNNNNN)")
    parts = load_state(folder)
    model.load_state_dict(parts["model"])
    optimizer.load_state_dict(parts["optimizer"])
    scheduler.load_state_dict(parts["scheduler"])
    if ema is not None:
        if not parts["ema"]:
            raise UserError(f"{folder} was saved without EMA; set train.ema_decay = 0 to resume it")
        ema.load_state_dict(parts["ema"])
    sampler.load_state_dict(parts["progress"]["sampler"])
    set_rng_state(parts["rng"], {"train": gen})
    log.info("resumed from %s", folder)
    return int(parts["progress"]["step"]), parts["progress"].get("smoothed")


def export_model(state: dict, out: Path, name: str, formats, dtype: str, keep_guidance: bool,
                 metadata: dict) -> list[Path]:
    """Write the trained weights (diffusers keys) through the checkpoint converter in each requested format."""
    from ..flux.checkpoint import convert
    from ..outputs import save_safetensors

    tdtype = COMPUTE_DTYPES["no" if dtype == "fp32" else dtype]
    tmp = out / f".{name}.export.safetensors"  # diffusers-keyed source for convert (it streams from files)
    save_safetensors({k: v.detach().to("cpu", tdtype).contiguous() for k, v in state.items()}, tmp,
                     overwrite=True)
    targets = {"bfl": (out / f"{name}.safetensors", "bfl", dtype),
               "diffusers": (out / f"{name}-diffusers", "diffusers", dtype),
               "fp8": (out / f"{name}-fp8.safetensors", "bfl", "fp8-scaled")}
    files = []
    try:
        for f in formats:
            dst, layout, dt = targets[f]
            files.append(convert(tmp, dst, layout=layout, dtype=dt, overwrite=True, drop_guidance=not keep_guidance,
                                 extra_metadata=metadata))
    finally:
        tmp.unlink(missing_ok=True)
    return files


# ------------------------------------------------------------------------------------------------ recipe
def dedistill(cfg: DedistillConfig, resume: str | None = None, progress: bool = True) -> dict:
    """Run the whole job; returns a summary (losses, exported files)."""
    from accelerate import Accelerator

    from ..data.loader import BucketBatchSampler
    from ..flux.checkpoint import load_transformer
    from ..train.ema import EMA
    from ..train.optim import build_optimizer, build_scheduler
    from ..train.progress import Progress
    from ..train.state import save_state

    quiet_libraries()
    tc = cfg.train
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    out = Path(cfg.save.output_dir)
    if main:
        steps.prepare_output_dir(out, resume is not None, cfg.save.overwrite)
        write_text(out / "config.toml", render_toml(cfg))
    accelerator.wait_for_everyone()
    state_dir = out / "state"
    torch.manual_seed(tc.seed)
    compute = COMPUTE_DTYPES[tc.mixed_precision]

    # 1. data (rank 0 fills the cache first, the others then read it)
    with accelerator.main_process_first():
        dataset, buckets, empty = load_data(cfg, out, device)
    # global batches, cut identically on every rank; drop_last: a partial batch cannot be split evenly
    sampler = BucketBatchSampler(buckets, cfg.data.batch_size * world, seed=tc.seed, drop_last=True)

    # 2. student: every weight trainable, fp32 master copy (autocast computes in bf16)
    start_from = cfg.model.transformer or cfg.model.path
    student, ckpt = load_transformer(start_from, dtype=torch.float32, allow_pickle=cfg.model.allow_pickle)
    if cfg.objective == "guidance_distill":
        if not ckpt.spec().guidance_embeds:
            student = with_guidance_embedding(student)
    elif not ckpt.spec().guidance_embeds:
        log.warning("%s has no guidance embedding: it is already de-distilled or pro-like", start_from)
    student.to(device).requires_grad_(True).train()
    if cfg.model.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    teacher = None
    if cfg.objective == "cfg_teacher":
        teacher, tck = load_transformer(cfg.model.teacher or start_from, dtype=compute,
                                        allow_pickle=cfg.model.allow_pickle)
        if not tck.spec().guidance_embeds:
            raise UserError(f"the cfg_teacher objective needs a guidance-distilled teacher (dev); "
                            f"{cfg.model.teacher or start_from} has no guidance embedding")
        teacher.to(device).eval()
    elif cfg.objective == "guidance_distill":
        if not cfg.model.teacher:
            raise UserError("model.teacher: the guidance_distill objective needs a CFG teacher (a pro-like model)")
        teacher, _ = load_transformer(cfg.model.teacher, dtype=compute, allow_pickle=cfg.model.allow_pickle)
        teacher.to(device).eval()
    optimizer = build_optimizer(student.parameters(), "adamw", tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.steps, tc.schedule)
    student, optimizer = accelerator.prepare(student, optimizer)
    inner = accelerator.unwrap_model(student)
    ema = EMA(inner.parameters(), tc.ema_decay) if tc.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(tc.seed)  # shared by all ranks: dropout, noise, sigmas, w
    start, smoothed = 0, None
    if resume is not None:
        start, smoothed = restore(resume, state_dir, inner, optimizer, scheduler, ema, gen, sampler)
    batches = steps.batches_forever(sampler)
    fsdp = accelerator.distributed_type.name == "FSDP"
    if fsdp and cfg.save.every:
        log.warning("save.every: resumable state is not written under FSDP yet (only the final export)")

    bar = Progress(tc.steps, start, "dedistill", out / "logs" if main else None, enabled=progress and main,
                   smoothed=smoothed)
    losses: list[float] = []
    t0, stop_after = time.perf_counter(), int(os.environ.get("DEV2PRO_STOP_AFTER_STEP", "0"))
    for step in range(start, tc.steps):
        total, logged = 0.0, {}
        for _ in range(tc.grad_accum):
            x0, noise, sigmas, w_scale, text = global_batch(dataset, next(batches), rank, world, empty,
                                                            cfg.data.caption_dropout, gen, teacher is not None,
                                                            cfg.teacher, tc)
            with accelerator.autocast():
                if teacher is None:
                    loss, parts = flow_objective(student, x0, noise, sigmas, text, device, torch.float32)
                elif cfg.objective == "guidance_distill":
                    loss, parts = guidance_distill_objective(student, teacher, x0, noise, sigmas, w_scale, text,
                                                             empty, device, torch.float32, compute)
                else:
                    loss, parts = cfg_teacher_objective(student, teacher, x0, noise, sigmas, w_scale, text, empty,
                                                        cfg.teacher.flow_weight, device, torch.float32, compute)
            accelerator.backward(loss / tc.grad_accum)
            # the logged loss is the global batch's: the mean over ranks
            total += accelerator.reduce(loss.detach(), "mean").item() / tc.grad_accum
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v.item() / tc.grad_accum
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), tc.max_grad_norm) \
            if tc.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        losses.append(total)
        if grad_norm is not None:
            logged["grad_norm"] = float(grad_norm)
        bar.update(step + 1, total, scheduler.get_last_lr()[0], logged)
        done = step + 1
        if cfg.save.every and done % cfg.save.every == 0 and done < tc.steps and not fsdp:
            if main:
                save_state(state_dir, done, _parts(inner.state_dict(), optimizer, scheduler, ema, gen, sampler,
                                                   done, bar.smoothed, tc.grad_accum), keep_last=cfg.save.keep_last)
            accelerator.wait_for_everyone()
        if stop_after and done == stop_after:
            bar.close()
            os._exit(17)  # test hook: die like a killed process right after step k
    bar.close()

    # 3. export (EMA weights when kept); the full state dict is gathered from FSDP shards
    if ema is not None:
        with ema.applied():
            state = accelerator.get_state_dict(student)
    else:
        state = accelerator.get_state_dict(student)
    files = []
    elapsed = time.perf_counter() - t0
    if main:
        meta = {"dev2pro.recipe": "dedistill", "dev2pro.objective": cfg.objective, "dev2pro.steps": str(tc.steps),
                "dev2pro.ema_decay": str(tc.ema_decay), "dev2pro.start": Path(start_from).name}
        files = export_model(state, out, cfg.save.name, cfg.save.formats, cfg.save.dtype, cfg.save.keep_guidance,
                             meta)
        summary = {"losses": losses, "files": [str(f) for f in files], "steps": tc.steps, "world_size": world,
                   "seconds": elapsed, "steps_per_second": (tc.steps - start) / max(elapsed, 1e-9)}
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return {"losses": losses, "files": [str(f) for f in files], "steps": tc.steps, "world_size": world,
            "seconds": elapsed}


def add_dedistill_parser(sub):
    from ..config import add_config_command

    add_config_command(sub, "dedistill", "full fine-tune of FLUX.1-dev away from guidance distillation (make a "
                       "dev2pro); launch with accelerate/torchrun for several GPUs", DedistillConfig,
                       load_dedistill_config, lambda cfg, resume, progress: dedistill(cfg, resume, progress=progress))


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
