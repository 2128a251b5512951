"""LyCORIS adapters (LoKr, LoHa) and DoRA files: their keys, their deltas, and where the deltas go.

Deltas, as ComfyUI (``comfy/weight_adapter/lokr.py``, ``loha.py``) and LyCORIS compute them:

    LoKr  kron(w1, w2), each factor stored whole (``lokr_w1``) or as a product (``lokr_w1_a @ lokr_w1_b``); scaled
          by alpha / dim when a factor is a product (dim = that ``_b``'s rows, w2's if both are) -- else by 1,
          whatever ``.alpha`` says. peft scales by alpha / r always, so a peft LoKr whose factors are both whole
          is written with its scale folded into w1.
    LoHa  (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank (rank = hada_w1_b's rows).
    DoRA  a LoRA pair plus a magnitude (``lora.dora``: which axis it normalises).

Keys written (``kohya`` and ``comfy`` layouts; ComfyUI reads both for FLUX.1 and FLUX.2): a module that is one whole
BFL linear is ``lora_unet_<BFL path, _>`` (kohya) or ``diffusion_model.<BFL path>`` (comfy); a diffusers module
that is a slice of a fused BFL weight (``attn.to_q/k/v``, ``add_*_proj``, FLUX.1's single-block q/k/v/mlp and
``norm_out.linear``) is ``lora_transformer_<diffusers path, _>``, which ComfyUI's ``flux_to_diffusers`` key map
applies to that slice (OneTrainer's name; ComfyUI's ``Flux2`` model is a ``Flux``, so the map serves both).
Suffixes: ``.lokr_w1`` | ``.lokr_w1_a/_b``, ``.lokr_w2`` | ``.lokr_w2_a/_b``, ``.hada_w1_a/_b``, ``.hada_w2_a/_b``,
``.alpha``; DoRA ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` / ``.dora_scale``. Read as well:
``lycoris_<diffusers path>`` (SimpleTuner), dotted names with any of the usual prefixes, BFL-key files as ComfyUI
users share them (a fused ``img_attn.qkv`` LoKr stays one BFL module: a Kronecker product does not split by rows).

``diffusers`` layout, only where diffusers 0.42 loads it: DoRA as peft saves it (``transformer.<path>.lora_A/B.weight``
+ ``.lora_magnitude_vector``, ``use_dora`` in ``lora_adapter_metadata``) and FLUX.2 LoKr (``transformer.<path>.lokr_*``,
the scale folded into w1, which ``Flux2LoraLoaderMixin`` infers a LoKrConfig from). diffusers loads no FLUX.1 LoKr
and no LoHa at all, so those are refused rather than written for nobody.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..errors import UserError
from ..outputs import count_nonfinite
from . import dora as D
from . import pieces as P
from .weights import ADAPTER_METADATA_KEY, LoraModule, LoraWeights, adapter_config, config_alpha, peft_config_kwargs

TYPE_KEY = "dev2pro.adapter_type"
_SUFFIX = r"lokr_w[12](?:_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12]|lora_(?:down|up|A|B)\.weight|alpha|dora_scale|" \
          r"lora_magnitude_vector(?:\.weight)?"
_KEY = re.compile(rf"^(.+?)\.({_SUFFIX})$")
_PAIR = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
         "lora_magnitude_vector.weight": "lora_magnitude_vector"}
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.")
_NAMES = {"lokr": "LoKr", "loha": "LoHa", "dora": "DoRA", "lora": "LoRA"}


@dataclass
class LycoModule:
    """A LoKr or LoHa module: its tensors by file suffix (``lokr_w1`` ...) and alpha (None: none stored)."""

    kind: str  # "lokr" | "loha"
    t: dict
    alpha: float | None

    def _w(self, i: int) -> torch.Tensor:
        if self.kind == "loha":
            return self.t[f"hada_w{i}_a"].float() @ self.t[f"hada_w{i}_b"].float()
        whole = self.t.get(f"lokr_w{i}")
        return whole.float() if whole is not None else self.t[f"lokr_w{i}_a"].float() @ self.t[f"lokr_w{i}_b"].float()

    @property
    def dim(self) -> int | None:
        """The rank alpha is divided by (None: LoKr with both factors whole)."""
        if self.kind == "loha":
            return self.t["hada_w1_b"].shape[0]
        b = self.t.get("lokr_w2_b", self.t.get("lokr_w1_b"))
        return None if b is None else b.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.dim is None else self.alpha / self.dim

    @property
    def shape(self) -> tuple[int, int]:
        w1, w2 = self._w(1), self._w(2)
        return (w1.shape[0], w1.shape[1]) if self.kind == "loha" else \
            (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])

    def delta(self) -> torch.Tensor:
        w1, w2 = self._w(1), self._w(2)
        return (w1 * w2 if self.kind == "loha" else torch.kron(w1, w2)) * self.scale

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.t.values())


def kind_of(m) -> str:
    return m.kind if isinstance(m, LycoModule) else "dora" if isinstance(m, D.DoraModule) else "lora"


class AdapterWeights(LoraWeights):
    """LoraWeights holding LoKr / LoHa / DoRA modules, named as ``lora.pieces`` says (diffusers, or BFL when fused)."""

    @property
    def adapter(self) -> str:
        kinds = {kind_of(m) for m in self.values()} - {"lora"}
        return "+".join(sorted(kinds)) or "lora"


def describe(m) -> str:
    """One module's shape of adaptation, for `lora info` groups."""
    if isinstance(m, LycoModule):
        dim = m.dim if m.dim is not None else "full"
        return f"{m.kind} dim={dim} alpha={'-' if m.alpha is None else format(m.alpha, 'g')}"
    dora = f" dora({m.axis})" if isinstance(m, D.DoraModule) else ""
    return f"r={m.rank} alpha={m.alpha:g}{dora}"


