"""Training states for resume: everything that makes step k+1 identical to an uninterrupted run, in ONE format that
`train` and `dedistill` share and that loads on any number of processes.

A state folder ``state/step-000123/`` holds the trained weights (all of them in a full fine-tune, the LoRA's in
LoRA training), the optimizer's per-weight tensors (AdamW moments) and the EMA as *row pieces*, plus
``common.safetensors`` + ``common.json``: the optimizer's scalars and hyper-parameters, the LR schedule, every random
generator, the step, the data position and the loss history. No pickle anywhere (torch.distributed.checkpoint
pickles its metadata), so resuming from a folder someone sent you cannot run code.

Pieces: FSDP2 splits a tensor of N rows over W ranks into chunks of ``ceil(N/W)`` rows (``Shard(0)``). Each rank
writes its rows of every tensor with their first row into its own ``rank-R-of-W.safetensors``; tensors that are
not sharded (DDP, one process) are written once, by rank 0. Loading copies into each live tensor the rows it holds
*now*, from whichever files have them: a state saved by 2 FSDP ranks resumes on 1 process, under DDP or on 8 ranks.
The folder appears under its final name only when complete; the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from ..errors import UserError
from ..outputs import save_safetensors
from .datacheck import DataCheck, resume_sampler
from .folder import STATE_DIR, STEP_RE
from .statefit import (ADAPTER_PIECE, adapter_facts, check_same_lora, check_state_fits,  # noqa: F401 (API)
                       configured_rank, run_facts)

STATE_FORMAT = "dev2pro-sharded-state-1"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state dict into (tensors by path, JSON skeleton with ``{"__tensor__": path}`` leaves)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            return {"__dict__": [[_key(k), walk(v, f"{path}/{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"__list__" if isinstance(o, list) else "__tuple__": [walk(v, f"{path}/{i}") for i, v in
                                                                           enumerate(o)]}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {path} in a training state")

    return tensors, walk(obj, prefix)


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {(k["int"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                    for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def list_states(root: Path) -> list[Path]:
    """State folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def usable_state(folder: Path) -> bool:
    """A state a resume can read: the folder a save completes (``common.json`` + ``common.safetensors``)."""
    return (folder / "common.json").is_file() and (folder / "common.safetensors").is_file()


def latest_state(root: Path) -> Path | None:
    """The newest usable state under ``root`` (an incomplete one -- a save that failed -- is skipped)."""
    states = [s for s in list_states(root) if usable_state(s)]
    return states[-1] if states else None


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Global torch RNG (CPU and CUDA) plus named generators, for exact resume."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    out.update({f"gen_{k}": g.get_state() for k, g in generators.items()})
    return out


