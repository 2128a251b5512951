"""Which rows of which weight an adapter module patches, in BFL and diffusers naming, for FLUX.1 and FLUX.2.

A LoRA splits exactly along the rows of a fused BFL weight (``formats`` does it); a Kronecker product, a Hadamard
product or a DoRA normalisation does not. So LoKr / LoHa / DoRA modules keep the naming they were trained or read
in: a diffusers module (``transformer_blocks.0.attn.to_q``: a slice of BFL's fused ``img_attn.qkv``) or a BFL module
(``double_blocks.0.img_attn.qkv``: three diffusers linears). The two namings never share a name, so a module name
says which it is. Merging or applying places each module's dense delta: ``place`` says which target rows take which
delta rows. ComfyUI does the same on load (a diffusers-named key patches a slice of the fused BFL weight).
"""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import UserError
from ..flux.keys import Piece, module_pieces

FAMILIES = ("flux1", "flux2")
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks|single_blocks|double_blocks)[._](\d+)[._]")


def counts(names: Iterable[str]) -> tuple[int, int]:
    """(double, single) block counts that hold every block index in ``names`` (any naming, dots or underscores)."""
    n = [0, 0]
    for name in names:
        m = _BLOCK.search(name)
        if m:
            j = int(m.group(1).startswith("single"))
            n[j] = max(n[j], int(m.group(2)) + 1)
    return n[0], n[1]


def pieces(family: str, n_double: int, n_single: int, hidden: int = 1, mlp_hidden: int = 1,
           guidance: bool = True) -> list[Piece]:
    """Every LoRA-targetable linear of a ``family`` transformer as BFL/diffusers pieces (rows given the sizes)."""
    if family == "flux1":
        return module_pieces(n_double, n_single, hidden, mlp_hidden, guidance)
    from ..families.flux2.lora_keys import ADALN, module_map

    out, h = [], hidden
    for bfl, names in module_map(n_double, n_single, guidance).items():
        if len(names) > 1:  # fused qkv, rows q|k|v
            out += [Piece(bfl, d, (j * h, (j + 1) * h), None) for j, d in enumerate(names)]
        elif bfl == ADALN:  # BFL shift|scale = diffusers scale|shift
            out += [Piece(bfl, names[0], (0, h), (h, 2 * h)), Piece(bfl, names[0], (h, 2 * h), (0, h))]
        else:
            out.append(Piece(bfl, names[0]))
    return out


def whole(ps: list[Piece]) -> dict[str, str]:
    """BFL name -> diffusers name for modules that are one and the same linear in both namings."""
    by_bfl: dict[str, list[Piece]] = {}
    for p in ps:
        by_bfl.setdefault(p.bfl, []).append(p)
    return {b: v[0].diffusers for b, v in by_bfl.items() if len(v) == 1 and v[0].bfl_rows is None}


def decode(mods: Iterable[str], want: str | None) -> tuple[str, dict[str, str]]:
    """(family, raw module name -> canonical name) for a file's module names.

    Raw names come as stored: ``lora_unet_<BFL path, _>``, ``lora_transformer_`` / ``lycoris_<diffusers path, _>``,
    or dotted with ``diffusion_model.`` / ``transformer.`` / ``base_model.model.`` / no prefix. Canonical names are
    diffusers paths, except BFL modules that are not one diffusers linear (fused qkv, FLUX.1's linear1, the final
    adaLN), which keep their BFL path. The family is the one whose names hold them all (``want``, else FLUX.1,
    when both do)."""
    mods = list(mods)
    nd, ns = counts(mods)
    fits = {}
    for fam in FAMILIES:
        ps = pieces(fam, nd, ns)
        bfl, dif = {p.bfl for p in ps}, {p.diffusers for p in ps}
        under = {"bfl": {b.replace(".", "_"): b for b in bfl}, "diffusers": {d.replace(".", "_"): d for d in dif}}
        one = whole(ps)
        table, bad = {}, None
        for raw in mods:
            name = _dotted(raw, under, bfl | dif)
            if name is None:
                bad = raw
                break
            table[raw] = one.get(name, name)
        if bad is None:
            fits[fam] = table
        elif fam == "flux1":
            first_bad = bad
    if not fits:
        raise UserError(f"module {first_bad!r} is not a linear layer of a FLUX.1 or FLUX.2 transformer: the adapter "
                        f"is for another model family")
    fam = want if want in fits else next(iter(fits))
    return fam, fits[fam]


def _dotted(raw: str, under: dict[str, dict[str, str]], dotted: set[str]) -> str | None:
    for prefix, naming in (("lora_unet_", "bfl"), ("lora_transformer_", "diffusers"), ("lycoris_", "diffusers")):
        if raw.startswith(prefix):
            return under[naming].get(raw[len(prefix):])
    name = re.sub(r"^(diffusion_model|transformer|base_model\.model)\.", "", raw)
    return name if name in dotted else None


def is_bfl(name: str, ps: list[Piece]) -> bool:
    return name in {p.bfl for p in ps} and name not in {p.diffusers for p in ps}


def place(name: str, naming: str, ps: list[Piece]) -> list[tuple[str, tuple | None, tuple | None]]:
    """[(target module in ``naming``, target rows or None = all, delta rows or None = all)] for module ``name``."""
    src_bfl = is_bfl(name, ps)
    if (naming == "bfl") == src_bfl:
        return [(name, None, None)]
    if src_bfl:  # a fused BFL module into diffusers linears
        return [(p.diffusers, p.diffusers_rows, p.bfl_rows) for p in ps if p.bfl == name]
    mine = [p for p in ps if p.diffusers == name]
    if not mine:
        raise UserError(f"module {name!r} is not a linear layer of this model")
    if len(mine) == 1 and mine[0].bfl_rows is None:
        return [(mine[0].bfl, None, None)]
    return [(p.bfl, p.bfl_rows, p.diffusers_rows) for p in mine]
