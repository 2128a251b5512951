"""Tiny FLUX.2 [klein] model folders: the real diffusers layout, real classes, small widths, built offline.

``write_tiny(folder, variant)`` writes what ``Flux2KleinPipeline.from_pretrained`` loads from
black-forest-labs/FLUX.2-klein-4B (or -base-4B): ``model_index.json`` (with ``is_distilled``: the only place the
Base/distilled difference lives, since the weights have the same architecture), ``transformer/``
(``Flux2Transformer2DModel``: 2 double + 4 single blocks, 4-axis RoPE, no guidance embedding), ``vae/``
(``AutoencoderKLFlux2``: 32 latent channels, 4 levels = /8, and its batch-norm statistics set to non-trivial values so
that code which forgets the latent normalisation fails a test), ``text_encoder/`` (``Qwen3ForCausalLM`` with 36
layers like Qwen3-4B/8B, so hidden states 9/18/27 are intermediate layers as in the real model; width 32 so the
stacked context is 96), ``tokenizer/`` (``Qwen2TokenizerFast``) and ``scheduler/``.

The tokenizer is a byte-level BPE like Qwen's (same normaliser and pre-tokeniser, taken from a default
``Qwen2TokenizerFast``), learnt in memory from the FLUX.1 tiny family's caption corpus by a few lines of
deterministic BPE (the ``tokenizers`` trainers break ties in Rust hash order, so folders would differ between runs),
plus Qwen's special tokens and a chat template that renders exactly what Qwen3's template renders for one user
message with ``enable_thinking=False`` (the only way the pipeline calls it). Same seed -> byte-identical folder.

``write_bfl_transformer`` writes a folder's transformer as a BFL-layout single file (what BFL and ComfyUI ship).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, pre_tokenizers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ...errors import UserError
from ...flux.tiny import learn_bpe, tiny_corpus, write_model_folder
from ...outputs import atomic_path, make_parent
from . import keys
from .spec import TINY_DEV, TINY_KLEIN, VARIANT_METADATA_KEY, Flux2Spec, build_transformer

VARIANTS = ("klein-base", "klein-distilled", "dev")
TEXT_MAX_LENGTH = 512  # Flux2KleinPipeline pads every prompt to this many tokens
MAX_MERGES = 2000  # the tiny Qwen3 tokenizer's merges

MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
# FLUX.2 klein's scheduler_config.json; the pipeline passes its own empirical mu, so dynamic shifting must be on.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
TINY_VAE_CONFIG = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=32,
                       sample_size=64)
# Qwen3-4B's structure (36 layers, GQA, q/k norms, tied embeddings) at width 32.
TINY_QWEN3_CONFIG = dict(num_hidden_layers=36, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=64, max_position_embeddings=2048, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, use_cache=False)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_ADDED = ("<think>", "</think>")  # plain added tokens in Qwen3 (not special: they survive decoding)
# Qwen3's chat template, cut down to what it renders for system/user/assistant text messages.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict, list]:
    reference = Qwen2TokenizerFast().backend_tokenizer  # Qwen's NFC normaliser and regex + byte-level pre-tokeniser
    corpus = tiny_corpus() + ["user assistant system"] * 20  # chat-template words become whole tokens, as in Qwen
    counts = Counter(word for line in corpus for word, _ in
                     reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(line)))
    merges = learn_bpe(counts, MAX_MERGES)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def tiny_tokenizer() -> Qwen2TokenizerFast:
    """A fresh offline Qwen2TokenizerFast: byte-level BPE, Qwen's special tokens, Qwen3-style chat template."""
    vocab, merges = _vocabulary()
    tok = Qwen2TokenizerFast(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False) for t in QWEN_ADDED])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_text_encoder(tok, text_hidden: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=len(tok), hidden_size=text_hidden, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, **TINY_QWEN3_CONFIG)
    return Qwen3ForCausalLM(config)


def tiny_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(**TINY_VAE_CONFIG)
    # Non-trivial latent statistics (a fresh BatchNorm has mean 0, var 1: forgetting them would go unnoticed).
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, n))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, n))
    return vae


def _write_components(root: Path, spec: Flux2Spec, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):  # one seeded stream for every component; the caller's RNG is untouched
        build_transformer(spec, seed=seed).save_pretrained(root / "transformer")
        tiny_vae().save_pretrained(root / "vae")
        if spec.variant == "dev":
            from .tiny_dev import write_dev_text_stack

            index = write_dev_text_stack(root, spec.text_hidden)
        else:
            tok = tiny_tokenizer()
            tiny_text_encoder(tok, spec.text_hidden).save_pretrained(root / "text_encoder")
            tok.save_pretrained(root / "tokenizer")
            index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__,
                     "is_distilled": spec.variant == "klein-distilled"}
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tiny(folder, variant: str = "klein-base", seed: int = 0, spec: Flux2Spec | None = None,
               overwrite: bool = False) -> Path:
    """Write a complete FLUX.2 diffusers folder with tiny random weights; returns its path.

    ``variant`` 'klein-base' | 'klein-distilled' writes a ``Flux2KleinPipeline`` folder (the two differ only in
    ``is_distilled``: same architecture), 'dev' a ``Flux2Pipeline`` folder (guidance embedding, Mistral3 text
    encoder; see ``tiny_dev``). Built in a hidden sibling and renamed into place (no half-written folder).
    """
    out = Path(os.path.abspath(folder))
    if variant not in VARIANTS:
        raise UserError(f"unknown tiny FLUX.2 variant {variant!r}: use one of {', '.join(VARIANTS)}")
    spec = spec or (TINY_DEV if variant == "dev" else TINY_KLEIN)
    return write_model_folder(out, overwrite, [*MODEL_INDEX, "model_index.json"],
                              lambda tmp: _write_components(tmp, spec.with_variant(variant), seed))


def write_bfl_transformer(folder, path, prefix: str = "", variant: str | None = None) -> Path:
    """The transformer of a diffusers folder as one BFL-layout ``.safetensors`` (``prefix`` e.g.
    ``'model.diffusion_model.'`` for ComfyUI's naming), recording the variant in the header metadata."""
    folder = Path(folder)
    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    if variant is None:
        from .spec import variant_from_folder

        variant = variant_from_folder(folder)
    bfl = keys.diffusers_to_bfl(sd, prefix=prefix)
    path = Path(path)
    make_parent(path, "BFL transformer file")
    with atomic_path(path, overwrite=True, what="BFL transformer file") as tmp:
        save_file({k: v.contiguous() for k, v in bfl.items()}, str(tmp),
                  metadata={VARIANT_METADATA_KEY: variant} if variant else None)
    return path
