"""FLUX.2 LoRA files: the three layouts people exchange, exact conversion between them, and the dense deltas.

In memory a FLUX.2 LoRA is ``LoraWeights`` (``lora.formats``): diffusers module path -> ``LoraModule(down [r, in],
up [out, r], alpha)``, delta W = up @ down * alpha / r. On disk it is one of:

    peft   transformer.<diffusers path>.lora_A.weight / .lora_B.weight; alpha only in the safetensors metadata key
           ``lora_adapter_metadata`` (JSON of LoraConfig kwargs prefixed ``transformer.``; no metadata: alpha = rank).
           diffusers' ``save_lora_weights`` writes it, ``Flux2KleinPipeline.load_lora_weights`` reads all of it.
    bfl    diffusion_model.<BFL path>.lora_A.weight / .lora_B.weight (ai-toolkit writes it, ComfyUI reads it). No
           ``.alpha``: diffusers' converter raises on any leftover key, so alpha/rank is folded into B.
    kohya  lora_unet_<BFL path, '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha (musubi-tuner, ComfyUI).
           diffusers loads only block linears, img_in, txt_in, time_in and final_layer.linear from it (it drops the
           shared modulations, guidance_in and final_layer.adaLN_modulation_1 with a warning).

BFL and diffusers paths differ in three ways (``module_map``): renames (``double_stream_modulation_img.lin`` ->
``.linear``, ``single_blocks.N.linear1`` -> ``single_transformer_blocks.N.attn.to_qkv_mlp_proj``, ``linear2`` ->
``attn.to_out``, ...); the double blocks' fused ``img_attn.qkv`` / ``txt_attn.qkv`` are three diffusers linears
(``attn.to_q/k/v``, ``attn.add_q/k/v_proj``); ``final_layer.adaLN_modulation.1`` emits shift|scale where diffusers'
``norm_out.linear`` emits scale|shift, so B's row halves swap (diffusers 0.42.1's BFL-LoRA converter forgets this).
Single blocks' linear1 is fused on both sides, so it needs nothing. A fused qkv LoRA is written as kohya's
``split_qkv`` saves it -- downs stacked, ups block-diagonal, alpha = part scale x total rank -- and read back by
slicing, exactly; a dense fused LoRA (musubi and ai-toolkit train BFL's qkv as one linear) becomes one shared down
and row slices of up.

Exactness: every conversion is checked by reading its own output back. What a layout cannot say (alpha in ``bfl``;
part scales that differ inside one fused kohya module; an alpha a fp32 ``.alpha`` tensor cannot hold; padding of
unequal part ranks) goes into one metadata key, ``dev2pro.lora_exact`` (JSON per diffusers module: alpha, rank, the
factor folded into B and B's dtype), which readers of other tools ignore and ours consumes. Folding a scale into B
is exact in B's dtype when the scale is a power of two (alpha = rank, 2 x rank, ...); when it is not, B is stored
one dtype wider (bf16 -> fp32, fp32 -> fp64: diffusers and ComfyUI cast it on load) so that the division on the way
back restores every bit. A diffusers adapter config is kept verbatim (``dev2pro.lora_adapter_metadata`` in the
other layouts), and so is a kohya ``.alpha`` dtype other than fp32 (``dev2pro.lora_alpha_dtype``): peft -> bfl ->
peft and kohya -> peft -> kohya give back the same bytes. Read, never written: ``diffusion_model.`` /
``base_model.model.`` + diffusers names (as peft); ``diffusion_model.*.lora_down/up`` and ``.alpha`` keys in the BFL
layout (ComfyUI reads both, diffusers neither).
"""

from __future__ import annotations

import json
import re
import warnings
from functools import reduce
from typing import Iterable, Mapping

import torch

from ...errors import UserError
from ...lora.weights import ADAPTER_METADATA_KEY, LoraModule, LoraWeights, config_alpha, peft_config_kwargs

