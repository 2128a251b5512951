"""The ``Family`` record each model family fills in (see the ``families`` package docstring), and ``lazy``:
family entries that point at diffusers-heavy code without importing it. No family module is imported here, so
each family imports this module and the registry (``families/__init__``) imports the families, one way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). Callables take unprefixed keys / shapes."""

    name: str  # config value, e.g. "flux1"
    title: str  # for messages, e.g. "FLUX.1"
    claims: Callable[[Iterable[str]], bool]  # these keys carry this family's own markers
    tensor_pieces: Callable[[Shapes, str], list]  # (shapes, layout) -> every tensor as flux.keys.Piece
    plan: Callable[[Shapes, str, str], dict]  # (shapes, src, dst) -> flux.keys.plan of these pieces (+ checks)
    spec_from_shapes: Callable[[Shapes, str, Sequence[int] | None], object]  # (shapes, layout, axes_dim) -> spec
    spec_from_config: Callable[[Mapping], object]  # diffusers transformer config.json -> spec
    build_transformer: Callable[..., object]  # (spec, device="cpu", dtype=None, seed=None) -> diffusers model
    transformer_class: str  # the diffusers class name (config.json "_class_name")
    blocks: Callable[[object], list]  # model -> repeated blocks in execution order (double, then single)
    model_inputs: Callable[..., dict]  # see flux1.model_inputs: the transformer's keyword arguments
    references: bool = False  # model_inputs takes ``reference`` tokens (edit pairs: FLUX.2's reference images)
    pipelines: tuple = ()  # the diffusers pipeline classes of its model folders (model_index.json "_class_name")
    # (spec, file path, header metadata) -> spec: what the keys cannot tell (FLUX.2 klein: Base or distilled)
    refine_spec: Callable[[object, object, Mapping[str, str]], object] = lambda spec, path, metadata: spec
    describe_variant: Callable[[object], str] = lambda spec: ""  # one line for `inspect`: what it is, how to sample
    modelspec: Callable[[object], dict] = lambda spec: {}  # the ``modelspec.*`` header metadata of an export
    # data: text stack and VAE of a model folder (see flux1 for the reference implementations)
    load_text: Callable[..., object] = None  # (model_dir, device, dtype) -> text-only pipeline (+ .scheduler)
    text_encoder: Callable[..., Callable] = None  # (pipe, device, max_length) -> captions -> {name: (B, ...)}
    text_settings: Callable[..., dict] = None  # (pipe, max_length) -> what besides the files keys the text cache
    embeds_of: Callable[[Mapping], tuple] = None  # one cached record -> (prompt_embeds (1, L, D), pooled or None)
    check_text: Callable[[object, object], None] = lambda pipe, spec: None  # UserError: text stack != transformer
    check_folder: Callable[[object, object], None] = lambda folder, spec: None  # UserError: no text stack for spec
    load_vae: Callable[..., object] = None  # (model_dir, device, dtype) -> VAE
    encode_images: Callable[..., object] = None  # (vae, pixels in [-1, 1]) -> stored latents (B, C, H/8, W/8)
    lora_targets: Callable[..., list] = None  # (preset, n_double, n_single, extras, double, single, guidance)
    # memory plan: hidden-wide vectors per token a (double, single) block keeps for backward without checkpointing,
    # LoRA on every Linear, by LoRA compute mode ("compute": bf16 LoRA, "fp32"); measured: see ``activations``
    activation_units: Mapping[str, tuple[float, float]] = None
    # sampling: (components {vae, scheduler}, transformer, distilled=False) -> diffusers pipeline; and
    # render(pipe, embeds, seeds, guidance, *, negative, steps, width, height) -> PIL images (``sampling.render``)
    build_pipeline: Callable[..., object] = None
    render: Callable[..., list] = None
    render_latents: Callable[..., object] = None  # aligned (embeds[i], seeds[i]) -> final latents (N, C, H/8, W/8)

    def __str__(self) -> str:
        return self.title


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported at the first call: family entries point at diffusers-heavy code (pipelines, text
    encoders, VAEs) that ``inspect`` / ``convert`` / the CLI's ``--help`` must not pay for at import time."""
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call


def each_prompt_and_seed(transformer, embeds: Sequence, seeds: Sequence[int], draw: Callable) -> list:
    """The loop of every family's ``render``: ``draw(embed_pair, generator)`` -> one PIL image for each (prompt
    embedding, seed), prompt-major, with the transformer in eval mode (its mode restored after) and the noise drawn
    from a seeded CPU generator, so a seed gives the same image on any device."""
    import torch

    was_training = transformer.training
    transformer.eval()
    try:
        return [draw(pair, torch.Generator("cpu").manual_seed(int(seed))) for pair in embeds for seed in seeds]
    finally:
        transformer.train(was_training)
