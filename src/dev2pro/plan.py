"""Memory plan: how much GPU memory (and host RAM) a LoRA training run will need, before it loads anything.

Every figure is computed from shapes, never by loading tensors: the base weights from the transformer's spec
(read from the checkpoint header) with the fp8 keep policy applied tensor by tensor, exactly as
``load_transformer`` stores them; the LoRA from the target module list and the Linear shapes; the optimizer
state from how each optimizer stores its moments.

Activations: ``activations`` (measured per family; the plan adds them per bucket).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .data.buckets import MAX_REFERENCE_PIXELS
from .errors import ConfigError
from .flux.inspection import tensor_group
from .flux.fp8 import Fp8Policy
from .activations import DTYPE_BYTES, activation_bytes, block_position
from .families import build_transformer, of_spec
from .host_memory import host_parts
from .train.blockswap import swap_positions

GB = 1024**3
TEXT_DTYPE_BYTES = {**DTYPE_BYTES, "fp8": 1}  # FLUX.2's text encoder may be stored in fp8 (its embedding stays bf16)
CUDA_OVERHEAD = int(0.8 * GB)  # CUDA context, cuBLAS workspaces and allocator slack beyond allocated bytes
VAE_DECODE_BYTES_PER_PIXEL = 2560  # ~10 live 128-channel bf16 maps at full resolution in the VAE decoder
VAE_TILE_PIXELS = 512 * 512
VAE_PARAMS, CLIP_L_PARAMS = 83_653_863, 123_060_480
T5_XXL_PARAMS = 4_762_310_656
# FLUX.2 text encoders by the transformer's context width (3 stacked layers): Qwen3-4B, Qwen3-8B, Mistral-Small-3.2
# 24B (the language model; dev's vision tower is not loaded for text): the published configs' counts, computed with
# transformers' classes on the meta device.
FLUX2_TEXT_PARAMS = {7680: 4_022_468_096, 12288: 8_190_735_360, 15360: 23_572_403_200}
FLUX2_VAE_PARAMS = 84_046_115  # AutoencoderKLFlux2 (32 latent channels)


@dataclass(frozen=True)
class PlanInputs:
    """What the plan needs, as explicit values (recipes build it from their config)."""

    spec: object  # FluxSpec
    dtype: str = "bf16"  # compute dtype
    fp8_storage: bool = False
    fp8_keep: tuple[str, ...] = ("norms", "biases", "embedders", "modulation", "final")
    gradient_checkpointing: bool = True
    lora_dtype: str = "fp32"  # train.lora_dtype: "compute" (bf16 LoRA over fp32 masters) or "fp32"
    blocks_to_swap: int = 0
    rank: int = 16
    lora_type: str = "lora"  # lora.type: lora | dora | lokr | loha (their trained tensors: ``adapter_shapes``)
    lokr_factor: int = -1
    lokr_decompose_both: bool = False
    targets: str = "all_linear"
    extra_targets: tuple[str, ...] = ()
    optimizer: str = "adamw"
    batch_size: int = 1
    image_tokens: tuple[int, ...] = (1024,)  # packed image tokens per bucket (512^2 -> 1024, 1024^2 -> 4096)
    images_per_sample: int = 1  # 1 + n: edit pairs, n reference images' tokens beside each image's (in image_tokens)
    reference_tokens: int = 0  # tokens of one reference (at most 1 MP: 4096); 0: as many as its image
    text_tokens: int = 512
    sample_pixels: int = 0  # width * height of samples during training (0 = no samples)
    sample_references: int = 0  # sample.control: reference images fitted to the sample size, each as many tokens
    inference_base: bool = False  # a second transformer visits the GPU for samples
    adapter_params: int = 0  # a frozen training adapter (model.adapter), held in the compute dtype (fp32 or bf16)
    vae_tiling: bool = False
    text_encoder: str = "gpu"  # gpu | cpu: where T5/CLIP run while caching
    text_encoder_dtype: str = "fp32"
    sample_prompts: int = 0  # prompts whose embeddings stay in host RAM for samples
    ema: bool = False  # de-distillation keeps an fp32 EMA copy of the trained weights (on the GPU)
    t5_params: int = T5_XXL_PARAMS
    clip_params: int = CLIP_L_PARAMS
    vae_params: int = VAE_PARAMS

    def target_tokens(self, image_tokens: int) -> int:
        """The image's own tokens of ``image_tokens`` (the image and its references)."""
        refs = self.images_per_sample - 1
        return image_tokens - refs * self.reference_tokens if refs and self.reference_tokens \
            else image_tokens // self.images_per_sample


