"""The tiny model family: a complete FLUX.1-dev-layout model folder small enough for tests and CPU demos.

Every recipe loads a base with ``FluxPipeline.from_pretrained``, so a useful test model is not a bare transformer
but the whole folder, laid out exactly like the FLUX.1-dev diffusers repo: ``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``.
Each component is the real class with real code paths (T5 relative attention, CLIP pooling at the EOS token, a
4-level VAE with Flux's 16 latent channels, scaling/shift and /8 spatial factor, dev's dynamic-shift scheduler);
only the widths are small. ``variant='dev'`` keeps the guidance embedding, ``'pro'`` drops it.

Nothing is downloaded: the tokenizer vocabularies are learnt in memory from a small built-in English corpus of
prompt-like captions (a byte-level BPE with ``</w>`` word ends for CLIP, a word-frequency Unigram for T5) and handed
to transformers' ``CLIPTokenizer`` / ``T5TokenizerFast``. They are learnt by a few lines of code here rather than by
the ``tokenizers`` trainers, whose token ids and tie-breaks follow Rust hash order and so change from one process to
the next; here the same seed gives byte-identical folders. Weights are random.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from dev2pro.errors import UserError
from dev2pro.flux.spec import T5_MAX_LENGTH_DEV, TINY, FluxSpec, build_transformer
from dev2pro.outputs import atomic_path, make_parent

CLIP_MAX_LENGTH = 77
VARIANTS = ("dev", "pro")

# Component classes exactly as black-forest-labs/FLUX.1-dev's model_index.json names them.
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# FLUX.1-dev's scheduler_config.json: mu linear in image tokens from (256, 0.5) to (4096, 1.15).
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
# Flux's VAE shape (16 latent channels, 4 levels => /8, no quant convs, scaling/shift) with tiny widths.
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, act_fn="silu", sample_size=64,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    force_upcast=True, mid_block_add_attention=True,
)
# Text encoders: widths come from the spec (CLIP hidden = pooled_dim, T5 d_model = context_dim), plus these.
TINY_CLIP_CONFIG = dict(num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                        hidden_act="quick_gelu")
TINY_T5_CONFIG = dict(num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",  # T5 v1.1, as Flux's T5-XXL
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
CLIP_MAX_MERGES = 2000

_DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
_COLOURS = "red green blue yellow orange purple pink black white gray grey brown gold silver cyan".split()
_MEDIA = ("photo", "sketch", "painting", "drawing", "illustration", "watercolor", "render", "pencil drawing",
          "ink drawing", "oil painting", "pixel art image", "close-up photo", "portrait")
_MODIFIERS = ("inverted", "outlined", "bold", "thin", "thick", "small", "large", "bright", "dark", "blurry",
              "sharp", "detailed", "simple", "handwritten", "high quality", "soft", "glowing", "old")
_NOUNS = ("digit", "number", "cat", "dog", "person", "man", "woman", "face", "house", "tree", "car", "city street",
          "mountain", "flower", "forest", "river", "beach", "room", "table", "book", "bird", "horse", "landscape",
          "sky", "sun", "letter", "shape", "circle", "square", "line")
_TEMPLATES = (
    "a {medium} of a {mod} {colour} {noun}",
    "A {medium} of the {noun} {digit}, {mod} style.",
    "the number {num} in {colour} on a {colour2} background",
    "{mod} {colour} digit {digit} with a {mod2} outline, {medium} style",
    "an {mod} {medium} of {digit} {noun}s in the {noun2}, trending art",
    "Photo of a {noun} and a {noun2} at night; {colour} light, {mod} shadows!",
)
_EXTRA_WORDS = ("with and on at by for from over under near behind front top bottom left right center centered "
                "white background foreground text logo icon symbol character picture image artwork styled view "
                "is are this that it its very two-tone minimal clean noisy texture pattern color colour colours")


def tiny_corpus() -> list[str]:
    """Prompt-like English captions (deterministic, no RNG) that the tiny tokenizers are trained on."""
    lists = dict(medium=_MEDIA, mod=_MODIFIERS, mod2=_MODIFIERS, colour=_COLOURS, colour2=_COLOURS, noun=_NOUNS,
                 noun2=_NOUNS, digit=_DIGIT_WORDS, num=[str(d) for d in range(10)])
    strides = dict(medium=1, mod=3, mod2=5, colour=7, colour2=11, noun=13, noun2=17, digit=19, num=23)
    lines = []
    for i in range(600):
        words = {k: v[(i * strides[k] + i // len(v)) % len(v)] for k, v in lists.items()}
        lines.append(_TEMPLATES[i % len(_TEMPLATES)].format(**words))
    lines += [" ".join(_DIGIT_WORDS), " ".join(str(d) for d in range(10)), " ".join(_COLOURS), _EXTRA_WORDS]
    # Each word once more with punctuation and as a plural, the forms captions use.
    words = sorted({w.strip(",.;!") for line in lines for w in line.split()} - {""})
    return lines + [f"{w}, {w}. {w}s" for w in words]


def learn_bpe(word_counts: dict[str, int], max_merges: int, word_end: str = "") -> list[tuple[str, str]]:
    """BPE merges learnt from word counts, for the tiny tokenizers: ``word_end="</w>"`` marks word ends as CLIP
    does; without it, plain byte-level BPE (Qwen's, Mistral's). Ties break on the pair itself: deterministic."""
    words = [(list(w[:-1]) + [w[-1] + word_end], n) for w, n in sorted(word_counts.items())]
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((a, b))
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == a and symbols[i + 1] == b:
                    symbols[i:i + 2] = [a + b]
                i += 1
    return merges


@functools.lru_cache(maxsize=1)
def _vocabularies() -> tuple[dict, list, list]:
    """(CLIP BPE vocab, CLIP merges, T5 Unigram pieces with log-prob scores), learnt once per process."""
    corpus = tiny_corpus()
    reference = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and byte-level pre-tokeniser
    clip_words = Counter(word for line in corpus for word, _ in
                         reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(line)))
    merges = learn_bpe(clip_words, CLIP_MAX_MERGES, word_end="</w>")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # like CLIP: every byte, bare and as a word end
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}

    # T5: whole words ("▁" marks a word start) and punctuation scored by log frequency, characters as fallback.
    t5_counts = Counter(("▁" if i == 0 else "") + piece for line in corpus for word in line.split()
                        for i, piece in enumerate(re.findall(r"\w+|[^\w\s]", word)))
    total = sum(t5_counts.values())
    scores = {piece: round(math.log(n / total), 4) for piece, n in t5_counts.items()}
    floor = min(scores.values()) - 2.0
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation + "àâäçéèêëîïñôöùûüß":
        scores.setdefault(char, floor)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return vocab, merges, pieces


def tiny_tokenizers():
    """Fresh (CLIPTokenizer with max length 77, T5TokenizerFast with max length 512), built offline."""
    vocab, merges, scores = _vocabularies()
    clip = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    t5 = T5TokenizerFast(vocab=list(scores), extra_ids=0, model_max_length=T5_MAX_LENGTH_DEV)
    return clip, t5


def _write_components(root: Path, spec: FluxSpec, seed: int) -> None:
    clip_tok, t5_tok = tiny_tokenizers()
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=spec.pooled_dim, intermediate_size=2 * spec.pooled_dim,
        projection_dim=spec.pooled_dim, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id, **TINY_CLIP_CONFIG)
    t5_config = T5Config(
        vocab_size=len(t5_tok), d_model=spec.context_dim, d_kv=spec.context_dim // TINY_T5_CONFIG["num_heads"],
        d_ff=2 * spec.context_dim, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id, is_encoder_decoder=False, use_cache=False, **TINY_T5_CONFIG)
    with torch.random.fork_rng(devices=[]):  # one seeded stream for every component; the caller's RNG is untouched
        build_transformer(spec, seed=seed).save_pretrained(root / "transformer")
        AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(root / "vae")
        CLIPTextModel(clip_config).save_pretrained(root / "text_encoder")
        T5EncoderModel(t5_config).save_pretrained(root / "text_encoder_2")
    clip_tok.save_pretrained(root / "tokenizer")
    t5_tok.save_pretrained(root / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tiny_model(out_dir, variant: str = "dev", seed: int = 0, spec: FluxSpec = TINY,
                     overwrite: bool = False) -> Path:
    """Write a complete FLUX.1-dev-layout model folder with tiny random weights; returns its path.

    ``variant`` 'dev' has the guidance embedding, 'pro' has none (it overrides ``spec.guidance_embeds``). The folder
    is built in a hidden sibling and renamed into place, so a crash never leaves a half-written model behind.
    """
    out = Path(os.path.abspath(out_dir))  # "." and "x/" have a usable name
    if variant not in VARIANTS:
        raise UserError(f"unknown tiny model variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return write_model_folder(out, overwrite, [*MODEL_INDEX, "model_index.json"],
                              lambda tmp: _write_components(tmp, spec.with_(guidance_embeds=variant == "dev"), seed))


def write_model_folder(out: Path, overwrite: bool, owned: list[str], write) -> Path:
    """Build a model folder with ``write(tmp)`` in a hidden sibling and rename it to ``out``: a crash never leaves a
    half-written model. ``out`` may be missing or empty; a non-empty one is replaced only with ``overwrite`` and only
    when it holds no more than an earlier model folder (the ``owned`` top-level names), never emptied otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose another output folder")
    empty = out.is_dir() and not any(out.iterdir())
    if out.is_dir() and not empty and not overwrite:
        raise UserError(f"{out} already exists and is not empty: pass overwrite=True (--overwrite) to replace it "
                        "or choose a new output folder")
    make_parent(out, "tiny model folder")
    with atomic_path(out, overwrite=True, what="tiny model folder", folder=True,
                     owned=owned if not empty else None) as tmp:
        tmp.mkdir()
        write(tmp)
    return out
