"""How the Train page lays the schema out for a newcomer: a short *Basics* layer and collapsed *Advanced* groups.

The fields themselves still come from the schema (``forms.field_specs``): a field added there appears under
Advanced, labelled from its key, with its help text as the hint, and no UI change is needed. This module only adds
words: which fields are Basics (the eight things a first run needs), a label per field in plain words, and which
Advanced group a field sits in. ``error_field`` finds the field a loader message is about, so the page can show the
CLI's own message beside that field.
"""

from __future__ import annotations

import math
import re

# The Basics layer, in page order: what a first LoRA run needs; everything else keeps its default (or the VRAM
# preset's choice) until Advanced is opened. The page fills them from the Models and Dataset pages.
BASICS = ("model.family", "model.path", "data.folders", "data.trigger", "train.steps", "lora.rank", "model.vram",
          "sample.prompts", "sample.every", "save.every", "save.output_dir")

# help in words where the schema's one-liner says too little for a newcomer (the schema and the CLI keep theirs)
HELP = {"lora.rank": "the LoRA's capacity: typical 16-64 (16 for a face or a style, 32-64 for several concepts); "
                     "higher learns more detail but trains slower and makes a larger file; its strength scale is "
                     "lora.alpha / rank",
        "save.every": "save the LoRA and a resumable training state every N steps (0: only at the end, so a crash "
                      "or a reboot loses the whole run); the web app's default is about a quarter of the steps",
        "sample.every": "render the sample prompts every N steps and at the end (0: only at the end); the web "
                        "app's default is about a quarter of the steps"}

LABELS = {
    "model.path": "Base model", "model.transformer": "Training transformer file",
    "model.family": "Model family", "model.inference_base": "Inference base (for samples)",
    "model.adapter": "Training adapter LoRA", "model.adapter_scale": "Adapter strength",
    "model.dtype": "Compute precision", "model.fp8_storage": "Store base weights in fp8",
    "model.fp8_keep": "Keep these in high precision under fp8", "model.gradient_checkpointing":
        "Gradient checkpointing", "model.blocks_to_swap": "Blocks kept in host RAM (block swap)",
    "model.vram": "GPU memory", "model.text_encoder": "Text encoders run on",
    "model.text_encoder_dtype": "Text encoder precision", "model.vae_tiling": "Decode samples in tiles",
    "model.t5_max_length": "Text tokens (T5 length)", "model.allow_pickle": "Allow .ckpt/.pt model files",
    "data.folders": "Dataset folder(s)", "data.shards": "Pre-encoded cache (index.json)",
    "data.default_caption": "Caption for images without one", "data.trigger": "Trigger word",
    "data.caption_dropout": "Caption dropout", "data.resolution": "Training resolution",
    "data.bucket_step": "Bucket step", "data.min_size": "Skip images smaller than",
    "data.strict": "Stop on unreadable images", "data.cache_dir": "Cache folder",
    "data.batch_size": "Images per step (batch size)", "data.reg_weight": "Loss weight of reg images",
    "data.folders.masks": "Loss masks folder", "data.folders.role": "Role (train / reg images)",
    "data.folders.controls": "Reference images folder(s) (FLUX.2 edit pairs; one per line)",
    "data.folders.resolution": "Resolution(s) (0: the dataset's)",
    "lora.rank": "LoRA rank", "lora.alpha": "LoRA alpha", "lora.dropout": "LoRA dropout",
    "lora.targets": "Layers trained", "lora.extra_targets": "Extra layers trained",
    "lora.double_blocks": "Only these double blocks", "lora.single_blocks": "Only these single blocks",
    "train.steps": "Training steps", "train.lr": "Learning rate", "train.optimizer": "Optimizer",
    "train.weight_decay": "Weight decay", "train.warmup_steps": "Warm-up steps",
    "train.schedule": "Learning-rate schedule", "train.grad_accum": "Gradient accumulation steps",
    "train.max_grad_norm": "Gradient clipping", "train.seed": "Random seed",
    "train.guidance": "Training guidance", "train.timestep_sampling": "Timestep sampling",
    "train.sigmoid_scale": "Sigmoid scale", "train.shift": "Timestep shift",
    "train.mixed_precision": "Mixed precision", "train.compile": "Compile blocks (torch.compile)",
    "train.fused_rope": "Fused rotary embedding",
    "train.attention_backend": "Attention backend", "train.nan_policy": "On a NaN loss",
    "train.nan_max_skips": "Stop after this many NaN steps",
    "sample.every": "Sample every N steps", "sample.prompts": "Sample prompts",
    "sample.negative": "Negative prompt", "sample.seeds": "Sample seeds", "sample.guidance": "Sample guidance",
    "sample.cfg": "Sample CFG scale", "sample.steps": "Sampling steps", "sample.width": "Sample width",
    "sample.height": "Sample height", "sample.with_adapter": "Also sample with the adapter",
    "sample.size": "Sample size (WxH)", "sample.baseline": "Sample the base before training",
    "sample.control": "Reference image(s) the samples edit",
    "save.output_dir": "Output name", "save.name": "LoRA file name", "save.every": "Save every N steps",
    "save.keep_last": "Training states kept", "save.formats": "LoRA file layouts",
    "save.overwrite": "Overwrite an existing run", "log_every": "Log every N steps",
    "train.ema_decay": "Average the weights (EMA decay, 0 = off)",
    "validation.folder": "Held-out images (validation folder)", "validation.fraction": "Hold out a fraction of "
    "the images", "validation.every": "Validation every N steps", "validation.sigmas": "Noise levels measured",
    "validation.seeds": "Noise seeds", "logging.wandb": "Also log to Weights & Biases",
    "logging.project": "W&B project", "logging.mode": "W&B mode",
}