@dataclass
class Plan:
    inputs: PlanInputs
    base_groups: dict = field(default_factory=dict)  # "group dtype" -> bytes (resident + swapped)
    base_bytes: int = 0
    swapped_bytes: int = 0
    swap_window_bytes: int = 0
    lora_params: int = 0
    lora_bytes: int = 0
    adapter_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activations: dict = field(default_factory=dict)  # image tokens -> bytes
    sampling_extra: int = 0
    caching_peak: int = 0
    host_ram: int = 0
    host_parts: dict = field(default_factory=dict)  # phase -> host bytes (loading, text encoding, training)

    ema_bytes: int = 0

    @property
    def static_bytes(self) -> int:
        """Weights on the GPU + LoRA + grads + optimizer state (+ EMA) (what stays between steps)."""
        return self.base_bytes - self.swapped_bytes + self.swap_window_bytes + self.lora_bytes + self.grad_bytes \
            + self.optimizer_bytes + self.adapter_bytes + self.ema_bytes

    def train_peak(self, image_tokens: int | None = None) -> int:
        """Estimated peak allocated bytes of a training step (the largest bucket by default)."""
        act = self.activations[image_tokens] if image_tokens is not None else max(self.activations.values())
        return self.static_bytes + act

    @property
    def sampling_peak(self) -> int:
        return self.static_bytes - self.grad_bytes + self.sampling_extra

    @property
    def peak(self) -> int:
        """The run's peak GPU allocation over caching, training and sampling."""
        return max(self.train_peak(), self.sampling_peak if self.inputs.sample_pixels else 0, self.caching_peak)

    def to_dict(self) -> dict:
        return {"base_groups_gb": {k: v / GB for k, v in self.base_groups.items()}, "base_gb": self.base_bytes / GB,
                "swapped_gb": self.swapped_bytes / GB, "swap_window_gb": self.swap_window_bytes / GB,
                "lora_params": self.lora_params, "lora_gb": self.lora_bytes / GB, "grads_gb": self.grad_bytes / GB,
                "adapter_gb": self.adapter_bytes / GB,
                "optimizer_gb": self.optimizer_bytes / GB,
                "activations_gb": {str(k): v / GB for k, v in self.activations.items()},
                "train_peak_gb": {str(k): self.train_peak(k) / GB for k in self.activations},
                "sampling_peak_gb": self.sampling_peak / GB, "caching_peak_gb": self.caching_peak / GB,
                "host_ram_gb": self.host_ram / GB, "host_parts_gb": {k: v / GB for k, v in self.host_parts.items()},
                "ema_gb": self.ema_bytes / GB, "peak_gb": self.peak / GB}


# ------------------------------------------------------------------------------------------------ pieces
def _meta_model(spec):
    return build_transformer(spec, device="meta")


def base_weights(model, inp: PlanInputs) -> tuple[dict, dict]:
    """({"group dtype": bytes}, {block position: [bytes, fp8 values]}) of the base as ``load_transformer``
    stores it."""
    policy = Fp8Policy.from_names(inp.fp8_keep)
    b = DTYPE_BYTES[inp.dtype]
    groups: dict[str, int] = {}
    per_block: dict[int, int] = {}
    for key, t in model.state_dict().items():
        fp8 = inp.fp8_storage and t.ndim == 2 and policy.should_quantize(key, tuple(t.shape))
        nbytes = t.numel() * (1 if fp8 else b) + (4 if fp8 else 0)  # + the fp32 per-tensor scale
        label = f"{tensor_group(key)} {'fp8' if fp8 else inp.dtype}"
        groups[label] = groups.get(label, 0) + nbytes
        pos = block_position(key, inp.spec.num_double)
        if pos is not None:
            acc = per_block.setdefault(pos, [0, 0])
            acc[0] += nbytes
            acc[1] += t.numel() if fp8 else 0
    return groups, per_block


