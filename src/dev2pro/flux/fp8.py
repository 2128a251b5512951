"""fp8 weights for Flux: quantise, decide what stays in bf16, read/write ComfyUI's scaled-fp8 files, store on a model.

An fp8 number has a 3-bit (e4m3fn, max 448) or 2-bit (e5m2, max 57344) mantissa, so rounding a *normal* value
costs at most half an ulp: 2^-4 relative for e4m3fn, 2^-3 for e5m2. The catch is the range. Flux weights are
mostly ~1e-2 or smaller, and e4m3fn stops being normal below 2^-6: a plain cast pushes most of a weight matrix
into subnormals (fewer bits) or to zero. A per-tensor scale fixes that: ``scale = amax / 448``, store
``q = fp8(w / scale)`` and read back ``w ~= q * scale``. The largest entry lands on 448 and the rest keep their
relative precision. That is all "scaled fp8" means here; no activation quantisation, matmuls run in bf16.

What stays in bf16 is a policy (``Fp8Policy``), decided per key on BFL or diffusers names: norm scales and biases
(tiny, precision-sensitive), the input embedders, the AdaLN modulation linears (they produce every block's
shift/scale/gate, ~27% of FLUX.1's parameters) and the final layer. Each group can be switched off; quantising the
modulation linears too is how a 12B model trains in ~12 GB.

ComfyUI's files (read from comfy/model_detection.py, comfy/ops.py, comfy/utils.py ``convert_old_quants``):
- legacy: a top-level ``scaled_fp8`` marker tensor whose *dtype* names the fp8 format (float32 means e4m3fn) and
  whose length says how to compute: 2 elements = dequantise and multiply in full precision, 0 elements = fp8
  matmuls allowed where the GPU has them (activations quantised too). Per Linear: an fp8 ``.weight`` and a
  0-d float32 ``.scale_weight``; optional 0-d float32 ``.scale_input``. Layers without ``.scale_weight`` are
  plain (bf16 or unscaled fp8). ``weight = weight.to(dtype) * scale_weight``.
- newer: per Linear ``.weight_scale`` (0-d float32), optional ``.input_scale``, and ``.comfy_quant``: a uint8
  tensor holding JSON such as ``{"format": "float8_e4m3fn", "full_precision_matrix_mult": true}``. ComfyUI
  converts legacy files to this form on load and hard-codes ``float8_e4m3fn`` for them, so we only write legacy
  scaled files in e4m3fn.
We write the legacy form with a 2-element marker (weights-only fp8, full-precision matmuls): it is the form every
ComfyUI version reads and it does not clamp Flux's large activations.

On a live diffusers model, ``enable_fp8_storage`` turns chosen ``nn.Linear`` modules into ``Fp8Linear`` in place
(same object, so parents, peft and optimisers keep their references): the weight stays an fp8 parameter plus an
fp32 ``weight_scale`` buffer, and ``forward`` dequantises it into the compute dtype for the call only. diffusers'
``enable_layerwise_casting`` does the cast but has nowhere to keep a scale, which is why we own this. Because the
dequantised weight is a temporary inside ``forward``, peft's ``base_layer`` call, gradient checkpointing's
recompute and ``model.to(device)`` all see ordinary module behaviour; without checkpointing autograd keeps one
bf16 copy per Linear for the backward pass, so the peak memory only drops with checkpointing on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Collection, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dev2pro.errors import CheckpointError, UserError

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz})
FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# safetensors header dtype names, so formats can be detected from a header without reading tensors
_SAFETENSORS_FP8 = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}

MARKER_KEY = "scaled_fp8"
SCALE_WEIGHT = ".scale_weight"  # legacy ComfyUI, what we write
AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2", ".comfy_quant")
SCALE_BUFFER = "weight_scale"  # name of the scale buffer on an Fp8Linear (so its state_dict reads like ComfyUI's)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def relative_error_bound(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    """Worst relative rounding error for values in the format's normal range: half an ulp (2^-4 for e4m3fn)."""
    return torch.finfo(dtype).eps / 2


# --- quantise / dequantise --------------------------------------------------------------------------------------

