"""Tiny FLUX.2 [klein] folders: the real layout, loadable offline by Flux2KleinPipeline, deterministic."""

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dev2pro.errors import UserError
from dev2pro.families.flux2 import spec as s
from dev2pro.families.flux2 import tiny
from dev2pro.flux.tiny import tiny_corpus

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"


def _folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("variant", ["klein-base", "klein-distilled"])
def test_layout_and_variant_record(variant, klein_base_dir, klein_distilled_dir):
    folder = klein_base_dir if variant == "klein-base" else klein_distilled_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] == (variant == "klein-distilled")
    assert all((folder / c).is_dir() for c in COMPONENTS)
    assert s.variant_from_folder(folder) == variant
    assert s.spec_from_folder(folder) == s.spec_from_folder(folder / "transformer", variant) == \
        s.TINY_KLEIN.with_variant(variant)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert s.spec_from_diffusers_config(config, variant=variant) == s.TINY_KLEIN.with_variant(variant)
    with safe_open(str(folder / TRANSFORMER_FILE), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert s.detect(shapes, variant=variant) == s.TINY_KLEIN.with_variant(variant)
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert te["num_hidden_layers"] > max(s.TINY_KLEIN.text_layers)  # layer 27 is intermediate, as in Qwen3-4B
    assert te["hidden_size"] * 3 == s.TINY_KLEIN.context_dim


def test_tokenizer_survives_save_and_load(klein_base_dir):
    fresh, loaded = tiny.tiny_tokenizer(), AutoTokenizer.from_pretrained(klein_base_dir / "tokenizer")
    assert type(loaded).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast") and len(loaded) == len(fresh)
    for line in tiny_corpus()[::37] + ["Ünïcode ☃ and 12345 & <|im_end|>"]:
        assert loaded(line).input_ids == fresh(line).input_ids
    message = [{"role": "user", "content": "a red cat"}]
    chat = loaded.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert chat == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert loaded.convert_ids_to_tokens(loaded(chat).input_ids)[:3] == ["<|im_start|>", "user", "Ċ"]
    assert loaded.pad_token == "<|endoftext|>" and loaded.eos_token == "<|im_end|>"
    assert loaded.decode(loaded("a red cat").input_ids) == "a red cat"


def test_same_seed_same_bytes(tmp_path, klein_base_dir):
    again = tiny.write_tiny(tmp_path / "again", variant="klein-base", seed=0)
    assert _folder_bytes(again) == _folder_bytes(klein_base_dir)
    with pytest.raises(UserError, match="not empty"):
        tiny.write_tiny(again)
    with pytest.raises(UserError, match="variant"):
        tiny.write_tiny(tmp_path / "x", variant="schnell")


@pytest.mark.parametrize("variant, calls", [("klein-base", 4), ("klein-distilled", 2)])
def test_pipeline_renders_offline(variant, calls, klein_base_dir, klein_distilled_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = klein_base_dir if variant == "klein-base" else klein_distilled_dir
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.is_distilled == (variant == "klein-distilled")
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["guidance"]),
                                           with_kwargs=True)
    image = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(seen) == calls and all(g is None for g in seen)  # Base: true CFG (2 forwards), distilled: 1


def test_bfl_single_file(tmp_path, klein_distilled_dir):
    path = tiny.write_bfl_transformer(klein_distilled_dir, tmp_path / "flux-2-klein-tiny.safetensors")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        variant = s.variant_from_metadata(f.metadata())
    assert variant == "klein-distilled" and "single_blocks.0.linear1.weight" in shapes
    assert s.detect(shapes, variant=variant) == s.TINY_KLEIN
    # diffusers' own conversion of our BFL file gives back the folder's weights exactly
    folder_sd = load_file(str(klein_distilled_dir / TRANSFORMER_FILE))
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(path)))
    assert set(theirs) == set(folder_sd) and all(torch.equal(theirs[k], folder_sd[k]) for k in folder_sd)
    # and its single-file loader reads it offline when given the klein config (it calls every FLUX.2 file dev)
    model = Flux2Transformer2DModel.from_single_file(str(path), config=str(klein_distilled_dir),
                                                     subfolder="transformer", local_files_only=True)
    assert all(torch.equal(model.state_dict()[k], folder_sd[k]) for k in folder_sd)
    comfy = tiny.write_bfl_transformer(klein_distilled_dir, tmp_path / "comfy.safetensors",
                                       prefix="model.diffusion_model.")
    with safe_open(str(comfy), framework="pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())


def test_dev_folder_renders_with_embedded_guidance(tmp_path, flux2_dev_dir):
    from diffusers import Flux2Pipeline

    index = json.loads((flux2_dev_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline" and "is_distilled" not in index
    assert s.variant_from_folder(flux2_dev_dir) == "dev"
    pipe = Flux2Pipeline.from_pretrained(flux2_dev_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.text_config.num_hidden_layers > 30
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["guidance"]),
                                           with_kwargs=True)
    image = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(seen) == 2 and all(float(g) == 3.5 for g in seen)  # one forward per step, guidance embedded
    path = tiny.write_bfl_transformer(flux2_dev_dir, tmp_path / "flux2-dev-tiny.safetensors")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert s.variant_from_metadata(f.metadata()) == "dev"
    assert "guidance_in.in_layer.weight" in shapes and s.detect(shapes) == s.TINY_DEV
