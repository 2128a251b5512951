"""FSDP2 for full fine-tunes, and a sharded training state that any number of processes can resume.

Why this module shards the model itself instead of asking accelerate to: accelerate (1.15) turns an FSDP request
into ``DistributedType.FSDP`` only for GPU-like distributed types (``AcceleratorState.__init__``: the branch for
MULTI_GPU/NPU/XPU/...). On CPU the type stays MULTI_CPU, the FSDP plugin is dropped without a word and
``accelerator.prepare`` wraps the model in DDP -- so accelerate's FSDP path can neither run nor be tested on a CPU
(gloo) machine. torch's own FSDP2 (``fully_shard``) runs on gloo and nccl alike, so the recipe calls it here: one
code path, tested with 2 CPU processes, used unchanged on GPUs. accelerate still starts the processes, picks the
device and reads our config files: `accelerate launch` exports a file's ``fsdp_config`` as ``FSDP_*`` environment
variables, which ``settings_from_accelerate`` reads through accelerate's own ``FullyShardedDataParallelPlugin``.

Wrapping: every ``transformer_blocks[i]`` and ``single_transformer_blocks[i]`` is one FSDP unit (its parameters
are all-gathered just before its forward and its backward and freed after), the root holds the embedders and the
final layer. Mixed precision: fp32 master shards, all-gathers and compute in ``param_dtype`` (bf16), gradients
reduced in fp32; inputs are not cast -- the forward runs under autocast exactly as without FSDP, so RoPE and the
timestep embedding stay fp32. Activation checkpointing is diffusers' per-block checkpointing, which composes with
FSDP2: a block's unshard hook fires again when backward recomputes it.

The sharded training state these shards save and load is ``train.state``'s one format.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ..errors import UserError
from .state import full_tensor, is_sharded, local_rows

log = logging.getLogger(__name__)
BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool = True  # free a gathered block after its forward (gather again for backward)
    offload: bool = False  # parameters, gradients and optimizer state in host RAM (one 80 GB GPU, full FLUX.1)
    activation_checkpointing: bool = False  # recompute each block in backward
    full_state: bool = False  # FULL_STATE_DICT: rank 0 writes whole tensors (else each rank its shard)
    ram_efficient_loading: bool = True  # build on the meta device, each rank reads only its rows of the start weights


def settings_from_accelerate() -> FsdpSettings | None:
    """FSDP settings of `accelerate launch --config_file X.yaml` where X has ``distributed_type: FSDP``; else None.

    Read on CPU too, where accelerate itself ignores them (see the module docstring).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    plugin = FullyShardedDataParallelPlugin()  # parses the FSDP_* variables the launcher exported
    if plugin.fsdp_version != 2:
        raise UserError("fsdp_config.fsdp_version: dev2pro shards with FSDP2 (fully_shard); set fsdp_version: 2")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    wrap = set(plugin.transformer_cls_names_to_wrap or BLOCK_CLASSES)
    if policy != "TRANSFORMER_BASED_WRAP" or wrap != set(BLOCK_CLASSES):
        raise UserError(f"fsdp_config: dev2pro wraps each Flux block (fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
                        f"fsdp_transformer_layer_cls_to_wrap: {','.join(BLOCK_CLASSES)}); got {policy} / "
                        f"{','.join(sorted(wrap))}")
    return FsdpSettings(reshard_after_forward=bool(plugin.reshard_after_forward),
                        offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
                        activation_checkpointing=bool(plugin.activation_checkpointing),
                        full_state=plugin.state_dict_type.name == "FULL_STATE_DICT",
                        ram_efficient_loading=bool(plugin.cpu_ram_efficient_loading))


# ------------------------------------------------------------------------------------------------ sharding
def ensure_process_group() -> None:
    """FSDP needs a process group even for one process (e.g. one GPU with offload): make a 1-rank gloo group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard_transformer(model: torch.nn.Module, device, settings: FsdpSettings, compute_dtype: torch.dtype):
    """``fully_shard`` each Flux block, then the root; parameters become DTensor shards on ``device``."""
    ensure_process_group()
    # Flux blocks return slices of one tensor (the single blocks split text/image tokens); FSDP2 warns that an
    # in-place op on such a view would skip its hook. diffusers applies none (out-of-place adds only), and the
    # 2-process test compares the trained weights with a one-process run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward,
              offload_policy=CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if settings.offload else
              OffloadPolicy())
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


@torch.no_grad()
def fill_shards(model: torch.nn.Module, read: Callable[[str], torch.Tensor]) -> None:
    """Copy into every parameter (this rank's shard of it) its rows of the full tensor ``read(name)`` returns.

    For a model built on the meta device, sharded, then ``to_empty``: each rank holds one full tensor at a time,
    never the whole model (8 ranks each loading FLUX.1 in fp32 would take 8 x 48 GB of host RAM).
    """
    for name, p in model.named_parameters():
        local, first, _ = local_rows(p)
        local.copy_(read(name)[first:first + local.shape[0]])


def gather_state(model: torch.nn.Module, dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU, ``dtype``), one tensor gathered at a time; ``{}`` on other ranks."""
    out = {}
    for name, t in model.state_dict().items():
        t = full_tensor(t.detach())  # every rank takes part in each all-gather
        if rank == 0:  # a copy: a plain tensor must not alias the live weights (callers swap EMA weights in)
            out[name] = t.to("cpu", dtype, copy=True)
    return out


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip by the global gradient norm (over all shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return float(norm.full_tensor() if is_sharded(norm) else norm)


def settings_for(distributed: str, mixed_precision: str) -> FsdpSettings | None:
    """FSDP settings when the run shards (``train.distributed``, or an accelerate FSDP config); None = DDP or one
    process."""
    launcher = settings_from_accelerate()
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
    return launcher or FsdpSettings()


def warn_if_single_cpu_launch(world: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process (its CPU launcher; N only through mpirun):
    it exports MASTER_ADDR for N > 1 but no WORLD_SIZE. Say so instead of silently training on one process."""
    if world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and "WORLD_SIZE" not in os.environ:
        log.warning("accelerate launch --cpu started a single process: for N CPU processes use torchrun "
                    "--nproc_per_node N, or configs/accelerate/cpu-ddp.yaml / cpu-fsdp.yaml (README: De-distilling "
                    "at scale)")
