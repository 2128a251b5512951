"""FLUX.2 as a ``families.Family``: its key tables, sizes and transformer inputs for the family-agnostic code.

The transformer reads packed tokens (FLUX.1's ``pack`` of our stored latents, see ``latents``), the stacked text
hidden states, sigmas, 4-axis position ids for both (t, h, w, layer) and -- FLUX.2 dev only -- a guidance value.
There is no pooled text vector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ...lora.targets import TargetTables, target_modules
from ..family import Family, lazy
from . import keys as keymod
from . import spec as specmod
from .text import wants_mistral

_MARKERS = ("single_stream_modulation.", "double_stream_modulation_img.", "double_stream_modulation_txt.")


def claims(keys: Iterable[str]) -> bool:
    """FLUX.2's own keys: the three modulations shared by all blocks."""
    return any(k.startswith(_MARKERS) for k in keys)


def spec_from_shapes(shapes: Mapping[str, Sequence[int]], layout: str, axes_dim: Sequence[int] | None = None):
    return specmod.detect(shapes, axes_dim=axes_dim)


def refine_spec(spec, path: Path, metadata: Mapping[str, str]):
    """What the keys cannot tell -- klein Base or distilled -- from the file's metadata or its model folder."""
    if not spec.is_klein or spec.variant != specmod.KLEIN_UNKNOWN:
        return spec
    variant = specmod.variant_from_metadata(metadata)
    folders = [path, path.parent] + ([path.parent.parent] if path.parent.name == "transformer" else [])
    for folder in folders:  # a model folder, its transformer/ subfolder, or a weights file inside that
        if variant is None and (folder / "model_index.json").is_file():
            variant = specmod.variant_from_folder(folder)
    return spec.with_variant(variant) if variant else spec