LAYOUTS = ("peft", "bfl", "kohya")
EXACT_KEY = "dev2pro.lora_exact"
CONFIG_KEY = "dev2pro.lora_adapter_metadata"  # a peft adapter config, kept verbatim outside the peft layout
ALPHA_DTYPE_KEY = "dev2pro.lora_alpha_dtype"  # kohya .alpha dtypes other than fp32, per BFL module
ADALN = "final_layer.adaLN_modulation.1"  # BFL shift|scale rows = diffusers norm_out.linear scale|shift

_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
           "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
        "final_layer.linear": "proj_out", ADALN: "norm_out.linear"}
_GUIDANCE = {"guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2"}
_SUFFIX = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
           ".alpha": "alpha"}
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.")


# ------------------------------------------------------------------------------------------------- the map
def module_map(num_double: int, num_single: int, guidance: bool = True) -> dict[str, tuple[str, ...]]:
    """BFL module path -> its diffusers module path(s), for every LoRA-targetable linear of a FLUX.2 transformer.

    Three diffusers paths = a fused qkv (rows q|k|v in thirds). klein 4B is (5, 20), 9B (8, 24), dev (8, 48);
    ``guidance`` adds ``guidance_in`` (dev)."""
    out: dict[str, tuple[str, ...]] = {}
    for i in range(num_double):
        out.update({f"double_blocks.{i}.{b}": tuple(f"transformer_blocks.{i}.{d}" for d in ds)
                    for b, ds in _QKV.items()})
        out.update({f"double_blocks.{i}.{b}": (f"transformer_blocks.{i}.{d}",) for b, d in _DOUBLE.items()})
    for i in range(num_single):
        out.update({f"single_blocks.{i}.{b}": (f"single_transformer_blocks.{i}.{d}",) for b, d in _SINGLE.items()})
    out.update({b: (d,) for b, d in {**_TOP, **(_GUIDANCE if guidance else {})}.items()})
    return out


def diffusers_targets(num_double: int, num_single: int, guidance: bool = True) -> list[str]:
    """Every LoRA-targetable linear of a diffusers ``Flux2Transformer2DModel``, by module path."""
    return [d for ds in module_map(num_double, num_single, guidance).values() for d in ds]


def _counts(names: Iterable[str], num_double: int | None, num_single: int | None) -> tuple[int, int]:
    """Block counts given, or the smallest ones that hold every block index in ``names`` (any naming)."""
    n = [0, 0]
    for name in names:
        m = re.match(r"(?:lora_unet_)?(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)"
                     r"[._](\d+)[._]", name)
        if m:
            j = int(m.group(1).startswith("single"))
            n[j] = max(n[j], int(m.group(2)) + 1)
    return (n[0] if num_double is None else num_double), (n[1] if num_single is None else num_single)


# ----------------------------------------------------------------------------------------------- detection
def detect_layout(keys: Iterable[str]) -> str:
    """'peft', 'bfl' or 'kohya' from a FLUX.2 LoRA file's keys (UserError if none fits)."""
    keys = [k for k in keys if not k.startswith(_TEXT_ENCODER)]
    odd = next((k for k in keys if re.search(r"(dora_scale|lokr_|hada_|\.oft_|lora_mid|lora_magnitude)", k)), None)
    if odd:
        raise UserError(f"key {odd!r}: LyCORIS/DoRA adapters are not plain LoRAs and are not supported.")
    if not any("lora" in k for k in keys):
        raise UserError(f"holds no LoRA tensors (no lora_A/lora_B/lora_down/lora_up keys). First keys: "
                        f"{sorted(keys)[:3]}")
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    bare = [re.sub(r"^(transformer|base_model\.model|diffusion_model)\.", "", k) for k in keys]
    diff_top = ("transformer_blocks.", "single_transformer_blocks.") + tuple(
        f"{d}." for d in (*_TOP.values(), *_GUIDANCE.values()))
    if any(k.startswith(diff_top) for k in bare):  # diffusers names, whatever the prefix (diffusers reads all)
        return "peft"
    bfl_top = tuple(f"{b}." for b in (*_TOP, *_GUIDANCE)) + ("double_blocks.", "single_blocks.")  # '.lin.'
    # not '.lin': diffusers' 'double_stream_modulation_img.linear' starts with BFL's '...img.lin'
    if any(k.startswith(bfl_top) for k in bare):
        return "bfl"
    raise UserError(f"not a FLUX.2 LoRA layout we know (peft transformer.*.lora_A/B, BFL diffusion_model.*, kohya "
                    f"lora_unet_*). First keys: {sorted(keys)[:3]}")