def param_count(m) -> int:
    if isinstance(m, LycoModule):
        return m.params
    return m.down.numel() + m.up.numel() + (m.magnitude.numel() if isinstance(m, D.DoraModule) else 0)


def is_adapter_file(keys) -> bool:
    """True for a LyCORIS (LoKr/LoHa) or DoRA state dict: ``formats`` hands those to ``read``."""
    return any(re.search(r"\.(lokr_|hada_|dora_scale$|lora_magnitude_vector)", k) for k in keys)


def module_delta(m, weight: Callable[[], torch.Tensor] | None = None, strength: float = 1.0) -> torch.Tensor:
    """A module's dense weight delta in fp32; DoRA calls ``weight()`` for the base weight it renormalises."""
    if isinstance(m, D.DoraModule):
        return D.delta(m, weight(), strength)
    if isinstance(m, LycoModule):
        return m.delta() * strength
    return m.up.float() @ m.down.float() * (m.scale * strength)


# ------------------------------------------------------------------------------------------------- reading
def read(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, want: str | None, path=None,
         base=None) -> AdapterWeights:
    """A LoKr / LoHa / DoRA state dict of any layout -> AdapterWeights (family and layout from the keys); a file
    whose names fit only the other family than ``want`` is a one-line error naming both."""
    groups: dict[str, dict] = {}
    for key, t in sd.items():
        if key.startswith(_TEXT_ENCODER):
            continue
        m = _KEY.match(key)
        if m is None:
            raise UserError(f"unexpected key {key!r} in a LyCORIS/DoRA file (want <module>.lokr_w1 / .hada_w1_a / "
                            f".lora_down.weight / .dora_scale / .alpha ...)")
        suffix = m.group(2)
        groups.setdefault(m.group(1), {})[_PAIR.get(suffix, suffix.removesuffix(".weight"))] = t
    family, names = P.decode(groups, _family_by_shapes(groups) or want)
    if want and family != want:
        from .. import families

        families.require_same(families.get(family), families.get(want), "the adapter",
                              f"base model {base}" if base else "base model it is applied to")
    cfg = adapter_config(metadata)
    declared = (metadata or {}).get(D.AXIS_KEY)
    lw = AdapterWeights(metadata=metadata, layout=_layout(groups), family=family)
    for raw, g in groups.items():
        lw[names[raw]] = _module(names[raw], g, cfg, declared)
    for name, m in lw.items():
        tensors = m.t.values() if isinstance(m, LycoModule) else [m.down, m.up] + (
            [m.magnitude] if isinstance(m, D.DoraModule) else [])
        if any(count_nonfinite(t) for t in tensors):
            raise UserError(f"module {name!r} holds NaN/inf values: the file is damaged -- re-export it")
    return lw