def blocks(model) -> list:
    """Double blocks, then single blocks (diffusers' execution order)."""
    model = getattr(model, "module", model)
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def model_inputs(x_t: torch.Tensor, sigmas: torch.Tensor, text: Mapping[str, torch.Tensor], h: int, w: int,
                 guidance: torch.Tensor | None, device, dtype, reference: torch.Tensor | None = None,
                 reference_hw: tuple[int, int] | None = None) -> dict:
    """Keyword arguments of ``Flux2Transformer2DModel.forward`` for packed tokens ``x_t`` (B, T, 128) of a stored
    latent (h, w) (``latents``), sigmas (B,), stacked text ``prompt_embeds`` (B, L, D); ``guidance`` (B,) or None.
    ``reference`` (B, n*T', 128): clean tokens of n reference images of latent size ``reference_hw`` (default
    (h, w); smaller above 1 MP, ``buckets.reference_size``), appended after ``x_t`` at time coordinates 10, 20, ...
    as ``Flux2Pipeline`` appends its ``image`` list (the output's first T tokens are the prediction)."""
    from .latents import REFERENCE_T, image_ids

    pe = text["prompt_embeds"]
    b, n = pe.shape[0], pe.shape[1]
    txt_ids = torch.zeros(b, n, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(n)  # (t, h, w, l) = (0, 0, 0, i): Flux2KleinPipeline._prepare_text_ids
    tokens, ids = x_t, image_ids(h, w, x_t.shape[0], device=device)
    if reference is not None:
        rh, rw = reference_hw or (h, w)
        n, rest = divmod(reference.shape[1], (rh // 2) * (rw // 2))
        if rest:
            raise ValueError(f"{reference.shape[1]} reference tokens are no whole number of {rh}x{rw}-latent "
                             "images: give reference_hw, the references' latent size")
        tokens = torch.cat([x_t, reference.to(x_t.device, x_t.dtype)], dim=1)
        ids = torch.cat([ids] + [image_ids(rh, rw, x_t.shape[0], device=device, t=REFERENCE_T * (i + 1))
                                 for i in range(n)], dim=1)
    return dict(hidden_states=tokens.to(device, dtype), encoder_hidden_states=pe.to(device, dtype),
                timestep=sigmas.to(device, dtype), guidance=guidance, txt_ids=txt_ids.to(device), img_ids=ids)


def describe_variant(spec) -> str:
    size = spec.size_name
    if spec.variant == "dev":
        return f"FLUX.2 dev ({size}): guidance-distilled (guidance_in present), sample with embedded guidance ~4"
    if spec.variant == "klein-base" and wants_mistral(spec):
        return ("FLUX.2 dev architecture without guidance embedding (undistilled or de-distilled; Mistral3 text): "
                "sample with true CFG ~4, ~50 steps")
    if spec.variant == "klein-base":
        return f"FLUX.2 klein Base ({size}): undistilled, for LoRA training; sample with true CFG ~4, ~50 steps"
    if spec.variant == "klein-distilled":
        return f"FLUX.2 klein distilled ({size}): step-distilled, sample with 4 steps and no CFG"
    return (f"FLUX.2 klein ({size}): Base and distilled share their keys and this file does not say which it is; "
            f"sampled as Base until it does: model_index.json's is_distilled (a diffusers folder), or record it "
            f"once with `dev2pro convert FILE OUT --variant klein-base|klein-distilled`")


def modelspec(spec) -> dict:
    meta = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "flux-2-dev" if spec.variant == "dev" else f"flux-2-{spec.size_name}",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2"}
    if spec.variant in specmod.VARIANTS:
        meta[specmod.VARIANT_METADATA_KEY] = spec.variant
    return meta


# LoRA presets on FLUX.2's modules. Single blocks fuse q, k, v and the MLP input in one linear (to_qkv_mlp_proj, BFL
# linear1) -- as musubi-tuner and ai-toolkit train it -- so "attention" takes it whole; to_out (linear2) mixes the
# attention and MLP outputs and comes with all_linear. The modulations are shared by all blocks (top level).
TABLES = TargetTables(
    double_attn=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out"),
    double_mlp=("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"),
    single_attn=("attn.to_qkv_mlp_proj",),
    single_mlp=("attn.to_out",),
    double_modulation=(), single_modulation=(),
    top_modulation=("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                    "single_stream_modulation.linear", "norm_out.linear"),
    embedders=("x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
               "time_guidance_embed.timestep_embedder.linear_2"),
    guidance_embedders=("time_guidance_embed.guidance_embedder.linear_1",
                        "time_guidance_embed.guidance_embedder.linear_2"),
)


def lora_targets(*args, **kwargs) -> list[str]:
    return target_modules(*args, **kwargs, tables=TABLES)


def _embeds_of(record: Mapping) -> tuple:
    """A cached record (bf16 on disk) -> (prompt_embeds (1, L, D) fp32, None): FLUX.2 has no pooled vector."""
    return record["prompt_embeds"][None].float(), None


_TEXT, _LATENTS, _SAMPLING = (f"{__package__}.{m}" for m in ("text", "latents", "sampling"))  # imported on use

FAMILY = Family(
    name="flux2", title="FLUX.2",
    claims=claims,
    tensor_pieces=lambda shapes, layout: keymod.pieces_for_shapes(shapes, layout),
    plan=keymod.plan,
    spec_from_shapes=spec_from_shapes,
    spec_from_config=specmod.spec_from_diffusers_config,
    build_transformer=specmod.build_transformer,
    transformer_class="Flux2Transformer2DModel", pipelines=("Flux2KleinPipeline", "Flux2Pipeline"),
    blocks=blocks,
    model_inputs=model_inputs, references=True,
    refine_spec=refine_spec,
    describe_variant=describe_variant,
    modelspec=modelspec,
    check_text=lazy(_TEXT, "check_pairing"), check_folder=lazy(_TEXT, "check_folder"),
    load_text=lazy(_TEXT, "load_text_encoder"),
    text_encoder=lazy(_TEXT, "text_encoder"), text_settings=lazy(_TEXT, "cache_settings"), embeds_of=_embeds_of,
    load_vae=lazy(_LATENTS, "load_vae"), encode_images=lazy(_LATENTS, "encode_images"), lora_targets=lora_targets,
    activation_units={"compute": (21.0, 21.0), "fp32": (32.0, 26.0)},
    build_pipeline=lazy(_SAMPLING, "build_pipeline"), render=lazy(_SAMPLING, "render"),
    render_latents=lazy(_SAMPLING, "render_latents"),
)
