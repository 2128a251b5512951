"""The tiny FLUX.2 dev text stack: a ``Mistral3ForConditionalGeneration`` and a Mistral-style tokenizer, offline.

FLUX.2 dev encodes prompts with Mistral-Small-3.x (40 layers; hidden states 10/20/30 stacked, 3 x 5120 = 15360) as
a two-message chat: BFL's system message, then the user prompt, no generation prompt, padded to 512 tokens. The
tiny model keeps the 40 layers (so 10/20/30 are intermediate, as in the real one) at width 32 (context 96) and a
one-layer Pixtral vision tower (the class needs one; text-only prompts never run it).

One deviation from black-forest-labs/FLUX.2-dev: its ``tokenizer/`` is a ``PixtralProcessor``, which transformers
refuses to build without torchvision. Text-only ``encode_prompt`` only calls ``apply_chat_template`` on it, which a
plain tokenizer has with the same arguments and result, so the tiny folder's ``tokenizer/`` is that tokenizer
(``PreTrainedTokenizerFast``): a byte-level BPE learnt like klein's, Mistral's control tokens, and a chat template
that renders ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`` as Mistral-Small-3's does for these messages.
Prompt upsampling with images (which needs the processor) is out of scope for the tiny family.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import diffusers
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast, Qwen2TokenizerFast

from ...flux.tiny import learn_bpe, tiny_corpus

MAX_MERGES = 2000  # the tiny Mistral tokenizer's merges (as many as klein's tiny Qwen3)
MODEL_INDEX = {
    "_class_name": "Flux2Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],  # the real repo: PixtralProcessor (needs torchvision)
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
# Mistral's control tokens come first in its vocabulary (tekken: ids 0..999).
CONTROL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
           "[/SYSTEM_PROMPT]", "<pad>")
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Mistral-Small-3.x's structure (40 layers, GQA, no sliding window) at width 32; a minimal Pixtral tower.
TINY_MISTRAL_TEXT = dict(model_type="mistral", intermediate_size=64, num_hidden_layers=40, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, rope_theta=1e9,
                         sliding_window=None, use_cache=False)
TINY_PIXTRAL = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, head_dim=8, patch_size=14, image_size=56)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict, list]:
    reference = Qwen2TokenizerFast().backend_tokenizer  # a tiktoken-style regex + byte-level split, like tekken's
    corpus = tiny_corpus() + [SYSTEM_MESSAGE] * 5  # every dev prompt carries BFL's system message
    counts = Counter(word for line in corpus for word, _ in reference.pre_tokenizer.pre_tokenize_str(line))
    merges = learn_bpe(counts, MAX_MERGES)
    tokens = list(CONTROL) + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    vocab, merges = _vocabulary()
    backend = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
    reference = Qwen2TokenizerFast().backend_tokenizer
    backend.pre_tokenizer = reference.pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in CONTROL])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=131072)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_mistral3(tok, text_hidden: int) -> Mistral3ForConditionalGeneration:
    config = Mistral3Config(
        text_config=dict(TINY_MISTRAL_TEXT, hidden_size=text_hidden, vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=TINY_PIXTRAL, image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config)


def write_dev_text_stack(root: Path, text_hidden: int) -> dict:
    """Write ``text_encoder/`` and ``tokenizer/`` (call inside the caller's seeded RNG); returns the model index."""
    tok = tiny_mistral_tokenizer()
    tiny_mistral3(tok, text_hidden).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