def _family_by_shapes(groups: dict[str, dict]) -> str | None:
    """'flux1' / 'flux2' when the modules' widths tell (``lora_keys.lora_family``'s ratios), else None."""
    from ..families.flux2.lora_keys import lora_family

    shapes = {}
    for raw, g in groups.items():
        if "hada_w1_a" in g and "hada_w1_b" in g:
            out, inp = g["hada_w1_a"].shape[0], g["hada_w1_b"].shape[1]
        elif "up" in g and "down" in g:
            out, inp = g["up"].shape[0], g["down"].shape[1]
        else:
            f = [g.get(f"lokr_w{i}") if f"lokr_w{i}" in g else (g.get(f"lokr_w{i}_a"), g.get(f"lokr_w{i}_b"))
                 for i in (1, 2)]
            if any(x is None or isinstance(x, tuple) and None in x for x in f):
                continue
            dims = [(x.shape[0], x.shape[1]) if not isinstance(x, tuple) else (x[0].shape[0], x[1].shape[1])
                    for x in f]
            out, inp = dims[0][0] * dims[1][0], dims[0][1] * dims[1][1]
        shapes[f"{raw}.lora_down.weight"], shapes[f"{raw}.lora_up.weight"] = (1, inp), (out, 1)
    return lora_family(list(shapes), shapes)[0]


def _layout(groups) -> str:
    if any(k.startswith(("transformer.", "base_model.model.")) for k in groups):
        return "diffusers"
    return "comfy" if any(k.startswith("diffusion_model.") for k in groups) else "kohya"


def _module(name: str, g: dict, cfg: dict | None, declared: str | None):
    alpha = float(g.pop("alpha").float().reshape(-1)[0]) if "alpha" in g else None
    lokr, hada = [k for k in g if k.startswith("lokr_")], [k for k in g if k.startswith("hada_")]
    if lokr or hada:
        kind = "lokr" if lokr else "loha"
        if lokr and hada or set(g) - set(lokr) - set(hada):
            raise UserError(f"module {name!r} mixes {sorted(g)}: one module is one adapter type; the file is damaged")
        if "lokr_t2" in g or "hada_t1" in g or "hada_t2" in g:
            raise UserError(f"{_NAMES[kind]} module {name!r} has Tucker (conv) factors; Flux linears take none -- "
                            f"the file is for a convolutional model")
        for i in (1, 2):
            need = [f"hada_w{i}_a", f"hada_w{i}_b"] if kind == "loha" else \
                [f"lokr_w{i}"] if f"lokr_w{i}" in g else [f"lokr_w{i}_a", f"lokr_w{i}_b"]
            missing = [k for k in need if k not in g]
            if missing:
                want = " + ".join(need) if kind == "loha" else f"lokr_w{i} or lokr_w{i}_a + lokr_w{i}_b"
                raise UserError(f"{_NAMES[kind]} module {name!r} has no {missing[0]} (it needs {want}): the file is "
                                f"incomplete -- re-export it from the tool that trained it")
        return LycoModule(kind, g, alpha)
    if "down" not in g or "up" not in g:
        raise UserError(f"DoRA module {name!r} has {sorted(g)} but needs lora_down/lora_A and lora_up/lora_B: the "
                        f"file is incomplete -- re-export it")
    down, up = g["down"], g["up"]
    if alpha is None:
        alpha = float(down.shape[0]) if cfg is None else config_alpha({**cfg, "use_dora": False}, name,
                                                                        down.shape[0])
    if "dora_scale" in g:
        axis = D.axis_from_file(name, g["dora_scale"], up.shape[0], down.shape[1], declared)
        return D.DoraModule(down, up, alpha, g["dora_scale"].reshape(-1), axis)
    if "lora_magnitude_vector" in g:
        return D.DoraModule(down, up, alpha, g["lora_magnitude_vector"].reshape(-1), "out")
    return LoraModule(down, up, alpha)


# ------------------------------------------------------------------------------------------------- writing
def to_state_dict(lw: AdapterWeights, layout: str, metadata: Mapping[str, str] | None = None):
    """(state dict, string metadata) of LoKr / LoHa / DoRA modules in ``layout`` (see the module docstring)."""
    meta = {str(k): str(v) for k, v in {**lw.metadata, **(metadata or {})}.items() if k != ADAPTER_METADATA_KEY}
    meta.update({"format": "pt", TYPE_KEY: lw.adapter})
    meta.pop(D.AXIS_KEY, None)  # said afresh below, from the modules written
    axes = {m.axis for m in lw.values() if isinstance(m, D.DoraModule)}
    if layout == "diffusers":
        return _diffusers(lw, meta), meta
    if layout not in ("kohya", "comfy"):
        raise UserError(f"cannot write the {layout!r} layout; choose kohya, comfy or diffusers")
    ps = P.pieces(lw.family or "flux1", *P.counts(lw))
    whole = {d: b for b, d in P.whole(ps).items()}
    sd = {}
    for name, m in lw.items():
        if P.is_bfl(name, ps) or name in whole:
            bfl = name if P.is_bfl(name, ps) else whole[name]
            key = "lora_unet_" + bfl.replace(".", "_") if layout == "kohya" else "diffusion_model." + bfl
        else:
            key = "lora_transformer_" + name.replace(".", "_")
        sd.update({f"{key}.{k}": v for k, v in _tensors(name, m).items()})
    if axes:
        meta[D.AXIS_KEY] = "in" if axes == {"in"} else "out"  # ComfyUI's names: per input column / output row
    return sd, meta


