"""The config schemas of `dev2pro train` and `dev2pro dedistill`, and their loaders.

Shared sections are written once, as bases each recipe extends (adds fields, may change a default or a help
text), never inherits-then-forbids: one ``DataSection`` (folders or shards, the bucket checks for both), an
optimisation base ``OptimBase`` (the LoRA's ``TrainSection`` adds the optimizer choice, the embedded training
guidance, compile and the attention backend, and ``train.epochs``; ``DedistillTrain`` adds EMA, distribution and
the adapter rank), and model bases; the sample and save sections (``sample.guidance`` is always the embedded
guidance, ``sample.cfg`` always the true-CFG scale) are ``schemas_save``'s, re-exported here. Path fields are
marked ``path=True``; ``config.load_config`` resolves them all against the config file's folder. Keys a recipe
no longer has are listed in a section's ``RENAMED`` with what to do. What the recipes derive from a loaded config
(plan inputs, data source, a --vram preset) is ``recipe_inputs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .choices import (ATTENTION_BACKENDS, COMPUTE_DTYPES, FAMILIES, LORA_TARGETS, MAX_REFERENCES, MIXED_PRECISION,
                      OBJECTIVES, OPTIMIZERS, SCHEDULES, TEXT_DTYPES, TIMESTEP_MODES, VRAM_CHOICES)
from .config import (as_list, explicit_keys, load_config, opt, ordered, require, require_path_list, require_range,
                     section)
from .errors import ConfigError
from .recipe_inputs import apply_vram_preset, check_rank_fits, data_source, plan_inputs  # noqa: F401 (API)
from .recipe_inputs import apply_sample_guidance_default
from .schemas_compare import Arm, CompareConfig, load_compare_config  # noqa: F401 (API)
from .schemas_eval import LoggingSection, ValidationSection
from .schemas_save import (MAX_RESOLUTION, DedistillSample, DedistillSave, SampleBase,  # noqa: F401 (API)
                           SampleSection, SaveBase, SaveSection)

COMPILE_CHOICES = ("off", "blocks", False, True)  # true/false: the older boolean spelling
LORA_DTYPES = ("compute", "fp32")
MAX_RANK = 6144  # the widest Flux layer (FLUX.2 dev's hidden width); the checkpoint's own widths are checked later
MAX_BATCH = 1024


def compile_mode(value) -> str:
    """``train.compile`` as "off" | "blocks" (``true`` is "blocks", ``false`` "off")."""
    return {True: "blocks", False: "off"}.get(value, value) if isinstance(value, bool) else value



# ------------------------------------------------------------------------------------------------ model
PRESET = "model.vram's preset when set"  # --print-config comments these out: a preset fills what is unwritten


@dataclass
class ModelBase:
    path: str = opt("", "model folder in the diffusers layout (FLUX.1-dev, FLUX.2 klein or dev): text encoder(s), "
                              "tokenizer(s), VAE and, unless model.transformer is set, the transformer",
                    path=True)
    transformer: str = opt("", "optional transformer file overriding the folder's (e.g. a dev2pro fp8 file)",
                           path=True)
    family: str = opt("auto", "model family: auto (from the checkpoint's keys), flux1 or flux2", ("auto", *FAMILIES))
    gradient_checkpointing: bool | str = opt("auto", "recompute activations in backward: auto (off when the memory "
                                                     "plan says the step fits the GPU without it: faster; on on CPU "
                                                     "and with blocks_to_swap), true or false", (True, False, "auto"),
                                                 model_default=PRESET)
    fp8_storage: bool = opt(False, "store base weights in fp8 (bf16 compute); lowers memory with checkpointing",
                            model_default=PRESET)
    t5_max_length: int = opt(512, "caption tokens the text encoder reads: FLUX.1's T5 (512 for dev and de-distilled "
                                             "bases; kohya's 256 is schnell's), FLUX.2's Qwen3/Mistral (512, as its pipelines)")
    allow_pickle: bool = opt(False, "allow .ckpt/.pt model files (they can run code)")

    def validate(self):
        require(bool(self.path), "path: set model.path to a diffusers model folder (FLUX.1-dev, FLUX.2 klein or dev)")
        require(0 < self.t5_max_length <= 512, "t5_max_length must be in 1..512")


@ordered("path", "transformer", "family", "inference_base", "adapter", "adapter_scale", "dtype", "fp8_storage",
         "fp8_keep",
         "gradient_checkpointing", "blocks_to_swap", "vram", "text_encoder", "text_encoder_dtype", "vae_tiling",
         "t5_max_length", "allow_pickle")
@dataclass
class ModelSection(ModelBase):
    inference_base: str = opt("", "transformer used for samples, where the LoRA will be used (the original "
                                  "FLUX.1-dev; FLUX.2 klein distilled beside its Base); empty = the training base",
                              path=True)
    adapter: str = opt("", "training adapter: a LoRA (e.g. dev -> dev2pro from `lora extract` or `dedistill` with "
                           "train.adapter_rank) applied as a frozen side branch while training, off for samples; "
                           "the training base is then dev and inference_base stays empty", path=True)
    adapter_scale: float = opt(1.0, "strength of the training adapter")
    dtype: str = opt("bf16", "compute dtype", COMPUTE_DTYPES)
    fp8_keep: list[str] = opt(["norms", "biases", "embedders", "modulation", "final"],
                         "groups kept in high precision under fp8 storage (drop 'modulation' to save ~27%)",
                         model_default=PRESET)
    blocks_to_swap: int = opt(0, "blocks (double blocks first; FLUX.1 has 57, FLUX.2 klein 4B 25, 9B 32, dev 56) "
                                 "whose frozen weights stay in pinned host RAM and are copied to the GPU just before "
                                 "use; needs gradient_checkpointing", model_default=PRESET)
    vram: int = opt(0, "GPU-size preset in GB (8|12|16|24|48; FLUX.2 also 32|80): picks fp8 storage, checkpointing, "
                       "blocks_to_swap, optimizer, text-encoder placement, VAE tiling; settings you write win; 0 = no "
                       "preset")
    text_encoder: str = opt("gpu", "where the text encoder(s) run while caching captions (FLUX.1: CLIP + T5; FLUX.2: "
                                      "Qwen3 or Mistral)", ("gpu", "cpu"), model_default=PRESET)
    text_encoder_dtype: str = opt("fp32", "text encoder dtype while caching (bf16 halves T5-XXL's 19 GB; fp8: FLUX.2's "
                                          "text encoder only, Mistral 24B in ~25 GB)", TEXT_DTYPES,
                                  model_default=PRESET)
    vae_tiling: bool = opt(False, "decode samples in tiles (less memory for large samples)", model_default=PRESET)

    def validate(self):
        super().validate()
        require(self.blocks_to_swap >= 0, "blocks_to_swap must be >= 0")
        require(self.vram in (0, *VRAM_CHOICES),
                f"vram = {self.vram}: choose 8, 12, 16, 24, 32, 48 or 80 (GB; 32 and 80: FLUX.2), or 0")


@ordered("path", "transformer", "family", "teacher", "gradient_checkpointing", "fp8_storage", "blocks_to_swap",
         "text_encoder", "text_encoder_dtype", "t5_max_length", "allow_pickle")
@dataclass
class DedistillModel(ModelBase):
    transformer: str = opt("", "start weights (any layout); empty = the folder's transformer", path=True)
    teacher: str = opt("", "cfg_teacher: the frozen guidance-distilled teacher (empty = the start weights); "
                           "guidance_distill: the CFG teacher (required)", path=True)
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (needed at full size)")
    fp8_storage: bool = opt(False, "with train.adapter_rank: keep the frozen base in fp8 (bf16 compute)")
    blocks_to_swap: int = opt(0, "with train.adapter_rank: blocks whose frozen weights stay in host RAM (as in "
                                 "train; FLUX.2 dev on a 24-48 GB card)")
    text_encoder: str = opt("gpu", "where the text encoder(s) run while caching captions", ("gpu", "cpu"))
    text_encoder_dtype: str = opt("fp32", "text encoder dtype while caching (fp8: FLUX.2 only)",
                                  TEXT_DTYPES)
    t5_max_length: int = opt(512, "caption tokens the text encoder reads (512 for dev)")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class FolderSection:
    path: str = opt("", "folder of images with same-stem .txt captions", path=True)
    repeats: int = opt(1, "times each image is seen per epoch")
    caption: str = opt("", "caption for images without a .txt file in this folder")
    recursive: bool = opt(False, "also read images in subfolders (a kohya parent of N_name folders is "
                                 "recognised without it)")
    masks: str = opt("", "folder of loss masks named like the images (white = learn, black = ignore); a "
                         "NAME.mask.png beside an image is read without it", path=True)
    controls: str | list[str] = opt("", "folder of reference images named like the images (edit pairs: the model "
                                        "sees the reference and learns to produce the image; FLUX.2 only); a list "
                                        "of folders: several references per image, in this order", path=True)
    role: str = opt("train", "reg: regularization (class) images for prior preservation, loss-weighted by "
                             "data.reg_weight (a kohya reg_data_dir of N_class folders works as is)", ("train", "reg"))
    resolution: int | list[int] = opt(0, "this folder's resolution(s) instead of data.resolution (0: data's)")

    def validate(self):
        require(bool(self.path), "path: each [[data.folders]] needs a path")
        require_range("repeats", self.repeats, 1, 100_000)
        require_path_list("controls", self.controls, MAX_REFERENCES)
        if self.resolution != 0:
            check_resolutions(self.resolution, 16)


def check_resolutions(value, bucket_step: int) -> None:
    """``resolution``: one side, or a non-empty list of distinct sides, each a multiple of 16 in range."""
    values = value if isinstance(value, list) else [value]
    require(len(values) > 0 and len(set(values)) == len(values),
            f"resolution must be a number or a list of distinct numbers (e.g. [512, 768, 1024]), got {value}")
    for r in values:
        require(isinstance(r, int) and r >= bucket_step, f"resolution must be >= bucket_step, got {r}")
        require(64 <= r <= MAX_RESOLUTION and r % 16 == 0,
                f"resolution must be a multiple of 16 in 64..{MAX_RESOLUTION} (512 or 1024 for FLUX.1), got {r}")


@dataclass
class DataSection:
    FOREIGN: ClassVar[dict] = {"train_batch_size": "data.batch_size", "caption_dropout_rate": "data.caption_dropout",
                               "train_data_dir": "data.folders = [{path = ...}]", "class_tokens": "data.trigger"}
    folders: list[FolderSection] = opt([], "[[data.folders]] tables: path, repeats, caption, recursive; a path "
                                           "may be a kohya parent of N_name folders")
    shards: str = opt("", "index.json written by `dev2pro cache` (pre-encoded latents + text), instead of folders",
                      path=True)
    default_caption: str = opt("", "caption for images without a .txt file")
    trigger: str = opt("", "trigger word prepended to every caption")
    caption_dropout: float = opt(0.0, "probability of training on the empty caption")
    resolution: int | list[int] = opt(512, "bucket target side: buckets have about resolution^2 pixels; a list "
                                           "(e.g. [512, 768, 1024]) buckets every image at each")
    bucket_step: int = opt(64, "bucket sides are multiples of this (>= 16)")
    min_size: int = opt(16, "images smaller than this on a side are skipped (listed in a warning)")
    strict: bool = opt(False, "stop on unreadable/tiny images instead of skipping them")
    cache_dir: str = opt("", "latent/text cache folder (default: <output_dir>/cache)", path=True)
    batch_size: int = opt(1, "images per step (per device)")
    reg_weight: float = opt(1.0, "loss weight of role = \"reg\" folders' images (kohya's prior_loss_weight); 0 "
                                 "leaves the reg folders out")

    def validate(self):
        require(len(self.folders) > 0 or bool(self.shards),
                "folders: add at least one [[data.folders]] table with a path (or set data.shards)")
        require(0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)")
        require(self.bucket_step >= 16 and self.bucket_step % 16 == 0, "bucket_step must be a multiple of 16")
        check_resolutions(self.resolution, self.bucket_step)
        for i, f in enumerate(self.folders):
            if f.resolution != 0:
                try:
                    check_resolutions(f.resolution, self.bucket_step)
                except ConfigError as e:
                    raise ConfigError(f"folders[{i}].{e}") from None
        require(self.reg_weight >= 0 and math.isfinite(self.reg_weight), "reg_weight must be >= 0")
        require_range("batch_size", self.batch_size, 1, MAX_BATCH)
        require_range("min_size", self.min_size, 1, MAX_RESOLUTION)


@dataclass
class DedistillData(DataSection):
    shards: str = opt("", "index.json written by `dev2pro cache` (used instead of [[data.folders]])", path=True)


# ------------------------------------------------------------------------------------------------ optimisation
@dataclass
class OptimBase:
    FOREIGN: ClassVar[dict] = {  # kohya / diffusers / ai-toolkit names (config_hints)
        "max_train_steps": "train.steps", "learning_rate": "train.lr", "lr_scheduler": "train.schedule",
        "lr_warmup_steps": "train.warmup_steps", "gradient_accumulation_steps": "train.grad_accum",
        "guidance_scale": "train.guidance (train)", "optimizer_type": "train.optimizer",
        "max_train_epochs": "train.epochs (train only)", "num_train_epochs": "train.epochs (train only)"}
    steps: int = opt(1000, "optimiser steps")
    lr: float = opt(1e-4, "learning rate")
    weight_decay: float = opt(0.0, "weight decay")
    warmup_steps: int = opt(0, "linear LR warmup steps")
    schedule: str = opt("constant", "LR schedule after warmup", SCHEDULES)
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    seed: int = opt(42, "seed for LoRA init, noise, timesteps and data order")
    timestep_sampling: str = opt("sigmoid", "how sigmas are drawn", TIMESTEP_MODES)
    sigmoid_scale: float = opt(1.0, "logit-normal scale for sigmoid/shift/flux_shift")
    shift: float = opt(3.0, "shift value for timestep_sampling = 'shift'")
    mixed_precision: str = opt("no", "accelerate mixed precision", MIXED_PRECISION)
    nan_policy: str = opt("stop", "on a non-finite loss or gradient: stop (keep the last good state) or skip the "
                                  "update", ("stop", "skip"))
    nan_max_skips: int = opt(10, "skip policy: stop after this many non-finite steps in a row")
    fused_rope: bool = opt(False, "rotary embedding as one complex product (~12% fewer kernel launches per eager "
                                  "step, same result to fp32 round-off); off until measured faster on a GPU")

    def validate(self):
        require(self.steps > 0, "steps must be > 0")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}")
        require(self.nan_max_skips >= 1, "nan_max_skips must be >= 1")
        require_range("weight_decay", self.weight_decay, 0)
        require_range("max_grad_norm", self.max_grad_norm, 0)
        require_range("sigmoid_scale", self.sigmoid_scale, 0, above=True)
        require_range("shift", self.shift, 0, above=True)
        require(self.grad_accum >= 1, "grad_accum must be >= 1")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")


@ordered("steps", "epochs", "lr", "optimizer", "weight_decay", "warmup_steps", "schedule", "grad_accum",
         "max_grad_norm", "seed", "ema_decay", "guidance", "timestep_sampling", "sigmoid_scale", "shift",
         "mixed_precision", "lora_dtype", "compile", "fused_rope", "attention_backend", "nan_policy", "nan_max_skips")
@dataclass
class TrainSection(OptimBase):
    epochs: float = opt(0.0, "train this many passes over the dataset instead of train.steps (0 = off; may be "
                             "fractional): epochs x batches per epoch / grad_accum steps, rounded up, counted when the "
                             "run starts; the run's config.toml records them as train.steps")
    optimizer: str = opt("adamw", "optimizer", OPTIMIZERS, model_default=PRESET)
    guidance: float = opt(1.0, "guidance input during training: 1.0 is the Dev2Pro recipe")
    lora_dtype: str = opt("compute", "LoRA compute dtype: compute (model.dtype, e.g. bf16, over fp32 master weights "
                                     "and fp32 optimizer state) or fp32 (fp32 LoRA GEMMs, slower)", LORA_DTYPES)
    compile: bool | str = opt("off", "regional torch.compile: blocks (each transformer block compiled once, diffusers "
                                     "compile_repeated_blocks; true = blocks) or off; the first steps are slow; not "
                                     "with blocks_to_swap", COMPILE_CHOICES)
    attention_backend: str = opt("", "diffusers attention backend from an installed kernel package (e.g. flash "
                                     "needs flash-attn); empty = PyTorch SDPA; auto = the fastest that passes a "
                                     "forward+backward probe of this model on this card (remembered per card); the "
                                     "*_hub backends are not offered (they download kernels at run time)",
                                 ATTENTION_BACKENDS)
    ema_decay: float = opt(0.0, "EMA of the LoRA weights (e.g. 0.999; 0 = off): the EMA is what is saved and "
                                "sampled")

    def validate(self):
        super().validate()
        require_range("epochs", self.epochs, 0)
        require(not (self.epochs and self.steps != type(self).steps), f"epochs: set train.epochs or train.steps, not "
                f"both (train.epochs = {self.epochs:g}, train.steps = {self.steps}); delete one of them (a run's "
                "config.toml holds its epochs as train.steps: extend such a run with train.steps)")
        require_range("guidance", self.guidance, 0, 100, above=True)
        self.compile = compile_mode(self.compile)
        require(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.optimizer == "schedulefree_adamw":  # it averages its weights itself and replaces the LR schedule
            require(self.schedule == "constant", "schedule: schedule-free AdamW needs no LR schedule; set "
                                                 "train.schedule = \"constant\" (train.warmup_steps still applies)")
            require(not self.ema_decay, "ema_decay: schedule-free AdamW already averages its weights; set "
                                        "train.ema_decay = 0")


@dataclass
class DedistillTrain(OptimBase):
    RENAMED: ClassVar[dict] = {
        "guidance": "dedistill always trains at guidance 1.0 (the Dev2Pro recipe); delete the line",
        "optimizer": "dedistill always uses AdamW (fp32 master weights); delete the line",
        "compile": "dedistill has no regional compile (the setting was never read); delete the line",
        "attention_backend": "dedistill uses PyTorch SDPA (the setting was never read); delete the line",
    }
    lr: float = opt(1e-5, "learning rate (full fine-tune: much lower than LoRA)")
    schedule: str = opt("cosine", "LR schedule after warmup", SCHEDULES)
    warmup_steps: int = opt(100, "linear LR warmup steps")
    mixed_precision: str = opt("bf16", "autocast compute dtype over fp32 master weights", MIXED_PRECISION)
    ema_decay: float = opt(0.999, "EMA of the weights (0 = off); exported instead of the raw weights")
    distributed: str = opt("auto", "auto: FSDP under an accelerate FSDP config, else DDP; fsdp: shard each Flux "
                                   "block (e.g. under torchrun); ddp: replicate", ("auto", "ddp", "fsdp"))
    adapter_rank: int = opt(0, "> 0: de-distill as a LoRA of this rank on every linear of the frozen start model "
                               "(one base, fp8 possible) and export it as a training adapter (kohya + diffusers)")

    def validate(self):
        super().validate()
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(self.adapter_rank >= 0, "adapter_rank must be >= 0 (0 = full fine-tune)")
        require_range("adapter_rank", self.adapter_rank, 0, MAX_RANK)
        require(not (self.adapter_rank and self.distributed == "fsdp"),
                "distributed: adapter de-distillation (adapter_rank > 0) runs on one device or DDP; FSDP shards "
                "full fine-tunes")


# ------------------------------------------------------------------------------------------------ LoRA, teacher
@dataclass
class LoraSection:
    FOREIGN: ClassVar[dict] = {"network_dim": "lora.rank", "linear": "lora.rank", "network_alpha": "lora.alpha",
                               "linear_alpha": "lora.alpha", "network_dropout": "lora.dropout"}
    rank: int = opt(16, "LoRA rank")
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = opt(0.0, "LoRA dropout")
    targets: str = opt("all_linear", "target preset", LORA_TARGETS)
    extra_targets: list[str] = opt([], "extra targets: modulation, embedders (on dev these include the guidance "
                                       "embedder, which learns the training guidance only: a warning says so)")
    double_blocks: list[int] = opt([], "train only these double-block indices (empty = all)")
    single_blocks: list[int] = opt([], "train only these single-block indices (empty = all)")
    type: str = opt("lora", "adapter type: lora, dora (peft's), lokr or loha (LyCORIS keys ComfyUI reads)",
                    ("lora", "dora", "lokr", "loha"))
    lokr_factor: int = opt(-1, "LoKr Kronecker factor (-1: near the square root of each width, as LyCORIS)")
    lokr_decompose_both: bool = opt(False, "LoKr: also factor the small Kronecker factor into a low-rank product")

    def validate(self):
        require(self.rank > 0, f"rank must be > 0, got {self.rank}")
        require_range("rank", self.rank, 1, MAX_RANK)
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        require(self.lokr_factor == -1 or self.lokr_factor > 0, f"lokr_factor must be -1 or > 0, got "
                f"{self.lokr_factor}")


@dataclass
class TeacherSection:
    w_min: float = opt(1.0, "lowest CFG scale drawn per sample")
    w_max: float = opt(5.0, "highest CFG scale drawn per sample")
    flow_weight: float = opt(0.0, "weight of an extra flow-matching loss on the student's conditional output")

    def validate(self):
        require(0.0 <= self.w_min <= self.w_max, "w_min must be in [0, w_max]")
        require(self.flow_weight >= 0.0, "flow_weight must be >= 0")


# ------------------------------------------------------------------------------------------------ the configs
@dataclass
class TrainConfig:
    model: ModelSection = section(ModelSection, "base model")
    data: DataSection = section(DataSection, "dataset")
    lora: LoraSection = section(LoraSection, "LoRA shape")
    train: TrainSection = section(TrainSection, "optimisation")
    sample: SampleSection = section(SampleSection, "samples during training")
    save: SaveSection = section(SaveSection, "outputs")
    validation: ValidationSection = section(ValidationSection, "validation loss on held-out images")
    logging: LoggingSection = section(LoggingSection, "loggers beside TensorBoard")
    log_every: int = opt(10, "progress-bar postfix and TensorBoard scalar interval (steps)")

    def validate(self):
        require(not (self.validation.enabled and self.data.shards), "validation: held-out images are cached from "
                "image folders, not data.shards: leave validation.folder and validation.fraction unset, or train "
                "from [[data.folders]]")
        refs, given = {len(as_list(f.controls)) for f in self.data.folders if f.controls}, as_list(self.sample.control)
        require(not (given and refs) or refs == {len(given)}, f"sample.control: {len(given)} reference image(s), "
                f"but the LoRA learns edits from {'/'.join(map(str, sorted(refs)))} (the controls folders of "
                "[[data.folders]]): give sample.control as many, in the folders' order")
        require(not (given and self.data.folders and not refs and not self.data.shards), "sample.control: the samples "
                "would edit a reference, but no [[data.folders]] entry has controls, so the LoRA learns text-to-image; "
                "add controls (edit pairs: a folder of same-name reference images) or remove sample.control")
        require(not (self.sample.with_adapter and not self.model.adapter), "sample.with_adapter: there is no "
                "model.adapter to turn on; set model.adapter (a dev2pro adapter file) or remove sample.with_adapter")


@dataclass
class DedistillConfig:
    objective: str = opt("flow", "flow: flow matching at guidance 1; cfg_teacher: match dev's guidance with CFG; "
                                 "guidance_distill: make a dev-like student from a CFG teacher",
                         OBJECTIVES)
    model: DedistillModel = section(DedistillModel, "base model")
    data: DedistillData = section(DedistillData, "dataset: folders (cached on the fly) or cache shards")
    teacher: TeacherSection = section(TeacherSection, "cfg_teacher objective")
    train: DedistillTrain = section(DedistillTrain, "optimisation")
    sample: DedistillSample = section(DedistillSample, "sample grids during training")
    save: DedistillSave = section(DedistillSave, "outputs")
    log_every: int = opt(10, "TensorBoard scalar interval and, with --no-progress, progress-line interval (steps)")

    def validate(self):
        require(not (self.train.adapter_rank and self.objective == "guidance_distill"),
                "objective: adapter de-distillation (train.adapter_rank > 0) supports flow and cfg_teacher")
        require(not (self.model.fp8_storage and not self.train.adapter_rank),
                "model.fp8_storage: only a frozen base can be stored in fp8; set train.adapter_rank > 0")
        require(not (self.model.blocks_to_swap and not self.train.adapter_rank),
                "model.blocks_to_swap: only a frozen base can be swapped to host RAM; set train.adapter_rank > 0")
        require(self.model.blocks_to_swap >= 0, "model.blocks_to_swap must be >= 0")
        require(not (self.objective == "guidance_distill" and not self.model.teacher), "model.teacher: the "
                "guidance_distill objective needs a CFG teacher (a pro-like model); set model.teacher")


# ------------------------------------------------------------------------------------------------ loaders
def load_train_config(path, overrides: list[str] | None = None, data: dict | None = None) -> TrainConfig:
    """The `dev2pro train` config from a TOML file, a dict and ``--set`` overrides; a ``model.vram`` preset fills
    only the settings the user did not write."""
    cfg = load_config(TrainConfig, path, overrides, data)
    if cfg.model.vram:
        apply_vram_preset(cfg, explicit_keys(path, overrides, data))
    apply_sample_guidance_default(cfg, explicit_keys(path, overrides, data))
    check_rank_fits(cfg)
    return cfg


def load_dedistill_config(path, overrides: list[str] | None = None, data: dict | None = None) -> DedistillConfig:
    """The `dev2pro dedistill` config from a TOML file, a dict and ``--set``; unset sample.cfg: the base's own."""
    cfg = load_config(DedistillConfig, path, overrides, data)
    apply_sample_guidance_default(cfg, explicit_keys(path, overrides, data), dedistill=True)
    return cfg
