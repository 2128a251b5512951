"""The steps of `dev2pro dedistill`, as functions the recipe calls in order: the objectives (the maths), data,
student and teacher, the resumable state, sample grids and the export. Each reads the config sections it needs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..flow import flow_loss, flow_target, noisy_input, sample_sigmas
from ..train import fsdp as fsdpmod
from . import train_steps as steps

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def objective_loss(cfg, student, teacher, x0, noise, sigmas, w_scale, text, empty, device, teacher_dtype):
    """The configured objective's (loss, logged parts); the student computes in fp32 under autocast."""
    if cfg.objective == "flow":
        return flow_objective(student, x0, noise, sigmas, text, device, torch.float32)
    if cfg.objective == "guidance_distill":
        return guidance_distill_objective(student, teacher, x0, noise, sigmas, w_scale, text, empty, device,
                                          torch.float32, teacher_dtype)
    return cfg_teacher_objective(student, teacher, x0, noise, sigmas, w_scale, text, empty,
                                 cfg.teacher.flow_weight, device, torch.float32, teacher_dtype)


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
@dataclass
class Data:
    dataset: object
    buckets: list  # latent (h, w) of every index, for BucketBatchSampler
    empty: dict  # the empty prompt's text tensors: caption dropout, the CFG branches
    sample_embeds: list  # (prompt_embeds, pooled) per sample prompt; [] when samples are off
    negative: tuple | None  # the empty prompt as the true-CFG negative of the samples
    components: dict  # VAE + scheduler for samples (the text encoders are freed)


def load_data(cfg, out: Path, device) -> Data:
    """Shards from `dev2pro cache`, or folders cached through the LoRA recipe's data step."""
    prompts = list(cfg.sample.prompts) if cfg.sample.every else []
    if cfg.data.shards:
        from ..data.shards import ShardDataset

        ds = ShardDataset(cfg.data.shards)
        empty, embeds, negative, components = ds.empty_text(), [], None, {}
        if prompts:  # shards hold no encoders' work for the sample prompts: load CLIP/T5 for them only, then free
            from ..sampling import encode_and_free, load_components

            components = load_components(cfg.model.path)
            embeds, negative = encode_and_free(components, prompts, "", device,
                                               empty["prompt_embeds"].shape[0])  # the cache's T5 length
            components = {"vae": components["vae"], "scheduler": components["scheduler"]}
        return Data(ds, ds.buckets(), empty, embeds, negative, components)
    # the LoRA recipe's data step reads these fields only; its "negative" is the empty prompt
    view = SimpleNamespace(data=cfg.data, model=cfg.model, train=cfg.train,
                           sample=SimpleNamespace(prompts=prompts, negative=""))
    prepared = steps.prepare_data(view, out, device)
    pe, pooled = prepared.negative_embeds
    return Data(prepared.dataset, prepared.dataset.buckets(), {"prompt_embeds": pe[0], "pooled": pooled[0]},
                prepared.sample_embeds, prepared.negative_embeds, prepared.components)


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


# ------------------------------------------------------------------------------------------------ models
def load_student(cfg, fsdp: "fsdpmod.FsdpSettings | None", device, compute: torch.dtype):
    """The start weights in fp32, every weight trainable, on ``device``; sharded per block under FSDP.

    guidance_distill grows a guidance embedding on a start file without one. Under FSDP with
    ``ram_efficient_loading`` the model is built on the meta device and sharded first; each rank then reads only
    its rows of each tensor (one full tensor in memory at a time).
    """
    from ..flux import keys as keymod
    from ..flux.checkpoint import load_transformer, open_checkpoint
    from ..flux.spec import build_transformer

    start_from = cfg.model.transformer or cfg.model.path
    ckpt = open_checkpoint(start_from, allow_pickle=cfg.model.allow_pickle)
    grow = cfg.objective == "guidance_distill" and not ckpt.spec().guidance_embeds
    if not grow and not ckpt.spec().guidance_embeds:
        log.warning("%s has no guidance embedding: it is already de-distilled or pro-like", start_from)
    if fsdp and fsdp.ram_efficient_loading and not grow:
        student = build_transformer(ckpt.spec(), device="meta")
    else:
        student, _ = load_transformer(start_from, dtype=torch.float32, allow_pickle=cfg.model.allow_pickle)
        student = with_guidance_embedding(student) if grow else student
    if cfg.model.gradient_checkpointing or (fsdp and fsdp.activation_checkpointing):
        student.enable_gradient_checkpointing()
    if cfg.train.adapter_rank:
        return with_adapter_lora(student, cfg.train.adapter_rank, compute, cfg.model.fp8_storage).to(device), \
            start_from
    if not fsdp:
        return student.to(device).requires_grad_(True).train(), start_from
    student = fsdpmod.shard_transformer(student, device, fsdp, compute)  # DTensor shards (host RAM with offload)
    if student.x_embedder.weight.is_meta:
        student.to_empty(device="cpu" if fsdp.offload else device)
        plan = keymod.plan(ckpt.shapes, ckpt.key_layout, "diffusers")
        fsdpmod.fill_shards(student, lambda name: keymod.assemble(
            plan[name], lambda k: ckpt.get_dequantized(k, torch.float32)))
    return student.requires_grad_(True).train(), start_from


