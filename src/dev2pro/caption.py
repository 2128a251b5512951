"""Caption images with a vision-language model loaded from a local folder (Florence-2, Qwen-VL, BLIP).

Every family is the transformers class for it (``AutoModelForImageTextToText`` picks it from ``config.json``'s
``model_type``); what differs is how each one is asked for a caption, and that is the real prompt format of each:

- **Florence-2** (``florence2``, the transformers-native ``florence-community/*`` checkpoints): a task token such
  as ``<DETAILED_CAPTION>`` or ``<MORE_DETAILED_CAPTION>``, which its processor turns into the task's sentence;
  the decoder's output is the caption.
- **Qwen-VL** (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): the chat template with one user turn holding the image
  and the instruction; the image placeholder is expanded to one token per merged 2x2 patch group, and the new
  tokens after the assistant prompt are the caption. This is done here from the tokenizer and the image processor
  rather than by transformers' Qwen-VL processor, because that processor refuses to be built without torchvision
  (for its video half, which captioning never uses) and torchvision must match the installed torch build exactly.
- **BLIP** (``blip``): an optional text prefix (``"a picture of"``) that the caption continues; the prefix is part
  of the decoded caption, as BLIP returns it.

Decoding is greedy (no sampling, one beam) so a folder captions the same way every run and in any batch size.
Only safetensors weights are loaded, and nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from .errors import UserError

FAMILY_OF_MODEL_TYPE = {"florence2": "florence2", "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen",
                        "blip": "blip"}
DEFAULT_PROMPTS = {
    "florence2": "<DETAILED_CAPTION>",
    "qwen": "Describe this image in one detailed paragraph for a text-to-image training caption: the subject, "
            "its appearance, the setting, the lighting and the style. Answer with the description only.",
    "blip": "a picture of",
}
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class Captioner:
    """A loaded captioning model and what turns images + an instruction into its inputs."""

    family: str  # "florence2" | "qwen" | "blip"
    model: Any
    processor: Any  # Florence-2 / BLIP: the transformers processor; Qwen: the tokenizer
    image_processor: Any  # Qwen only (the others' processor holds theirs)
    device: torch.device
    dtype: torch.dtype


def detect_family(model_dir: str | Path) -> str:
    """The captioner family of a model folder, from its ``config.json`` ``model_type``."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"captioning model folder {root} does not exist; pass --model a local model folder "
                        "(e.g. one written by `dev2pro init-tiny-captioner`, or a downloaded Florence-2/Qwen-VL/BLIP)")
    config = root / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except FileNotFoundError:
        raise UserError(f"{config} is missing: {root} is not a transformers model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config} is not valid JSON ({e}); re-download or rebuild the model folder") from None
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise UserError(f"{config}: model_type {model_type!r} is not a supported captioner; supported: "
                        f"{', '.join(FAMILY_OF_MODEL_TYPE)} (Florence-2 needs the transformers-native "
                        "florence-community checkpoints)")
    return FAMILY_OF_MODEL_TYPE[model_type]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def load_captioner(model_dir: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> Captioner:
    """Load a captioner from a local folder (offline, safetensors only); bf16 on CUDA, fp32 on CPU by default."""
    family = detect_family(model_dir)
    root = Path(model_dir).expanduser()
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if not any(root.glob("*.safetensors")):
        raise UserError(f"no .safetensors weights in {root}; only safetensors are loaded (convert the checkpoint)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(root, dtype=dtype, local_files_only=True,
                                                            use_safetensors=True)
        if family == "qwen":
            processor = AutoTokenizer.from_pretrained(root, local_files_only=True)
            processor.chat_template = processor.chat_template or _chat_template_file(root)
            image_processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
        else:
            processor, image_processor = AutoProcessor.from_pretrained(root, local_files_only=True), None
    except OSError as e:  # transformers reports missing/unreadable files as OSError
        raise UserError(f"cannot load the captioner in {root}: {e}") from None
    return Captioner(family, model.to(dev).eval(), processor, image_processor, dev, dtype)


def _chat_template_file(root: Path) -> str:
    """The chat template shipped beside a Qwen-VL model (``chat_template.json`` / ``.jinja``)."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text())["chat_template"]
    raise UserError(f"{root} has no chat template (tokenizer_config.json, chat_template.json or .jinja); "
                    "copy the one from the model's original repository")


def caption_images(captioner: Captioner, images: list, prompt: str | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 1) -> list[str]:
    """One caption per PIL image, in order, ``batch_size`` images per ``generate`` call (greedy decoding)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError(f"max length and batch size must be >= 1, got {max_new_tokens} and {batch_size}")
    prompt = DEFAULT_PROMPTS[captioner.family] if prompt is None else prompt
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = [im.convert("RGB") for im in images[start:start + batch_size]]
        inputs, prompt_len = _inputs(captioner, batch, prompt)
        # a text decoder with learned positions (BLIP: 512) crashes past its last one: stop there instead
        limit = getattr(getattr(captioner.model.config, "text_config", None), "max_position_embeddings", None)
        ids = inputs.get("input_ids")
        new_tokens = max_new_tokens if not limit or ids is None else \
            max(1, min(max_new_tokens, limit - ids.shape[1]))
        with torch.inference_mode():
            out = captioner.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        tokenizer = getattr(captioner.processor, "tokenizer", captioner.processor)
        texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        captions += [_one_line(t) for t in texts]
    return captions


def _one_line(text: str) -> str:
    """A caption file is one line: whitespace runs collapse; control characters and the U+FFFD left by a
    multi-byte character cut at the token limit are dropped."""
    text = "".join(ch for ch in text if ch != "\ufffd" and (ch.isprintable() or ch.isspace()))
    return " ".join(text.split())


def _inputs(captioner: Captioner, images: list, prompt: str) -> tuple[dict, int]:
    """(generate() inputs on the model's device, how many leading output tokens are the prompt)."""
    family, processor = captioner.family, captioner.processor
    if family == "qwen":
        inputs = _qwen_inputs(processor, captioner.image_processor, images, prompt)
        prompt_len = inputs["input_ids"].shape[1]  # decoder-only: the output repeats the prompt
    else:
        text = [prompt] * len(images) if prompt or family == "florence2" else None
        try:
            inputs = processor(images=images, text=text, padding=True, return_tensors="pt")
        except ValueError as e:  # Florence-2: a task token with extra text, and similar prompt mistakes
            raise UserError(f"prompt {prompt!r} is not valid for this {family} model: {e}") from None
        prompt_len = 0  # Florence-2 decodes from its own start token; BLIP keeps its prefix as part of the caption
    return {k: (v.to(captioner.device, captioner.dtype) if v.is_floating_point() else v.to(captioner.device))
            for k, v in inputs.items()}, prompt_len


def _qwen_inputs(tokenizer, image_processor, images: list, prompt: str) -> dict:
    """Chat-template text with each image placeholder expanded to its patch-group count, left-padded, + pixels."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = "<|image_pad|>"
    if text.count(image_token) != 1:
        raise UserError(f"the model's chat template does not place one {image_token} per image; is it a Qwen-VL "
                        "Instruct model folder?")
    pixels = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size ** 2
    texts = [text.replace(image_token, image_token * (int(thw.prod()) // merge)) for thw in pixels["image_grid_thw"]]
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {**encoded, **pixels}
