"""Flux LoRA files: one in-memory form and every layout people exchange (kohya, ComfyUI, diffusers/PEFT, XLabs).

In memory a LoRA is ``LoraWeights`` (``lora.weights``): diffusers module path -> ``LoraModule(down [r, in],
up [out, r], alpha)``, delta W = up @ down * alpha / r. On disk it is one of:

    kohya      lora_unet_<BFL path, '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha   (kohya, ComfyUI, Forge)
    comfy      diffusion_model.<BFL path>.lora_down.weight / .lora_up.weight / .alpha       (ComfyUI's generic key)
    diffusers  transformer.<diffusers path>.lora_A.weight / .lora_B.weight; alpha only in the safetensors
               metadata key ``lora_adapter_metadata`` (JSON of LoraConfig kwargs, each prefixed ``transformer.``)
    xlabs      [diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight ...    (read only, no alpha)

The BFL layouts fuse linears that diffusers keeps apart (``flux.keys``: img/txt ``qkv`` = q|k|v, single ``linear1``
= q|k|v|mlp). A fused LoRA is written the way kohya's ``split_qkv`` saves it -- downs stacked, ups block-diagonal --
so its rank is the sum of the parts' ranks. Every reader (kohya's loader, ComfyUI's ``alpha / lora_down.shape[0]``,
diffusers' ``_convert_to_ai_toolkit_cat``) scales it by ``alpha / total rank``; kohya itself saves the per-part
alpha unchanged, which makes its split files 1/3 (1/4) as strong once loaded. We store ``alpha = part scale x
total rank`` so every reader gets our delta. Parts are padded to one rank with zero blocks (missing parts become zero
blocks) because diffusers only un-fuses block-diagonal ups whose column blocks have equal width. Parts sharing one
down (kohya without split_qkv, XLabs) are read and written dense: one down, stacked ups.

diffusers' kohya converter ignores ``.alpha`` for ``final_layer.*``, so there we bake the scale into ``up`` and store
alpha = rank. It also hard-codes 19/38 blocks and 3072 widths, which is why ``ops.apply_lora`` loads our PEFT form
into a model of any size instead. Sizes (hidden, mlp width, block counts) are read off the LoRA's own shapes or
passed in, never taken from FLUX.1's constants. FLUX.2 LoRAs (``.family == "flux2"``) go through ``lora.flux2``;
LoKr / LoHa / DoRA files (``lycoris.is_adapter_file``) through ``lora.lycoris``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..choices import LORA_LAYOUTS
from ..errors import UserError
from ..flux.keys import Piece, module_pieces
from ..outputs import make_parent, save_safetensors
from .checks import check_lora
from .weights import (ADAPTER_METADATA_KEY, LoraModule, LoraWeights, adapter_config, config_alpha,  # noqa: F401
                      lora_to_peft_state_dict, pair, peft_config_kwargs, plain_number)  # (LoRA types re-exported)

WRITABLE = LORA_LAYOUTS
LAYOUTS = WRITABLE + ("xlabs",)
_PREFIX = {"kohya": "lora_unet_", "comfy": "diffusion_model.", "diffusers": "transformer."}
_SUFFIX = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
           ".alpha": "alpha"}
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.")
_DIFFUSERS_TOP = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                  "time_text_embed.", "norm_out.", "proj_out.")


# ------------------------------------------------------------------------------------------------------- sizes
# Module-name suffixes whose in_features is the model width, per naming; used to size the row maps.
_HIDDEN_IN = {
    "bfl": (".qkv", ".linear1", "_mod.lin", "modulation.lin", "_mlp.0", "_attn.proj", "adaLN_modulation.1",
            "final_layer.linear"),
    "diffusers": ("attn.to_q", "attn.to_k", "attn.to_v", "_proj", "attn.to_out.0", "attn.to_add_out", "proj_mlp",
                  "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"),
}


def _sizes(mods: Mapping[str, LoraModule], naming: str, hidden: int | None, mlp_hidden: int | None):
    """(n_double, n_single, hidden, mlp_hidden) of the model a LoRA was made for, from its shapes."""
    dbl, sgl = ("double_blocks.", "single_blocks.") if naming == "bfl" else \
        ("transformer_blocks.", "single_transformer_blocks.")
    n = {dbl: 0, sgl: 0}
    for name in mods:
        for pre in n:
            if name.startswith(pre):
                n[pre] = max(n[pre], int(name[len(pre):].split(".", 1)[0]) + 1)
    if hidden is None:
        hidden = next((m.down.shape[1] for k, m in mods.items() if k.endswith(_HIDDEN_IN[naming]) or k == "proj_out"),
                      None)
    if hidden is None:  # only embedders: no rows to split, any width works
        return n[dbl], n[sgl], 0, 0
    for k, m in mods.items():
        if mlp_hidden is None and k.endswith((".linear1", "proj_mlp", "_mlp.0", "net.0.proj")):
            mlp_hidden = m.up.shape[0] - (3 * hidden if k.endswith(".linear1") else 0)
        elif mlp_hidden is None and (k.endswith((".linear2", "_mlp.2", "net.2")) or
                                     k.startswith("single_transformer_blocks.") and k.endswith(".proj_out")):
            mlp_hidden = m.down.shape[1] - (0 if "mlp" in k or "net" in k else hidden)
    # Nothing tells the mlp width: diffusers' FluxTransformer2DModel fixes mlp_ratio at 4 (architecture, not size).
    return n[dbl], n[sgl], hidden, 4 * hidden if mlp_hidden is None else mlp_hidden


def _groups(mods: Mapping[str, LoraModule], naming: str, hidden: int | None, mlp_hidden: int | None):
    """BFL module -> its pieces (in BFL row order), for a model sized from the LoRA."""
    groups: dict[str, list[Piece]] = {}
    for p in module_pieces(*_sizes(mods, naming, hidden, mlp_hidden), guidance=True):
        groups.setdefault(p.bfl, []).append(p)
    for parts in groups.values():
        parts.sort(key=lambda p: (p.bfl_rows or (0, 0))[0])
    known = set(groups) if naming == "bfl" else {p.diffusers for ps in groups.values() for p in ps}
    unknown = sorted(set(mods) - known)
    if unknown:
        raise UserError(f"LoRA module {unknown[0]!r} ({len(unknown)} in all) is not a linear layer of a Flux "
                        f"transformer ({naming} naming): the LoRA is for another model family.")
    return groups


# ------------------------------------------------------------------------------------------ fusing / un-fusing
def _fuse(parts: list[LoraModule | None], sizes: list[int]) -> LoraModule:
    """kohya split_qkv layout: stacked downs, block-diagonal ups, equal block widths, alpha = scale x total rank.

    Parts that share one down (read from a dense fused LoRA, or XLabs) go back to the dense form: one down, stacked
    ups -- the original file, not one three or four times its size."""
    present = [m for m in parts if m is not None]
    r, scale, ref = max(m.rank for m in present), present[0].scale, present[0].down
    if len(present) == len(parts) and all(
            m.down is ref or (m.down.shape == ref.shape and torch.equal(m.down, ref)) for m in present) and all(
            math.isclose(m.scale, scale, rel_tol=1e-6) for m in present):
        return LoraModule(ref, torch.cat([m.up for m in present]), present[0].alpha)
    downs, ups = [], []
    for m, size in zip(parts, sizes):
        down, up = ref.new_zeros(r, ref.shape[1]), ref.new_zeros(size, r)
        if m is not None:
            down[:m.rank] = m.down
            # One alpha serves the whole fused module: fold a part's other scale into its up (1-ulp rounding);
            # equal scales, the usual case, are copied exactly.
            same = math.isclose(m.scale, scale, rel_tol=1e-6)
            up[:, :m.rank] = m.up if same else (m.up.float() * (m.scale / scale)).to(up.dtype)
        downs.append(down)
        ups.append(up)
    return LoraModule(torch.cat(downs), torch.block_diag(*ups), scale * r * len(parts))


def _unfuse(m: LoraModule, rows: list[tuple[int, int]]) -> list[LoraModule | None]:
    """Split a fused module into its parts; None for parts that are all zero (padding or an unused part).

    Block-diagonal ups (kohya split_qkv, ours) give each part its own columns. Any other up stays exact by giving
    every part the whole down and its rows of the up (kohya without split_qkv: each part keeps the full rank)."""
    ups, n, scale = [m.up[a:b] for a, b in rows], len(rows), m.scale
    w = m.rank // n
    diagonal = m.rank % n == 0 and all(
        not up[:, k * w:(k + 1) * w].any() for j, up in enumerate(ups) for k in range(n) if k != j)
    out = []
    for j, up in enumerate(ups):
        down = m.down
        if diagonal:
            down, up = m.down[j * w:(j + 1) * w], up[:, j * w:(j + 1) * w]
            keep = down.any(1) | up.any(0)  # drop the zero padding, keep trained-but-zero-up parts
            down, up = (down, up) if keep.all() else (down[keep], up[:, keep])
        used = down.shape[0] > 0 and (diagonal or bool(up.any()))
        out.append(LoraModule(down, up, scale * down.shape[0]) if used else None)
    return out


def to_bfl(lw: Mapping[str, LoraModule], hidden=None, mlp_hidden=None) -> dict[str, LoraModule]:
    """diffusers-named modules -> BFL-named modules (fused where BFL fuses), as written to kohya/ComfyUI files and
    merged into BFL/ComfyUI checkpoints."""
    out = {}
    for bfl, parts in _groups(lw, "diffusers", hidden, mlp_hidden).items():
        mods = [lw.get(p.diffusers) for p in parts]
        if all(m is None for m in mods):
            continue
        if len({p.diffusers for p in parts}) > 1:
            m = _fuse(mods, [b - a for a, b in (p.bfl_rows for p in parts)])
        elif parts[0].diffusers_rows is None:
            m = mods[0]
        else:  # one module, rows permuted (final modulation: diffusers scale|shift, BFL shift|scale)
            m = LoraModule(mods[0].down, torch.cat([mods[0].up[slice(*p.diffusers_rows)] for p in parts]),
                           mods[0].alpha)
        if bfl.startswith("final_layer.") and m.alpha != m.rank:
            # diffusers' kohya converter ignores alpha for final_layer.*: bake the scale so every reader agrees.
            m = LoraModule(m.down, (m.up.float() * m.scale).to(m.up.dtype), float(m.rank))
        out[bfl] = m
    return out


def _from_bfl(mods: Mapping[str, LoraModule], hidden=None, mlp_hidden=None) -> dict[str, LoraModule]:
    """BFL-named modules -> diffusers-named modules."""
    out = {}
    groups = _groups(mods, "bfl", hidden, mlp_hidden)
    for bfl, m in mods.items():
        parts = groups[bfl]
        if len({p.diffusers for p in parts}) > 1:
            split = _unfuse(m, [p.bfl_rows for p in parts])
            out.update({p.diffusers: s for p, s in zip(parts, split) if s is not None})
        elif parts[0].bfl_rows is None:
            out[parts[0].diffusers] = m
        else:
            order = sorted(parts, key=lambda p: p.diffusers_rows[0])
            out[parts[0].diffusers] = LoraModule(m.down, torch.cat([m.up[slice(*p.bfl_rows)] for p in order]),
                                                 m.alpha)
    return out


# -------------------------------------------------------------------------------------------- state dicts
def detect_layout(keys: Iterable[str]) -> str:
    """'kohya', 'comfy', 'diffusers' or 'xlabs' from a LoRA file's keys (UserError if none fits)."""
    keys = list(keys)
    odd = next((k for k in keys if re.search(r"(dora_scale|lokr_|hada_|\.oft_|lora_mid)", k)), None)
    if odd:
        raise UserError(f"key {odd!r}: a LyCORIS/DoRA key; read such files with load_lora (lora.lycoris).")
    if not any("lora" in k for k in keys):
        raise UserError(f"holds no LoRA tensors (no lora_down/lora_up/lora_A/lora_B keys); is it a base model? "
                        f"First keys: {sorted(keys)[:3]}")
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".processor." in k and "_lora" in k for k in keys):
        return "xlabs"
    if any(k.startswith(("diffusion_model.", "double_blocks.", "single_blocks.")) for k in keys):
        return "comfy"
    if any(k.startswith(("transformer.", "base_model.model.") + _DIFFUSERS_TOP) for k in keys):
        return "diffusers"
    if keys and all(k.startswith(_TEXT_ENCODER) for k in keys):
        raise UserError("this LoRA only holds text-encoder weights; dev2pro handles transformer LoRAs.")
    raise UserError(f"not a Flux LoRA layout we know (kohya lora_unet_*, ComfyUI diffusion_model.*, diffusers "
                    f"transformer.*lora_A/B, XLabs *.processor.*_lora*). First keys: {sorted(keys)[:3]}")


