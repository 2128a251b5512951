"""What a state dict is, told from its key names alone (torch-free, no tensor read): a Flux base model, a LoRA in
any layout ``lora.formats`` reads, or -- for error messages -- another common checkpoint kind. One place decides,
so ``lora.sniff`` (sample's and the web app's early checks) and ``flux.keys`` (the not-Flux message) agree."""

from __future__ import annotations

import re
from typing import Sequence

from ..choices import LORA_LAYOUTS

# a base model's probe keys (flux.keys.strip_prefix: BFL/ComfyUI and diffusers layouts), with any prefix
MODEL_KEY = re.compile(r"(^|\.)(img_in|x_embedder)\.weight$")
# LoRA keys in any layout lora.formats reads: kohya lora_unet_*/lora_te*, lora_down/up, PEFT lora_A/B, XLabs
# *_lora*, and LyCORIS/DoRA (lora.formats.detect_layout's own signs)
LORA_KEY = re.compile(r"lora|dora_scale|lokr_|hada_|\.oft_", re.IGNORECASE)


def has_model_keys(keys: Sequence[str]) -> bool:
    """Whether the key names hold a Flux transformer's input embedder (a base model, any layout or prefix)."""
    return any(MODEL_KEY.search(k) for k in keys)


def has_lora_keys(keys: Sequence[str]) -> bool:
    """Whether the key names are a LoRA's (a LoRA names a model's layers with .lora_A/.lora_down in the key)."""
    return not has_model_keys(keys) and any(LORA_KEY.search(k) for k in keys)


def guess_family(keys: Sequence[str]) -> str | None:
    """A short human name for common non-Flux checkpoints, for error messages."""
    joined = " ".join(keys[:2000])
    if "joint_blocks." in joined or "transformer_blocks.0.ff_context" in joined and "pos_embed" in joined:
        return "an SD3 MMDiT"
    if "input_blocks." in joined or "down_blocks.0.resnets" in joined:
        return "a Stable Diffusion / SDXL UNet"
    if has_lora_keys(keys[:2000]):
        return (f"a LoRA, not a base model: LoRA files have their own tools -- `dev2pro lora convert IN OUT --layout "
                f"{'|'.join(LORA_LAYOUTS)}` changes its layout, `dev2pro lora info IN` describes it, `dev2pro lora "
                f"merge --base MODEL --lora IN OUT` bakes it into a base model")
    if "encoder.down." in joined or "decoder.up." in joined:
        return "a VAE"
    if "encoder.block." in joined or "text_model.encoder" in joined:
        return "a text encoder"
    return None
