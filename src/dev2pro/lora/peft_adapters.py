"""Adapter types through peft: the config ``lora.type`` trains with, the modules a trained model holds, and putting a
LoKr / LoHa / DoRA file back into a model for sampling.

Training uses peft's own layers: ``LoraConfig`` (``use_dora`` for DoRA), ``LoKrConfig``, ``LoHaConfig``. Reading a
trained adapter turns peft's scale (alpha / r for every type) into the file conventions of ``lora.lycoris`` and
``lora.dora``. Applying a file: modules peft can hold as they are (diffusers-named LoKr / LoHa, peft's own DoRA) go
in as a peft adapter of that type -- a side branch, so fp8 storage stays untouched and the adapter can be deleted
again (the training sampler swaps it each time); the rest (fused BFL-named modules, ComfyUI-convention DoRA) are
merged into the weights in fp32 (fp8 storage requantised: a small delta can round away there, so it warns).
"""

from __future__ import annotations

import re
import warnings

import torch

from ..errors import UserError
from . import dora as D
from . import pieces as P
from .lycoris import AdapterWeights, LycoModule, deltas

TYPES = ("lora", "dora", "lokr", "loha")
NETWORK_MODULE = "lycoris.kohya"  # what LyCORIS writes into ss_network_module (kohya's metadata)


def peft_config(kind: str, rank: int, alpha: float, dropout: float, targets, lokr_factor: int = -1,
                lokr_decompose_both: bool = False):
    """The peft config ``lora.type`` = ``kind`` trains with (LoKr/LoHa: ``dropout`` is peft's rank dropout)."""
    import peft

    if kind in ("lora", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                               init_lora_weights=True, use_dora=kind == "dora")
    if kind == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets,
                               decompose_factor=lokr_factor, decompose_both=lokr_decompose_both, init_weights=True)
    if kind == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets, init_weights=True)
    raise UserError(f"lora.type = {kind!r} is not an adapter type; choose one of {', '.join(TYPES)}")


def is_adapter_param(name: str, adapter: str) -> bool:
    """A trainable parameter of peft adapter ``adapter`` (LoRA/DoRA ``lora_*``, LoKr ``lokr_*``, LoHa ``hada_*``)."""
    return bool(re.search(rf"\.(lora_\w+|lokr_\w+|hada_\w+)\.{re.escape(adapter)}(\.|$)", name))


def kohya_fields(kind: str, rank: int, alpha: float, lokr_factor: int = -1, decompose_both: bool = False) -> dict:
    """``ss_network_module`` / ``ss_network_args`` as LyCORIS's kohya wrapper writes them (plain LoRA: none)."""
    if kind == "lora":
        return {}
    args = {"algo": "lora", "dora_wd": "True"} if kind == "dora" else {"algo": kind}
    if kind == "lokr":
        args.update(factor=str(lokr_factor), decompose_both=str(decompose_both))
    return {"ss_network_module": NETWORK_MODULE, "ss_network_args": args, "dev2pro.adapter_type": kind}


def check_layouts(kind: str, family: str, layouts) -> None:
    """Refuse, before training, a ``save.formats`` layout that no loader reads for this adapter type."""
    if "diffusers" in layouts and (kind == "loha" or kind == "lokr" and family != "flux2"):
        raise UserError(f"save.formats has 'diffusers' but diffusers 0.42 loads no {kind} adapter for "
                        f"{family.upper().replace('FLUX', 'FLUX.')}: set save.formats = [\"kohya\"] (ComfyUI and "
                        f"dev2pro read it)")


def scaled_fp8(transformer) -> bool:
    """Does the model hold scaled fp8 weights (whose scale peft's DoRA does not apply)?"""
    from ..flux.fp8 import SCALE_BUFFER

    return any(SCALE_BUFFER in getattr(m, "_buffers", {}) for m in transformer.modules())


def check_storage(transformer, kind: str) -> None:
    """peft's DoRA reads the base weight without an fp8 scale: refuse DoRA on scaled fp8 storage."""
    if kind == "dora" and scaled_fp8(transformer):
        raise UserError("lora.type = 'dora' with model.fp8_storage: peft's DoRA reads the fp8 weights without their "
                        "scales (wrong norms); set model.fp8_storage = false, or train lora/lokr/loha")


# ------------------------------------------------------------------------------------------ trained -> modules
def module_from_peft(layer, adapter: str, alpha_of) -> object | None:
    """The LycoModule / DoraModule of a peft LoKr, LoHa or DoRA layer (None for anything else)."""
    kind = type(layer).__module__.split(".")[-2]  # peft.tuners.<lokr|loha|lora>.layer
    if kind in ("lokr", "loha"):
        t = {k: _full(getattr(layer, k)[adapter]) for k in layer.adapter_layer_names if adapter in getattr(layer, k)}
        m = LycoModule(kind, t, None)
        s = float(layer.scaling[adapter])
        if m.dim is None:  # both LoKr factors whole: readers apply no alpha, so the scale goes into w1
            t["lokr_w1"] = t["lokr_w1"] * s
        else:
            m.alpha = s * m.dim
        return m
    if kind == "lora" and layer.use_dora.get(adapter):
        down, up = (_full(p.weight) for p in (layer.lora_A[adapter], layer.lora_B[adapter]))
        mag = _full(layer.lora_magnitude_vector[adapter].weight)
        return D.DoraModule(down, up, alpha_of(layer), mag, "out")
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu().clone()