def lora_layers(model, inp: PlanInputs) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every Linear the LoRA wraps (``every_linear``: all of them, as adapter
    de-distillation's LoRA)."""
    s = inp.spec
    if inp.targets == "every_linear":
        return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)]
    names = of_spec(s).lora_targets(inp.targets, s.num_double, s.num_single, inp.extra_targets,
                                    guidance=s.guidance_embeds)
    return [(n, m.in_features, m.out_features) for n in names for m in [model.get_submodule(n)]]


def adapter_shapes(inp: PlanInputs, fin: int, fout: int) -> list[tuple[int, int]]:
    """(rows, cols) of the trainable tensors ``lora.type`` puts on one ``fin`` -> ``fout`` Linear, as peft's layers
    make them (``train.model.add_lora``): LoRA A (r, in) + B (out, r); DoRA + a magnitude per output (a vector:
    (out, 1)); LoHa two such pairs (``hada_w1_a/b``, ``hada_w2_a/b``); LoKr the Kronecker factors of peft's
    ``factorization`` of both widths -- ``lokr_w1`` whole unless ``decompose_both`` and the rank is below half its
    larger side, ``lokr_w2`` whole unless the rank is below half its larger side (then two rank-wide factors)."""
    r = inp.rank
    if inp.lora_type in ("lora", "dora"):
        return [(r, fin), (fout, r)] + ([(fout, 1)] if inp.lora_type == "dora" else [])
    if inp.lora_type == "loha":
        return [(fout, r), (r, fin)] * 2
    if inp.lora_type != "lokr":
        raise ValueError(f"unknown lora.type {inp.lora_type!r}")
    from peft.tuners.lokr.layer import factorization  # the split peft's LoKr layer uses

    (in_m, in_n), (out_l, out_k) = factorization(fin, inp.lokr_factor), factorization(fout, inp.lokr_factor)
    w1 = [(out_l, r), (r, in_m)] if inp.lokr_decompose_both and r < max(out_l, in_m) / 2 else [(out_l, in_m)]
    w2 = [(out_k, r), (r, in_n)] if r < max(out_k, in_n) / 2 else [(out_k, in_n)]
    return w1 + w2


