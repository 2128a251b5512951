"""What a training run leaves for users: LoRA files in the layouts they load (kohya/ComfyUI, diffusers), and a
de-distilled model exported through ``flux.convert.convert`` (BFL file, diffusers folder, fp8) or as a training
adapter. A full disk at the export keeps the last training state and says how to finish with ``--resume``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from .. import families
from ..errors import UserError
from ..flux.checkpoint import DTYPE_CHOICES
from ..flux.convert import convert
from ..lora.dora import is_peft_dora
from ..lora.flux2 import kohya_fields
from ..lora.formats import save_lora
from ..lora.ops import lora_from_peft_model
from ..lora.peft_adapters import rebased
from ..outputs import clean_stale_temps, save_safetensors, temp_path, write_error_message, write_errors
from .fsdp import gather_state
from .state import latest_state

LORA_SUFFIXES = {"kohya": "", "diffusers": ".diffusers", "comfy": ".comfy"}


def lora_paths(out: Path, name: str, layouts: Sequence[str], suffix: str = "") -> list[Path]:
    """The LoRA files a save writes: ``NAME[SUFFIX][.layout].safetensors`` (kohya has no layout tag)."""
    return [out / f"{name}{suffix}{LORA_SUFFIXES[layout]}.safetensors" for layout in layouts]


def save_lora_files(model, out: Path, name: str, layouts: Sequence[str], metadata: dict, suffix: str = "",
                    adapter_name: str = "default") -> list[Path]:
    """The peft adapter ``adapter_name`` of ``model`` as LoRA files, one per layout, with ``metadata``; a FLUX.2
    model's in FLUX.2's layouts of the same names (``lora.flux2``: musubi ``lora_unet_*``, the BFL-key layout
    ComfyUI reads, diffusers/PEFT) and with musubi's FLUX.2 ``ss_*`` / modelspec fields."""
    lw = lora_from_peft_model(model, adapter_name)  # .family: the model's
    inner = getattr(model, "module", model)
    if lw.family == "flux2":
        fam = families.get("flux2")
        fields = kohya_fields(fam.spec_from_config(dict(inner.config)))
        if getattr(lw, "adapter", "lora") != "lora":  # LyCORIS's network module names the adapter type
            fields.pop("ss_network_module")
        metadata = {**metadata, **fields}
    # peft's DoRA goes into the ComfyUI layouts converted on the training base's own weights (lora.dora)
    comfy = rebased(lw, inner) if is_peft_dora(lw) and set(layouts) - {"diffusers"} else lw
    paths = lora_paths(out, name, layouts, suffix)
    return [save_lora(lw if layout == "diffusers" else comfy, path, layout, metadata, overwrite=True)
            for layout, path in zip(layouts, paths)]


def export_adapter(model, ema, out: Path, name: str, metadata: dict) -> list[Path]:
    """The de-distilled LoRA (EMA weights when kept) as adapter files: kohya (ComfyUI, `lora merge`) and diffusers."""
    with ema.applied() if ema is not None else contextlib.nullcontext():
        lw = lora_from_peft_model(model, "default")
    meta = {**{k: str(v) for k, v in metadata.items()}, "dev2pro.kind": "training_adapter"}
    return [save_lora(lw, out / f"{name}-adapter.safetensors", "kohya", metadata=meta, overwrite=True),
            save_lora(lw, out / f"{name}-adapter.diffusers.safetensors", "diffusers", metadata=meta, overwrite=True)]


def final_weights(model, ema, dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    """The weights to export (the EMA when kept), gathered to rank 0 in ``dtype``; ``{}`` on the other ranks."""
    with ema.applied() if ema is not None else contextlib.nullcontext():
        return gather_state(model, dtype, rank)


def export_model(state: dict, out: Path, name: str, formats: Sequence[str], dtype: str, keep_guidance: bool,
                 metadata: dict) -> list[Path]:
    """Write the trained weights (diffusers keys) through the checkpoint converter in each requested format."""
    # a killed export left its diffusers-keyed source (a recognisable temp; older versions: a fixed hidden name)
    clean_stale_temps(out, force=True)
    (out / f".{name}.export.safetensors").unlink(missing_ok=True)
    tmp = temp_path(out / f"{name}.export.safetensors")  # diffusers-keyed source for convert (it streams files)
    targets = {"bfl": (out / f"{name}.safetensors", "bfl", dtype),
               "diffusers": (out / f"{name}-diffusers", "diffusers", dtype),
               "fp8": (out / f"{name}-fp8.safetensors", "bfl", "fp8-scaled")}
    # not the temp's name (it holds a pid) nor the folder's: a rerun anywhere writes identical bytes
    metadata = {"dev2pro.source": f"dev2pro dedistill export {name}", **metadata}
    files = []
    try:
        save_safetensors({k: v.detach().to("cpu", DTYPE_CHOICES[dtype]).contiguous() for k, v in state.items()}, tmp,
                         overwrite=True, what="exported weights")
        for f in formats:
            dst, layout, dt = targets[f]
            files.append(convert(tmp, dst, layout=layout, dtype=dt, overwrite=True, drop_guidance=not keep_guidance,
                                 extra_metadata=metadata))
    finally:
        tmp.unlink(missing_ok=True)
    return files


def export_or_keep_state(state: dict, out: Path, name: str, formats: Sequence[str], dtype: str, keep_guidance: bool,
                         metadata: dict, state_dir: Path, resume_command: str) -> list[Path]:
    """``export_model`` with a full disk (or a read-only folder) turned into one line that names the kept state."""
    try:
        return export_model(state, out, name, formats, dtype, keep_guidance, metadata)
    except write_errors() as e:
        why = write_error_message(e, out / f"{name}.safetensors", "export the model to")
        kept = latest_state(state_dir)
        if kept is None:
            raise UserError(f"{why}; no training state was kept (set save.every to keep one): free space and "
                            f"train again") from None
        raise UserError(f"{why}; the training state {kept} is kept: free space and run `{resume_command}` to "
                        f"export it") from None