_FLUX1_ONLY = re.compile(r"(img_mod|txt_mod|single_blocks[._]\d+[._]modulation|vector_in|norm1(_context)?\.linear|"
                         r"single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv]\.)|ff\.net|"
                         r"ff_context\.net|time_text_embed)")
_FLUX2_ONLY = re.compile(r"(stream_modulation|to_qkv_mlp_proj|linear_in|linear_out|time_guidance_embed|"
                         r"single_transformer_blocks\.\d+\.attn\.to_out\.)")


_RATIOS = {"mlp.0": (True, {4: "flux1", 6: "flux2"}), "mlp.2": (False, {4: "flux1", 3: "flux2"}),
           "linear1": (True, {7: "flux1", 9: "flux2"}), "linear2": (False, {5: "flux1", 4: "flux2"})}
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))


def lora_family(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[str | None, str]:
    """('flux1' | 'flux2' | None, why) for a LoRA file of any layout, from its names and, if given, tensor shapes.

    Names: FLUX.2 has no per-block modulation (``img_mod``, ``single_blocks.N.modulation``, diffusers ``norm1``)
    and no ``vector_in``; it has ``*_stream_modulation``, and diffusers names (``to_qkv_mlp_proj``, ``ff.linear_in``)
    of its own. Names shared by both (kohya/BFL block linears) are told apart by width ratios that hold at any
    size: the double-block mlp input (4h FLUX.1 GELU, 6h FLUX.2 SwiGLU), its output (4h vs 3h), single linear1
    (7h vs 9h) and linear2 (5h vs 4h); then block indices (a double block >= 8 exists only in FLUX.1, a single
    block >= 38 only in FLUX.2 dev). None: nothing tells them apart (e.g. attention-only double-block LoRAs of
    hidden 3072, which FLUX.1 and klein 4B share) -- check the shapes against the base model instead."""
    keys = list(keys)
    for k in keys:
        for family, pattern in (("flux1", _FLUX1_ONLY), ("flux2", _FLUX2_ONLY)):
            if pattern.search(k):
                return family, f"{k!r} is a {family.upper().replace('FLUX', 'FLUX.')}-only module"
    for k, down in (shapes or {}).items():
        for ds, us in _PAIRS:
            up = shapes.get(k[: -len(ds)] + us) if k.endswith(ds) else None
            m = re.search(r"_(mlp[._][02])$|[._](linear[12])$", k[: -len(ds)]) if up else None
            if m and len(down) == len(up) == 2:
                kind = (m.group(1) or m.group(2)).replace("_", ".")
                out_wide, table = _RATIOS[kind]
                wide, narrow = (up[0], down[1]) if out_wide else (down[1], up[0])
                if narrow and wide % narrow == 0 and wide // narrow in table:
                    return table[wide // narrow], f"{k!r}: the width ratio {wide // narrow} of {kind}"
    nd, ns = _counts(keys, None, None)
    if nd > 8:
        return "flux1", f"double block {nd - 1} exists only in FLUX.1 (FLUX.2 has at most 8)"
    if ns > 38:
        return "flux2", f"single block {ns - 1} exists only in FLUX.2 dev (FLUX.1 has 38)"
    return None, "names and shapes fit both FLUX.1 and FLUX.2"


def looks_like_flux2(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
    """True when ``lora_family`` finds positive FLUX.2 evidence (False for FLUX.1 and for undecidable files)."""
    return lora_family(keys, shapes)[0] == "flux2"


# ----------------------------------------------------------------------------------------- exact folding
def _fold(up: torch.Tensor, f: float) -> torch.Tensor:
    """up x f, stored so that ``_unfold`` gives ``up`` back bit for bit: same dtype when that is exact (f a power
    of two, the usual case), else one dtype wider (the division then lands within a few ulps of the wider dtype,
    which round to the original value)."""
    if f == 1.0:
        return up
    for dtype in (up.dtype, torch.float32 if up.element_size() < 4 else torch.float64, torch.float64):
        y = (up.double() * f).to(dtype)
        if torch.equal(_unfold(y, f, up.dtype), up):
            return y
    raise UserError(f"cannot fold scale {f} into a {up.dtype} LoRA up weight exactly.")


def _unfold(y: torch.Tensor, f: float, dtype: torch.dtype) -> torch.Tensor:
    return y.to(dtype) if f == 1.0 else (y.double() / f).to(dtype)


def _same(a: LoraModule, b: LoraModule) -> bool:
    return (a.alpha == b.alpha and a.down.dtype == b.down.dtype and a.up.dtype == b.up.dtype and
            torch.equal(a.down, b.down) and torch.equal(a.up, b.up))


# --------------------------------------------------------------------------------------------------- reading
def _group(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, dict]:
    """module (prefix stripped) -> {'down', 'up', 'alpha'}; text-encoder keys are skipped with a warning."""
    groups, skipped = {}, []
    prefixes = {"peft": ("transformer.", "base_model.model.", "diffusion_model.", ""),
                "bfl": ("diffusion_model.", "base_model.model.", "transformer.", ""), "kohya": ("lora_unet_",)}[layout]
    for key, t in sd.items():
        if key.startswith(_TEXT_ENCODER):
            skipped.append(key)
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in _SUFFIX if key.endswith(s)), None)
        if prefix is None or suffix is None:
            raise UserError(f"unexpected key {key!r} in a {layout}-layout FLUX.2 LoRA.")
        groups.setdefault(key[len(prefix):-len(suffix)], {})[_SUFFIX[suffix]] = t
    if skipped:
        warnings.warn(f"skipped {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}): only the transformer "
                      f"part is kept.")
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            raise UserError(f"LoRA module {name!r} has {sorted(g)} but needs both down and up: the file is incomplete.")
        if g["down"].ndim != 2 or g["up"].ndim != 2 or g["down"].shape[0] != g["up"].shape[1]:
            raise UserError(f"LoRA module {name!r}: down {tuple(g['down'].shape)} and up {tuple(g['up'].shape)} are "
                            f"not a linear LoRA pair.")
    return groups


def _unknown(names, known, naming) -> None:
    bad = sorted(set(names) - set(known))
    if bad:
        raise UserError(f"LoRA module {bad[0]!r} ({len(bad)} in all) is not a linear layer of a FLUX.2 transformer "
                        f"({naming} naming): the LoRA is for another model family or more blocks.")


def _peft_config(raw: str | None) -> dict | None:
    if not raw:
        return None
    cfg = json.loads(raw)
    pre = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return pre or cfg


def _pattern(patterns: Mapping | None, name: str, default):
    for pattern, value in (patterns or {}).items():  # peft.utils.other.get_pattern_key: the first match wins
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _config_fits(cfg: dict, lw: Mapping[str, LoraModule]) -> bool:
    """Does a peft adapter config give every module its rank and alpha and target exactly these modules?"""
    targets = cfg.get("target_modules") or []
    for name, m in lw.items():
        hit = re.fullmatch(targets, name) if isinstance(targets, str) else any(
            name == t or name.endswith("." + t) for t in targets)
        if not hit or cfg.get("exclude_modules") or int(_pattern(cfg.get("rank_pattern"), name, cfg.get("r", 8))) \
                != m.rank or config_alpha(cfg, name, m.rank) != m.alpha:
            return False
    return True


def _read_peft(sd, metadata, nd, ns) -> tuple[dict[str, LoraModule], dict[str, str]]:
    groups = _group(sd, "peft")
    nd, ns = _counts(groups, nd, ns)
    _unknown(groups, diffusers_targets(nd, ns), "diffusers")
    meta = dict(metadata or {})
    raw = meta.pop(ADAPTER_METADATA_KEY, None)
    cfg = _peft_config(raw)
    mods = {}
    for name, g in groups.items():
        r = g["down"].shape[0]
        alpha = float(g["alpha"].item()) if "alpha" in g else float(r) if cfg is None else config_alpha(cfg, name, r)
        mods[name] = LoraModule(g["down"], g["up"], alpha)
    if raw:
        meta[CONFIG_KEY] = raw
    return mods, meta


def _read_bfl_side(sd, metadata, layout, nd, ns) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """bfl / kohya -> diffusers-named modules; ``dev2pro.lora_exact`` restores what the layout could not hold."""
    groups = _group(sd, layout)
    nd, ns = _counts(groups, nd, ns)
    fmap = module_map(nd, ns)
    if layout == "kohya":
        dotted = {b.replace(".", "_"): b for b in fmap}
        _unknown(groups, dotted, "kohya")
        groups = {dotted[k]: g for k, g in groups.items()}
    _unknown(groups, fmap, "BFL")
    meta = dict(metadata or {})
    exact = json.loads(meta.pop(EXACT_KEY, "{}"))
    alpha_dtypes = {b: str(g["alpha"].dtype).removeprefix("torch.") for b, g in groups.items()
                    if "alpha" in g and g["alpha"].dtype != torch.float32}
    if alpha_dtypes:
        meta[ALPHA_DTYPE_KEY] = json.dumps(alpha_dtypes, sort_keys=True)
    mods: dict[str, LoraModule] = {}
    for bfl, g in groups.items():
        down, up, rank = g["down"], g["up"], g["down"].shape[0]
        scale = float(g["alpha"].item()) / rank if "alpha" in g else 1.0  # what ComfyUI applies
        if bfl == ADALN:  # shift|scale -> scale|shift
            up = torch.cat(up.chunk(2, 0)[::-1])
        names = fmap[bfl]
        n, h = len(names), up.shape[0] // len(names)
        w = rank // n
        blocks = n > 1 and rank % n == 0 and all(
            not up[j * h:(j + 1) * h, k * w:(k + 1) * w].any() for j in range(n) for k in range(n) if k != j)
        for j, name in enumerate(names):
            if n == 1:
                d, u = down, up
            elif blocks:  # kohya split_qkv / ours: each part owns its columns
                d, u = down[j * w:(j + 1) * w], up[j * h:(j + 1) * h, j * w:(j + 1) * w]
            else:  # dense fused (musubi): every part sees the whole down
                d, u = down.clone(), up[j * h:(j + 1) * h]
            e = exact.get(name)
            r = e["rank"] if e else 0
            if e and (d.shape[0] < r or d[r:].any() or u[:, r:].any()):
                e = None  # resized by another tool that copied the header: read the tensors as ComfyUI does
            if e:
                mods[name] = LoraModule(d[:r].clone(), _unfold(u[:, :r], e["fold"], getattr(torch, e["up_dtype"]))
                                        .contiguous(), float(e["alpha"]))
                continue
            alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)  # not scale x rank: no rounding
            if n > 1 and blocks:
                keep = d.any(1) | u.any(0)  # drop zero padding; an all-zero part was absent
                if not keep.any():
                    continue
                d, u, alpha = (d, u, scale * w) if keep.all() else (d[keep], u[:, keep], scale * int(keep.sum()))
            # parts get their own storage (safetensors refuses tensors that share memory)
            mods[name] = LoraModule(d.clone() if n > 1 else d, u.contiguous(), alpha)
    return mods, meta