def optimizer_state_bytes(name: str, shapes: Sequence[tuple[int, int]]) -> int:
    """Bytes of optimizer state for fp32 LoRA matrices of these (rows, cols) shapes.

    adamw: exp_avg + exp_avg_sq (fp32) + a 0-d fp32 step per tensor. adamw8bit (bitsandbytes): two uint8 moments
    with an fp32 absmax per 256 values; tensors under 4096 values keep fp32 moments. prodigy: four fp32 moments.
    adafactor (torch): a row and a column second-moment vector per matrix + step. schedulefree_adamw: z and
    exp_avg_sq (fp32).
    """
    total = 0
    for r, c in shapes:
        n = r * c
        if name == "adamw":
            total += 8 * n + 4
        elif name == "adamw8bit":
            total += 8 * n + 4 if n < 4096 else 2 * n + 2 * 4 * -(-n // 256) + 4
        elif name == "prodigy":
            total += 16 * n + 4
        elif name == "adafactor":
            total += 4 * (r + c) + 4
        elif name == "schedulefree_adamw":  # z + exp_avg_sq (fp32); its step count is per group
            total += 8 * n
        else:
            raise ValueError(f"unknown optimizer {name!r}")
    return total


# a block's AdaLN linears: FLUX.1 double blocks' norm1 / norm1_context, single blocks' norm (FLUX.2: shared, above)
def component_params(model_dir: str | None, subfolder: str, default: int) -> int:
    """Parameter count of a model folder's component from its safetensors headers (``default`` without files)."""
    folder = Path(model_dir) / subfolder if model_dir else None
    files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
    if not files:
        return default
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, info in header.items():
            if key != "__metadata__":
                size = 1
                for d in info["shape"]:
                    size *= d
                n += size
    return n


def encoder_params(model_dir: str | None, spec=None) -> dict[str, int]:
    """{"t5", "clip", "vae"} parameter counts of a model folder (the published models' when absent). For FLUX.2
    ``t5`` is its one text encoder (Qwen3 / Mistral) and ``clip`` is 0."""
    if spec is not None and of_spec(spec).name == "flux2":
        default = FLUX2_TEXT_PARAMS.get(spec.context_dim, FLUX2_TEXT_PARAMS[7680])
        return {"t5": component_params(model_dir, "text_encoder", default), "clip": 0,
                "vae": component_params(model_dir, "vae", FLUX2_VAE_PARAMS)}
    return {"t5": component_params(model_dir, "text_encoder_2", T5_XXL_PARAMS),
            "clip": component_params(model_dir, "text_encoder", CLIP_L_PARAMS),
            "vae": component_params(model_dir, "vae", VAE_PARAMS)}


def estimate(inp: PlanInputs) -> Plan:
    """The memory plan for these settings."""
    model = _meta_model(inp.spec)
    groups, per_block = base_weights(model, inp)
    plan = Plan(inp, base_groups=groups, base_bytes=sum(groups.values()))

    swapped = swap_positions(inp.spec.num_double, inp.spec.num_single, inp.blocks_to_swap)
    plan.swapped_bytes = sum(per_block[p][0] for p in swapped)
    plan.swap_window_bytes = sum(sorted((per_block[p][0] for p in swapped), reverse=True)[:2])
    layers = lora_layers(model, inp)
    shapes = [s for _, fin, fout in layers for s in adapter_shapes(inp, fin, fout)]
    plan.lora_params = sum(r * c for r, c in shapes)
    plan.lora_bytes = plan.grad_bytes = 4 * plan.lora_params
    if inp.lora_dtype == "compute" and inp.dtype != "fp32":  # + the compute copies (train/precision.py)
        plan.lora_bytes += DTYPE_BYTES[inp.dtype] * plan.lora_params
    plan.optimizer_bytes = optimizer_state_bytes(inp.optimizer, shapes)
    plan.adapter_bytes = inp.adapter_params * (4 if inp.dtype == "fp32" else 2)  # lora/adapter.py's dtype rule
    plan.ema_bytes = plan.lora_bytes if inp.ema else 0
    plan.activations = {img: activation_bytes(inp, layers, per_block, img) for img in sorted(set(inp.image_tokens))}
    b, s = DTYPE_BYTES[inp.dtype], inp.spec
    if inp.sample_pixels:
        refs = inp.sample_references * (min(inp.sample_pixels, MAX_REFERENCE_PIXELS) // 256)  # <= 1 MP each
        tokens = inp.sample_pixels // 256 + refs + inp.text_tokens
        pixels = min(inp.sample_pixels, VAE_TILE_PIXELS) if inp.vae_tiling else inp.sample_pixels
        plan.sampling_extra = (plan.base_bytes - plan.swapped_bytes if inp.inference_base else 0) \
            + 12 * tokens * s.hidden * b + inp.vae_params * 4 + pixels * VAE_DECODE_BYTES_PER_PIXEL * 2
    # caching, its own phase (the encoders are freed before the transformer loads): the VAE (fp32) encodes on the
    # GPU; the text encoder(s) in their dtype on the GPU or the CPU
    text = (inp.t5_params + inp.clip_params) * TEXT_DTYPE_BYTES[inp.text_encoder_dtype]
    # per image: an edit pair's references are encoded in batches of their own, each at its image's size
    vae = inp.vae_params * 4 + inp.target_tokens(max(inp.image_tokens)) * 256 * VAE_DECODE_BYTES_PER_PIXEL * 2
    plan.caching_peak = vae + (0 if inp.text_encoder == "cpu" else text)
    plan.host_parts = host_parts(inp, plan, text)
    plan.host_ram = max(plan.host_parts.values())
    return plan


def checkpointing_choice(inp: PlanInputs, card_bytes: int | None, headroom: float = 0.9) -> bool:
    """``model.gradient_checkpointing = "auto"``: off when the plan says every phase of the run fits ``headroom`` of
    the card without it (measured: 0.45 vs 0.84 s at 512^2, 0.71 vs 1.01 s at 1024^2 on an H200), on otherwise.
    No card (CPU) or block swap (it needs checkpointing to save anything): on."""
    if card_bytes is None or inp.blocks_to_swap:
        return True
    plan = estimate(replace(inp, gradient_checkpointing=False))
    need = max(plan.train_peak(), plan.sampling_peak if inp.sample_pixels else 0)  # caching: the same either way
    return need + CUDA_OVERHEAD > headroom * card_bytes


def fmt_gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1024**2:.1f} MB"


def render(plan: Plan) -> str:
    """The plan as printed by `dev2pro plan` and at the start of `dev2pro train`."""
    i = plan.inputs
    lines = ["memory plan (estimates; GPU figures are allocated bytes, the card also needs "
             f"~{fmt_gb(CUDA_OVERHEAD)} for the CUDA context):"]
    lines.append(f"  base weights {fmt_gb(plan.base_bytes)}: " + ", ".join(
        f"{k} {fmt_gb(v)}" for k, v in sorted(plan.base_groups.items(), key=lambda kv: -kv[1])))
    if i.blocks_to_swap:
        lines.append(f"  block swap {i.blocks_to_swap}: {fmt_gb(plan.swapped_bytes)} in pinned host RAM, "
                     f"{fmt_gb(plan.swap_window_bytes)} on the GPU at a time")
    kind = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}.get(i.lora_type, i.lora_type)
    lines.append(f"  {kind} rank {i.rank} ({plan.lora_params / 1e6:.3g}M params): weights {fmt_gb(plan.lora_bytes)} + "
                 f"grads {fmt_gb(plan.grad_bytes)} + {i.optimizer} state {fmt_gb(plan.optimizer_bytes)}")
    if plan.adapter_bytes:
        lines.append(f"  training adapter ({i.adapter_params / 1e6:.3g}M params, frozen side branch, off for "
                     f"samples): {fmt_gb(plan.adapter_bytes)}")
    ck = "with" if i.gradient_checkpointing else "without"
    for img, act in plan.activations.items():
        side = int((i.target_tokens(img) * 256) ** 0.5)
        refs = i.images_per_sample - 1
        what = f"~{side}px^2" + (" + its reference" if refs == 1 else f" + its {refs} references" if refs else "")
        lines.append(f"  activations at {img} image tokens ({what}), batch {i.batch_size}, "
                     f"{ck} checkpointing: {fmt_gb(act)} -> training peak {fmt_gb(plan.train_peak(img))}")
    if i.sample_pixels:
        lines.append(f"  sampling: +{fmt_gb(plan.sampling_extra)} (inference base "
                     f"{'on GPU' if i.inference_base else 'is the training base'}, VAE decode"
                     f"{' tiled' if i.vae_tiling else ''}) -> {fmt_gb(plan.sampling_peak)}")
    if plan.ema_bytes:
        lines.append(f"  EMA of the trained weights (fp32): {fmt_gb(plan.ema_bytes)}")
    lines.append(f"  caching: {fmt_gb(plan.caching_peak)} (text encoders {i.text_encoder}, {i.text_encoder_dtype}; "
                 "its own phase, freed before the transformer loads)")
    lines.append(f"  host RAM peak ~{fmt_gb(plan.host_ram)}: " + ", ".join(
        f"{k} {fmt_gb(v)}" for k, v in plan.host_parts.items() if v))
    lines.append(f"  peak GPU: {fmt_gb(plan.peak)} (+{fmt_gb(CUDA_OVERHEAD)} context)")
    return "\n".join(lines)


