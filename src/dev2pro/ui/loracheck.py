"""Is the Models page's convert source a LoRA? `dev2pro convert` converts base models (Flux transformers); given a
LoRA it fails only inside the queued job ("not a Flux transformer checkpoint ... a LoRA"). The page refuses it
before a job is queued, from the safetensors headers alone (``lora.sniff``), and names the command that converts
a LoRA's layout.
"""

from __future__ import annotations

from pathlib import Path

from ..choices import LORA_LAYOUTS
from ..errors import UserError
from ..lora.sniff import lora_layout

MAX_FILES = 8  # a folder's .safetensors files looked at (a LoRA folder holds one or two)


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