def read_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              num_double: int | None = None, num_single: int | None = None,
              layout: str | None = None) -> LoraWeights:
    """A FLUX.2 LoRA state dict of any layout -> LoraWeights (diffusers names, alpha per module). Block counts
    default to the LoRA's own highest indices; pass the model's to check a LoRA against it. ``.metadata`` keeps the
    file's other metadata plus what a round trip needs (verbatim adapter config, kohya alpha dtypes)."""
    layout = layout or detect_layout(state_dict)
    if layout == "peft":
        mods, meta = _read_peft(state_dict, metadata, num_double, num_single)
    elif layout in ("bfl", "kohya"):
        mods, meta = _read_bfl_side(state_dict, metadata, layout, num_double, num_single)
    else:
        raise UserError(f"unknown FLUX.2 LoRA layout {layout!r}; known: {', '.join(LAYOUTS)}")
    bad = next((n for n, m in mods.items() if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())), None)
    if bad:
        raise UserError(f"LoRA module {bad!r} holds NaN or inf values: the file is damaged.")
    return LoraWeights(mods, meta, layout)


# --------------------------------------------------------------------------------------------------- writing
def _fuse(parts: list[LoraModule | None], file_scale: float | None):
    """Modules of one BFL linear -> (down, up, alpha or None, {part index: fold}).

    ``file_scale`` None (kohya): alpha carries the first part's scale, other parts fold theirs relative to it;
    1.0 (bfl): every part folds its whole scale."""
    present = [m for m in parts if m is not None]
    ref = present[0]
    s_file = ref.scale if file_scale is None else file_scale
    folds = {j: m.scale / s_file for j, m in enumerate(parts) if m is not None}
    if len(present) == len(parts) and all(m.down.shape == ref.down.shape and m.down.dtype == ref.down.dtype and
                                          torch.equal(m.down, ref.down) and m.scale == ref.scale for m in present):
        # one linear, or a dense fused one (musubi, or read from one): one down, stacked ups
        ups = [_fold(m.up, folds[j]) for j, m in enumerate(parts)]
        dtype = reduce(torch.promote_types, [u.dtype for u in ups])
        return ref.down, torch.cat([u.to(dtype) for u in ups]), (ref.alpha if file_scale is None else None), folds
    if any(m.down.dtype != ref.down.dtype for m in present):
        raise UserError("the parts of one fused qkv LoRA have different down dtypes.")
    r, h = max(m.rank for m in present), ref.up.shape[0]
    downs, ups = [], []
    for j, m in enumerate(parts):  # equal blocks, zero padded: what diffusers' kohya converter un-fuses
        if m is None:
            downs.append(ref.down.new_zeros(r, ref.down.shape[1]))
            ups.append(ref.up.new_zeros(h, r))
            continue
        u = _fold(m.up, folds[j])
        downs.append(torch.cat([m.down, m.down.new_zeros(r - m.rank, m.down.shape[1])]))
        ups.append(torch.cat([u, u.new_zeros(h, r - m.rank)], 1))
    dtype = reduce(torch.promote_types, [u.dtype for u in ups])
    return (torch.cat(downs), torch.block_diag(*[u.to(dtype) for u in ups]),
            (s_file * r * len(parts) if file_scale is None else None), folds)


