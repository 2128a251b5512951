"""The models a training loop holds: the frozen LoRA base (fp8 storage, block swap, attention backend, compile) with
its peft LoRA, and the de-distillation student (every weight trainable, or a LoRA on a frozen base) and teacher.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from peft import LoraConfig

from .. import families
from ..errors import UserError
from ..flux import keys as keymod
from ..flux.checkpoint import load_transformer, open_checkpoint
from ..flux.fp8 import Fp8Policy, enable_fp8_storage
from ..lora.peft_adapters import check_storage, is_adapter_param, peft_config
from . import fsdp as fsdpmod
from .blockswap import BlockSwap, swap_positions
from .compiled import compile_blocks
from .cuda import avoid_cudnn_attention
from .rope import use_fused_rope

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ LoRA training
def check_blocks_to_swap(path: str, blocks_to_swap: int, allow_pickle: bool = False, family: str | None = None) -> None:
    """Refuse a ``blocks_to_swap`` above the checkpoint's block count from its header alone -- before minutes of
    data caching, not after."""
    if blocks_to_swap:
        spec = open_checkpoint(path, allow_pickle=allow_pickle, family=family).spec()
        swap_positions(spec.num_double, spec.num_single, blocks_to_swap)  # raises with the valid range


def load_base(path: str, dtype: torch.dtype, device, *, fp8_storage: bool = False, fp8_keep: Sequence[str] = (),
              gradient_checkpointing: bool = True, blocks_to_swap: int = 0, allow_pickle: bool = False,
              family: str | None = None):
    """The frozen training base (any layout, any family), optionally with fp8 storage; -> (model, Checkpoint).

    Without block swap it goes to ``device`` now; with it, ``place_base`` moves the resident part later.
    """
    model, ckpt = load_transformer(path, dtype=dtype, fp8_storage=fp8_storage, policy=Fp8Policy.from_names(fp8_keep),
                                   allow_pickle=allow_pickle, family=family)
    if not blocks_to_swap:
        model.to(device)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, ckpt


def place_base(model, device, *, blocks_to_swap: int = 0, gradient_checkpointing: bool = True,
               attention_backend: str = "", compile: bool | str = "off",
               fused_rope: bool = False) -> BlockSwap | None:
    """Block swap, attention backend, fused RoPE (``train/rope.py``: for the process) and regional compilation on the
    LoRA'd base; returns the ``BlockSwap`` (None without swap). Call after ``add_lora`` so the LoRA weights are told
    apart from the swapped base weights."""
    avoid_cudnn_attention()
    use_fused_rope(fused_rope)
    swap = None
    if blocks_to_swap:
        if not gradient_checkpointing:
            log.warning("model.blocks_to_swap without gradient_checkpointing: autograd keeps every block's weights "
                        "for backward, so the swap saves no GPU memory; set model.gradient_checkpointing = true")
        swap = BlockSwap(model, blocks_to_swap, device).place()
        log.info("block swap: %d blocks, %.2f GB of base weights in host RAM", blocks_to_swap,
                 swap.swapped_bytes() / 1024**3)
    if attention_backend:
        try:
            model.set_attention_backend(attention_backend)
        except Exception as e:  # unknown name, or a kernel package that is not installed
            raise UserError(f"train.attention_backend = {attention_backend!r}: {e}") from None
    if compile not in ("off", False):  # "blocks" (true: its older spelling)
        if swap is not None:
            log.warning("train.compile is skipped with block swap (its per-block hooks would break the graphs)")
        else:
            compile_blocks(model)
    return swap


def add_lora(transformer, target_names: list[str], rank: int, alpha: float, dropout: float = 0.0,
             adapter_name: str = "default", kind: str = "lora", lokr_factor: int = -1,
             lokr_decompose_both: bool = False) -> list[torch.nn.Parameter]:
    """Inject a peft adapter of ``kind`` (lora, dora, lokr, loha; ``lora.peft_adapters``) after fp8 storage is in
    place, as peft needs; only its weights train, in fp32.

    Every other parameter is frozen, a training adapter's LoRA included. Returns the trainable parameters.
    """
    check_storage(transformer, kind)
    transformer.add_adapter(peft_config(kind, rank, alpha, dropout, target_names, lokr_factor, lokr_decompose_both),
                            adapter_name=adapter_name)
    params = []
    for n, p in transformer.named_parameters():
        if is_adapter_param(n, adapter_name):
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    return params


# ------------------------------------------------------------------------------------------------ de-distillation
def with_guidance_embedding(model):
    """A copy of a model without guidance embedding that has one, initialised to add nothing (output unchanged).
    Any family: FLUX.1's ``time_text_embed.guidance_embedder``, FLUX.2's ``time_guidance_embed.guidance_embedder``
    (no biases), both added to the timestep embedding, so a zero last layer adds nothing."""
    fam = families.of_model(model)
    spec = fam.spec_from_config(dict(model.config)).with_guidance()
    grown = families.build_transformer(spec.with_(axes_dim=tuple(model.config.axes_dims_rope)),
                                       dtype=next(model.parameters()).dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("guidance_embedder" not in k for k in missing):
        raise ValueError(f"cannot add a guidance embedding: missing {missing[:3]}, unexpected {unexpected[:3]}")
    last = next(m for n, m in grown.named_modules() if n.endswith("guidance_embedder.linear_2"))
    torch.nn.init.zeros_(last.weight)  # guidance adds zero to the conditioning vector until it learns otherwise
    if last.bias is not None:
        torch.nn.init.zeros_(last.bias)
    return grown


def load_student(path: str, device, compute: torch.dtype, *, grow_guidance: bool = False,
                 gradient_checkpointing: bool = True, adapter_rank: int = 0, fp8_storage: bool = False,
                 fsdp: "fsdpmod.FsdpSettings | None" = None, allow_pickle: bool = False, blocks_to_swap: int = 0):
    """The start weights in fp32, every weight trainable, on ``device``; sharded per block under FSDP.

    ``grow_guidance`` adds a guidance embedding to a file without one. ``adapter_rank`` > 0: a frozen base with a
    trainable LoRA instead, ``blocks_to_swap`` of its blocks kept in host RAM (``BlockSwap``, kept as
    ``student.block_swap``; pass ``device_placement=False`` for it to ``accelerator.prepare``). Under FSDP with
    ``ram_efficient_loading`` the model is built on the meta device and sharded first; each rank then reads only its
    rows of each tensor (one full tensor in memory at a time).
    """
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    if blocks_to_swap:
        swap_positions(ckpt.spec().num_double, ckpt.spec().num_single, blocks_to_swap)  # the valid range, early
    grow = grow_guidance and not ckpt.spec().guidance_embeds
    if not grow and not ckpt.spec().guidance_embeds:
        log.warning("%s has no guidance embedding: it is already de-distilled or pro-like", path)
    if fsdp and fsdp.ram_efficient_loading and not grow:
        student = families.build_transformer(ckpt.spec(), device="meta")
    else:
        student, _ = load_transformer(path, dtype=torch.float32, allow_pickle=allow_pickle)
        student = with_guidance_embedding(student) if grow else student
    if gradient_checkpointing or (fsdp and fsdp.activation_checkpointing):
        student.enable_gradient_checkpointing()
    if adapter_rank:
        student = with_adapter_lora(student, adapter_rank, compute, fp8_storage)
        if not blocks_to_swap:
            return student.to(device)
        student.block_swap = place_base(student, device, blocks_to_swap=blocks_to_swap,
                                        gradient_checkpointing=gradient_checkpointing)
        return student
    if not fsdp:
        return student.to(device).requires_grad_(True).train()
    student = fsdpmod.shard_transformer(student, device, fsdp, compute)  # DTensor shards (host RAM with offload)
    if student.x_embedder.weight.is_meta:
        student.to_empty(device="cpu" if fsdp.offload else device)
        plan = ckpt.plan("diffusers")
        fsdpmod.fill_shards(student, lambda name: keymod.assemble(
            plan[name], lambda k: ckpt.get_dequantized(k, torch.float32)))
    return student.requires_grad_(True).train()


def with_adapter_lora(model, rank: int, compute: torch.dtype, fp8: bool):
    """Adapter de-distillation: the start model frozen (in ``compute``, or fp8 storage) with a trainable fp32 LoRA
    of ``rank`` on every Linear -- what `lora extract` would cover -- initialised to add nothing (B = 0)."""
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


def load_teacher(objective: str, path: str, dtype, device, allow_pickle: bool = False):
    """The frozen teacher (a replica on every rank) of a teacher objective; None for ``flow``."""
    if objective == "flow":
        return None
    teacher, ckpt = load_transformer(path, dtype=dtype, allow_pickle=allow_pickle)
    if objective == "cfg_teacher" and not ckpt.spec().guidance_embeds:
        raise UserError(f"the cfg_teacher objective needs a guidance-distilled teacher (dev); {path} has no "
                        f"guidance embedding")
    return teacher.to(device).eval()