def _group(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], layout: str) -> dict[str, dict]:
    """module -> {'down', 'up', 'alpha'} tensors; text-encoder keys are skipped with a warning."""
    groups, skipped = {}, []
    for key, t in sd.items():
        if key.startswith(_TEXT_ENCODER):
            skipped.append(key)
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in _SUFFIX if key.endswith(s)), None)
        if prefix is None or suffix is None:
            raise UserError(f"unexpected key {key!r} in a {layout}-layout LoRA (want {prefixes[0]}<module>"
                            f"{{.lora_down.weight,.lora_up.weight,.alpha}}).")
        groups.setdefault(key[len(prefix):-len(suffix)], {})[_SUFFIX[suffix]] = t
    if skipped:
        warnings.warn(f"skipped {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}): only the transformer "
                      f"part is kept.")
    return groups


def lora_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                         layout: str | None = None, hidden: int | None = None,
                         mlp_hidden: int | None = None) -> LoraWeights:
    """Read a LoRA state dict of any known layout into LoraWeights (diffusers names)."""
    layout = layout or detect_layout(sd)
    if layout == "xlabs":
        from .xlabs import read_xlabs

        mods = read_xlabs(sd, mlp_hidden)
    elif layout == "diffusers":
        cfg = adapter_config(metadata)
        groups = _group(sd, ("transformer.", "base_model.model.", ""), layout)
        mods = {n: pair(n, g, None if cfg is None or "alpha" in g else config_alpha(cfg, n, g["down"].shape[0]))
                for n, g in groups.items()}
        _groups(mods, "diffusers", hidden, mlp_hidden)  # names check
    elif layout in ("kohya", "comfy"):
        groups = _group(sd, (_PREFIX[layout], ""), layout)
        if layout == "kohya":
            groups = _bfl_names_from_kohya(groups)
        mods = _from_bfl({n: pair(n, g) for n, g in groups.items()}, hidden, mlp_hidden)
    else:
        raise UserError(f"unknown LoRA layout {layout!r}; known: {', '.join(LAYOUTS)}")
    check_lora(mods, hidden, mlp_hidden)  # finite values, every shape fits a Flux transformer
    return LoraWeights(mods, metadata, layout)