def _write_raw(lw: Mapping[str, LoraModule], layout: str, meta: dict[str, str], nd: int, ns: int):
    """(state dict, metadata, exact-notes candidates) in ``layout`` without the ``dev2pro.lora_exact`` key."""
    sd: dict[str, torch.Tensor] = {}
    notes: dict[str, dict] = {}
    generated = json.dumps({f"transformer.{k}": v for k, v in peft_config_kwargs(lw).items()}, indent=2,
                           sort_keys=True)  # as diffusers' save_lora_weights writes it
    raw = meta.pop(CONFIG_KEY, None)
    cfg = _peft_config(raw)
    if cfg is None or not _config_fits(cfg, lw):
        raw = generated
    if layout != "peft" and raw != generated:
        meta[CONFIG_KEY] = raw  # another tool's config (its key order, extra fields): kept for the way back
    if layout == "peft":
        meta[ADAPTER_METADATA_KEY] = raw
        for name, m in lw.items():
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = m.down, m.up
            notes[name] = {"fold": 1.0}
        return sd, meta, notes
    alpha_dtypes = json.loads(meta.pop(ALPHA_DTYPE_KEY, "{}")) if layout == "kohya" else {}
    for bfl, names in module_map(nd, ns).items():
        parts = [lw.get(n) for n in names]
        if all(m is None for m in parts):
            continue
        down, up, alpha, info = _fuse(parts, None if layout == "kohya" else 1.0)
        if bfl == ADALN:  # diffusers scale|shift -> BFL shift|scale
            up = torch.cat(up.chunk(2, 0)[::-1])
        notes.update({names[j]: {"fold": f} for j, f in info.items()})
        if layout == "bfl":
            sd[f"diffusion_model.{bfl}.lora_A.weight"], sd[f"diffusion_model.{bfl}.lora_B.weight"] = down, up
        else:
            key = "lora_unet_" + bfl.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            dtype = getattr(torch, alpha_dtypes.get(bfl, "float32"))
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)  # 0-d, as kohya saves it
    return sd, meta, notes