def with_adapter_lora(model, rank: int, compute: torch.dtype, fp8: bool):
    """Adapter de-distillation: the start model frozen (in ``compute``, or fp8 storage) with a trainable fp32 LoRA
    of ``rank`` on every Linear -- what `lora extract` would cover -- initialised to add nothing (B = 0)."""
    from peft import LoraConfig

    from ..flux.fp8 import Fp8Policy, enable_fp8_storage

    model.requires_grad_(False)
    if compute != torch.float32:
        model.to(compute)  # a frozen base needs no fp32 master copy
    if fp8:
        enable_fp8_storage(model, Fp8Policy(), compute_dtype=compute)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=True),
                      adapter_name="default")
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
            p.requires_grad_(True)
    return model.train()


def export_adapter(model, ema, out: Path, name: str, metadata: dict) -> list[Path]:
    """The de-distilled LoRA (EMA weights when kept) as adapter files: kohya (ComfyUI, `lora merge`) and diffusers."""
    import contextlib

    from ..lora.formats import save_lora
    from ..lora.ops import lora_from_peft_model

    with ema.applied() if ema is not None else contextlib.nullcontext():
        lw = lora_from_peft_model(model, "default")
    meta = {**{k: str(v) for k, v in metadata.items()}, "dev2pro.kind": "training_adapter"}
    return [save_lora(lw, out / f"{name}-adapter.safetensors", "kohya", metadata=meta, overwrite=True),
            save_lora(lw, out / f"{name}-adapter.diffusers.safetensors", "diffusers", metadata=meta, overwrite=True)]


def load_teacher(cfg, start_from: str, dtype, device):
    """The frozen teacher (a replica on every rank) or None for the flow objective."""
    from ..flux.checkpoint import load_transformer

    if cfg.objective == "flow":
        return None
    if cfg.objective == "guidance_distill" and not cfg.model.teacher:
        raise UserError("model.teacher: the guidance_distill objective needs a CFG teacher (a pro-like model)")
    path = cfg.model.teacher or start_from
    teacher, ckpt = load_transformer(path, dtype=dtype, allow_pickle=cfg.model.allow_pickle)
    if cfg.objective == "cfg_teacher" and not ckpt.spec().guidance_embeds:
        raise UserError(f"the cfg_teacher objective needs a guidance-distilled teacher (dev); {path} has no "
                        f"guidance embedding")
    return teacher.to(device).eval()