# --vram presets: the settings each card size gets (explicit config values win over these)
_ALL_FP8 = ["norms", "biases", "embedders", "final"]
VRAM_PRESETS: dict[int, dict[str, dict]] = {
    48: {"model": dict(fp8_storage=False, gradient_checkpointing=True, blocks_to_swap=0, text_encoder="gpu",
                       text_encoder_dtype="fp32", vae_tiling=False), "train": dict(optimizer="adamw")},
    24: {"model": dict(fp8_storage=True, gradient_checkpointing=True, blocks_to_swap=0, text_encoder="gpu",
                       text_encoder_dtype="bf16", vae_tiling=False), "train": dict(optimizer="adamw")},
    16: {"model": dict(fp8_storage=True, fp8_keep=_ALL_FP8, gradient_checkpointing=True, blocks_to_swap=8,
                       text_encoder="gpu", text_encoder_dtype="bf16", vae_tiling=True),
         "train": dict(optimizer="adamw")},
    12: {"model": dict(fp8_storage=True, fp8_keep=_ALL_FP8, gradient_checkpointing=True, blocks_to_swap=16,
                       text_encoder="cpu", text_encoder_dtype="bf16", vae_tiling=True),
         "train": dict(optimizer="adamw8bit")},
    8: {"model": dict(fp8_storage=True, fp8_keep=_ALL_FP8, gradient_checkpointing=True, blocks_to_swap=45,
                      text_encoder="cpu", text_encoder_dtype="bf16", vae_tiling=True),
        "train": dict(optimizer="adamw8bit")},
}