def _tensors(name: str, m) -> dict[str, torch.Tensor]:
    if isinstance(m, LycoModule):
        out = dict(m.t)
    else:
        out = {"lora_down.weight": m.down, "lora_up.weight": m.up}
        if isinstance(m, D.DoraModule):
            out["dora_scale"] = D.to_comfy(m, name)
    if getattr(m, "alpha", None) is not None:
        out["alpha"] = torch.tensor(float(m.alpha))
    return out


def _diffusers(lw: AdapterWeights, meta: dict) -> dict[str, torch.Tensor]:
    bad = next((n for n in lw if P.is_bfl(n, P.pieces(lw.family or "flux1", *P.counts(lw)))), None)
    if bad:
        raise UserError(f"module {bad!r} patches a fused BFL weight, which diffusers has no linear for: write the "
                        f"kohya or comfy layout")
    kind = lw.adapter
    if kind == "dora" and all(isinstance(m, D.DoraModule) and m.axis == "out" for m in lw.values()):
        sd = {}
        for n, m in lw.items():
            sd.update({f"transformer.{n}.lora_A.weight": m.down, f"transformer.{n}.lora_B.weight": m.up,
                       f"transformer.{n}.lora_magnitude_vector": m.magnitude})
        cfg = {**peft_config_kwargs(lw), "use_dora": True}
        meta[ADAPTER_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True)
        return sd
    if kind == "lokr" and lw.family == "flux2":
        sd = {}
        for n, m in lw.items():
            t = dict(m.t)
            first = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"  # diffusers' _bake_lokr_alpha_: scale into w1
            t[first] = (t[first].float() * m.scale).to(t[first].dtype)
            sd.update({f"transformer.{n}.{k}": v for k, v in t.items()})
        return sd
    why = {"dora": "its DoRA is not peft's (normalised per input column, or by the base's norms): peft cannot hold "
                   "it", "lokr": "diffusers 0.42 loads LoKr only for FLUX.2",
           "loha": "diffusers 0.42 loads no LoHa"}.get(kind, "it mixes adapter types")
    raise UserError(f"cannot write this {_NAMES.get(kind, kind)} adapter in the diffusers layout ({why}): write the "
                    f"kohya or comfy layout, which ComfyUI and dev2pro read")


# -------------------------------------------------------------------------------------------------- deltas
def deltas(lw: AdapterWeights, naming: str, sizes: tuple, weight: Callable[[str], torch.Tensor],
           shape: Callable[[str], tuple | None], strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Target module (in ``naming``) -> summed fp32 delta of ``lw``'s modules, each placed on its rows.

    ``sizes`` = (n_double, n_single, hidden, mlp_hidden, guidance) of the base; ``weight(name)`` its fp32 weight
    (read only for DoRA), ``shape(name)`` its shape (None: the base has no such weight)."""
    ps = P.pieces(lw.family or "flux1", *sizes)
    total: dict[str, torch.Tensor] = {}
    for name, m in lw.items():
        spots = P.place(name, naming, ps)
        for t, _, _ in spots:
            if shape(t) is None:
                raise UserError(f"module {name!r} has no weight {t!r} in the base: the adapter is for another "
                                f"model (family or size)")
        out, inp = m.shape if isinstance(m, (LycoModule, D.DoraModule)) else (m.up.shape[0], m.down.shape[1])
        rows = sum(rt[1] - rt[0] if rt else shape(t)[0] for t, rt, _ in spots)
        if (rows, inp) != (out, shape(spots[0][0])[1]):
            raise UserError(f"module {name!r} gives a {(out, inp)} delta but the base's weight is "
                            f"{(rows, shape(spots[0][0])[1])}: the adapter is for another model size")

        def base_rows(spots=spots, out=out, inp=inp) -> torch.Tensor:
            w = torch.zeros(out, inp)
            for t, rt, rs in spots:
                w[slice(*rs) if rs else slice(None)] = weight(t)[slice(*rt) if rt else slice(None)]
            return w
        d = module_delta(m, base_rows, strength)
        for t, rt, rs in spots:
            acc = total.setdefault(t, torch.zeros(shape(t)))
            acc[slice(*rt) if rt else slice(None)] += d[slice(*rs) if rs else slice(None)]
    return total
