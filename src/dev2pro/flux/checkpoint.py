"""The single way in and out of a Flux transformer checkpoint, in every layout users bring.

Layouts (detected from keys, never from file names):
  diffusers-folder  a model folder (``model_index.json`` + ``transformer/``) or a transformer folder, sharded or not
  diffusers         a single safetensors file with diffusers names (``x_embedder.weight`` ...)
  bfl               a single file with BFL names (``img_in.weight``, ``double_blocks.0.img_attn.qkv.weight`` ...)
  comfy             BFL names under ``model.diffusion_model.`` (ComfyUI, incl. plain and scaled fp8)

Reading is lazy (``Checkpoint.get`` loads one tensor) and writing streams (one output tensor in memory at a
time), so converting a 24 GB file needs about one tensor of RAM, and loading an fp8 file into a model keeping
fp8 storage peaks at the file size plus one tensor. Scaled fp8 is dequantised with its scales -- diffusers'
converter drops them and silently produces wrong weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from ..choices import CHECKPOINT_LAYOUTS, PICKLE_SUFFIXES  # noqa: F401 (re-exported)
from .. import families
from ..errors import CheckpointError, UserError
from ..families import Family
from ..outputs import NonFiniteError, count_nonfinite
from . import fp8 as fp8mod
from . import keys as keymod
from .header import read_header
from .weightfiles import transformer_folder, weight_files

LAYOUTS = CHECKPOINT_LAYOUTS
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_CHOICES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn,
                 "fp8-scaled": torch.float8_e4m3fn}  # config/CLI dtype names
SHARD_BYTES = 10 * 1024**3  # diffusers' save_pretrained default shard size


@dataclass
class Checkpoint:
    """An opened checkpoint: names, shapes and dtypes without loading data; ``get`` reads one tensor."""

    path: Path
    layout: str  # diffusers-folder | diffusers | bfl | comfy
    key_layout: str  # bfl | diffusers: the naming of the model keys
    prefix: str
    shapes: dict[str, tuple[int, ...]]  # unprefixed model keys (no fp8 scale / marker keys)
    dtypes: dict[str, torch.dtype]
    aux: dict[str, str]  # unprefixed auxiliary keys (scales, markers) -> full key
    files: dict[str, Path]  # full key -> file holding it
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # diffusers config.json when present
    ignored: int = 0  # keys of other components (VAE, text encoders) in an all-in-one file
    _state: dict | None = None  # in-memory tensors (pickle files)
    family: Family = field(default_factory=lambda: families.get("flux1"))  # detected from the keys (or forced)

    @property
    def fp8_format(self) -> str:
        """'none', 'fp8' (plain casts) or 'fp8-scaled' (ComfyUI per-tensor scales)."""
        return fp8mod.detect_fp8_format([*self.aux, *self.dtypes], self.dtypes)

    def spec(self):
        """The transformer's sizes (its family's spec class), from config.json or the tensor shapes."""
        axes = None
        if "dev2pro.axes_dim" in self.metadata:
            axes = json.loads(self.metadata["dev2pro.axes_dim"])
        if self.config:
            return self.family.refine_spec(self.family.spec_from_config(self.config), self.path, self.metadata)
        try:
            return self.family.refine_spec(self.family.spec_from_shapes(self.shapes, self.key_layout, axes),
                                           self.path, self.metadata)
        except KeyError as e:
            raise CheckpointError(f"{self.path} lacks {e.args[0]}, which sizes the model: the checkpoint is "
                                  f"incomplete") from None
        except ValueError as e:  # a gap in the block numbering
            raise CheckpointError(f"{self.path}: {e}") from None

    def missing(self) -> list[str]:
        """Transformer tensors (in the file's own naming) that a complete model of this size has and the file
        lacks -- e.g. ``final_layer.*`` of a truncated export."""
        try:
            pieces = self.family.tensor_pieces(self.shapes, self.key_layout)
        except KeyError as e:
            return [str(e.args[0])]
        expected = {p.bfl if self.key_layout == "bfl" else p.diffusers for p in pieces}
        return sorted(expected - set(self.shapes))

    def plan(self, dst_layout: str) -> dict:
        """Its family's ``plan`` (``flux.keys.plan`` over the family's pieces) from this file's layout to
        ``dst_layout``: for each output key, the input rows that build it."""
        return self.family.plan(self.shapes, self.key_layout, dst_layout)

    def raw(self, full_key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[full_key]
        try:
            with safe_open(str(self.files[full_key]), framework="pt") as f:
                return f.get_tensor(full_key)
        except Exception as e:  # a truncated file shows up here when the header claimed more data
            raise CheckpointError(f"{self.files[full_key]}: cannot read tensor {full_key!r} ({e}); "
                                  f"the file is corrupt or truncated -- download or convert it again") from None

    def get(self, key: str) -> torch.Tensor:
        """One model tensor, as stored (fp8 stays fp8; use ``scale_of`` for its scale)."""
        return self.raw(self.prefix + key)

    def scale_of(self, key: str) -> torch.Tensor | None:
        """The fp8 per-tensor scale of a model weight, if the file stores one."""
        sk = fp8mod.scale_key_for(key, self.aux)
        return self.raw(self.aux[sk]).float() if sk else None

    def get_dequantized(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.get(key)
        if t.dtype in FP8_DTYPES:
            return fp8mod.dequantize_entry(t, self.scale_of(key), dtype)
        return t.to(dtype)

    def num_params(self) -> int:
        n = 0
        for s in self.shapes.values():
            p = 1
            for d in s:
                p *= d
            n += p
        return n

    def size_bytes(self) -> int:
        return sum(Path(p).stat().st_size for p in set(self.files.values()))


# ------------------------------------------------------------------------------------------------ reading
def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, family: str | None = None) -> Checkpoint:
    """Open any supported Flux transformer checkpoint; CheckpointError with a fix for anything else.

    ``family``: force a model family (``families``) instead of detecting it from the keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        return _open_folder(path, family, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path} is a pickle file, which can run arbitrary code when loaded. Convert it "
                                  f"to safetensors, or pass --allow-pickle if you trust its source")
        return _open_pickle(path, family)
    return _from_headers(path, {path: read_header(path)}, family=family)