# settings tried in order when a plan does not fit: the cheapest change in speed first, block swap last
_REMEDIES = (
    ("model.gradient_checkpointing = true", dict(gradient_checkpointing=True)),
    ("model.fp8_storage = true", dict(fp8_storage=True)),
    ('model.fp8_keep = ["norms", "biases", "embedders", "final"]', dict(fp8_keep=("norms", "biases", "embedders",
                                                                               "final"))),
    ('train.optimizer = "adamw8bit"', dict(optimizer="adamw8bit")),
)
_SWAP_RUNGS = (8, 16, 22, 28, 36, 45)  # FLUX.1's 57 blocks; larger models continue every 5 blocks


def swap_ladder(spec) -> list[int]:
    """Block-swap counts a remedy or a computed preset tries, in order: FLUX.1's rungs, then every 5 blocks, up to
    all of the model's blocks (nothing must stay resident: the prefetch window holds two at a time anyway). FLUX.2
    dev's 56 blocks get 50, 55, 56 (its 16 GB card needs 50); klein 4B's 25 get 8, 16, 22, 25."""
    blocks = spec.num_double + spec.num_single
    return [n for n in _SWAP_RUNGS if n < blocks] + list(range(50, blocks, 5)) + [blocks]


def remedies(spec) -> list[tuple[str, dict]]:
    """(config line, PlanInputs change) tried in order when a plan does not fit this model."""
    return [*_REMEDIES, *((f"model.blocks_to_swap = {n}", dict(blocks_to_swap=n)) for n in swap_ladder(spec))]


def advise(inp: PlanInputs, vram_bytes: int, preset: int = 0) -> tuple[bool, str]:
    """(fits, message): whether the plan fits a card of ``vram_bytes``, else the settings that would (the
    ``--vram`` preset for that card as well, unless ``preset`` -- the ``model.vram`` in use -- is that one)."""
    plan = estimate(inp)
    need = plan.peak + CUDA_OVERHEAD
    if need <= vram_bytes:
        return True, f"fits: ~{fmt_gb(need)} of {fmt_gb(vram_bytes)}"
    changed, settings = [], inp
    for label, change in remedies(inp.spec):
        if all(getattr(settings, k) == v for k, v in change.items()):
            continue
        if "blocks_to_swap" in change and change["blocks_to_swap"] < settings.blocks_to_swap:
            continue
        settings = replace(settings, **change)
        if "blocks_to_swap" in change:
            changed = [c for c in changed if not c.startswith("model.blocks_to_swap")]
        changed.append(label)
        for te in (dict(text_encoder_dtype="bf16"), dict(text_encoder="cpu")):
            if estimate(settings).caching_peak + CUDA_OVERHEAD > vram_bytes and \
                    any(getattr(settings, k) != v for k, v in te.items()):
                settings = replace(settings, **te)
                changed += [f'model.{k} = "{v}"' for k, v in te.items()]
        if estimate(settings).peak + CUDA_OVERHEAD <= vram_bytes:
            hint = vram_preset_for(vram_bytes)
            return False, (f"WARNING: the plan needs ~{fmt_gb(need)} but the GPU has {fmt_gb(vram_bytes)}; "
                           f"set {_settings_line(changed)}" + (f" (or --vram {hint})" if hint != preset else ""))
    return False, (f"WARNING: the plan needs ~{fmt_gb(need)} but the GPU has {fmt_gb(vram_bytes)}, and no setting "
                   "makes it fit: lower data.resolution or use a larger GPU")