def quantize(t: torch.Tensor, scaled: bool, dtype: torch.dtype = torch.float8_e4m3fn):
    """(q, scale): fp8 ``q`` and a 0-d float32 ``scale`` (None when not ``scaled``) with ``t ~= q * scale``."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an fp8 dtype")
    fmax = torch.finfo(dtype).max
    if not scaled:
        # clamp first: some backends turn out-of-range casts into NaN (e4m3fn has no inf)
        return t.clamp(-fmax, fmax).to(dtype), None
    t = t.detach()
    flat_t, step = t.reshape(-1), 1 << 22
    # abs/amax are exact in any float dtype; chunks avoid a full-size temporary (RAM ~ one tensor when converting)
    amax = torch.stack([flat_t[i:i + step].abs().amax() for i in range(0, flat_t.numel(), step)]).amax().float() \
        if t.device.type != "meta" and t.numel() else t.abs().amax().float() if t.numel() else torch.zeros(())
    if amax.device.type != "meta" and not torch.isfinite(amax):
        raise ValueError("cannot quantise a tensor with inf/NaN values")
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))  # an all-zero tensor keeps scale 1
    if t.device.type == "meta":
        return torch.empty_like(t, dtype=dtype), scale
    # Divide in fp32 so rounding once to fp8 is the only loss (amax / scale can land a hair above fmax -> clamp).
    # Row chunks keep the fp32 temporaries small: converting a 24 GB checkpoint needs about one tensor of RAM.
    q = torch.empty(t.shape, dtype=dtype, device=t.device)
    flat_q = q.view(-1)
    for i in range(0, flat_t.numel(), step):
        chunk = flat_t[i:i + step].to(torch.float32, copy=True).div_(scale).clamp_(-fmax, fmax)
        flat_q[i:i + step] = chunk.to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``q.to(dtype) * scale`` (the runtime path: no fp32 temporary; exact when ``dtype`` is float32)."""
    out = q.to(dtype)
    if scale is None:
        return out
    if out is q:  # q already has the target dtype: never scale the stored tensor in place
        return q * scale.to(dtype)
    return out.mul_(scale)


# --- the keep-in-high-precision policy ---------------------------------------------------------------------------

