"""LoRA or base model? Told from a safetensors header alone (``flux.header.read_header``: no tensor is read, torch is
imported only to name a LoRA's layout), so a command can refuse a swapped input before it loads anything."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..flux.header import read_header
from ..flux.kinds import has_lora_keys, has_model_keys


def _keys_and_meta(path: Path) -> tuple[list[str], dict]:
    header = read_header(path)
    meta = header.get("__metadata__")
    return [k for k in header if k != "__metadata__"], meta if isinstance(meta, dict) else {}


def is_base_model(path: str | Path) -> bool:
    """Whether safetensors file ``path`` holds a Flux transformer (its input embedder's weight), not a LoRA."""
    return has_model_keys(_keys_and_meta(Path(path))[0])


def lora_layout(path: str | Path) -> str | None:
    """The LoRA layout of safetensors file ``path`` (``kohya``, ``comfy``, ``diffusers``, ``xlabs``, or ``LoRA``
    when lora.formats names none), None when it is not a LoRA; CheckpointError for a damaged header."""
    keys, meta = _keys_and_meta(Path(path))
    if has_model_keys(keys):
        return None
    marked = str(meta.get("modelspec.architecture", "")).endswith("/lora") or "ss_network_module" in meta
    if not (marked or has_lora_keys(keys)):
        return None
    from .formats import detect_layout  # lazy: imports torch

    try:
        return detect_layout(keys)
    except UserError:  # LyCORIS, text-encoder only, a layout it does not read: still a LoRA
        return "LoRA"