def _bfl_names_from_kohya(groups: dict[str, dict]) -> dict[str, dict]:
    """Underscored BFL paths (``double_blocks_0_img_attn_qkv``) -> dotted ones, via the known module names."""
    counts = [1 + max((int(m.group(1)) for k in groups if (m := re.match(pat, k))), default=-1)
              for pat in (r"double_blocks_(\d+)_", r"single_blocks_(\d+)_")]
    # Names do not depend on the widths, so any sizes do here.
    dotted = {p.bfl.replace(".", "_"): p.bfl for p in module_pieces(*counts, 1, 1, guidance=True)}
    unknown = sorted(set(groups) - set(dotted))
    if unknown:
        raise UserError(f"LoRA module 'lora_unet_{unknown[0]}' ({len(unknown)} in all) is not a linear layer of a "
                        f"Flux transformer: the LoRA is for another model family.")
    return {dotted[k]: g for k, g in groups.items()}


def lora_to_state_dict(lw: LoraWeights | Mapping[str, LoraModule], layout: str, metadata: Mapping[str, str] | None = None,
                       hidden: int | None = None, mlp_hidden: int | None = None):
    """(state dict, string metadata) of ``lw`` in a writable layout; metadata = lw's, updated by ``metadata``."""
    if layout not in WRITABLE:
        raise UserError(f"cannot write the {layout!r} layout; choose one of {', '.join(WRITABLE)}.")
    meta = {**getattr(lw, "metadata", {}), **(metadata or {})}
    meta = {str(k): str(v) for k, v in meta.items() if k != ADAPTER_METADATA_KEY}  # never carry a stale config
    meta["format"] = "pt"
    sd = {}
    if layout == "diffusers":
        sd = {f"transformer.{k}": v for k, v in lora_to_peft_state_dict(lw).items()}
        cfg = {f"transformer.{k}": v for k, v in peft_config_kwargs(lw).items()}
        meta[ADAPTER_METADATA_KEY] = json.dumps(cfg, indent=2, sort_keys=True)  # as diffusers' save_lora_weights
    else:
        for bfl, m in to_bfl(lw, hidden, mlp_hidden).items():
            name = _PREFIX[layout] + (bfl.replace(".", "_") if layout == "kohya" else bfl)
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = m.down, m.up
            sd[f"{name}.alpha"] = torch.tensor(float(m.alpha))  # 0-d, like kohya's (fp32 here, not bf16)
    return sd, meta


