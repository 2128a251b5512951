"""Key maps between the BFL (also ComfyUI) and diffusers layouts of a Flux transformer.

Both layouts hold the same numbers; they differ in names and in how some linears are fused:

    BFL                                   diffusers
    double_blocks.N.img_attn.qkv          transformer_blocks.N.attn.to_q | to_k | to_v        (rows split in 3)
    double_blocks.N.txt_attn.qkv          transformer_blocks.N.attn.add_q_proj | add_k | add_v
    single_blocks.N.linear1               single_transformer_blocks.N.attn.to_q|k|v | proj_mlp (h, h, h, mlp)
    final_layer.adaLN_modulation.1        norm_out.linear                                      (halves swapped:
                                                                                               BFL shift,scale)
Everything else is a rename. So one table of ``Piece``s -- "rows [a:b] of BFL tensor X are rows [c:d] of diffusers
tensor Y" -- describes the whole mapping, both directions, for weights, biases and (restricted to ``.weight``)
LoRA modules. All sizes come from the tensor shapes handed in, never from FLUX.1's constants (diffusers' own
converter hard-codes hidden 3072 and cannot read smaller models; it also has no diffusers -> BFL direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import CheckpointError
from .kinds import guess_family

Rows = tuple[int, int] | None  # a row range on dim 0, None = the whole tensor

# Known key prefixes in the wild, longest first. ComfyUI saves "model.diffusion_model.", ComfyUI LoRA-ish and
# some merges "diffusion_model.", diffusers single files sometimes "transformer.".
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("transformer.",)


@dataclass(frozen=True)
class Piece:
    """Rows ``bfl_rows`` of BFL tensor ``bfl`` are rows ``diffusers_rows`` of diffusers tensor ``diffusers``."""

    bfl: str
    diffusers: str
    bfl_rows: Rows = None
    diffusers_rows: Rows = None


def _renames(n_double: int, n_single: int, guidance: bool) -> list[tuple[str, str]]:
    """Module-level (no .weight/.bias) one-to-one renames, BFL -> diffusers."""
    r = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
    ]
    if guidance:
        r += [
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ]
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        r += [
            (b + "img_mod.lin", d + "norm1.linear"),
            (b + "txt_mod.lin", d + "norm1_context.linear"),
            (b + "img_attn.proj", d + "attn.to_out.0"),
            (b + "txt_attn.proj", d + "attn.to_add_out"),
            (b + "img_mlp.0", d + "ff.net.0.proj"),
            (b + "img_mlp.2", d + "ff.net.2"),
            (b + "txt_mlp.0", d + "ff_context.net.0.proj"),
            (b + "txt_mlp.2", d + "ff_context.net.2"),
        ]
    for i in range(n_single):
        r += [
            (f"single_blocks.{i}.modulation.lin", f"single_transformer_blocks.{i}.norm.linear"),
            (f"single_blocks.{i}.linear2", f"single_transformer_blocks.{i}.proj_out"),
        ]
    return r


def qk_norm_renames(n_double: int, n_single: int) -> list[tuple[str, str]]:
    """QK RMSNorm scales: BFL ``.scale`` <-> diffusers ``.weight`` (full tensor names; FLUX.1 and FLUX.2 alike)."""
    r = []
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        r += [
            (b + "img_attn.norm.query_norm.scale", d + "norm_q.weight"),
            (b + "img_attn.norm.key_norm.scale", d + "norm_k.weight"),
            (b + "txt_attn.norm.query_norm.scale", d + "norm_added_q.weight"),
            (b + "txt_attn.norm.key_norm.scale", d + "norm_added_k.weight"),
        ]
    for i in range(n_single):
        b, d = f"single_blocks.{i}.norm.", f"single_transformer_blocks.{i}.attn."
        r += [(b + "query_norm.scale", d + "norm_q.weight"), (b + "key_norm.scale", d + "norm_k.weight")]
    return r


def _split(bfl: str, targets: Sequence[str], sizes: Sequence[int]) -> list[Piece]:
    out, start = [], 0
    for name, size in zip(targets, sizes):
        out.append(Piece(bfl, name, (start, start + size), None))
        start += size
    return out


def module_pieces(n_double: int, n_single: int, hidden: int, mlp_hidden: int, guidance: bool) -> list[Piece]:
    """Linear-module pieces (names without ``.weight``/``.bias``): the map LoRA layouts are built on."""
    pieces = [Piece(b, d) for b, d in _renames(n_double, n_single, guidance)]
    h = hidden
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        pieces += _split(b + "img_attn.qkv", [d + "to_q", d + "to_k", d + "to_v"], [h, h, h])
        pieces += _split(b + "txt_attn.qkv", [d + "add_q_proj", d + "add_k_proj", d + "add_v_proj"], [h, h, h])
    for i in range(n_single):
        d = f"single_transformer_blocks.{i}."
        pieces += _split(f"single_blocks.{i}.linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v",
                                                         d + "proj_mlp"], [h, h, h, mlp_hidden])
    # BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
    pieces += [Piece("final_layer.adaLN_modulation.1", "norm_out.linear", (0, h), (h, 2 * h)),
               Piece("final_layer.adaLN_modulation.1", "norm_out.linear", (h, 2 * h), (0, h))]
    return pieces


def tensor_pieces(n_double: int, n_single: int, hidden: int, mlp_hidden: int, guidance: bool) -> list[Piece]:
    """Every tensor of a Flux transformer as pieces (weights, biases, norm scales)."""
    out = []
    for p in module_pieces(n_double, n_single, hidden, mlp_hidden, guidance):
        for suffix in (".weight", ".bias"):
            out.append(Piece(p.bfl + suffix, p.diffusers + suffix, p.bfl_rows, p.diffusers_rows))
    out += [Piece(b, d) for b, d in qk_norm_renames(n_double, n_single)]
    return out


# --------------------------------------------------------------------------------------------- layout sniffing
def strip_prefix(keys: Iterable[str]) -> tuple[str, str]:
    """Return (layout, prefix) for a Flux transformer's keys: layout 'bfl' or 'diffusers'."""
    keys = list(keys)
    for layout, prefixes, probe in (("bfl", BFL_PREFIXES + ("",), "img_in.weight"),
                                    ("diffusers", DIFFUSERS_PREFIXES + ("",), "x_embedder.weight")):
        for prefix in prefixes:
            if prefix + probe in keys:
                return layout, prefix
    raise CheckpointError(_not_flux_message(keys))