def set_rng_state(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for k, g in generators.items():
        g.set_state(state[f"gen_{k}"])


# ------------------------------------------------------------------------------------------------ pieces
def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a shard; a no-op for a plain tensor)."""
    if not is_sharded(t):
        return t
    mesh = t.device_mesh
    if t.device.type != mesh.device_type:  # CPU-offloaded shard on a GPU mesh: gather on the mesh's device
        t = DTensor.from_local(t.to_local().to(mesh.device_type), mesh, t.placements, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()




def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
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
        local, first, sharded = local_rows(t.detach())
        if (sharded or rank == 0) and local.numel():
            pieces[name] = local.cpu().contiguous()
            index[name] = [first, list(t.shape)]
    save_safetensors(pieces, tmp / f"rank-{rank:05d}-of-{world:05d}.safetensors",
                     {"format": STATE_FORMAT, "pieces": json.dumps(index)}, overwrite=True, what="training state")
    barrier()
    if rank == 0:
        flat, skeleton = flatten_state(common)
        save_safetensors(flat, tmp / "common.safetensors", overwrite=True, what="training state")
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
    if (folder / "progress.json").is_file() and not meta_path.is_file():
        raise UserError(f"{folder} is a training state of an older dev2pro (before train and dedistill shared one "
                        "state format); finish that run with the version that started it, or start it again")
    if not meta_path.is_file() or not (folder / "common.safetensors").is_file():
        raise UserError(f"{folder} is not a complete training state (common.json/common.safetensors missing); "
                        f"resume from another step")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{folder}: unknown training-state format {meta.get('format')!r}")
    return unflatten_state(meta["state"], load_file(str(folder / "common.safetensors")))


def saved_shapes(folder: Path) -> dict[str, list[int]]:
    """Every saved piece's name -> its whole shape, from the rank files' headers (no tensor is read)."""
    shapes = {}
    for f in sorted(folder.glob("rank-*.safetensors")):
        with safe_open(str(f), "pt") as h:
            shapes.update({n: shape for n, (_, shape) in json.loads((h.metadata() or {})["pieces"]).items()})
    return shapes


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
            local, first, _ = local_rows(target)
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


# ------------------------------------------------------------------------------------------------ training states
def _noop() -> None:
    return None


def save_training_state(state_dir: Path, step: int, model, optimizer, scheduler, gen: torch.Generator, sampler, *,
                        smoothed: float | None, grad_accum: int, keep_last: int, losses: list | None = None, ema=None,
                        validation: dict | None = None, rank: int = 0, world: int = 1,
                        barrier: Callable[[], None] = _noop, full: bool = False, recipe: str = "train",
                        data: list[str] | None = None) -> Path:
    """The resumable state after ``step`` (every rank calls this): the trainable weights, the optimizer's per-weight
    tensors and the EMA as pieces, the rest common; ``losses`` (steps 1..step, None = skipped) feeds ``loss.png``;
    ``validation``: the validation history (step -> numbers) a resumed run keeps reporting; ``recipe`` (``train`` |
    ``dedistill``): recorded with the model's facts (``statefit.run_facts``) for a resume to compare; ``data``: the
    dataset's fingerprint (``datacheck``), which a resume compares with its dataset."""

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {p: n for n, p in trained.items()}
    tensors = {f"model/{n}": p for n, p in trained.items()}
    scalars, moments = {}, {}
    for p, st in optimizer.state.items():
        scalars.setdefault(names[p], {})
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape == p.shape:  # AdamW moments: shaped (and sharded) like p
                tensors[f"optim/{k}/{names[p]}"] = v
                moments[k] = str(v.dtype).removeprefix("torch.")
            else:
                scalars[names[p]][k] = v
    if ema is not None:
        tensors.update({f"ema/{names[p]}": s for p, s in zip(ema.params, ema.shadow)})
    common = {"optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in optimizer.param_groups],
                            "scalars": scalars, "moments": moments},
              "scheduler": scheduler.state_dict(), "rng": rng_state({"train": gen}),
              "ema": {"decay": ema.decay, "updates": ema.updates} if ema is not None else {},
              "progress": {"step": step, "smoothed": smoothed,
                           "sampler": sampler.state_dict(batches_done=step * grad_accum),
                           "losses": list(losses or []), "validation": dict(validation or {}),
                           **({"data": list(data)} if data is not None else {})},
              "run": run_facts(model, trained, recipe)}
    return save_sharded_state(state_dir, step, tensors, common, rank, world, barrier, keep_last, full)


@dataclass
class Resumed:
    step: int
    smoothed: float | None
    folder: Path
    losses: list  # per step 1..step (None = skipped or not recorded)
    validation: dict = field(default_factory=dict)  # step -> validation numbers (train.validation)
    chosen: str = ""  # how ``folder`` was picked when --resume named a run folder (``state_folder``)
    note: str = ""  # the dataset changed and the run continues on it (``datacheck.resume_sampler``)

    def line(self) -> str:
        """The console line of a resumed run."""
        return f"resumed from step {self.step} ({self.folder}{self.chosen}){self.note}"


def state_folder(resume: str, state_dir: Path) -> tuple[Path, str]:
    """The state ``--resume`` names and how it was picked (for ``Resumed.line``): ``latest`` (the newest usable
    state in ``state_dir``), a state folder ``.../state/step-NNNNNN``, or a run folder (or its ``state/``): its
    newest usable state. A path that does not exist, or a folder that is neither, is one line saying so."""
    if resume == "latest":
        folder = latest_state(state_dir)
        if folder is None:
            raise UserError(f"nothing to resume: no usable training state in {state_dir}; run the same command "
                            f"without --resume to start again")
        return folder, ""
    path = Path(resume)
    if not path.exists():
        raise UserError(_missing_state(resume, path))
    if not path.is_dir():
        raise UserError(f"--resume {resume}: not a state folder (expected a run folder or one of its states, "
                        f"RUN/state/step-NNNNNN)")
    if STEP_RE.match(path.name) or any((path / n).exists() for n in ("common.json", "progress.json")):
        return path, ""  # a state folder: ``read_common`` says when it is incomplete
    states = path if path.name == STATE_DIR or list_states(path) else path / STATE_DIR
    if not states.is_dir():
        raise UserError(f"--resume {resume}: neither a training state (RUN/state/step-NNNNNN) nor a run folder (it "
                        f"has no {STATE_DIR}/ folder); pass the folder of the run to continue, or one of its states")
    newest = latest_state(states)
    if newest is None:
        raise UserError(f"--resume {resume}: {states} holds no complete training state (none was saved, or its "
                        f"saves were cut short); start the run again without --resume")
    return newest, f", the newest complete state in {path}"