# ------------------------------------------------------------------------------------------------------- files
def load_lora(path: str | os.PathLike, allow_pickle: bool = False, hidden: int | None = None,
              mlp_hidden: int | None = None, family=None, base: str | os.PathLike | None = None) -> LoraWeights:
    """Read a LoRA file (safetensors; a pickled .pt/.bin/.ckpt only with ``allow_pickle``) of FLUX.1 or FLUX.2.

    ``family`` (a ``families.Family`` or its name): the model the LoRA is for -- ``base`` names it in messages. A
    file of the other family is a one-line UserError naming both; a file whose names and shapes fit both families
    is read as ``family`` (default FLUX.1). ``.family`` of the result says what the file is for."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        if not allow_pickle:
            raise UserError(f"{path}: not a safetensors file ({e}). If it is a pickled PyTorch LoRA, convert it to "
                            f"safetensors, or pass --allow-pickle if you trust where it came from (unpickling can run "
                            f"code).") from e
        sd, metadata = torch.load(path, map_location="cpu", weights_only=True), {}
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{path}: holds no tensors.")
    from . import flux2, lycoris

    want = getattr(family, "name", family)
    adapter = lycoris.is_adapter_file(sd)  # LoKr / LoHa / DoRA: their own keys and maths (lora.lycoris)
    found = None if adapter else flux2.family_for(sd, want, path, base, metadata)
    try:
        if adapter:
            return lycoris.read(sd, metadata, want, path, base)
        if (found or want) == "flux2":
            return flux2.read(sd, metadata)
        lw = lora_from_state_dict(sd, metadata, None, hidden, mlp_hidden)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    lw.family = found or want
    return lw


def save_lora(lw: LoraWeights | Mapping[str, LoraModule], path: str | os.PathLike, layout: str,
              metadata: Mapping[str, str] | None = None, overwrite: bool = False, hidden: int | None = None,
              mlp_hidden: int | None = None, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``lw`` as a safetensors file in ``layout``, atomically, through ``outputs`` (guarded destination,
    NaN/inf refused, disk-full and read-only errors as one line). ``sources``: inputs it must not replace.
    A FLUX.2 ``lw`` (``.family``) is written in FLUX.2's layouts of the same names (``lora.flux2``)."""
    path = Path(path)
    if getattr(lw, "adapter", "lora") != "lora":
        from .lycoris import to_state_dict

        sd, meta = to_state_dict(lw, layout, metadata)
    elif getattr(lw, "family", None) == "flux2":
        from . import flux2

        sd, meta = flux2.to_state_dict(lw, layout, metadata)
    else:
        sd, meta = lora_to_state_dict(lw, layout, metadata, hidden, mlp_hidden)
    # sorted keys: a stable byte layout whatever the module order
    sd = {k: sd[k].detach().to("cpu").contiguous() for k in sorted(sd)}
    make_parent(path, "LoRA")
    return save_safetensors(sd, path, meta, overwrite=overwrite, what="LoRA", sources=sources)