# Advanced groups: (section prefix, title); keys with no section go to the last group
GROUPS = (("model.", "Model and memory"), ("data.", "Dataset"), ("lora.", "LoRA shape"),
          ("train.", "Optimisation"), ("sample.", "Samples during training"), ("save.", "Saving"),
          ("validation.", "Validation loss"), ("logging.", "Logging"), ("", "Logging"))


def label(key: str) -> str:
    """A field's label in words: ours, else its key's last part with spaces ("nan_max_skips" -> "Nan max skips")."""
    if key in LABELS:
        return LABELS[key]
    words = key.rsplit(".", 1)[-1].replace("_", " ")
    return words[:1].upper() + words[1:]


def group(key: str) -> str:
    return next((title for prefix, title in GROUPS[:-1] if key.startswith(prefix)), GROUPS[-1][1])


def annotate(specs: list[dict]) -> list[dict]:
    """The schema's specs with ``label`` (words), ``basic`` (in the Basics layer) and ``group`` (its Advanced
    group) added; table items get labels too. Sections are dropped: the page groups by ``group``."""
    out = []
    for spec in specs:
        if spec["kind"] == "section":
            continue
        spec = {**spec, "label": label(spec["key"]), "basic": spec["key"] in BASICS, "group": group(spec["key"]),
                **({"help": HELP[spec["key"]]} if spec["key"] in HELP else {})}
        if spec["kind"] == "tables":
            spec["fields"] = [{**f, "label": label(f"{spec['key']}.{f['key']}") if f"{spec['key']}.{f['key']}"
                               in LABELS else label(f["key"])} for f in spec["fields"] if f["kind"] != "section"]
        out.append(spec)
    return out


def every_default(steps) -> int:
    """About a quarter of ``steps``, rounded to a number a person would pick (1000 -> 250, 3000 -> 750, 1333 -> 350,
    20 -> 5): how often a web-app run saves and samples unless the form says otherwise. app.js's everyDefault is
    the same rule (it fills the visible field)."""
    try:
        steps = int(steps)
    except (TypeError, ValueError):
        return 0
    if steps <= 0:
        return 0
    quarter = steps / 4
    if quarter < 10:
        return max(1, math.floor(quarter + 0.5))
    unit = 10 ** math.floor(math.log10(quarter)) / 2  # 250 -> 50, 2500 -> 500
    return int(min(steps, max(unit, math.floor(quarter / unit + 0.5) * unit)))


def every_epochs_default(epochs) -> int:
    """A quarter of ``train.epochs`` in whole epochs, at least 1 (16 -> 4, 10 -> 3, 2 -> 1): the web app's save
    and sample cadence for a run counted in epochs. app.js's everyEpochsDefault is the same rule."""
    return max(1, math.floor(float(epochs) / 4 + 0.5))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def ui_defaults(values: dict, schema_steps: int) -> dict:
    """The web app's defaults for what a form leaves out (values sent without these keys, e.g. Basics only):
    ``save.every`` and ``sample.every`` about a quarter of the steps (``sample.every`` only with sample prompts:
    the loader refuses it without) or, for a run in ``train.epochs``, ``*.every_epochs`` a quarter of the epochs (a
    step cadence is left out beside an epoch one: the loader refuses both), ``save.name`` the run folder's name
    (downloads and ComfyUI's loras/ folder are not all ``lora.safetensors``). The CLI's own defaults (schemas.py)
    stay as they are."""
    if not isinstance(values, dict):
        return values
    out = dict(values)
    steps = out.get("train.steps", schema_steps)
    epochs = _number(out.get("train.epochs"))
    prompts = out.get("sample.prompts", "")
    has_prompts = any(str(p).strip() for p in prompts) if isinstance(prompts, list) else bool(str(prompts).strip())
    for sec, wanted in (("save", True), ("sample", has_prompts)):
        if f"{sec}.every" in out:
            continue
        if _number(out.get(f"{sec}.every_epochs")):  # the user's epoch cadence: a step one beside it is refused
            out[f"{sec}.every"] = "0"
        elif epochs and f"{sec}.every_epochs" not in out:  # train.epochs: steps are counted at the start
            out[f"{sec}.every"], out[f"{sec}.every_epochs"] = "0", str(every_epochs_default(epochs) if wanted else 0)
        else:
            out[f"{sec}.every"] = str(every_default(steps) if wanted else 0)
    if not str(out.get("save.name") or "").strip() and isinstance(out.get("save.output_dir"), str):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", out["save.output_dir"].rstrip("/").rsplit("/", 1)[-1]).strip("-.")
        if stem:
            out["save.name"] = stem[:100]
    return out


def error_field(message: str, keys) -> str | None:
    """The setting a loader message names (the longest key found in it, as 'key', key: or key =), else None;
    ``data.folders[0].path`` names ``data.folders``."""
    found = [k for k in keys if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
    if not found:  # a section's own validate() names the bare field ("steps must be > 0" -> train.steps)
        m = re.match(r"(?:[^:]*: )?([a-z][\w.]*)(?:\[\d+\])?[ :]", message.split("\n")[0])
        if m:
            found = [k for k in keys if k.endswith("." + m.group(1).split(".")[-1])] if "." not in m.group(1) \
                else [k for k in keys if k == m.group(1)]
    return max(found, key=len) if found else None