def _missing_state(resume: str, path: Path) -> str:
    """A ``--resume`` path that does not exist: a step folder ``save.keep_last`` pruned from a state folder that
    exists (its saved states listed), or a path that is not there at all."""
    parent = path.parent
    if STEP_RE.match(path.name) and parent.is_dir() and (parent.name == STATE_DIR or list_states(parent)):
        states = [str(s) for s in reversed(list_states(parent)) if usable_state(s)]
        listing = ", ".join(states[:3]) + (f" (and {len(states) - 3} older)" if len(states) > 3 else "")
        return f"--resume {resume}: no such state (save.keep_last keeps only the newest ones); " + (
            f"the saved states of this run, newest first: {listing}; pass one of them, or --resume latest for the "
            f"newest" if states else f"{parent} holds no usable state: run the same command without --resume "
            f"to start again")
    return (f"--resume {resume}: does not exist; pass a run folder (its newest state is resumed), one of its states "
            f"(RUN/state/step-NNNNNN), or --resume alone for the newest state in save.output_dir")


def restore_training_state(resume: str, state_dir: Path, model, optimizer, scheduler, gen: torch.Generator, sampler,
                           ema=None, rank_setting: str = "lora.rank", recipe: str = "train",
                           data: DataCheck | None = None) -> Resumed:
    """Load a state saved by ``save_training_state`` (by any number of processes) into the live objects.
    ``rank_setting``: the config key of a LoRA's rank, for the message when it differs from the saved run's;
    ``recipe``: the command resuming (a state of another kind of run is refused first, saying what it is);
    ``data``: the dataset now (a changed one is refused before anything is loaded, or continued on when allowed)."""

    folder, chosen = state_folder(resume, state_dir)
    common = read_common(folder)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # what save_training_state wrote
    targets = {f"model/{n}": p for n, p in params.items()}
    shapes = saved_shapes(folder)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    check_state_fits(folder, common.get("run"), shapes, run_facts(model, params, recipe), names)
    check_same_lora(folder, shapes, targets, rank_setting, configured_rank(model, params))
    step = int(common["progress"]["step"])
    note = resume_sampler(folder, common["progress"], sampler, data, step)  # the dataset: before any tensor loads
    saved = common["optimizer"]
    moments = saved["moments"]
    for n, p in params.items():  # optimizer state created here (shaped and sharded like p), filled below
        if n in saved["scalars"]:
            dtypes = moments if isinstance(moments, dict) else dict.fromkeys(moments)  # older states: a list
            optimizer.state[p] = {**saved["scalars"][n], **{
                k: torch.zeros_like(p, dtype=getattr(torch, d) if d else None) for k, d in dtypes.items()}}
            targets.update({f"optim/{k}/{n}": optimizer.state[p][k] for k in dtypes})
    for group, values in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(values)
    if ema is not None:
        if not common["ema"]:
            raise UserError(f"{folder} was saved without EMA; set train.ema_decay = 0 to resume it")
        ema.decay, ema.updates = float(common["ema"]["decay"]), int(common["ema"]["updates"])
        names = {p: n for n, p in params.items()}
        targets.update({f"ema/{names[p]}": s for p, s in zip(ema.params, ema.shadow)})
    load_sharded_tensors(folder, targets)
    scheduler.load_state_dict(common["scheduler"])
    set_rng_state(common["rng"], {"train": gen})
    losses = list(common["progress"].get("losses", []))[:step]
    return Resumed(step, common["progress"].get("smoothed"), folder, [None] * (step - len(losses)) + losses,
                   common["progress"].get("validation") or {}, chosen, note)