def _settings_line(changed: list[str]) -> str:
    """The advised settings; 8-bit AdamW says it needs bitsandbytes where that is not installed (still advised)."""
    import importlib.util

    line = ", ".join(changed)
    if any("adamw8bit" in c for c in changed) and importlib.util.find_spec("bitsandbytes") is None:
        line += " (adamw8bit needs bitsandbytes, not installed here: pip install bitsandbytes on the training machine)"
    return line


def vram_preset_for(vram_bytes: int) -> int:
    """The largest preset (8/12/16/24/48 GB) not above the card."""
    fits = [v for v in VRAM_PRESETS if v * GB <= vram_bytes * 1.02]
    return max(fits) if fits else min(VRAM_PRESETS)


def adapter_params_in_file(path: str) -> int:
    """Parameters of a training adapter file, from its safetensors header (no tensor is read)."""
    if not path:
        return 0
    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight"))


def card_bytes(vram_gb: float | None) -> tuple[int | None, str]:
    """(bytes, description) of the card to check against: ``--vram`` if given, else the CUDA device seen."""
    if vram_gb:
        return int(vram_gb * GB), f"--vram {vram_gb:g}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return None, "no CUDA device"


LARGEST_CARD = 200 * GB  # more than any single GPU holds (B200: 192 GB): a plan beyond it is a typo, not a run


class ImpossiblePlan(ConfigError):
    """Settings no card can train: a rank above the layers' width, a peak beyond ``LARGEST_CARD``."""


def check_rank(inp: PlanInputs) -> None:
    """Refuse a LoRA rank above the narrowest layer it trains (min of in/out features): it cannot add capacity,
    only memory (rank 100000 on 3072-wide layers was accepted silently)."""
    name, fin, fout = min(lora_layers(_meta_model(inp.spec), inp), key=lambda x: min(x[1], x[2]))
    if inp.rank > min(fin, fout):
        raise ImpossiblePlan(f"lora.rank = {inp.rank} is larger than the narrowest layer it trains ({name}: {fin} "
                             f"in, {fout} out): use at most {min(fin, fout)} (4..128 is typical)")


def check_fits_a_card(plan: Plan) -> None:
    """Refuse a plan no single card can hold, before anything is loaded."""
    if plan.peak > LARGEST_CARD:
        raise ImpossiblePlan(f"this run needs about {fmt_gb(plan.peak)} of GPU memory at its peak, more than any "
                             f"single card holds ({fmt_gb(LARGEST_CARD)}): lower data.resolution, data.batch_size or "
                             f"lora.rank (the plan above shows where the memory goes)")


def report(inputs: PlanInputs, vram_gb: float | None = None, out=None) -> dict:
    """Print the plan and the fit verdict; returns the plan as a dict (plus 'fits' and 'message'). ImpossiblePlan
    for a rank above the layers' width or a plan beyond any card (after printing it). A ``vram_gb`` that is a
    preset size is the preset in use (`plan`/`train` apply it): the advice does not name it again."""
    out = out or sys.stdout
    check_rank(inputs)
    plan = estimate(inputs)
    print(render(plan), file=out, flush=True)
    check_fits_a_card(plan)
    card, what = card_bytes(vram_gb)
    result = plan.to_dict()
    if card is None:
        print("  (no GPU seen: pass --vram GB to check a card)", file=out, flush=True)
        return result
    preset = int(vram_gb) if vram_gb and float(vram_gb).is_integer() else 0
    fits, message = advise(inputs, card, preset=preset)
    print(f"  {what}: {message}", file=out, flush=True)
    result.update(fits=fits, message=message)
    return result
