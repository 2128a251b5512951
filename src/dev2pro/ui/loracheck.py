"""Is the Models page's convert source a LoRA? `dev2pro convert` converts base models (Flux transformers); given a
LoRA it fails only inside the queued job ("not a Flux transformer checkpoint ... a LoRA"). The page refuses it
before a job is queued, from the safetensors headers alone (``flux.header.read_header``: no tensor is read, no
torch needed), and names the command that converts a LoRA's layout.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..choices import LORA_LAYOUTS
from ..errors import UserError
from ..flux.header import read_header

# a base model's probe keys (flux.keys.strip_prefix: BFL/ComfyUI and diffusers layouts), with any prefix
_MODEL_KEY = re.compile(r"(^|\.)(img_in|x_embedder)\.weight$")
# LoRA keys in any layout lora.formats reads: kohya lora_unet_*/lora_te*, lora_down/up, PEFT lora_A/B, XLabs
# *_lora*, and LyCORIS/DoRA (lora.formats.detect_layout's own signs)
_LORA_KEY = re.compile(r"lora|dora_scale|lokr_|hada_|\.oft_", re.IGNORECASE)
MAX_FILES = 8  # a folder's .safetensors files looked at (a LoRA folder holds one or two)


def lora_layout(path: Path) -> str | None:
    """The LoRA layout of safetensors file ``path`` (``kohya``, ``comfy``, ``diffusers``, ``xlabs``, or ``LoRA``
    when lora.formats names none), None when it is not a LoRA; CheckpointError for a damaged header."""
    header = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    if any(_MODEL_KEY.search(k) for k in keys):
        return None  # a base model (a LoRA names these layers with .lora_A/.lora_down in the key)
    marked = str(meta.get("modelspec.architecture", "")).endswith("/lora") or "ss_network_module" in meta
    if not (marked or any(_LORA_KEY.search(k) for k in keys)):
        return None
    from ..lora.formats import detect_layout  # lazy: imports torch (loaded at start-up by planview)

    try:
        return detect_layout(keys)
    except UserError:  # LyCORIS, text-encoder only, a layout it does not read: still a LoRA
        return "LoRA"


def lora_files(src: Path) -> list[Path]:
    """The safetensors files of ``src`` to look at: the file itself, or a folder's own weights unless it is a
    model folder (``model_index.json``) or a diffusers transformer folder (``diffusion_pytorch_model*``)."""
    if src.is_file():
        return [src] if src.suffix.lower() == ".safetensors" else []
    if (src / "model_index.json").exists() or any(src.glob("diffusion_pytorch_model*.safetensors*")):
        return []
    return sorted(src.glob("*.safetensors"))[:MAX_FILES]


def refuse_lora_source(src: Path, rel) -> None:
    """UserError naming the LoRA command when convert source ``src`` is (or holds) a LoRA file; ``rel(path)``:
    the workspace-relative name shown."""
    for f in lora_files(src):
        layout = lora_layout(f)
        if layout is None:
            continue
        what = "a LoRA" + (f" ({layout} layout)" if layout != "LoRA" else "")
        raise UserError(f"'src': {rel(f)} is {what}, not a base model. Convert converts base models (a FLUX "
                        f"transformer file or model folder) to another dtype or layout; to convert a LoRA's "
                        f"layout, run in a terminal: dev2pro lora convert {rel(f)} OUT.safetensors --layout "
                        f"{'|'.join(LORA_LAYOUTS)}")
