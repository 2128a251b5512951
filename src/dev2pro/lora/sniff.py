"""LoRA or base model? Told from a safetensors header alone (``flux.header.read_header``: no tensor is read, torch is
imported only to name a LoRA's layout), so a command can refuse a swapped input before it loads anything."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..flux.header import read_header

# a base model's probe keys (flux.keys.strip_prefix: BFL/ComfyUI and diffusers layouts), with any prefix
_MODEL_KEY = re.compile(r"(^|\.)(img_in|x_embedder)\.weight$")
# LoRA keys in any layout lora.formats reads: kohya lora_unet_*/lora_te*, lora_down/up, PEFT lora_A/B, XLabs
# *_lora*, and LyCORIS/DoRA (lora.formats.detect_layout's own signs)
_LORA_KEY = re.compile(r"lora|dora_scale|lokr_|hada_|\.oft_", re.IGNORECASE)


def _keys_and_meta(path: Path) -> tuple[list[str], dict]:
    header = read_header(path)
    meta = header.get("__metadata__")
    return [k for k in header if k != "__metadata__"], meta if isinstance(meta, dict) else {}


def is_base_model(path: str | Path) -> bool:
    """Whether safetensors file ``path`` holds a Flux transformer (its input embedder's weight), not a LoRA."""
    return any(_MODEL_KEY.search(k) for k in _keys_and_meta(Path(path))[0])


def lora_layout(path: str | Path) -> str | None:
    """The LoRA layout of safetensors file ``path`` (``kohya``, ``comfy``, ``diffusers``, ``xlabs``, or ``LoRA``
    when lora.formats names none), None when it is not a LoRA; CheckpointError for a damaged header."""
    keys, meta = _keys_and_meta(Path(path))
    if any(_MODEL_KEY.search(k) for k in keys):
        return None  # a base model (a LoRA names these layers with .lora_A/.lora_down in the key)
    marked = str(meta.get("modelspec.architecture", "")).endswith("/lora") or "ss_network_module" in meta
    if not (marked or any(_LORA_KEY.search(k) for k in keys)):
        return None
    from .formats import detect_layout  # lazy: imports torch

    try:
        return detect_layout(keys)
    except UserError:  # LyCORIS, text-encoder only, a layout it does not read: still a LoRA
        return "LoRA"
