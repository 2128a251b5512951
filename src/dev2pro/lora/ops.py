"""LoRA maths on tensors and models: delta, SVD extraction, and putting a LoRA into a diffusers model.

A LoRA module is a rank-r factorisation of a weight update, delta W = up @ down * alpha / r. So:
- merging adds that product to the base weight (``lora.merge``: in fp32, then back to the weight's storage, fp8
  requantised with its scale);
- extraction is the reverse: the best rank-k approximation of a weight difference is its truncated SVD
  (Eckart-Young), and the squared singular values say how much of the difference each rank keeps ("energy");
- applying to a model goes through peft (``load_lora_adapter``) with each module's alpha kept, for any model size.
These functions work on tensors in memory; streaming checkpoint files through them is ``lora.merge``'s job (merge)
and ``recipes.lora_tools``' (extract).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import UserError
from ..flux.fp8 import FP8_DTYPES
from .weights import LoraModule, LoraWeights, lora_to_peft_state_dict, peft_config_kwargs


def _no_fp8(name: str, t: torch.Tensor) -> None:
    if t.dtype in FP8_DTYPES:
        raise ValueError(f"{name} is {t.dtype}: dequantise fp8 weights (with their scales) before LoRA maths.")


def lora_delta(module: LoraModule, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """delta W = up @ down * alpha / rank, computed in fp32 and returned as ``dtype``."""
    return (module.up.float() @ module.down.float() * module.scale).to(dtype)


RANK_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Factors:
    """The top singular triplets of a weight difference: delta ~= u @ diag(s) @ vh, plus ||delta||_F^2.

    ``total`` is exact whichever way the triplets were found, so ``energy(k)`` is the true fraction of the
    difference a rank-k LoRA made of these triplets keeps (for a randomized SVD too: its rank-k product is the
    projection of delta onto k orthonormal columns, whose squared norm is exactly sum(s[:k]^2)).
    """

    u: torch.Tensor  # [out, q]
    s: torch.Tensor  # [q], descending
    vh: torch.Tensor  # [q, in]
    total: float
    method: str  # "exact" | "randomized"

    def energy(self, k: int) -> float:
        if self.total <= 0:
            return 1.0
        return min(1.0, float((self.s[:k].double() ** 2).sum()) / self.total)

    def rank_for(self, energy: float) -> int:
        """Smallest k keeping ``energy`` of the difference, or every triplet held when they do not reach it."""
        if self.total <= 0:
            return 1
        cum = torch.cumsum(self.s.double() ** 2, 0) / self.total
        target = torch.tensor(energy, dtype=torch.float64, device=cum.device)  # triplets may sit on the GPU
        return min(int(torch.searchsorted(cum, target)) + 1, self.s.numel())

    def ladder(self, max_rank: int | None = None) -> dict[int, float]:
        """Retained energy at ranks 1, 2, 4, ... (those these triplets cover): the spectrum summary."""
        top = self.s.numel() if max_rank is None else max_rank if self.method == "exact" else \
            min(max_rank, self.s.numel())  # an exact spectrum is complete: beyond it, everything is kept
        return {k: round(self.energy(k), 6) for k in RANK_LADDER if k <= top}

    def module(self, k: int) -> LoraModule:
        """Rank-k LoRA; singular values split evenly (sqrt each side) so up/down have similar magnitudes."""
        root = self.s[:k].sqrt()
        return LoraModule(down=(root[:, None] * self.vh[:k]).float().cpu().contiguous(),
                          up=(self.u[:, :k] * root).float().cpu().contiguous(), alpha=float(k))


def use_randomized(shape: tuple[int, int], rank: int, oversample: int = 16) -> bool:
    """Randomized SVD pays off when the wanted triplets are a small part of the spectrum (rank << width)."""
    return (rank + oversample) * 4 <= min(shape)


def decompose(delta: torch.Tensor, rank: int, exact: bool | None = None, oversample: int = 16, niter: int = 4,
              device: str | torch.device | None = None, seed: int = 0) -> Factors:
    """The top ``rank`` (+ ``oversample`` for randomized) singular triplets of ``delta`` in fp32 on ``device``.

    ``exact=None`` picks: ``torch.linalg.svd`` for small or near-full ranks, else ``torch.svd_lowrank`` (Halko et
    al.: a random range finder with ``niter`` power iterations, which sharpen a slowly decaying spectrum) on
    ``rank + oversample`` columns. A full SVD of a 3072-wide matrix costs O(n^3) for every triplet; the
    randomized one costs O(n^2 q) for the q that are kept. Seeded, so repeated runs give the same file.
    """
    if delta.ndim != 2:
        raise ValueError(f"extract needs a 2-D weight difference, got shape {tuple(delta.shape)}")
    _no_fp8("delta", delta)
    a = delta.to(device=device or delta.device, dtype=torch.float32)
    total = float(a.double().square().sum()) if a.device.type == "cpu" else float(a.square().sum(dtype=torch.float64))
    q = min(rank + oversample, *a.shape)
    randomized = use_randomized(tuple(a.shape), rank, oversample) if exact is None else not exact
    if randomized and q < min(a.shape):
        with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
        return Factors(u, s, v.T, total, "randomized")
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    # the full spectrum's own sum: the same fp32 rounding as the kept part, so rank = width keeps exactly 1.0
    return Factors(u, s, vh, float((s.double() ** 2).sum()), "exact")


def extract(delta: torch.Tensor, rank: int, energy: float | None = None, exact: bool | None = None,
            **svd) -> tuple[LoraModule, float]:
    """Best rank-k LoRA of ``delta`` by SVD; returns (module, retained energy = kept / total squared singular values).

    k is ``rank``, or with ``energy`` the smallest rank keeping that fraction (capped by ``rank``). alpha = k.
    ``exact``/``svd`` choose the SVD (``decompose``).
    """
    f = decompose(delta, rank, exact, **svd)
    k = max(1, min(rank, f.s.numel()))
    if energy is not None:
        k = min(k, f.rank_for(energy))
    return f.module(k), f.energy(k)


def rank_errors(weight: torch.Tensor, delta: torch.Tensor, f: Factors, ranks, x: torch.Tensor) -> dict[int, tuple]:
    """Per rank k: (||x (delta - lora_k)^T||^2, ||x (weight + delta)^T||^2) on fixed inputs ``x`` [n, in].

    Their ratio's square root is the relative output error of base + rank-k LoRA against the target layer; the
    sums over layers give a whole-model figure. Ranks beyond the triplets held use all of them.
    """
    x = x.to(f.u.device, torch.float32)
    target = x @ (weight.to(x) + delta.to(x)).T
    resid = x @ delta.to(x).T
    proj = (x @ f.vh.T) * f.s  # [n, q]
    den = float(target.double().square().sum())
    out = {}
    for k in sorted(ranks):
        k_eff = min(k, f.s.numel())
        r = resid - proj[:, :k_eff] @ f.u[:, :k_eff].T
        out[k] = (float(r.double().square().sum()), den)
    return out


def extract_pair(a_sd: Mapping[str, torch.Tensor], b_sd: Mapping[str, torch.Tensor], rank: int,
                 energy: float | None = None, min_delta: float = 1e-6) -> tuple[LoraWeights, dict]:
    """A LoRA that takes model A to model B: ``extract`` on every Linear weight (B - A) of two diffusers state dicts.

    Skips 1-D tensors (biases, norms), identical weights, and weights whose difference is at most
    ``min_delta`` x ||A|| (Frobenius). The report maps each extracted layer to its rank, retained energy and relative
    difference ||B - A|| / ||A||, and lists what was skipped and why.
    """
    lw = LoraWeights(layout="diffusers")
    report = {"layers": {}, "identical": [], "below_min_delta": [], "not_linear": [],
              "only_in_one": sorted(set(a_sd) ^ set(b_sd))}
    for key in sorted(set(a_sd) & set(b_sd)):
        a, b = a_sd[key], b_sd[key]
        if a.ndim != 2 or not key.endswith(".weight"):
            report["not_linear"].append(key)
            continue
        if a.shape != b.shape:
            raise UserError(f"{key}: shape {tuple(a.shape)} in A but {tuple(b.shape)} in B; the two checkpoints are "
                            f"different model sizes.")
        _no_fp8(key, a)
        _no_fp8(key, b)
        if torch.equal(a, b):
            report["identical"].append(key)
            continue
        delta = b.float() - a.float()
        rel = float(delta.norm() / a.float().norm().clamp_min(1e-30))
        if rel <= min_delta:
            report["below_min_delta"].append(key)
            continue
        module, kept = extract(delta, rank, energy)
        name = key[: -len(".weight")]
        lw[name] = module
        report["layers"][name] = {"rank": module.rank, "retained_energy": kept, "relative_delta": rel}
    return lw, report


# ------------------------------------------------------------------------------------------- models (peft)
def _shape_summary(transformer) -> str:
    cfg = getattr(transformer, "config", {})
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    heads, dim = get("num_attention_heads"), get("attention_head_dim")
    return (f"{get('num_layers')} double / {get('num_single_layers')} single blocks, hidden "
            f"{heads * dim if heads and dim else '?'}")


def check_fits(transformer: torch.nn.Module, lw: Mapping[str, LoraModule]) -> None:
    """UserError naming the first LoRA module that is missing from the model or has the wrong shape."""
    modules = dict(transformer.named_modules())
    for name, m in lw.items():
        base = getattr(modules.get(name), "base_layer", modules.get(name))  # a layer that already has adapters
        if not isinstance(base, torch.nn.Linear):
            raise UserError(f"LoRA module {name!r} is not a linear layer of this model ({_shape_summary(transformer)})"
                            f": the LoRA is for another model family or size.")
        if (m.up.shape[0], m.down.shape[1]) != (base.out_features, base.in_features):
            raise UserError(f"LoRA module {name!r} is {m.up.shape[0]}x{m.down.shape[1]} but the model's layer is "
                            f"{base.out_features}x{base.in_features} ({_shape_summary(transformer)}): the LoRA is for "
                            f"another model size.")


def apply_lora(transformer: torch.nn.Module, lw: Mapping[str, LoraModule], scale: float = 1.0,
               adapter_name: str = "dev2pro") -> str:
    """Load ``lw`` into a diffusers FluxTransformer2DModel (any size) as a peft adapter, alphas intact.

    The adapter is added to the active ones (earlier adapters stay on) with strength ``scale``; returns its name.
    LoKr / LoHa / DoRA weights go in as peft adapters of their type where peft holds them, else are merged
    (``peft_adapters.apply``).
    """
    from peft.tuners.lora import LoraLayer  # heavy (~2 s): lora info/merge/extract skip it

    from .dora import is_peft_dora
    from .lycoris import AdapterWeights
    from .peft_adapters import scaled_fp8

    if isinstance(lw, AdapterWeights) and (not is_peft_dora(lw) or scaled_fp8(transformer)):
        # LoKr / LoHa / ComfyUI-convention DoRA / fused BFL modules; peft's DoRA would read scaled fp8 unscaled
        from .peft_adapters import apply

        return apply(transformer, lw, scale, adapter_name)
    check_fits(transformer, lw)
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise UserError(f"the model already has an adapter named {adapter_name!r}; pick another name.")
    before = {n: list(m.active_adapters) for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    sd, cfg = lora_to_peft_state_dict(lw), peft_config_kwargs(lw)
    if is_peft_dora(lw):  # peft's own DoRA (per output row): its magnitudes go in as they are
        sd.update({f"{n}.lora_magnitude_vector": m.magnitude for n, m in lw.items()})
        cfg["use_dora"] = True
    with warnings.catch_warnings():  # peft warns whenever a second adapter arrives; several are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(sd, prefix=None, adapter_name=adapter_name, metadata=cfg)
    injected = 0
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in module.lora_A:
            injected += 1
            module.set_scale(adapter_name, scale)
        # peft activates only the newest adapter on each layer it touches; keep the earlier ones on as well.
        wanted = [a for a in before.get(name, []) + [adapter_name] if a in module.lora_A]
        if wanted and list(module.active_adapters) != wanted:
            module.set_adapter(wanted)
    if injected != len(lw):
        raise UserError(f"only {injected} of {len(lw)} LoRA modules were injected into the model.")
    return adapter_name


def lora_from_peft_model(transformer: torch.nn.Module, adapter_name: str = "default") -> LoraWeights:
    """LoraWeights of a peft-injected model's adapter; rank and alpha per layer as peft resolved them (config +
    rank/alpha patterns), rsLoRA expressed as an alpha over r. Wrapper prefixes (compile, FSDP, checkpointing,
    PeftModel) are dropped from names; DTensor shards are gathered. ``.family`` is the model's (FLUX.2 LoRAs are
    written in FLUX.2's layouts). LoKr / LoHa / DoRA adapters come back as ``lycoris.AdapterWeights``
    (``peft_adapters.module_from_peft``)."""
    from peft.tuners.lora import LoraLayer  # heavy (~2 s), as in apply_lora
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..families import of_model
    from .lycoris import AdapterWeights
    from .peft_adapters import module_from_peft

    lw = AdapterWeights(layout="diffusers", family=of_model(transformer).name)
    for name, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter_name not in (
                module.lora_A if isinstance(module, LoraLayer) else getattr(module, "_available_adapters", ())):
            continue
        other = module_from_peft(module, adapter_name, lambda m: _alpha(m, adapter_name))
        if other is not None:  # LoKr / LoHa / DoRA
            lw[_clean(name)] = other
            continue
        alpha = _alpha(module, adapter_name)
        down, up = (_full(p.weight) for p in (module.lora_A[adapter_name], module.lora_B[adapter_name]))
        lw[_clean(name)] = LoraModule(down, up, float(alpha))
    if not lw:
        names = sorted(getattr(transformer, "peft_config", {}))
        raise UserError(f"the model has no LoRA adapter {adapter_name!r} (adapters: {names or 'none'}).")
    return lw if lw.adapter != "lora" else LoraWeights(lw, layout="diffusers", family=lw.family)


def _alpha(module, adapter_name: str) -> float:
    """peft's alpha of a LoRA layer in our alpha / r convention (rsLoRA scales by alpha / sqrt(r))."""
    r, alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
    return float(alpha * math.sqrt(r) if module.use_rslora.get(adapter_name) else alpha)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _clean(name: str) -> str:
    for wrapper in ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("base_model.model.")