# Regexes on a normalised key (no file prefix, no peft ``.base_layer``); ``(\.|$)`` lets module names match too.
GROUPS: dict[str, tuple[str, ...]] = {
    "norms": (r"\.(query_norm|key_norm)(\.|$)", r"\.norm_(added_)?[qk](\.|$)"),
    "biases": (r"\.bias$",),
    "embedders": (r"^(img_in|txt_in|time_in|vector_in|guidance_in)(\.|$)",
                  r"^(x_embedder|context_embedder|time_text_embed|time_guidance_embed)(\.|$)"),  # FLUX.2: last
    "modulation": (r"^double_blocks\.\d+\.(img|txt)_mod\.lin(\.|$)", r"^single_blocks\.\d+\.modulation\.lin(\.|$)",
                   r"^final_layer\.adaLN_modulation\.1(\.|$)",
                   r"^transformer_blocks\.\d+\.norm1(_context)?\.linear(\.|$)",
                   r"^single_transformer_blocks\.\d+\.norm\.linear(\.|$)", r"^norm_out\.linear(\.|$)",
                   r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.(lin|linear)(\.|$)"),  # FLUX.2
    # BFL final_layer.*, diffusers norm_out.* and the top-level proj_out (not single blocks' proj_out)
    "final": (r"^(final_layer|norm_out|proj_out)(\.|$)",),
}
_GROUP_RES = {name: tuple(re.compile(p) for p in pats) for name, pats in GROUPS.items()}


def normalize_key(key: str) -> str:
    """A key without ``model.diffusion_model.`` / ``diffusion_model.`` / ``transformer.`` or peft's ``.base_layer``."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.replace(".base_layer", "")


@dataclass(frozen=True)
class Fp8Policy:
    """Which tensors stay in high precision; everything else with >= 2 dims is quantised.

    A tensor in several groups (``final_layer.adaLN_modulation.1`` is modulation and final) is kept if any of its
    groups is kept. ``keep_patterns`` are extra ``fnmatch`` globs on the normalised key. 1-D tensors outside the
    norms/biases groups are always kept.
    """

    keep_norms: bool = True
    keep_biases: bool = True
    keep_embedders: bool = True
    keep_modulation: bool = True
    keep_final: bool = True
    keep_patterns: tuple[str, ...] = ()

    @classmethod
    def from_names(cls, names: Iterable[str] | str, keep_patterns: Sequence[str] = ()) -> "Fp8Policy":
        """Keep exactly the named groups (``["norms", "biases"]`` or ``"norms,biases"``; empty keeps none)."""
        if isinstance(names, str):
            names = names.split(",")
        names = {n.strip() for n in names if n.strip()}
        unknown = sorted(names - set(GROUPS))
        if unknown:
            raise UserError(f"model.fp8_keep: unknown fp8 keep group(s) {', '.join(unknown)}; valid groups: "
                            f"{', '.join(GROUPS)}")
        return cls(**{f"keep_{g}": g in names for g in GROUPS}, keep_patterns=tuple(keep_patterns))

    @property
    def kept_groups(self) -> list[str]:
        return [g for g in GROUPS if getattr(self, f"keep_{g}")]

    def describe(self) -> str:
        """One line for safetensors metadata, e.g. ``keep=norms,biases,embedders,modulation,final``."""
        text = "keep=" + (",".join(self.kept_groups) or "none")
        return text + (f";patterns={','.join(self.keep_patterns)}" if self.keep_patterns else "")

    def should_quantize(self, key: str, shape: Sequence[int]) -> bool:
        """True if the tensor ``key`` (BFL or diffusers name, any known prefix) of ``shape`` goes to fp8."""
        k = normalize_key(key)
        if any(fnmatchcase(k, p) for p in self.keep_patterns):
            return False
        groups = [g for g, res in _GROUP_RES.items() if any(r.search(k) for r in res)]
        if len(shape) < 2 and not {"norms", "biases"} & set(groups):
            return False  # scales, markers, anything vector-like we have no group for
        return not any(getattr(self, f"keep_{g}") for g in groups)


# --- ComfyUI files: read ---------------------------------------------------------------------------------------

def _is_fp8(dtype) -> bool:
    return dtype in FP8_DTYPES or (isinstance(dtype, str) and dtype.upper() in _SAFETENSORS_FP8)


def is_marker_key(key: str) -> bool:
    return key == MARKER_KEY or key.endswith("." + MARKER_KEY)


def is_scale_key(key: str) -> bool:
    """True for ComfyUI's marker and per-layer scale / input-scale / comfy_quant keys (not model tensors)."""
    return is_marker_key(key) or key.endswith(AUX_SUFFIXES)


def detect_fp8_format(keys: Iterable[str], dtypes: Mapping[str, object]) -> str:
    """'fp8-scaled' (ComfyUI legacy or newer scales), 'fp8' (plain fp8 weights) or 'none'.

    ``dtypes`` maps keys to torch dtypes or safetensors header names ('F8_E4M3', 'BF16', ...).
    """
    keys = list(keys)
    if any(is_scale_key(k) for k in keys):
        return "fp8-scaled"
    if any(_is_fp8(dtypes.get(k)) for k in keys):
        return "fp8"
    return "none"


def scale_key_for(weight_key: str, keys: Collection[str]) -> str | None:
    """The key of ``weight_key``'s dequantisation scale (``.scale_weight`` or ``.weight_scale``), if any."""
    base = weight_key.removesuffix(".weight")
    for suffix in (SCALE_WEIGHT, ".weight_scale"):
        if base + suffix in keys:
            return base + suffix
    return None


def parse_comfy_quant(t: torch.Tensor) -> dict:
    """The per-layer config stored in a ``.comfy_quant`` uint8 tensor (JSON bytes)."""
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def dequantize_entry(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A file's (weight, scale) pair as a ``dtype`` tensor; per-tensor or per-row scales, computed in fp32."""
    if not weight.is_floating_point():
        raise CheckpointError(f"a {weight.dtype} weight is a quantisation format we cannot read (only fp8 is supported)")
    if scale is None:
        return weight.to(dtype)
    s = scale.float()
    if s.numel() == 1:
        s = s.reshape(())
    elif tuple(s.shape) in ((weight.shape[0],), (weight.shape[0], 1)):  # row-wise: one per output feature
        s = s.reshape(-1, *([1] * (weight.ndim - 1)))
    else:
        raise CheckpointError(f"scale of shape {tuple(scale.shape)} for a weight of shape {tuple(weight.shape)} "
                              "is block-wise; only per-tensor and per-row fp8 scales are supported")
    return (weight.float() * s.to(weight.device)).to(dtype)


# --- ComfyUI files: write --------------------------------------------------------------------------------------

def scaled_fp8_entries(key: str, tensor: torch.Tensor, policy: Fp8Policy, scaled: bool = True,
                       dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """The file entries for one high-precision tensor: unchanged if kept, else fp8 (+ ``.scale_weight``).

    Scales are only written for ``.weight`` tensors (the only ones ComfyUI applies them to); other quantised
    tensors (biases/norms when their group is switched off) are plain casts.
    """
    if tensor.dtype in FP8_DTYPES:
        raise ValueError(f"{key} is already {tensor.dtype}; dequantise it first (dequantize_entry)")
    if not policy.should_quantize(key, tuple(tensor.shape)):
        return {key: tensor}
    if scaled and dtype != torch.float8_e4m3fn:
        raise UserError(f"scaled fp8 files must be e4m3fn: ComfyUI reads legacy scaled files as e4m3fn, so {dtype} "
                        "values above 448 would be clamped; write a plain (unscaled) file for e5m2")
    if scaled and key.endswith(".weight") and tensor.ndim >= 2:
        q, scale = quantize(tensor, True, dtype)
        return {key: q, key.removesuffix(".weight") + SCALE_WEIGHT: scale}
    return {key: quantize(tensor, False, dtype)[0]}


def scaled_fp8_marker(dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The ``scaled_fp8`` marker: 2 elements of the fp8 dtype (weights-only fp8, full-precision matmuls).

    The writer stores it as ``<layout prefix>scaled_fp8`` (e.g. ``model.diffusion_model.scaled_fp8``).
    """
    return torch.zeros(2, dtype=dtype)


# --- fp8 storage on a live model ---------------------------------------------------------------------------------

class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in fp8 (+ optional fp32 ``weight_scale``), computed in bf16/fp32.

    Made by ``enable_fp8_storage`` by swapping the class of an existing Linear; never constructed directly.
    ``compute_dtype`` is also the attribute peft reads (as for bitsandbytes layers) to create LoRA weights in the
    compute dtype rather than in the base weight's fp8.
    """

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype not in FP8_DTYPES:
            raise RuntimeError(f"an Fp8Linear weight became {self.weight.dtype}; fp8 storage was lost")
        weight = dequantize(self.weight, self._buffers.get(SCALE_BUFFER), self.compute_dtype)
        bias = self.bias.to(weight.dtype) if self.bias is not None else None
        return F.linear(x.to(weight.dtype), weight, bias)

    def _apply(self, fn, recurse=True):
        # model.to(device, dtype) / .half() must move fp8 storage but not cast it: an fp8 -> wider float -> fp8
        # round trip is exact, so we let torch convert as usual and put the fp8 dtype (and the fp32 scale) back.
        weight_dtype, scale = self.weight.dtype, self._buffers.get(SCALE_BUFFER)
        super()._apply(fn, recurse)
        if self.weight.dtype != weight_dtype:
            self.weight.data = self.weight.data.to(weight_dtype)
        moved = self._buffers.get(SCALE_BUFFER)
        if scale is not None and moved.dtype != scale.dtype:
            self._buffers[SCALE_BUFFER] = scale.to(moved.device)
        return self

    def extra_repr(self) -> str:
        scaled = "scaled" if SCALE_BUFFER in self._buffers else "plain"
        return f"{super().extra_repr()}, storage={self.weight.dtype} ({scaled}), compute={self.compute_dtype}"


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def enable_fp8_storage(model: nn.Module, policy: Fp8Policy, compute_dtype: torch.dtype = torch.bfloat16,
                       storage_dtype: torch.dtype = torch.float8_e4m3fn,
                       scales: Mapping[str, torch.Tensor] | None = None, scaled: bool = True) -> list[str]:
    """Store the policy's Linear weights (diffusers names) in fp8; returns the names of the fp8 modules.

    Linears whose weight is *already* fp8 (loaded with ``load_state_dict(assign=True)``) always become fp8 storage,
    with their scale from ``scales`` (keyed by module name or ``<module>.weight``) or none. High-precision weights
    the policy selects are quantised here (per-tensor scaled unless ``scaled=False``). fp8 weights are frozen.
    Call before injecting LoRA; afterwards cast trainable params to fp32 as usual for bf16 training.
    """
    if storage_dtype not in FP8_DTYPES:
        raise ValueError(f"storage_dtype must be an fp8 dtype, got {storage_dtype}")
    pending = {k.removesuffix(".weight"): v for k, v in (scales or {}).items()}
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            continue  # already enabled
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or _is_adapter(name) or hasattr(module, "base_layer"):
            continue  # peft's wrapper exposes its base layer's weight; the base layer itself is handled
        if type(module) is not nn.Linear:
            if weight.dtype in FP8_DTYPES:
                raise ValueError(f"{name} ({type(module).__name__}) has an fp8 weight; only nn.Linear is supported")
            continue
        scale = pending.pop(name, None)
        if weight.dtype in FP8_DTYPES:
            q = weight.detach()
        elif scale is not None:
            raise ValueError(f"a scale was given for {name} but its weight is {weight.dtype}, not fp8")
        elif policy.should_quantize(name + ".weight", tuple(weight.shape)):
            q, scale = quantize(weight.detach(), scaled, storage_dtype)
        else:
            continue
        module.weight = nn.Parameter(q, requires_grad=False)
        if scale is not None:
            module.register_buffer(SCALE_BUFFER, scale.detach().float().reshape(()).to(q.device))
        module.__class__ = Fp8Linear
        module.compute_dtype = compute_dtype
        converted.append(name)
    if pending:
        raise ValueError(f"scales given for modules that are not Linear layers of this model: {sorted(pending)[:5]}")
    return converted


def param_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (fp8 = 1 byte per element)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def compute_dtype(transformer) -> torch.dtype:
    """The dtype a transformer computes in: fp8-stored layers declare their ``compute_dtype``, others compute in their
    weights' dtype (read off ``x_embedder``, which every Flux family has; peft's wrapper is looked through)."""
    layer = transformer.x_embedder
    layer = getattr(layer, "base_layer", layer)
    return getattr(layer, "compute_dtype", layer.weight.dtype)