def kohya_metadata(rank: int, alpha: float, guidance_scale: float, timestep_sampling: str, base_model_name: str,
                   extra: Mapping[str, object] | None = None, spec=None) -> dict[str, str]:
    """kohya ``ss_*`` + modelspec metadata, so kohya tools, ComfyUI and Civitai recognise a Flux.1 LoRA -- or,
    given a FLUX.2 ``spec`` of the base, a FLUX.2 one (musubi-tuner's values, ``lora.flux2.kohya_fields``)."""
    meta = {
        "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank), "ss_network_alpha": str(plain_number(alpha)),
        "ss_guidance_scale": str(guidance_scale), "ss_timestep_sampling": timestep_sampling,
        "ss_sd_model_name": base_model_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "flux-1-dev/lora",  # trained on a de-distilled base, used on FLUX.1-dev
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": Path(base_model_name).stem + "-lora",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if getattr(spec, "family", "flux1") == "flux2":
        from .flux2 import kohya_fields

        meta.update(kohya_fields(spec))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def kohya_dataset_fields(images: Sequence[tuple[str, str, int]], resolution, output_name: str,
                         started: float) -> dict[str, str]:
    """kohya's dataset and run fields, which its and Civitai's metadata viewers show: ``images`` are (image path,
    caption, repeats), one per training image; tags are the caption's comma-separated parts, per image folder."""
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for path, caption, repeats in images:
        folder = Path(path).parent.name
        d = dirs.setdefault(folder, {"n_repeats": int(repeats), "img_count": 0})
        d["img_count"] += 1
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                tags.setdefault(folder, {})[tag] = tags.get(folder, {}).get(tag, 0) + 1
    sides = resolution if isinstance(resolution, (list, tuple)) else [resolution]
    return {"ss_output_name": output_name, "ss_num_train_images": str(sum(r for _, _, r in images)),
            "ss_resolution": str(tuple([int(max(sides))] * 2)), "ss_training_started_at": str(started),
            "ss_tag_frequency": json.dumps(tags, ensure_ascii=False), "ss_dataset_dirs": json.dumps(dirs)}


def edit_references(metadata: Mapping[str, str] | None) -> int:
    """Reference images per edit a LoRA was trained with (dev2pro's ``dev2pro.references``; 0: text-to-image)."""
    try:
        return int((metadata or {}).get("dev2pro.references", 0))
    except (TypeError, ValueError):
        return 0


def file_edit_references(path: str | os.PathLike) -> int:
    """``edit_references`` of a LoRA file, from its header only (0 for an unreadable or pickled file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return edit_references(f.metadata())
    except (SafetensorError, OSError):
        return 0