def warn_if_single_cpu_launch(world: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process (its CPU launcher; N only through mpirun):
    it exports MASTER_ADDR for N > 1 but no WORLD_SIZE. Say so instead of silently training on one process."""
    if world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and "WORLD_SIZE" not in os.environ:
        log.warning("accelerate launch --cpu started a single process: for N CPU processes use torchrun "
                    "--nproc_per_node N, or configs/accelerate/cpu-ddp.yaml / cpu-fsdp.yaml (README: De-distilling "
                    "at scale)")


def fsdp_settings(distributed: str, mixed_precision: str) -> fsdpmod.FsdpSettings | None:
    """FSDP settings when the run shards (train.distributed, or an accelerate FSDP config); None = DDP/1 process."""
    launcher = fsdpmod.settings_from_accelerate()
    if distributed == "ddp":
        if launcher is not None:
            raise UserError("train.distributed = 'ddp', but the accelerate config asks for FSDP: use a DDP config "
                            "or set train.distributed = 'auto'")
        return None
    if distributed == "auto" and launcher is None:
        return None
    if mixed_precision == "fp16":
        raise UserError("train.mixed_precision: fp16 needs a sharded gradient scaler, not supported under FSDP; "
                        "use bf16")
    return launcher or fsdpmod.FsdpSettings()


# ------------------------------------------------------------------------------------------------ state
def save_state(state_dir: Path, step: int, model, optimizer, scheduler, ema, gen, sampler, smoothed, accum: int,
               keep_last: int, rank: int, world: int, barrier, full: bool = False, losses: list | None = None) -> Path:
    """Resumable state (every rank calls this): weights, AdamW moments and EMA as sharded tensors, the rest common."""
    from ..train.state import rng_state

    # trainable weights only: all of them in a full fine-tune, the LoRA alone in adapter de-distillation
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {p: n for n, p in trained.items()}
    tensors = {f"model/{n}": p for n, p in trained.items()}
    scalars, moments = {}, set()
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape == p.shape:
                tensors[f"optim/{k}/{names[p]}"] = v
                moments.add(k)
            else:
                scalars.setdefault(names[p], {})[k] = v
    if ema is not None:
        tensors.update({f"ema/{names[p]}": s for p, s in zip(ema.params, ema.shadow)})
    common = {"optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in optimizer.param_groups],
                            "scalars": scalars, "moments": sorted(moments)},
              "scheduler": scheduler.state_dict(), "rng": rng_state({"train": gen}),
              "ema": {"decay": ema.decay, "updates": ema.updates} if ema is not None else {},
              "progress": {"step": step, "smoothed": smoothed,
                           "sampler": sampler.state_dict(batches_done=step * accum), "losses": list(losses or [])}}
    return fsdpmod.save_sharded_state(state_dir, step, tensors, common, rank, world, barrier, keep_last, full)


def resumed_folder(resume: str, state_dir: Path) -> Path | None:
    from ..train.state import latest_state

    return latest_state(state_dir) if resume == "latest" else Path(resume)


def restore(resume: str, state_dir: Path, model, optimizer, scheduler, ema, gen, sampler):
    """Load a saved state (from any number of processes, sharded or not) into the live objects
    -> (step, smoothed, losses of steps 1..step with None where unknown)."""
    from ..train.state import latest_state, set_rng_state

    folder = latest_state(state_dir) if resume == "latest" else Path(resume)
    if folder is None or not folder.is_dir():
        raise UserError(f"nothing to resume: no training state in {state_dir}" if resume == "latest" else
                        f"--resume {resume}: not a state folder (expected .../state/step-NNNNNN)")
    common = fsdpmod.read_common(folder)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # what save_state wrote
    targets = {f"model/{n}": p for n, p in params.items()}
    saved = common["optimizer"]
    for n, p in params.items():  # AdamW state created here (shaped and sharded like p), filled below
        if n in saved["scalars"]:
            optimizer.state[p] = {**saved["scalars"][n], **{k: torch.zeros_like(p) for k in saved["moments"]}}
            targets.update({f"optim/{k}/{n}": optimizer.state[p][k] for k in saved["moments"]})
    for group, values in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(values)
    if ema is not None:
        if not common["ema"]:
            raise UserError(f"{folder} was saved without EMA; set train.ema_decay = 0 to resume it")
        ema.decay, ema.updates = float(common["ema"]["decay"]), int(common["ema"]["updates"])
        names = {p: n for n, p in params.items()}
        targets.update({f"ema/{names[p]}": s for p, s in zip(ema.params, ema.shadow)})
    fsdpmod.load_sharded_tensors(folder, targets)
    scheduler.load_state_dict(common["scheduler"])
    sampler.load_state_dict(common["progress"]["sampler"])
    set_rng_state(common["rng"], {"train": gen})
    step = int(common["progress"]["step"])
    losses = list(common["progress"].get("losses", []))[:step]
    return step, common["progress"].get("smoothed"), [None] * (step - len(losses)) + losses


def any_rank(flag: bool, accelerator) -> bool:
    """True on every rank when ``flag`` is set on any (a Ctrl-C may reach only some processes)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item() > 0)