def base_weight(module) -> torch.Tensor:
    """A linear's weight in fp32 as its forward sees it (Fp8Linear's scale applied; peft wrappers unwrapped)."""
    from ..flux.fp8 import SCALE_BUFFER, dequantize

    module = getattr(module, "base_layer", module)
    w = module.weight.detach()
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    return dequantize(w, module._buffers.get(SCALE_BUFFER), torch.float32).cpu()


def rebased(lw: AdapterWeights, model) -> AdapterWeights:
    """peft DoRA modules converted to ComfyUI's convention on ``model``'s own weights (``dora.rebase``)."""
    if not any(isinstance(m, D.DoraModule) and m.axis == "out" for m in lw.values()):
        return lw
    mods = {_clean(n): m for n, m in model.named_modules()}
    out = AdapterWeights(metadata=lw.metadata, layout=lw.layout, family=lw.family)
    for n, m in lw.items():
        out[n] = D.rebase(m, base_weight(mods[n])) if isinstance(m, D.DoraModule) else m
    return out


def _clean(name: str) -> str:
    for wrapper in ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "") if name.startswith(wrapper) or f".{wrapper}" in name else name
    return name.removeprefix("base_model.model.")


# --------------------------------------------------------------------------------------------- file -> model
def apply(transformer, lw: AdapterWeights, scale: float, adapter_name: str) -> str:
    """Put ``lw`` into ``transformer``: a peft adapter of its type when peft holds it as is, else merged."""
    ps = P.pieces(lw.family or "flux1", *P.counts(lw))
    kinds = {m.kind if isinstance(m, LycoModule) else None for m in lw.values()}
    if len(kinds) == 1 and None not in kinds and not any(P.is_bfl(n, ps) for n in lw):
        return _inject(transformer, lw, scale, adapter_name)
    _merge_into(transformer, lw, scale, adapter_name)
    return adapter_name


def _inject(transformer, lw: AdapterWeights, scale: float, adapter_name: str) -> str:
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    kind = next(iter(lw.values())).kind
    config = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
        r=1, alpha=1, target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(lw)) + ")$")
    before = {n: list(m.active_adapters) for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=adapter_name)  # r=1: tiny placeholders, replaced below
    injected = 0
    for name, layer in transformer.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        m = lw.get(_clean(name))
        if m is not None and adapter_name in layer._available_adapters:
            base = layer.get_base_layer()
            if tuple(m.shape) != (base.out_features, base.in_features):
                raise UserError(f"{_clean(name)}: the {m.kind} module is {m.shape[0]}x{m.shape[1]} but the layer is "
                                f"{base.out_features}x{base.in_features}: the adapter is for another model size")
            device = base.weight.device
            for k in layer.adapter_layer_names:
                params = getattr(layer, k)
                if adapter_name in params:
                    del params[adapter_name]
                if k in m.t:
                    params[adapter_name] = torch.nn.Parameter(m.t[k].float().to(device), requires_grad=False)
            layer.r[adapter_name], layer.alpha[adapter_name] = 1, m.scale  # set_scale(s) -> s * m.scale
            layer.set_scale(adapter_name, scale)
            injected += 1
        wanted = [a for a in before.get(name, []) + [adapter_name] if a in layer._available_adapters]
        if wanted and list(layer.active_adapters) != wanted:
            layer.set_adapter(wanted)
    if injected != len(lw):
        raise UserError(f"only {injected} of {len(lw)} adapter modules were injected into the model")
    return adapter_name


def _merge_into(transformer, lw: AdapterWeights, scale: float, adapter_name: str) -> None:
    """Add ``lw``'s deltas to the weights in fp32 (fp8 requantised); a second call with the same ``adapter_name``
    first restores what the first one changed."""
    from .. import families
    from ..flux.fp8 import FP8_DTYPES, SCALE_BUFFER, quantize

    spec = families.of_model(transformer).spec_from_config(dict(transformer.config))
    mods = {_clean(n).removesuffix(".base_layer"): m for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}
    sizes = (spec.num_double, spec.num_single, spec.hidden, spec.mlp_hidden, spec.guidance_embeds)
    for lin in mods.values():  # the same adapter merged before (the training sampler's "sample"): undo it first
        kept = getattr(lin, "_dev2pro_unmerged", {}).pop(adapter_name, None)
        if kept is not None:
            lin.weight.data = kept[0].to(lin.weight.device)
            if kept[1] is not None:
                lin._buffers[SCALE_BUFFER] = kept[1].to(lin.weight.device)
    total = deltas(lw, "diffusers", sizes, lambda n: base_weight(mods[n]),
                   lambda n: tuple(mods[n].weight.shape) if n in mods else None, scale)
    for name, d in total.items():
        lin = mods[name]
        w = lin.weight
        scale_buf = lin._buffers.get(SCALE_BUFFER)
        lin.__dict__.setdefault("_dev2pro_unmerged", {})[adapter_name] = (  # host copies, to undo the merge
            w.detach().cpu().clone(), None if scale_buf is None else scale_buf.detach().cpu().clone())
        if w.dtype in FP8_DTYPES:
            warnings.warn(f"{name}: merging an adapter into fp8 storage rounds small changes away; load the base "
                          f"without fp8 storage for exact samples")
            q, s = quantize(base_weight(lin) + d, scaled=SCALE_BUFFER in lin._buffers, dtype=w.dtype)
            w.data = q.to(w.device)
            if s is not None:
                lin._buffers[SCALE_BUFFER] = s.to(w.device)
        else:
            w.data = (w.detach().float() + d.to(w.device)).to(w.dtype)
