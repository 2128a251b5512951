"""Tiny random-weight captioners: a complete local model folder per family, built offline for tests and demos.

``dev2pro caption --model DIR`` loads a captioner from a folder laid out exactly like its Hub repo (``config.json``
with the family's ``model_type``, ``model.safetensors``, the tokenizer files, ``processor_config.json`` /
``preprocessor_config.json``, a generation config and, for Qwen, the chat template). The folders written here are
that layout with the real transformers classes (Florence-2's DaViT + BART, Qwen2.5-VL's windowed ViT + Qwen2
decoder with M-RoPE, Qwen3-VL's ViT with DeepStack + Qwen3 decoder, BLIP's ViT + BERT decoder), only tiny and with
random weights, so every code path of captioning runs on a CPU in seconds while the captions are nonsense.

Nothing is downloaded: the vocabularies are built here from the tiny Flux family's caption corpus
(:func:`dev2pro.flux.tiny.tiny_corpus`). Byte-level BPE (BART, Qwen2) gets every byte plus each corpus word as
a chain of left-to-right merges -- no learning, so the same seed gives the same folder in any process; BERT
WordPiece gets each word, each letter and each ``##letter``.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import (BartTokenizer, BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor,
                          Florence2Config, Florence2ForConditionalGeneration, Florence2Processor, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

from .errors import UserError
from .flux.tiny import tiny_corpus
from .owned import owned_folder

TINY_FAMILIES = ("florence2", "qwen2_5_vl", "qwen3_vl", "blip")

# The Qwen2-VL / Qwen2.5-VL Instruct chat template, as shipped in their repos' chat_template.json.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# How the Qwen3-VL Instruct template renders a plain conversation: no default system turn (Qwen2/2.5-VL add one),
# images as <|vision_start|><|image_pad|><|vision_end|>. Its tool-calling and thinking branches are left out.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['content'] is "
    "string %}{{- message['content'] }}{%- else %}{%- for content in message['content'] %}{%- if content['type'] == "
    "'image' or 'image' in content or 'image_url' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def _corpus_words() -> tuple[str, ...]:
    return tuple(sorted({w for line in tiny_corpus() for w in line.lower().replace(",", " , ").replace(".", " . ")
                         .split()}))


def _byte_level_bpe(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE: specials first, every byte, then each corpus word as a merge chain."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    space = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(" ")[0][0]  # "Ġ"
    tokens = list(dict.fromkeys(specials + alphabet))
    seen, merges = set(tokens), []
    for word in _corpus_words():
        for form in (word, space + word):
            for i in range(2, len(form) + 1):
                if form[:i] not in seen:
                    seen.add(form[:i])
                    tokens.append(form[:i])
                    merges.append((form[:i - 1], form[i - 1]))
    return {t: i for i, t in enumerate(tokens)}, merges


def _image_processor(name: str):
    """The PIL-backed image processor class: ``NamePil`` where transformers has both backends (torchvision is
    optional and must match the torch build), else ``Name``. The saved config names ``Name`` either way."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _padded_vocab(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _florence2(seed: int):
    vocab, merges = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    vocab["<mask>"] = len(vocab)
    vocab["<image>"] = len(vocab)
    tok = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"},
                        model_max_length=1024)
    side = 32  # DaViT stage stride 4 -> an 8x8 grid, plus one pooled token
    image_proc = _image_processor("CLIPImageProcessor")(
        size={"height": side, "width": side}, crop_size={"height": side, "width": side}, do_center_crop=False,
        image_seq_length=(side // 4) ** 2 + 1)
    processor = Florence2Processor(image_processor=image_proc, tokenizer=tok)
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=_padded_vocab(len(tok)), d_model=32, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=256, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[32], num_heads=[2], num_groups=[2], window_size=4, drop_path_rate=0.0,
                           projection_dim=32, max_position_embeddings=16),
        image_token_id=tok.image_token_id, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        decoder_start_token_id=2)
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config), processor


_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer(chat_template: str):
    """A Qwen2 byte-level BPE tokenizer with the Qwen-VL special tokens after the vocabulary, as in the real one."""
    vocab, merges = _byte_level_bpe([])
    for special in _QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=_QWEN_SPECIALS[1:], model_max_length=4096)
    tok.chat_template = chat_template
    ids = {s: tok.convert_tokens_to_ids(s) for s in _QWEN_SPECIALS}
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text_ids = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"])
    return tok, token_ids, text_ids


def _qwen_text(vocab_size: int, text_ids: dict, **extra) -> dict:
    """A 2-layer, 32-wide decoder with M-RoPE (head dim 8: sections 2+1+1 for time, height, width)."""
    return dict(vocab_size=_padded_vocab(vocab_size), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **text_ids, **extra)


def _qwen2_5_vl(seed: int):
    tok, token_ids, text_ids = _qwen_tokenizer(QWEN_VL_CHAT_TEMPLATE)
    # Patch 14 merged 2x2, as the real model; images are resized to about 56x56 px (aspect kept, sides multiples
    # of 28), i.e. 4-6 image tokens, so images of different shapes give prompts of different lengths.
    image_proc = _image_processor("Qwen2VLImageProcessor")(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(len(tok), text_ids, max_window_layers=2, rope_parameters={
            "rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=True, **token_ids)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), (tok, image_proc)


def _qwen3_vl(seed: int):
    tok, token_ids, text_ids = _qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE)
    # Patch 16 merged 2x2 (Qwen3-VL's), interleaved M-RoPE, and DeepStack features injected from vision block 1.
    image_proc = _image_processor("Qwen2VLImageProcessor")(
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64})
    config = Qwen3VLConfig(
        text_config=_qwen_text(len(tok), text_ids, head_dim=8, rope_parameters={
            "rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[1]),
        tie_word_embeddings=True, **token_ids)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config), (tok, image_proc)


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """BERT-style vocab: specials, then each corpus word, each character and each ``##character``."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = list(dict.fromkeys(specials + list(_corpus_words()) + chars + [f"##{c}" for c in chars]))
    return {t: i for i, t in enumerate(tokens)}


def _blip(seed: int):
    # BLIP's tokenizer is bert-base-uncased plus a [DEC] token that starts every caption.
    vocab = _wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]", do_lower_case=True, model_max_length=512)
    image_proc = _image_processor("BlipImageProcessor")(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_proc, tokenizer=tok)
    config = BlipConfig(
        text_config=dict(vocab_size=_padded_vocab(len(tok)), hidden_size=32, encoder_hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"],
                         sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config), processor


def _rescale_weights(model, seed: int, gain: float = 2.0) -> None:
    """Re-draw every matrix with std ``gain / sqrt(fan_in)``.

    The configs' 0.02 init suits 1000-wide layers; in 32-wide ones it shrinks the signal at every layer, so a tiny
    model gives every image the same caption (or stops at once). Scaling by fan-in keeps activations O(1), so the
    captions depend on the image -- which the batching and per-image tests need to mean anything.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (gain / fan_in ** 0.5))


_BUILDERS = {"florence2": _florence2, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "blip": _blip}


def write_tiny_captioner(out_dir: str | Path, family: str, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random-weight captioner folder of ``family`` (atomically); returns its path."""
    if family not in _BUILDERS:
        raise UserError(f"unknown captioner family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    model, parts = _BUILDERS[family](seed)
    _rescale_weights(model, seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with owned_folder(out, overwrite, "init-tiny-captioner", None, what="tiny captioner folder") as tmp:
        model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        for part in parts if isinstance(parts, tuple) else (parts,):
            part.save_pretrained(tmp)
    return out
