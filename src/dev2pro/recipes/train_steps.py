"""The steps of `dev2pro train`, as functions the recipe calls in order (and `dedistill` reuses).

Each step reads the config sections it needs and calls library functions with explicit arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..flow import flow_loss, flow_target, noisy_input, sample_sigmas

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ output dir
def prepare_output_dir(out: Path, resume: str | None, overwrite: bool, say: Callable[[str], None] = print) -> Path:
    """Check the (locked) run folder for this start; returns its state folder.

    A folder a failed start left behind (config, caches, logs: no state, no LoRA) is reused by a plain rerun; a run
    that saved needs ``--resume`` (or ``save.overwrite``); a folder holding anything else is never reused silently.
    """
    from ..train.run import folder_status, os_error_message

    status = folder_status(out)
    if resume == "latest" and status in ("absent", "empty", "started"):
        raise UserError(f"nothing to resume: {out} " + (
            "was started but never saved a training state (a failed start, or a run stopped before its first save)"
            if status == "started" else "holds no run") + "; run the same command without --resume to start it")
    if resume is None and status in ("saved", "foreign") and not overwrite:
        raise UserError(f"output folder {out} already holds " + ("a run" if status == "saved" else "other files") +
                        "; pass --resume to continue it, set save.overwrite = true to start over in it, or choose "
                        "another save.output_dir")
    if resume is None and status == "started":
        say(f"reusing {out}: an earlier start never saved anything (cached latents and text are reused when valid)")
    if resume is None and status == "saved" and (out / "state").is_dir():
        # starting over (save.overwrite): the old run's states must not be what a later --resume picks up
        import shutil

        shutil.rmtree(out / "state")
        say(f"save.overwrite: starting over in {out} (the previous run's training states were removed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(os_error_message(e, out, "create the run folder")) from None
    return out / "state"


# ------------------------------------------------------------------------------------------------ data
@dataclass
class PreparedData:
    dataset: object
    sampler: object
    collate: Callable
    sample_embeds: list  # (prompt_embeds, pooled) per sample prompt
    negative_embeds: tuple | None
    components: dict  # vae + scheduler kept for sampling (text encoders freed)
    image_seq_lens: list


def encoder_identity(folder: Path) -> str:
    """A cheap identity for the encoders of a model folder: configs + weight-file headers, sizes and mtimes."""
    h = hashlib.sha256()
    for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        d = folder / sub
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            st = f.stat()
            h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare_data(cfg, out: Path, device) -> PreparedData:
    """Dataset, batch sampler, collate and sample-prompt embeddings; from folders (cached here) or shards."""
    if cfg.data.shards:
        return _prepare_shards(cfg, device)
    from ..data.buckets import assign_bucket, make_buckets
    from ..data.cache import cache_latents, cache_text, load_cached
    from ..data.folders import DatasetFolder, scan_dataset
    from ..data.loader import CacheEntry, CachedDataset
    from ..flux.latents import encode_images

    d = cfg.data
    folders = [DatasetFolder(Path(f.path), f.repeats, f.caption or None, getattr(f, "recursive", False))
               for f in d.folders]
    buckets = make_buckets(d.resolution * d.resolution, step=d.bucket_step)
    items = scan_dataset(folders, default_caption=d.default_caption or None, trigger=d.trigger or None,
                         min_size=d.min_size, strict=d.strict, buckets=buckets)
    sizes = []
    for it in items:
        w, h = it.size if it.size else _image_size(it.path)
        sizes.append(assign_bucket(w, h, buckets))
    model_dir = Path(cfg.model.path)
    text_device, text_dtype = text_encoder_placement(cfg.model, device)
    comps = load_encoders(model_dir, device, text_device, text_dtype)
    enc_id = encoder_identity(model_dir)
    cache_dir = Path(d.cache_dir) if d.cache_dir else out / "cache"
    latent_paths = cache_latents([(it.path, s) for it, s in zip(items, sizes)],
                                 lambda px: encode_images(comps["vae"], px).cpu(), f"vae:{enc_id}", cache_dir)
    t5_len = cfg.model.t5_max_length
    text_pipe = comps["pipe"]
    encode_text = text_encoder(text_pipe, text_device, t5_len)

    settings = {"t5_max_length": t5_len}
    if text_dtype != torch.float32:  # bf16 embeddings are other values: they get their own cache entries
        settings["text_encoder_dtype"] = str(text_dtype).removeprefix("torch.")
    captions = [it.caption for it in items]
    extra = [""] + list(cfg.sample.prompts) + ([cfg.sample.negative] if cfg.sample.negative else [])
    text_paths = cache_text(captions + extra, encode_text, f"text:{enc_id}", settings, cache_dir)
    # the encoders are not needed again: free them before the transformer arrives
    components = {"vae": comps["vae"].to("cpu"), "scheduler": text_pipe.scheduler}
    comps = text_pipe = None  # drop the encoders (closures above are not called again)
    _free(device)
    entries = [CacheEntry(lp, text_paths[it.caption], it.caption, it.repeats)
               for it, lp in zip(items, latent_paths)]

    def embeds_of(text):
        t = load_cached(text_paths[text])
        return t["prompt_embeds"][None], t["pooled"][None]

    sample_embeds = [embeds_of(p) for p in cfg.sample.prompts]
    negative = embeds_of(cfg.sample.negative) if cfg.sample.negative else embeds_of("")
    return _assemble(cfg, CachedDataset(entries), load_cached(text_paths[""]), sample_embeds, negative, components,
                     [(w // 16) * (h // 16) for w, h in sizes])


def _prepare_shards(cfg, device) -> PreparedData:
    """Pre-encoded shards (`dev2pro cache`): no VAE pass; the encoders load only to embed sample prompts."""
    from ..data.shards import ShardDataset

    dataset = ShardDataset(cfg.data.shards)
    empty = dataset.empty_text()
    if cfg.data.trigger or cfg.data.default_caption:
        log.warning("data.trigger/default_caption do not apply to shards: their captions were encoded by "
                    "`dev2pro cache`")
    sample_embeds, negative, components = [], (empty["prompt_embeds"][None], empty["pooled"][None]), {}
    if cfg.sample.prompts:
        text_device, text_dtype = text_encoder_placement(cfg.model, device)
        comps = load_encoders(Path(cfg.model.path), device, text_device, text_dtype)
        pipe = comps["pipe"]
        encode = text_encoder(pipe, text_device, empty["prompt_embeds"].shape[0])  # the shards' T5 length

        def embeds_of(text):
            t = encode([text])
            return t["prompt_embeds"], t["pooled"]

        sample_embeds = [embeds_of(p) for p in cfg.sample.prompts]
        if cfg.sample.negative:
            negative = embeds_of(cfg.sample.negative)
        components = {"vae": comps["vae"].to("cpu"), "scheduler": pipe.scheduler}
        comps = pipe = encode = None
        _free(device)
    return _assemble(cfg, dataset, empty, sample_embeds, negative, components,
                     [(h // 2) * (w // 2) for h, w in dataset.buckets()])


def _assemble(cfg, dataset, empty, sample_embeds, negative, components, seq_lens) -> PreparedData:
    from ..data.loader import BucketBatchSampler, collate

    sampler = BucketBatchSampler(dataset.buckets(), cfg.data.batch_size, seed=cfg.train.seed)
    dropout = cfg.data.caption_dropout

    def collate_fn(batch, generator):
        return collate(batch, empty_text=empty, dropout_p=dropout, generator=generator)

    return PreparedData(dataset, sampler, collate_fn, sample_embeds, negative, components, seq_lens)


def _image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def text_encoder_placement(model_cfg, device) -> tuple:
    """(device, dtype) for CLIP + T5 while caching: ``model.text_encoder`` (gpu|cpu), ``model.text_encoder_dtype``."""
    where = getattr(model_cfg, "text_encoder", "gpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[getattr(model_cfg, "text_encoder_dtype", "fp32")]
    return (torch.device("cpu") if where == "cpu" else device), dtype


def load_encoders(model_dir: Path, device, text_device=None, text_dtype=None) -> dict:
    """VAE (on ``device``) and a text-only FluxPipeline (CLIP + T5, on ``text_device``, default ``device``, in
    ``text_dtype``, default fp32) from a FLUX.1-dev-layout folder, offline."""
    from diffusers import AutoencoderKL, FluxPipeline

    if not (model_dir / "model_index.json").exists():
        raise UserError(f"model.path {model_dir} is not a FLUX.1-dev-layout model folder (no model_index.json); "
                        f"it must hold vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    try:
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval()
        pipe = FluxPipeline.from_pretrained(model_dir, transformer=None, vae=None, local_files_only=True,
                                            torch_dtype=text_dtype or torch.float32).to(text_device or device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the VAE/text encoders from {model_dir}: {e}") from None
    return {"vae": vae, "pipe": pipe}


def text_encoder(pipe, device, max_length: int) -> Callable[[list[str]], dict]:
    """captions -> {"prompt_embeds" (B, seq, D), "pooled" (B, P)} in fp32 on the CPU, with ``pipe``'s CLIP + T5."""

    @torch.no_grad()
    def encode(captions: list[str]) -> dict:
        pe, pooled, _ = pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=device,
                                           max_sequence_length=max_length)
        return {"prompt_embeds": pe.float().cpu(), "pooled": pooled.float().cpu()}

    return encode


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ model
def load_base(cfg, dtype, device):
    """The training base transformer, frozen, optionally with fp8 storage, gradient checkpointing on."""
    from ..flux.checkpoint import load_transformer
    from ..flux.fp8 import Fp8Policy

    src = cfg.model.transformer or cfg.model.path
    policy = Fp8Policy.from_names(cfg.model.fp8_keep)
    model, ckpt = load_transformer(src, dtype=dtype, fp8_storage=cfg.model.fp8_storage, policy=policy,
                                   allow_pickle=cfg.model.allow_pickle)
    if not getattr(cfg.model, "blocks_to_swap", 0):
        model.to(device)  # with block swap, place_base moves the resident part after the LoRA is added
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, ckpt