def write_lora(lw: LoraWeights | Mapping[str, LoraModule], layout: str, num_double: int | None = None,
               num_single: int | None = None, metadata: Mapping[str, str] | None = None):
    """(state dict, string metadata) of ``lw`` in ``layout``; metadata = lw's, updated by ``metadata``.

    The output is read back before it is returned; what the layout cannot hold goes into ``dev2pro.lora_exact``,
    so ``read_lora`` of the result equals ``lw`` bit for bit (RuntimeError otherwise: a bug, not bad input)."""
    if layout not in LAYOUTS:
        raise UserError(f"cannot write the {layout!r} layout; choose one of {', '.join(LAYOUTS)}.")
    if not lw:
        raise UserError("the LoRA has no modules.")
    nd, ns = _counts(lw, num_double, num_single)
    _unknown(lw, diffusers_targets(nd, ns), "diffusers")
    meta = {str(k): str(v) for k, v in {**getattr(lw, "metadata", {}), **(metadata or {})}.items()
            if k not in (EXACT_KEY, ADAPTER_METADATA_KEY)}
    raw_cfg = getattr(lw, "metadata", {}).get(ADAPTER_METADATA_KEY)
    if raw_cfg and CONFIG_KEY not in meta:
        meta[CONFIG_KEY] = raw_cfg  # LoraWeights read by lora.formats keep the config under diffusers' key
    sd, meta, notes = _write_raw(lw, layout, dict(meta), nd, ns)
    back = read_lora(sd, meta, nd, ns, layout)
    exact = {}
    for name, m in lw.items():
        if name not in back or not _same(back[name], m):
            exact[name] = {"alpha": m.alpha, "rank": m.rank, "fold": notes[name]["fold"],
                           "up_dtype": str(m.up.dtype).removeprefix("torch.")}
    if exact:
        meta[EXACT_KEY] = json.dumps(exact, sort_keys=True)
        back = read_lora(sd, meta, nd, ns, layout)
    wrong = [n for n, m in lw.items() if n not in back or not _same(back[n], m)] + sorted(set(back) - set(lw))
    if wrong:
        raise RuntimeError(f"FLUX.2 LoRA {layout} writer does not read back exactly: {wrong[:3]}")
    return sd, meta