def _not_flux_message(keys: Sequence[str]) -> str:
    family = guess_family(keys)
    hint = f" It looks like {family}." if family else ""
    sample = ", ".join(sorted(keys)[:3])
    return (f"not a Flux transformer checkpoint: neither 'img_in.weight' (BFL/ComfyUI layout) nor 'x_embedder.weight'"
            f" (diffusers layout) is present.{hint} First keys: {sample}. Pass a FLUX.1 or FLUX.2 transformer file"
            f" or a diffusers model folder.")


def block_counts(keys: Iterable[str], layout: str) -> tuple[int, int]:
    """(double, single) block counts from unprefixed keys."""
    d_pre, s_pre = ("double_blocks.", "single_blocks.") if layout == "bfl" else \
        ("transformer_blocks.", "single_transformer_blocks.")
    dbl, sgl = set(), set()
    for k in keys:
        if k.startswith(d_pre):
            dbl.add(int(k[len(d_pre):].split(".", 1)[0]))
        elif k.startswith(s_pre):
            sgl.add(int(k[len(s_pre):].split(".", 1)[0]))
    return (max(dbl) + 1 if dbl else 0), (max(sgl) + 1 if sgl else 0)


def pieces_for_shapes(shapes: Mapping[str, Sequence[int]], layout: str) -> list[Piece]:
    """The tensor pieces for a checkpoint, sized from its own shapes (unprefixed keys)."""
    n_double, n_single = block_counts(shapes, layout)
    if layout == "bfl":
        hidden = int(shapes["img_in.weight"][0])
        guidance = "guidance_in.in_layer.weight" in shapes
        if n_single:
            mlp = int(shapes["single_blocks.0.linear1.weight"][0]) - 3 * hidden
        else:
            mlp = int(shapes["double_blocks.0.img_mlp.0.weight"][0]) if n_double else 4 * hidden
    else:
        hidden = int(shapes["x_embedder.weight"][0])
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in shapes
        key = "single_transformer_blocks.0.proj_mlp.weight"
        mlp = int(shapes[key][0]) if key in shapes else 4 * hidden
    return tensor_pieces(n_double, n_single, hidden, mlp, guidance)


# ------------------------------------------------------------------------------------------------ conversion
def plan(shapes: Mapping[str, Sequence[int]], src: str, dst: str, pieces: Sequence[Piece] | None = None,
         title: str = "Flux") -> dict[str, list[tuple[str, Rows, Rows]]]:
    """For each output key: the (input key, input rows, output rows) that build it. ``src``/``dst`` in bfl|diffusers.

    Keys must be unprefixed. Unknown input keys raise CheckpointError (nothing is silently dropped). ``pieces``:
    the family's table for these shapes (``families.Family.tensor_pieces``); FLUX.1's when not given.
    """
    if src == dst:
        return {k: [(k, None, None)] for k in shapes}
    pieces = pieces_for_shapes(shapes, src) if pieces is None else pieces
    out: dict[str, list[tuple[str, Rows, Rows]]] = {}
    used = set()
    for p in pieces:
        s_key, s_rows, d_key, d_rows = (p.bfl, p.bfl_rows, p.diffusers, p.diffusers_rows) if src == "bfl" else \
            (p.diffusers, p.diffusers_rows, p.bfl, p.bfl_rows)
        if s_key not in shapes:
            continue
        used.add(s_key)
        out.setdefault(d_key, []).append((s_key, s_rows, d_rows))
    unknown = sorted(set(shapes) - used)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not part of a {title} transformer in the {src} layout, e.g. "
                              f"{unknown[:5]}. Is this a different model family or a partial/merged file?")
    # Output tensors built from several pieces are assembled in output-row order.
    for k, parts in out.items():
        if len(parts) > 1:
            parts.sort(key=lambda t: (t[2] or (0, 0))[0])
    return out


def assemble(parts: Sequence[tuple[str, Rows, Rows]], get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Build one output tensor from its pieces; ``get(key)`` loads an input tensor."""
    chunks = []
    for key, s_rows, _ in parts:
        t = get(key)
        chunks.append(t if s_rows is None else t[s_rows[0]:s_rows[1]])
    if len(chunks) == 1 and parts[0][2] is None:
        return chunks[0]
    if any(c.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for c in chunks):
        # torch.cat has no fp8 kernel on every backend: concatenate the raw bytes instead (exact).
        return torch.cat([c.view(torch.uint8) for c in chunks]).view(chunks[0].dtype)
    return torch.cat(chunks)


def convert_state_dict(sd: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Convert an unprefixed transformer state dict between 'bfl' and 'diffusers' layouts."""
    steps = plan({k: tuple(v.shape) for k, v in sd.items()}, src, dst)
    return {k: assemble(parts, sd.__getitem__) for k, parts in steps.items()}


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(sd, "bfl", "diffusers")


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(sd, "diffusers", "bfl")