def place_base(model, cfg, device):
    """Block swap (``model.blocks_to_swap``), attention backend and regional compilation on the LoRA'd base.

    Returns the ``BlockSwap`` (None without swap). Call after ``add_lora`` so the LoRA weights are told apart.
    """
    from ..train.cuda import avoid_cudnn_attention

    avoid_cudnn_attention()
    swap = None
    n = getattr(cfg.model, "blocks_to_swap", 0)
    if n:
        from ..train.blockswap import BlockSwap

        if not cfg.model.gradient_checkpointing:
            log.warning("model.blocks_to_swap without gradient_checkpointing: autograd keeps every block's weights "
                        "for backward, so the swap saves no GPU memory; set model.gradient_checkpointing = true")
        swap = BlockSwap(model, n, device).place()
        log.info("block swap: %d blocks, %.2f GB of base weights in host RAM", n, swap.swapped_bytes() / 1024**3)
    tc = cfg.train
    if getattr(tc, "attention_backend", ""):
        try:
            model.set_attention_backend(tc.attention_backend)
        except Exception as e:  # unknown name, or a kernel package that is not installed
            raise UserError(f"train.attention_backend = {tc.attention_backend!r}: {e}") from None
    if getattr(tc, "compile", False):
        if swap is not None:
            log.warning("train.compile is skipped with block swap (its per-block hooks would break the graphs)")
        else:
            model.compile_repeated_blocks(dynamic=True)
    return swap


