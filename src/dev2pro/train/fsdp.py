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

Sharded state: FSDP2 splits a tensor of N rows over W ranks into chunks of ``ceil(N/W)`` rows (``Shard(0)``).
Each rank writes its rows of every tensor (weights, AdamW moments, EMA) with their first row into its own
safetensors file; tensors that are not sharded (DDP, one process) are written once, by rank 0; the rest (LR
schedule, RNG, data position) goes to ``common.safetensors`` + ``common.json``. Loading copies into each live tensor
the rows it holds *now*, from whichever files have them: a state saved by 2 FSDP ranks resumes on 1 process, under
DDP or on 8 ranks. No pickle anywhere (torch.distributed.checkpoint pickles its metadata), as in ``train.state``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import UserError
from ..outputs import save_safetensors
from .state import flatten_state, list_states, unflatten_state

BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
STATE_FORMAT = "dev2pro-sharded-state-1"


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
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

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
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard_transformer(model: torch.nn.Module, device, settings: FsdpSettings, compute_dtype: torch.dtype):
    """``fully_shard`` each Flux block, then the root; parameters become DTensor shards on ``device``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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
        local, first, _ = _piece(p)
        local.copy_(read(name)[first:first + local.shape[0]])


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a shard; a no-op for a plain tensor)."""
    if not is_sharded(t):
        return t
    mesh = t.device_mesh
    if t.device.type != mesh.device_type:  # CPU-offloaded shard on a GPU mesh: gather on the mesh's device
        from torch.distributed.tensor import DTensor

        t = DTensor.from_local(t.to_local().to(mesh.device_type), mesh, t.placements, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()


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


# ------------------------------------------------------------------------------------------------ sharded state
def _piece(t: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(this rank's rows, the index of its first row in the full tensor, whether ``t`` is sharded)."""
    if not is_sharded(t):
        return t, 0, False
    mesh = t.device_mesh
    if mesh.ndim != 1 or not t.placements[0].is_shard(0):
        raise NotImplementedError(f"only 1-D meshes sharded on dim 0 (FSDP2's default) are handled, got "
                                  f"{t.placements} on {mesh}")
    local = t.to_local()
    rows, chunk = t.shape[0], math.ceil(t.shape[0] / mesh.size())
    first = min(mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != max(0, min(chunk, rows - first)):
        raise RuntimeError(f"unexpected shard of {tuple(t.shape)}: {tuple(local.shape)} rows from {first}")
    return local, first, True


def save_sharded_state(root: Path, step: int, tensors: dict[str, torch.Tensor], common: dict, rank: int,
                       world: int, barrier: Callable[[], None], keep_last: int = 2, full: bool = False) -> Path:
    """Write ``root/step-XXXXXX`` (every rank calls this): rank files of ``tensors`` + ``common`` from rank 0.

    The folder appears under its final name only when complete (rank 0 renames it once all ranks have written);
    ``full`` gathers sharded tensors so rank 0 writes them whole. Needs a filesystem all ranks share.
    """
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    pieces, index = {}, {}
    for name, t in tensors.items():
        if full:
            t = full_tensor(t)
        local, first, sharded = _piece(t.detach())
        if (sharded or rank == 0) and local.numel():
            pieces[name] = local.cpu().contiguous()
            index[name] = [first, list(t.shape)]
    save_safetensors(pieces, tmp / f"rank-{rank:05d}-of-{world:05d}.safetensors",
                     {"format": STATE_FORMAT, "pieces": json.dumps(index)}, overwrite=True)
    barrier()
    if rank == 0:
        flat, skeleton = flatten_state(common)
        save_safetensors(flat, tmp / "common.safetensors", overwrite=True)
        (tmp / "common.json").write_text(json.dumps({"format": STATE_FORMAT, "step": step, "world_size": world,
                                                     "state": skeleton}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_states(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_common(folder: Path) -> dict:
    """The non-tensor part of a sharded state (plus its small tensors, e.g. RNG states)."""
    meta_path = folder / "common.json"
    if not meta_path.is_file() or not (folder / "common.safetensors").is_file():
        raise UserError(f"{folder} is not a complete training state (common.json/common.safetensors missing); "
                        f"resume from another step")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{folder}: unknown training-state format {meta.get('format')!r}")
    return unflatten_state(meta["state"], load_file(str(folder / "common.safetensors")))


@torch.no_grad()
def load_sharded_tensors(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Copy into each target (a plain tensor or this rank's shard of a DTensor) its rows, from any rank file."""
    files = sorted(folder.glob("rank-*.safetensors"))
    with ExitStack() as stack:
        where: dict[str, list] = {}
        for f in files:
            h = stack.enter_context(safe_open(str(f), "pt"))
            for name, (first, shape) in json.loads((h.metadata() or {})["pieces"]).items():
                where.setdefault(name, []).append((h, first, shape))
        for name, target in targets.items():
            if name not in where:
                raise UserError(f"{folder}: the saved state has no {name}; it belongs to another model or setup")
            local, first, _ = _piece(target)
            if list(target.shape) != where[name][0][2]:
                raise UserError(f"{folder}: {name} was saved with shape {where[name][0][2]}, the model has "
                                f"{list(target.shape)}")
            if local.ndim == 0:
                local.copy_(where[name][0][0].get_tensor(name))
                continue
            lo, hi, covered = first, first + local.shape[0], 0
            for h, start, _ in where[name]:
                part = h.get_slice(name)
                a, b = max(lo, start), min(hi, start + part.get_shape()[0])
                if a < b:
                    local[a - lo:b - lo].copy_(part[a - start:b - start])
                    covered += b - a
            if covered != hi - lo:
                raise UserError(f"{folder}: rows {lo}..{hi} of {name} are not all saved (a rank file is missing)")