# ------------------------------------------------------------------------------------------------ samples
def sample_grids(model, data: Data, sc, step: int, folder: Path, bar, main: bool, autocast, device) -> list[Path]:
    """Grids (rows = prompts, cols = seeds) at guidance 1.0 and with true CFG at ``sc.guidance``.

    Every rank renders (under FSDP each forward needs all ranks' shards; under DDP it costs no extra wall time);
    the main process writes ``stepNNNNNN-g1.png`` / ``-cfg.png`` and logs them to TensorBoard.
    """
    from ..sampling import build_pipeline, make_labelled_grid, render, save_png

    vae = data.components["vae"].to(device)
    pipe = build_pipeline({**data.components, "vae": vae}, model)
    seeds, paths = [int(s) for s in sc.seeds], []
    for tag, scale in (("g1", 1.0), ("cfg", float(sc.guidance))):
        with autocast():  # the training forward's precision (FSDP's bf16 shards need it)
            images = render(pipe, data.sample_embeds, seeds, guidance=1.0, true_cfg=scale, negative=data.negative,
                            steps=sc.steps, width=sc.width, height=sc.height)
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            title = f"step {step}  |  guidance 1.0" + (f", true CFG {scale:g}" if tag == "cfg" else ", no CFG")
            rows, cols = [str(p) for p in sc.prompts], [f"seed {s}" for s in seeds]
            grid = make_labelled_grid(images, rows, cols, title)
            paths.append(save_png(grid, folder / f"step{step:06d}-{tag}.png",
                                  {"step": str(step), "prompts": json.dumps(list(sc.prompts)),
                                   "seeds": json.dumps(seeds), "true_cfg": str(scale), "guidance": "1.0",
                                   "title": title, "rows": json.dumps(rows), "cols": json.dumps(cols)},
                                  overwrite=True))
            bar.image(f"samples/{tag}", grid, step)
    vae.to("cpu")
    return paths


# ------------------------------------------------------------------------------------------------ export
def final_weights(model, ema, dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    """The weights to export (the EMA when kept), gathered to rank 0 in ``dtype``; ``{}`` on the other ranks."""
    if ema is None:
        return fsdpmod.gather_state(model, dtype, rank)
    with ema.applied():
        return fsdpmod.gather_state(model, dtype, rank)


def export_model(state: dict, out: Path, name: str, formats, dtype: str, keep_guidance: bool,
                 metadata: dict) -> list[Path]:
    """Write the trained weights (diffusers keys) through the checkpoint converter in each requested format."""
    from ..flux.checkpoint import convert
    from ..outputs import clean_stale_temps, save_safetensors, temp_path

    # a killed export left its diffusers-keyed source (a recognisable temp; older versions: a fixed hidden name)
    clean_stale_temps(out, force=True)
    (out / f".{name}.export.safetensors").unlink(missing_ok=True)
    tdtype = COMPUTE_DTYPES["no" if dtype == "fp32" else dtype]
    tmp = temp_path(out / f"{name}.export.safetensors")  # diffusers-keyed source for convert (it streams files)
    targets = {"bfl": (out / f"{name}.safetensors", "bfl", dtype),
               "diffusers": (out / f"{name}-diffusers", "diffusers", dtype),
               "fp8": (out / f"{name}-fp8.safetensors", "bfl", "fp8-scaled")}
    # the temp's name holds a pid: the exports record a fixed source name, so reruns write identical bytes
    metadata = {"dev2pro.source": f".{name}.export.safetensors", **metadata}
    files = []
    try:
        save_safetensors({k: v.detach().to("cpu", tdtype).contiguous() for k, v in state.items()}, tmp,
                         overwrite=True, what="exported weights")
        for f in formats:
            dst, layout, dt = targets[f]
            files.append(convert(tmp, dst, layout=layout, dtype=dt, overwrite=True, drop_guidance=not keep_guidance,
                                 extra_metadata=metadata))
    finally:
        tmp.unlink(missing_ok=True)
    return files


def export_or_keep_state(state: dict, out: Path, save, metadata: dict, state_dir: Path) -> list[Path]:
    """``export_model`` with a full disk (or a read-only folder) turned into one line that names the kept state."""
    from ..train.run import write_error_message, write_errors
    from ..train.state import latest_state

    try:
        return export_model(state, out, save.name, save.formats, save.dtype, save.keep_guidance, metadata)
    except write_errors() as e:
        why = write_error_message(e, out / f"{save.name}.safetensors", "export the model to")
        kept = latest_state(state_dir)
        if kept is None:
            raise UserError(f"{why}; no training state was kept (set save.every to keep one): free space and "
                            f"train again") from None
        raise UserError(f"{why}; the training state {kept} is kept: free space and run `dev2pro dedistill "
                        f"{out / 'config.toml'} --resume` to export it") from None