def add_lora(transformer, cfg, spec) -> list[torch.nn.Parameter]:
    """Inject the LoRA (after fp8 storage is in place, as peft needs) and make only its weights trainable, fp32."""
    from peft import LoraConfig

    from ..lora.targets import target_modules

    lc = cfg.lora
    names = target_modules(lc.targets, spec.num_double, spec.num_single, lc.extra_targets,
                           [int(i) for i in lc.double_blocks] or None, [int(i) for i in lc.single_blocks] or None,
                           spec.guidance_embeds)
    transformer.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                       target_modules=names, init_lora_weights=True), adapter_name="default")
    params = []
    for n, p in transformer.named_parameters():
        if "lora_" in n and ".default." in n:  # only the trained adapter (a training adapter stays frozen)
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    return params


def flow_matching_loss(transformer, batch: dict, tc, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """One batch's flow-matching loss at the fixed training guidance (noise/sigmas drawn on CPU from ``gen``)."""
    from ..flux.latents import image_ids, pack, text_ids

    x0 = batch["latents"]  # (B, C, h, w)
    b, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = sample_sigmas(b, tc.timestep_sampling, gen, sigmoid_scale=tc.sigmoid_scale, shift=tc.shift,
                           image_seq_len=(h // 2) * (w // 2))
    x_t = pack(noisy_input(x0, noise, sigmas))  # (B, T, C*4)
    target = pack(flow_target(x0, noise)).to(device)
    model = transformer.module if hasattr(transformer, "module") else transformer
    guidance = torch.full((b,), tc.guidance, device=device) if model.config.guidance_embeds else None
    pred = transformer(hidden_states=x_t.to(device, dtype), timestep=sigmas.to(device, dtype),
                       guidance=None if guidance is None else guidance.to(dtype),
                       pooled_projections=batch["pooled"].to(device, dtype),
                       encoder_hidden_states=batch["prompt_embeds"].to(device, dtype),
                       txt_ids=text_ids(batch["prompt_embeds"].shape[1], device=device),
                       img_ids=image_ids(h, w, device=device), return_dict=False)[0]
    return flow_loss(pred.float(), target.float())


# ------------------------------------------------------------------------------------------------ loop plumbing
def batches_forever(sampler):
    while True:
        yield from sampler


def save_state(state_dir: Path, step: int, model, optimizer, scheduler, sampler, gen, smoothed, grad_accum,
               keep_last, losses: list | None = None) -> Path:
    """The resumable state after ``step``; ``losses`` (steps 1..step, None = skipped) feeds ``loss.png``."""
    from peft.utils import get_peft_model_state_dict

    from ..train.state import rng_state, save_state as write

    return write(state_dir, step, {
        "lora": {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state({"train": gen}),
        "progress": {"step": step, "smoothed": smoothed,
                     "sampler": sampler.state_dict(batches_done=step * grad_accum),
                     "losses": list(losses or [])},
    }, keep_last=keep_last)


@dataclass
class Resumed:
    step: int
    smoothed: float | None
    folder: Path
    losses: list  # per step 1..step (None = skipped or not recorded)


def resume_state(resume: str, state_dir: Path, model, optimizer, scheduler, sampler, gen) -> Resumed:
    """Restore a saved state into the live objects."""
    from peft.utils import set_peft_model_state_dict

    from ..train.state import latest_state, load_state, set_rng_state

    folder = latest_state(state_dir) if resume == "latest" else Path(resume)
    if folder is None or not folder.is_dir():
        raise UserError(f"nothing to resume: no training state in {state_dir}" if resume == "latest" else
                        f"--resume {resume}: not a state folder (expected .../state/step-NNNNNN)")
    parts = load_state(folder)
    result = set_peft_model_state_dict(model, parts["lora"])
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{folder}: the saved LoRA does not match this config's LoRA shape/targets")
    optimizer.load_state_dict(parts["optimizer"])
    scheduler.load_state_dict(parts["scheduler"])
    sampler.load_state_dict(parts["progress"]["sampler"])
    set_rng_state(parts["rng"], {"train": gen})
    step = int(parts["progress"]["step"])
    losses = list(parts["progress"].get("losses", []))[:step]
    return Resumed(step, parts["progress"].get("smoothed"), folder, [None] * (step - len(losses)) + losses)


def save_lora_files(model, cfg, ckpt, out: Path, suffix: str) -> list[Path]:
    from ..lora.formats import kohya_metadata, save_lora
    from ..lora.ops import lora_from_peft_model

    lw = lora_from_peft_model(model, "default")
    meta = kohya_metadata(cfg.lora.rank, cfg.lora.alpha, cfg.train.guidance, cfg.train.timestep_sampling,
                          Path(cfg.model.transformer or cfg.model.path).name,
                          extra={"ss_steps": cfg.train.steps, "ss_learning_rate": cfg.train.lr,
                                 "dev2pro.train_base_variant": ckpt.spec().variant,
                                 "dev2pro.inference_base": Path(cfg.model.inference_base).name
                                 if cfg.model.inference_base else "",
                                 "dev2pro.training_adapter": Path(cfg.model.adapter).name if cfg.model.adapter
                                 else ""})
    files = []
    for layout in cfg.save.formats:
        ext = "" if layout == "kohya" else f".{layout}"
        files.append(save_lora(lw, out / f"{cfg.save.name}{suffix}{ext}.safetensors", layout, meta, overwrite=True))
    return files


class InferenceBase:
    """Samples of the current LoRA on the base it will be used with (``model.inference_base``, e.g. dev).

    The inference transformer lives on the CPU and visits the device only while sampling, so a 24 GB card does
    not hold two bases at once; the current LoRA weights are copied into it as a peft adapter each time.
    """

    def __init__(self, cfg, ckpt, dtype, data: PreparedData, device):
        self.cfg, self.dtype, self.data, self.device = cfg, dtype, data, device
        self.model = None
        if cfg.model.inference_base and cfg.sample.prompts:
            from ..flux.checkpoint import load_transformer
            from ..flux.fp8 import Fp8Policy

            self.model, _ = load_transformer(cfg.model.inference_base, dtype=dtype,
                                             fp8_storage=cfg.model.fp8_storage,
                                             policy=Fp8Policy.from_names(cfg.model.fp8_keep),
                                             allow_pickle=cfg.model.allow_pickle)
        self.swap = None
        if self.model is not None and getattr(cfg.model, "blocks_to_swap", 0):
            from ..train.blockswap import BlockSwap

            self.swap = BlockSwap(self.model, cfg.model.blocks_to_swap, device)  # placed while sampling only

    def sample(self, train_model, step: int, folder: Path, bar, progress: bool = False) -> Path:
        """Render the grid; with ``model.adapter`` on the training model with the adapter off (= the LoRA on dev),
        and with ``sample.with_adapter`` a second grid with it on. Returns the (first) grid's path."""
        if not self.cfg.model.adapter:
            return self._sample(train_model, step, folder, bar, progress)
        from ..lora import adapter

        with adapter.disabled(train_model):
            path = self._sample(train_model, step, folder, bar, progress)
        if self.cfg.sample.with_adapter:
            self._sample(train_model, step, folder, bar, progress, suffix="-adapter")
        return path

    def _sample(self, train_model, step: int, folder: Path, bar, progress: bool = False, suffix: str = "") -> Path:
        from ..lora.ops import apply_lora, lora_from_peft_model
        from ..sampling import build_pipeline, make_labelled_grid, render, save_png
        from ..train.progress import render_each

        sc = self.cfg.sample
        lw = lora_from_peft_model(train_model, "default")
        if self.model is not None:
            target = self.model if self.swap else self.model.to(self.device)
            if "sample" in getattr(target, "peft_config", {}):
                target.delete_adapters("sample")
            apply_lora(target, lw, 1.0, adapter_name="sample")
            if self.swap:
                self.swap.place()  # after apply_lora, so the new LoRA weights go to the device too
        else:
            target = train_model
        was_training = target.training
        target.eval()
        vae = self.data.components["vae"].to(self.device)
        if getattr(self.cfg.model, "vae_tiling", False):
            vae.enable_tiling()
        pipe = build_pipeline({**self.data.components, "vae": vae}, target)
        with torch.no_grad():  # prompt-major: one grid row per prompt, one column per seed
            images = render_each(render, pipe, self.data.sample_embeds, [int(s) for s in sc.seeds], f"samples {step}",
                                 progress, guidance=sc.guidance, true_cfg=sc.cfg, negative=self.data.negative_embeds,
                                 steps=sc.steps, width=sc.width, height=sc.height)
        if was_training:
            target.train()
        if self.swap:
            self.swap.unplace()
        elif self.model is not None:
            self.model.to("cpu")
        self.data.components["vae"].to("cpu")
        base = self.cfg.model.inference_base or "training base"
        if self.cfg.model.adapter:
            base += f" + adapter {Path(self.cfg.model.adapter).name}" if suffix else " without the adapter"
        title = f"step {step}  |  guidance {sc.guidance}  |  {Path(base).name}"
        rows, cols = [str(p) for p in sc.prompts], [f"seed {s}" for s in sc.seeds]
        grid = make_labelled_grid(images, rows, cols, title)
        folder.mkdir(parents=True, exist_ok=True)
        path = save_png(grid, folder / f"step{step:06d}{suffix}.png",
                        {"step": str(step), "prompts": json.dumps(list(sc.prompts)), "seeds": json.dumps(sc.seeds),
                         "guidance": str(sc.guidance), "base": base, "title": title, "rows": json.dumps(rows),
                         "cols": json.dumps(cols)}, overwrite=True)
        bar.image("samples" + suffix, grid, step)
        return path