def _open_folder(given: Path, family: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    path = transformer_folder(given)
    kind, files = weight_files(path)
    if not files:
        raise CheckpointError(f"{path} holds no safetensors weights (nor diffusers' pickle .bin): expected a "
                              f"diffusers model folder (model_index.json + transformer/) or a transformer folder")
    missing = [f for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: shard {missing[0].name} named in the index is missing")
    if kind == "pickle":
        if not allow_pickle:
            raise CheckpointError(f"{path} holds its weights as pickle ({files[0].name}"
                                  f"{f' + {len(files) - 1} more' if len(files) > 1 else ''}), which can run "
                                  f"arbitrary code when loaded. Convert it to safetensors once (`dev2pro convert "
                                  f"{given} OUT.safetensors --layout bfl --allow-pickle`) and use that file, or pass "
                                  f"--allow-pickle (a config's model.allow_pickle = true) if you trust its source")
        state, headers = {}, {}
        for f in files:  # shards: one state dict, each key still mapped to the file that holds it
            part = _load_pickle(f)
            headers[f] = {k: {"dtype": None, "shape": list(v.shape)} for k, v in part.items()}
            state.update(part)
        ckpt = _from_headers(path, headers, state=state, family=family)
    else:
        ckpt = _from_headers(path, {f: read_header(f) for f in files}, family=family)
    ckpt.layout = "diffusers-folder"
    if (path / "config.json").exists():
        ckpt.config = json.loads((path / "config.json").read_text())
    return ckpt


def _open_pickle(path: Path, family: str | None = None) -> Checkpoint:
    obj = _load_pickle(path)
    header = {k: {"dtype": None, "shape": list(v.shape)} for k, v in obj.items()}
    return _from_headers(path, {path: header}, state=obj, family=family)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with ``weights_only`` (tensors and plain containers: no code runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load this pickle file ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def _from_headers(path: Path, headers: Mapping[Path, dict], state: dict | None = None,
                  family: str | None = None) -> Checkpoint:
    metadata: dict[str, str] = {}
    entries: dict[str, tuple[tuple[int, ...], torch.dtype | None, Path]] = {}
    for file, header in headers.items():
        metadata.update(header.get("__metadata__") or {})
        for k, v in header.items():
            if k == "__metadata__":
                continue
            dtype = state[k].dtype if state is not None else _ST_DTYPES.get(v["dtype"])
            entries[k] = (tuple(v["shape"]), dtype, file)
    key_layout, prefix = keymod.strip_prefix(entries)
    shapes, dtypes, aux, files, ignored = {}, {}, {}, {}, 0
    for k, (shape, dtype, file) in entries.items():
        files[k] = file
        if prefix and not k.startswith(prefix):
            if k.endswith("scaled_fp8"):
                aux["scaled_fp8"] = k
            else:
                ignored += 1  # all-in-one files also hold VAE / text encoders
            continue
        name = k[len(prefix):]
        if fp8mod.is_scale_key(name) or name == "scaled_fp8":
            aux[name] = k
        else:
            shapes[name], dtypes[name] = shape, dtype
    layout = ("comfy" if prefix in keymod.BFL_PREFIXES else "bfl") if key_layout == "bfl" else "diffusers"
    fam = families.detect(shapes, key_layout, family, source=str(path))
    ckpt = Checkpoint(path=path, layout=layout, key_layout=key_layout, prefix=prefix, shapes=shapes, dtypes=dtypes,
                      aux=aux, files=files, metadata=metadata, ignored=ignored, _state=state, family=fam)
    ckpt.plan("diffusers")  # raises on keys that are not part of a transformer of its family
    return ckpt


# ------------------------------------------------------------------------------------------------ loading
def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, fp8_storage: bool = False,
                     policy: "fp8mod.Fp8Policy | None" = None, scaled: bool = True, allow_pickle: bool = False,
                     guidance_embeds: bool | None = None, family: str | None = None):
    """Load a checkpoint into diffusers' FluxTransformer2DModel. Returns (model, Checkpoint).

    ``fp8_storage``: weights the policy quantises are kept (or put) in fp8 with ``dtype`` compute, the rest in
    ``dtype``; the model is built on the meta device and tensors are assigned one by one, so the whole model is
    never materialised in high precision. Without it, fp8 weights are dequantised (scales applied) to ``dtype``.
    ``guidance_embeds=False`` drops a guidance embedding that the file has (a pro-like model). ``family``: forced
    (``open_checkpoint``); the transformer class is the family's (FluxTransformer2DModel, Flux2Transformer2DModel).
    """
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle, family=family)
    spec = ckpt.spec()
    if guidance_embeds is not None and guidance_embeds != spec.guidance_embeds:
        if guidance_embeds:
            raise UserError(f"{path} has no guidance embedding; it cannot be loaded as a guidance-distilled model")
        spec = spec.without_guidance()  # FLUX.2 ties the variant to the embedding: the spec knows how
    policy = policy or fp8mod.Fp8Policy()
    model = families.build_transformer(spec, device="meta")
    steps = ckpt.plan("diffusers")
    wanted = dict(model.state_dict())
    state, scales = {}, {}
    for key, parts in steps.items():
        if key not in wanted:
            continue  # e.g. a dropped guidance embedding
        target = wanted[key]
        src_fp8 = all(ckpt.dtypes[p[0]] in FP8_DTYPES for p in parts)
        keep_fp8 = fp8_storage and target.ndim == 2 and policy.should_quantize(key, tuple(target.shape))
        if keep_fp8 and src_fp8 and _same_scale(ckpt, parts):
            t = keymod.assemble(parts, ckpt.get)
            s = ckpt.scale_of(parts[0][0])
        else:
            t = keymod.assemble(parts, lambda k: ckpt.get_dequantized(k, torch.float32))
            s = None
            if keep_fp8:
                t, s = fp8mod.quantize(t, scaled=scaled)
            else:
                t = t.to(dtype)
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(target.shape)}; the file is inconsistent with its own block sizes")
        _check_finite(path, " + ".join(dict.fromkeys(ckpt.prefix + p[0] for p in parts)), t)  # the file's names
        state[key] = t
        if keep_fp8 and s is not None:
            scales[key] = s
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} transformer tensors, e.g. {missing[:3]}; "
                              f"the checkpoint is incomplete")
    model.load_state_dict(state, assign=True, strict=True)
    if fp8_storage:
        fp8mod.enable_fp8_storage(model, policy, compute_dtype=dtype, scales=scales)
    model.eval().requires_grad_(False)
    return model, ckpt


def _check_finite(path, key: str, t: torch.Tensor) -> None:
    """The load-time scan: one pass per tensor while it is in memory anyway (training on a NaN weight would
    otherwise run to the end and save an all-NaN LoRA)."""
    bad = count_nonfinite(t)
    if bad:
        raise NonFiniteError(f"{path}: tensor {key} holds {bad} NaN/inf value(s) of {t.numel()}; the checkpoint is "
                             f"corrupt or was saved from a diverged run -- use another copy of the model")


def _same_scale(ckpt: Checkpoint, parts) -> bool:
    """Pieces from one fp8 tensor share its scale; pieces from differently scaled tensors must be requantised."""
    srcs = {p[0] for p in parts}
    if len(srcs) == 1:
        return True
    scales = [ckpt.scale_of(k) for k in srcs]
    if all(s is None for s in scales):
        return True
    return all(s is not None and torch.equal(s, scales[0]) for s in scales)
