"""Training-state checkpoints for resume: everything that makes step k+1 identical to an uninterrupted run.

A state folder ``state/step-000123/`` holds the trainable weights, the optimizer and LR-schedule state, every
random-generator state the loop draws from, the step and the data order position. Tensors go to safetensors and
the rest to JSON -- no pickle, so resuming from a folder someone sent you cannot run code. Each folder is written
atomically (temp dir + rename); the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..outputs import atomic_path, save_safetensors

STEP_RE = re.compile(r"^step-(\d+)$")


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


def save_state(root: Path, step: int, parts: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``root/step-XXXXXX`` with one safetensors + JSON pair per named part; prune older folders."""
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"step-{step:06d}"
    with atomic_path(dst, overwrite=True, what="training state") as tmp:
        tmp.mkdir()
        for name, obj in parts.items():
            tensors, skeleton = flatten_state(obj)
            save_safetensors(tensors, tmp / f"{name}.safetensors", overwrite=True)
            (tmp / f"{name}.json").write_text(json.dumps(skeleton))
    for old in list_states(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def load_state(folder: Path) -> dict[str, Any]:
    parts = {}
    for js in sorted(folder.glob("*.json")):
        st = js.with_suffix(".safetensors")
        if not st.exists():
            raise UserError(f"training state {folder} is incomplete ({st.name} missing); resume from another step")
        parts[js.stem] = unflatten_state(json.loads(js.read_text()), load_file(str(st)))
    return parts


def list_states(root: Path) -> list[Path]:
    """State folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_state(root: Path) -> Path | None:
    states = list_states(root)
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
