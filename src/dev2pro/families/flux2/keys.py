"""Key maps between the BFL (also ComfyUI) and diffusers layouts of a FLUX.2 transformer.

The two layouts hold the same numbers. All but two tensors are renames:

    BFL                                      diffusers
    double_blocks.N.img_attn.qkv             transformer_blocks.N.attn.to_q | to_k | to_v         (rows split in 3)
    double_blocks.N.txt_attn.qkv             transformer_blocks.N.attn.add_q_proj | add_k | add_v
    final_layer.adaLN_modulation.1           norm_out.linear          (halves swapped: BFL shift,scale)
    single_blocks.N.linear1                  single_transformer_blocks.N.attn.to_qkv_mlp_proj     (stays fused)
    single_blocks.N.linear2                  single_transformer_blocks.N.attn.to_out              (no ``.0``)
    double_stream_modulation_img.lin         double_stream_modulation_img.linear                  (+ txt, single)
    *.norm.query_norm.scale                  *.attn.norm_q.weight                                 (.scale -> .weight)

There are no biases. The map is the same ``Piece`` table as FLUX.1's (``dev2pro.flux.keys``): "rows [a:b] of BFL
tensor X are rows [c:d] of diffusers tensor Y", so ``plan`` gives, per output key, the input slices that build it and
``assemble`` builds one output tensor at a time from a lazy ``get(key)``: a converter streams, holding one tensor.
Sizes come from the shapes handed in, so tiny models convert like full ones.

diffusers' own converter (``convert_flux2_transformer_checkpoint_to_diffusers``) is BFL -> diffusers only and
raises KeyError on ``model.diffusion_model.``- or ``diffusion_model.``-prefixed keys (its handlers look the prefixed
names up in bare-key tables); ``strip_prefix`` takes ComfyUI's prefixes off first, and ``iter_converted`` streams.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch

from ...errors import CheckpointError
from ...flux.keys import Piece, Rows, assemble, block_counts, qk_norm_renames  # noqa: F401 (assemble: this API)
from ...flux.keys import plan as flux_plan
from .spec import BFL_PREFIXES, DIFFUSERS_PREFIXES, strip_prefix  # noqa: F401 (re-exported)

FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _renames(n_double: int, n_single: int, guidance: bool) -> list[tuple[str, str]]:
    """Module-level (no ``.weight``) one-to-one renames, BFL -> diffusers."""
    r = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        ("single_stream_modulation.lin", "single_stream_modulation.linear"),
        ("final_layer.linear", "proj_out"),
    ]
    if guidance:
        r += [("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
              ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2")]
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        r += [
            (b + "img_attn.proj", d + "attn.to_out.0"),
            (b + "txt_attn.proj", d + "attn.to_add_out"),
            (b + "img_mlp.0", d + "ff.linear_in"),
            (b + "img_mlp.2", d + "ff.linear_out"),
            (b + "txt_mlp.0", d + "ff_context.linear_in"),
            (b + "txt_mlp.2", d + "ff_context.linear_out"),
        ]
    for i in range(n_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        r += [(b + "linear1", d + "to_qkv_mlp_proj"), (b + "linear2", d + "to_out")]
    return r


def module_pieces(n_double: int, n_single: int, hidden: int, guidance: bool) -> list[Piece]:
    """Linear-module pieces (names without ``.weight``): the map LoRA layouts are built on."""
    pieces = [Piece(b, d) for b, d in _renames(n_double, n_single, guidance)]
    h = hidden
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        for src, names in (("img_attn.qkv", ("to_q", "to_k", "to_v")),
                           ("txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            pieces += [Piece(b + src, d + name, (j * h, (j + 1) * h), None) for j, name in enumerate(names)]
    # BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
    pieces += [Piece(FINAL_ADALN[0], FINAL_ADALN[1], (0, h), (h, 2 * h)),
               Piece(FINAL_ADALN[0], FINAL_ADALN[1], (h, 2 * h), (0, h))]
    return pieces


def tensor_pieces(n_double: int, n_single: int, hidden: int, guidance: bool) -> list[Piece]:
    """Every tensor of a FLUX.2 transformer as pieces (weights and norm scales; FLUX.2 has no biases)."""
    out = [Piece(p.bfl + ".weight", p.diffusers + ".weight", p.bfl_rows, p.diffusers_rows)
           for p in module_pieces(n_double, n_single, hidden, guidance)]
    return out + [Piece(b, d) for b, d in qk_norm_renames(n_double, n_single)]


def pieces_for_shapes(shapes: Mapping[str, Sequence[int]], layout: str) -> list[Piece]:
    """The tensor pieces for a checkpoint, sized from its own (unprefixed) shapes."""
    n_double, n_single = block_counts(shapes, layout)
    if layout == "bfl":
        hidden, guidance = int(shapes["img_in.weight"][0]), "guidance_in.in_layer.weight" in shapes
    else:
        hidden = int(shapes["x_embedder.weight"][0])
        guidance = "time_guidance_embed.guidance_embedder.linear_1.weight" in shapes
    return tensor_pieces(n_double, n_single, hidden, guidance)


def plan(shapes: Mapping[str, Sequence[int]], src: str, dst: str) -> dict[str, list[tuple[str, Rows, Rows]]]:
    """For each output key: the (input key, input rows, output rows) that build it; ``src``/``dst`` bfl|diffusers.

    Keys must be unprefixed (``strip_prefix``). Unknown input keys raise CheckpointError: nothing is dropped
    silently (a FLUX.1 key, a bias, a LoRA key all stop the conversion).
    """
    if src not in ("bfl", "diffusers") or dst not in ("bfl", "diffusers"):
        raise ValueError(f"layouts are 'bfl' and 'diffusers', got {src!r} -> {dst!r}")
    if src == dst:
        return {k: [(k, None, None)] for k in shapes}
    out = flux_plan(shapes, src, dst, pieces_for_shapes(shapes, src), title="FLUX.2")
    hidden = int(shapes["img_in.weight" if src == "bfl" else "x_embedder.weight"][0])
    for key, parts in out.items():  # flux_plan sorted fused outputs' parts in output-row order
        if parts[0][2] is not None:  # a fused output (qkv, final adaLN): its parts must cover all of its rows
            need = 2 * hidden if key.startswith(FINAL_ADALN) else 3 * hidden
            if sum(r[1] - r[0] for _, _, r in parts) != need:
                raise CheckpointError(f"fused tensor {key} lacks some of its parts (e.g. to_k without to_q): the "
                                      "checkpoint is incomplete")
    return out


def iter_converted(shapes: Mapping[str, Sequence[int]], get: Callable[[str], torch.Tensor], src: str, dst: str,
                   prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a conversion: yield (output key, tensor) one at a time, reading inputs through ``get(input key)``.

    ``shapes`` may carry any known prefix (``get`` receives the full input key); ``prefix`` is put on the output
    keys. Peak memory is one output tensor plus its inputs, whatever the checkpoint size.
    """
    _, in_prefix = strip_prefix(shapes)
    bare = {k[len(in_prefix):]: v for k, v in shapes.items() if k.startswith(in_prefix)}
    for key, parts in plan(bare, src, dst).items():
        yield prefix + key, assemble(parts, lambda k: get(in_prefix + k))


def convert_state_dict(sd: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Convert a transformer state dict between 'bfl' and 'diffusers' (input prefixes are taken off)."""
    _, prefix = strip_prefix(sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    steps = plan({k: tuple(v.shape) for k, v in sd.items()}, src, dst)
    return {k: assemble(parts, sd.__getitem__) for k, parts in steps.items()}


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(sd, "bfl", "diffusers")


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers -> BFL; ``prefix='model.diffusion_model.'`` gives ComfyUI's all-in-one naming."""
    return {prefix + k: v for k, v in convert_state_dict(sd, "diffusers", "bfl").items()}
