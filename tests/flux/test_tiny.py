"""The tiny model family: a complete, loadable, deterministic FLUX.1-dev-layout folder built offline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dev2pro.errors import UserError
from dev2pro.flux import tiny
from dev2pro.flux.spec import TINY, param_count
from dev2pro.flux.tiny import write_tiny_model

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
CAPTION = "A bold, outlined sketch of the number 7 in red, inverted painting style"
TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dev_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_has_the_flux_dev_layout(tiny_dev_dir):
    assert {p.name for p in tiny_dev_dir.iterdir()} == {"model_index.json", *COMPONENTS}
    index = json.loads((tiny_dev_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        k: v for k, v in tiny.MODEL_INDEX.items() if not k.startswith("_")}
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert (tiny_dev_dir / TRANSFORMER_FILE).is_file()
    assert (tiny_dev_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    vae = json.loads((tiny_dev_dir / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # the real VAE's spatial factor
    scheduler = json.loads((tiny_dev_dir / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in tiny.FLUX_DEV_SCHEDULER_CONFIG} == tiny.FLUX_DEV_SCHEDULER_CONFIG
    assert scheduler["shift"] == 3.0 and scheduler["use_dynamic_shifting"] is True
    clip = json.loads((tiny_dev_dir / "text_encoder" / "config.json").read_text())
    t5 = json.loads((tiny_dev_dir / "text_encoder_2" / "config.json").read_text())
    assert clip["hidden_size"] == TINY.pooled_dim and t5["d_model"] == TINY.context_dim


def test_dev_pipeline_loads_offline_and_generates(dev_pipe):
    out = dev_pipe("a photo of a red digit seven", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                   output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
    assert out.images.std() > 0  # random weights still produce a non-constant image


def test_encode_prompt_pads_t5_to_512_and_pools_clip(dev_pipe):
    prompt_embeds, pooled, text_ids = dev_pipe.encode_prompt(CAPTION, None)
    assert prompt_embeds.shape == (1, 512, TINY.context_dim)
    assert pooled.shape == (1, TINY.pooled_dim)
    assert text_ids.shape == (512, 3)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()


def test_pro_variant_has_no_guidance_embedding(tiny_dev_dir, tiny_pro_dir):
    from diffusers import FluxPipeline

    for folder, has_guidance in ((tiny_dev_dir, True), (tiny_pro_dir, False)):
        config = json.loads((folder / "transformer" / "config.json").read_text())
        assert config["guidance_embeds"] is has_guidance
        keys = _keys(folder / TRANSFORMER_FILE)
        assert any(k.startswith("time_text_embed.guidance_embedder.") for k in keys) is has_guidance

    pipe = FluxPipeline.from_pretrained(tiny_pro_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a sketch of the digit 3", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_parameter_count_matches_the_spec(dev_pipe, tiny_pro_dir):
    assert sum(p.numel() for p in dev_pipe.transformer.parameters()) == param_count(TINY)
    with safe_open(str(tiny_pro_dir / TRANSFORMER_FILE), framework="pt") as f:
        pro_count = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert pro_count == param_count(TINY.with_(guidance_embeds=False)) < param_count(TINY)


def test_same_seed_is_byte_identical_and_seeds_differ(tiny_dev_dir, tmp_path):
    again = write_tiny_model(tmp_path / "again", variant="dev", seed=0)
    assert _folder_bytes(again) == _folder_bytes(tiny_dev_dir)
    other = write_tiny_model(tmp_path / "other", variant="dev", seed=1)
    assert (other / TRANSFORMER_FILE).read_bytes() != (tiny_dev_dir / TRANSFORMER_FILE).read_bytes()
    assert _folder_bytes(other / "tokenizer") == _folder_bytes(tiny_dev_dir / "tokenizer")  # weights-only seed


def test_tokenizers_are_identical_in_a_fresh_process(tiny_dev_dir, tmp_path):
    # The `tokenizers` trainers assign ids in hash order, which changes per process; ours must not.
    code = ("import sys; from dev2pro.flux.tiny import tiny_tokenizers; c, t = tiny_tokenizers(); "
            "c.save_pretrained(sys.argv[1] + '/tokenizer'); t.save_pretrained(sys.argv[1] + '/tokenizer_2')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    for name in ("tokenizer", "tokenizer_2"):
        assert _folder_bytes(tmp_path / name) == _folder_bytes(tiny_dev_dir / name)


def test_tokenizers_round_trip_pad_and_tolerate_unknown_words(tiny_dev_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_mem, t5_mem = tiny.tiny_tokenizers()
    clip = CLIPTokenizer.from_pretrained(tiny_dev_dir / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_dev_dir / "tokenizer_2")
    assert clip(CAPTION).input_ids == clip_mem(CAPTION).input_ids
    assert t5(CAPTION).input_ids == t5_mem(CAPTION).input_ids
    assert (clip.model_max_length, t5.model_max_length) == (77, 512)

    # Caption words are whole tokens; the sequences carry BOS/EOS like the real ones.
    assert clip.tokenize("a photo of a red digit seven") == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "digit</w>", "seven</w>"]
    assert t5.tokenize("a photo of the digit 7") == ["▁a", "▁photo", "▁of", "▁the", "▁digit", "▁7"]
    ids = clip(CAPTION).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert t5(CAPTION).input_ids[-1] == t5.eos_token_id

    clip_padded = clip(CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    t5_padded = t5(CAPTION, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(clip_padded) == 77 and len(t5_padded) == 512 and t5_padded[-1] == t5.pad_token_id

    weird = "Zebra xylophone ÿ 日本 — quizzical 🙂"
    clip_ids, t5_ids = clip(weird).input_ids, t5(weird).input_ids
    assert all(0 <= i < len(clip) for i in clip_ids) and all(0 <= i < len(t5) for i in t5_ids)
    assert clip.unk_token_id not in clip_ids[1:-1]  # CLIP falls back to bytes, never to unk
    assert t5.unk_token_id in t5_ids  # T5 has no piece for CJK or emoji, like a real SentencePiece without them


def test_refuses_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="overwrite"):
        write_tiny_model(out)
    assert (out / "keep.txt").read_text() == "user data"

    with pytest.raises(UserError, match="keep.txt.*does not write"):  # --overwrite replaces models, not user data
        write_tiny_model(out, variant="pro", overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    write_tiny_model(out, variant="dev")
    write_tiny_model(out, variant="pro", overwrite=True)  # an earlier model folder is replaced
    assert (out / "model_index.json").is_file() and not (out / "transformer" / "config.json").read_text().count(
        '"guidance_embeds": true')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or backup siblings left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_tiny_model(empty) / "model_index.json").is_file()
    with pytest.raises(UserError, match="variant"):
        write_tiny_model(tmp_path / "bad", variant="schnell")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(root, spec, seed):
        (root / "transformer").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_components", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