def convert(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, to_layout: str,
            num_double: int | None = None, num_single: int | None = None):
    """A FLUX.2 LoRA state dict in any layout -> (state dict, metadata) in ``to_layout``; round trips are exact."""
    return write_lora(read_lora(state_dict, metadata, num_double, num_single), to_layout, num_double, num_single)


def delta_weights(state_dict: Mapping[str, torch.Tensor] | LoraWeights, metadata: Mapping[str, str] | None = None,
                  num_double: int | None = None, num_single: int | None = None, naming: str = "diffusers",
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Module path -> dense weight delta up @ down * alpha / rank (computed in fp32), for a LoRA state dict of any
    layout (or LoraWeights): add ``[name]`` to ``<name>.weight`` to merge it. ``naming='bfl'`` gives the deltas of
    a BFL/ComfyUI checkpoint's weights: q|k|v stacked (a missing part is zeros), the final adaLN's halves swapped."""
    lw = state_dict if isinstance(state_dict, LoraWeights) else read_lora(state_dict, metadata, num_double, num_single)
    deltas = {n: (m.up.float() @ m.down.float() * m.scale).to(dtype) for n, m in lw.items()}
    if naming == "diffusers":
        return deltas
    if naming != "bfl":
        raise ValueError(f"naming must be 'diffusers' or 'bfl', not {naming!r}")
    out = {}
    for bfl, names in module_map(*_counts(lw, num_double, num_single)).items():
        have = [deltas[n] for n in names if n in deltas]
        if have:
            d = torch.cat([deltas.get(n, torch.zeros_like(have[0])) for n in names])
            out[bfl] = torch.cat(d.chunk(2)[::-1]) if bfl == ADALN else d
    return out
