"""FLUX.2 LoRA files behind ``formats.load_lora`` / ``save_lora``: which family a file is for, and the way through
the family's key map (``families.flux2.lora_keys``).

A file says its family by its names and shapes (``lora_keys.lora_family``); when it cannot (attention-only double
block LoRAs fit FLUX.1 and klein 4B alike) its header may (kohya/musubi ``ss_base_model_version``, modelspec
``modelspec.architecture``: what dev2pro, musubi and kohya write), else the model it is loaded for decides, and
FLUX.1 stays the default, so FLUX.1 files read exactly as before. Users name FLUX.2 layouts as they name FLUX.1's:
``kohya`` (musubi's ``lora_unet_*``), ``comfy`` (the BFL-key layout ai-toolkit writes and ComfyUI reads),
``diffusers`` (PEFT).
In memory both families are ``LoraWeights`` with diffusers module names; ``.family`` tells them apart.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Mapping

import torch

from ..errors import UserError
from .checks import check_finite
from .weights import LoraWeights

LAYOUTS = {"kohya": "kohya", "comfy": "bfl", "diffusers": "peft"}  # our layout names -> lora_keys'
_OURS = {v: k for k, v in LAYOUTS.items()}
NETWORK_MODULE = "networks.lora_flux_2"  # musubi-tuner's FLUX.2 LoRA module (its ss_network_module)
log = logging.getLogger(__name__)
# The modules diffusers' kohya FLUX.2 reader (``lora_conversion_utils._convert_kohya_flux2_lora_to_diffusers``, which
# ``load_lora_weights`` runs on a ``lora_unet_*`` file) maps, in diffusers names; it skips any other module with a
# log line only: the shared modulations, the final adaLN (norm_out.linear), dev's guidance embedder.
# tests/lora/test_kohya_diffusers_note.py holds this to diffusers' own loader.
_DIFFUSERS_KOHYA = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.linear_(in|out))"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)|x_embedder|context_embedder|proj_out"
    r"|time_guidance_embed\.timestep_embedder\.linear_[12]")
_SAID: set[tuple[str, ...]] = set()  # the notes said in this process (a training run saves many times)
_BASE_VERSION = {"klein-4b": "flux_2_klein_4b", "klein-9b": "flux_2_klein_9b", "dev": "flux_2_dev"}  # musubi's


def header_family(metadata: Mapping[str, str] | None) -> str | None:
    """'flux1' | 'flux2' | None from a LoRA file's header: kohya's ``flux1`` / musubi's ``flux_2*``
    ``ss_base_model_version``, or a ``flux-1-*`` / ``flux-2-*`` ``modelspec.architecture``."""
    version = str((metadata or {}).get("ss_base_model_version", "")).lower()
    arch = str((metadata or {}).get("modelspec.architecture", "")).lower()
    if version.startswith("flux_2") or arch.startswith("flux-2"):
        return "flux2"
    if version.startswith("flux1") or arch.startswith("flux-1"):
        return "flux1"
    return None


def file_family(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """('flux1' | 'flux2' | None, why) for a LoRA state dict, from its names and shapes; where they fit both
    families, from its header (``header_family``)."""
    from ..families.flux2.lora_keys import lora_family

    found, why = lora_family(list(sd), {k: tuple(v.shape) for k, v in sd.items()})
    if found is None and header_family(metadata):
        return header_family(metadata), "its header (ss_base_model_version / modelspec.architecture)"
    return found, why


def family_for(sd: Mapping[str, torch.Tensor], want: str | None, path, base=None,
               metadata: Mapping[str, str] | None = None) -> str | None:
    """The family a LoRA state dict is for (``file_family``); a one-line UserError naming both when it is not
    ``want`` (the base model's family; None: any)."""
    found, _ = file_family(sd, metadata)
    if found and want and found != want:
        from .. import families  # on use: loading the registry loads every family

        families.require_same(families.get(found), families.get(want), f"LoRA {path}",
                              f"base model {base}" if base else "base model it is applied to")
    return found


def read(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> LoraWeights:
    """A FLUX.2 LoRA state dict of any layout -> LoraWeights (family 'flux2', layout in our names)."""
    from ..families.flux2.lora_keys import read_lora

    lw = read_lora(sd, metadata)
    return LoraWeights(lw, lw.metadata, _OURS[lw.layout], family="flux2")


def to_state_dict(lw: Mapping, layout: str, metadata: Mapping[str, str] | None = None):
    """(state dict, metadata) of a FLUX.2 LoRA in one of our layout names; ``read`` gives ``lw`` back bit for bit.
    Metadata keys are sorted: the same LoRA always gives the same bytes."""
    from ..families.flux2.lora_keys import write_lora

    if layout not in LAYOUTS:
        raise UserError(f"cannot write a FLUX.2 LoRA in the {layout!r} layout; choose one of {', '.join(LAYOUTS)}.")
    check_finite(lw)  # before the writer's read-back, which would call the values "damaged"
    if layout == "kohya" and (note := kohya_diffusers_note(lw)):
        log.warning(note)
    sd, meta = write_lora(lw, LAYOUTS[layout], metadata={"format": "pt", **(metadata or {})})
    return sd, dict(sorted(meta.items()))


def diffusers_kohya_skips(names: Iterable[str]) -> list[str]:
    """The modules of ``names`` (diffusers names) that diffusers' kohya FLUX.2 reader does not load."""
    return sorted(n for n in names if not _DIFFUSERS_KOHYA.fullmatch(n))


def kohya_diffusers_note(lw: Mapping) -> str | None:
    """Once per process and set of modules: a kohya-layout FLUX.2 LoRA with modules diffusers' kohya reader skips
    (modulation, final adaLN, guidance embedder) names them and the layouts that load them all; else None."""
    skipped = tuple(diffusers_kohya_skips(lw))
    if not skipped or skipped in _SAID:
        return None
    _SAID.add(skipped)
    return (f"note: diffusers' load_lora_weights skips {len(skipped)} module(s) of this kohya-layout FLUX.2 LoRA "
            f"(its kohya converter has no name for them): {', '.join(skipped)}; the `diffusers` layout loads them all "
            f"in diffusers (lora.diffusers.safetensors, or `dev2pro lora convert FILE OUT --layout diffusers --family "
            f"flux2`), as ComfyUI loads the comfy layout")


def kohya_fields(spec) -> dict[str, str]:
    """What musubi-tuner, ComfyUI and Civitai read to know a LoRA is for FLUX.2 (and which size): musubi's
    ``ss_base_model_version`` (``flux_2_klein_4b`` ...; ``flux_2`` for other sizes) and network module, and the
    ``modelspec.architecture`` of the base with ``/lora``."""
    from ..families import get

    arch = get("flux2").modelspec(spec)["modelspec.architecture"]
    return {"ss_base_model_version": _BASE_VERSION.get(spec.size_name, "flux_2"),
            "ss_network_module": NETWORK_MODULE, "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2"}
