"""Is a LoRA usable? Finite values, and every module's delta the shape a Flux transformer's layer has.

Checked on every load (``formats.lora_from_state_dict``), so `lora info` calls a damaged file invalid and `lora
merge` / `sample` stop with the module's name instead of a RuntimeError deep in a matmul or all-black images.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Mapping

from ..errors import UserError
from ..outputs import NonFiniteError, count_nonfinite

if TYPE_CHECKING:  # formats imports this module to check what it loads
    from .weights import LoraModule

_H, _M = "h", "m"  # symbolic dims: model width, mlp width
_SHAPES = [  # (pattern over diffusers module names, (out, in)); None = any (embedder inputs, final projection out)
    (r"transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)", (_H, _H)),
    (r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.0\.proj", (_M, _H)),
    (r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.2", (_H, _M)),
    (r"transformer_blocks\.\d+\.norm1(_context)?\.linear", ("6h", _H)),
    (r"single_transformer_blocks\.\d+\.attn\.to_[qkv]", (_H, _H)),
    (r"single_transformer_blocks\.\d+\.proj_mlp", (_M, _H)),
    (r"single_transformer_blocks\.\d+\.proj_out", (_H, "h+m")),
    (r"single_transformer_blocks\.\d+\.norm\.linear", ("3h", _H)),
    (r"norm_out\.linear", ("2h", _H)),
    (r"proj_out", (None, _H)),
    (r"(x_embedder|context_embedder|time_text_embed\.\w+\.linear_1)", (_H, None)),
    (r"time_text_embed\.\w+\.linear_2", (_H, _H)),
]


def _dim(sym, h: int, m: int) -> int | None:
    return None if sym is None else {"h": h, "m": m, "6h": 6 * h, "3h": 3 * h, "2h": 2 * h, "h+m": h + m}[sym]


def check_finite(mods: Mapping[str, LoraModule]) -> None:
    """NonFiniteError naming the first module with a NaN/inf value or alpha (any family)."""
    for name, m in mods.items():
        bad = count_nonfinite(m.down) + count_nonfinite(m.up)
        if bad or not math.isfinite(m.alpha):
            what = f"{bad} NaN/inf value(s)" if bad else f"alpha {m.alpha}"
            raise NonFiniteError(f"LoRA module {name!r} holds {what}: the LoRA is broken (saved from a diverged "
                                 f"run?) and would turn every image black; retrain it or use an earlier save.")


def check_lora(mods: Mapping[str, LoraModule], hidden: int | None = None, mlp_hidden: int | None = None) -> None:
    """Refuse a LoRA with NaN/inf values or a module whose delta cannot fit a Flux transformer.

    The widths are the ones most modules agree on (or the given ones), so the odd module out is the one named."""
    check_finite(mods)
    shaped = [(name, dims) for name in mods for pat, dims in _SHAPES if re.fullmatch(pat, name)]
    votes_h = Counter(mods[n].down.shape[1] for n, d in shaped if d[1] == _H)
    votes_h.update(mods[n].up.shape[0] for n, d in shaped if d[0] == _H)
    h = hidden or (votes_h.most_common(1)[0][0] if votes_h else None)
    if h is None:
        return
    votes_m = Counter(mods[n].up.shape[0] for n, d in shaped if d[0] == _M)
    votes_m.update(mods[n].down.shape[1] for n, d in shaped if d[1] == _M)
    votes_m.update(mods[n].down.shape[1] - h for n, d in shaped if d[1] == "h+m")
    m = mlp_hidden or (votes_m.most_common(1)[0][0] if votes_m else 4 * h)
    for name, (out_sym, in_sym) in shaped:
        mod = mods[name]
        want = (_dim(out_sym, h, m), _dim(in_sym, h, m))
        got = (mod.up.shape[0], mod.down.shape[1])
        if any(w is not None and w != g for w, g in zip(want, got)):
            shown = "x".join("*" if w is None else str(w) for w in want)
            raise UserError(f"LoRA module {name!r} gives a {got[0]}x{got[1]} delta, but in a Flux transformer of "
                            f"width {h} (mlp {m}) that layer is {shown}: the file is damaged or mixes models.")
