"""FLUX.2 klein text encoding equals the pipeline's own encode_prompt, and what __call__ feeds the transformer."""

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline

from dev2pro.errors import UserError
from dev2pro.families.flux2 import text
from dev2pro.families.flux2.spec import TINY_DEV, TINY_KLEIN

PROMPTS = ["a red cat", "Photo of a dog and a tree at night; blue light, soft shadows!"]


@pytest.fixture(scope="module")
def full_pipe(klein_base_dir):
    pipe = Flux2KleinPipeline.from_pretrained(klein_base_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_pipe(klein_base_dir):
    return text.load_text_encoder(klein_base_dir)


def test_equals_the_pipelines_encode_prompt(full_pipe, text_pipe):
    assert text_pipe.transformer is None and text_pipe.vae is None
    ref_embeds, ref_ids = full_pipe.encode_prompt(prompt=PROMPTS)
    embeds, ids = text.encode(text_pipe, PROMPTS)
    assert embeds.dtype == torch.float32 and embeds.shape == (2, text.MAX_LENGTH, 96)
    assert torch.equal(embeds, ref_embeds) and torch.equal(ids, ref_ids)
    assert torch.equal(text.text_ids(embeds), ref_ids)
    # each prompt alone gives the same rows as in the batch (padding to 512 makes them independent)
    alone, _ = text.encode(text_pipe, PROMPTS[1:])
    torch.testing.assert_close(alone[0], embeds[1], rtol=1e-5, atol=1e-6)


def test_stack_is_hidden_states_9_18_27(text_pipe):
    embeds, _ = text.encode(text_pipe, PROMPTS[:1])
    tok, te = text_pipe.tokenizer, text_pipe.text_encoder
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    inputs = tok(chat, return_tensors="pt", padding="max_length", truncation=True, max_length=text.MAX_LENGTH)
    with torch.no_grad():
        hidden = te(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    width = te.config.hidden_size
    for i, layer in enumerate(text.LAYERS):
        assert torch.equal(embeds[0, :, i * width:(i + 1) * width], hidden[layer][0])


def test_cache_record_and_empty_prompt(full_pipe, text_pipe):
    record = text.text_encoder(text_pipe, "cpu")(PROMPTS)
    embeds, _ = text.encode(text_pipe, PROMPTS)
    assert set(record) == {"prompt_embeds"} and record["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(record["prompt_embeds"], embeds.to(torch.bfloat16))
    empty, empty_ids = text.empty_prompt(text_pipe)
    ref, _ = full_pipe.encode_prompt(prompt="")
    assert torch.equal(empty, ref) and empty.shape == (1, text.MAX_LENGTH, 96)
    # the Base pipeline's true-CFG negative is exactly this embedding
    seen = []
    full_pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    full_pipe(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=1, guidance_scale=4.0,
              generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(seen) == 2 and torch.equal(seen[0], embeds[:1]) and torch.equal(seen[1], empty)
    assert text.cache_settings(text_pipe)["layers"] == [9, 18, 27]


def test_refuses_a_folder_without_text_encoder(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        text.load_text_encoder(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="text_encoder"):
        text.load_text_encoder(tmp_path)


def test_dev_text_stack_equals_flux2pipeline(flux2_dev_dir, text_pipe):
    from diffusers import Flux2Pipeline

    full = Flux2Pipeline.from_pretrained(flux2_dev_dir, local_files_only=True)
    dev = text.load_text_encoder(flux2_dev_dir)
    assert type(dev).__name__ == "Flux2Pipeline" and text.default_layers(dev) == (10, 20, 30)
    ref, ref_ids = full.encode_prompt(prompt=PROMPTS)
    embeds, ids = text.encode(dev, PROMPTS)
    assert torch.equal(embeds, ref) and torch.equal(ids, ref_ids) and embeds.shape == (2, 512, 96)
    text.check_pairing(dev, TINY_DEV)
    text.check_pairing(text_pipe, TINY_KLEIN)
    with pytest.raises(UserError, match="klein \\(Qwen3\\) text encoder .* cannot feed a FLUX.2 dev transformer"):
        text.check_pairing(text_pipe, TINY_DEV)
    with pytest.raises(UserError, match="dev \\(Mistral3\\) text encoder .* cannot feed a FLUX.2 klein"):
        text.check_pairing(dev, TINY_KLEIN)


def test_pairing_by_published_context_width_not_the_guidance_embedding(tmp_path):
    """A full-size FLUX.2 dev de-distilled *without* its guidance embedding still reads Mistral3 (context 15360):
    its folder is accepted, and a klein-width transformer is refused with a Mistral folder whatever it embeds."""
    from dev2pro.families.flux2.spec import PRESETS

    for name in ("text_encoder", "tokenizer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    undistilled_dev = PRESETS["flux2-dev"].with_(guidance_embeds=False, variant="klein")
    assert undistilled_dev.is_klein and text.wants_mistral(undistilled_dev)
    assert text.check_folder(tmp_path, undistilled_dev) == "Flux2Pipeline"
    assert text.check_folder(tmp_path, PRESETS["flux2-dev"]) == "Flux2Pipeline"
    with pytest.raises(UserError, match=r"dev \(Mistral3\) text encoder .* cannot feed a FLUX.2 klein transformer "
                                        r"\(context 7680\)"):
        text.check_folder(tmp_path, PRESETS["flux2-klein-4b-base"])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(UserError, match=r"klein \(Qwen3\) text encoder .* cannot feed a FLUX.2 dev transformer"):
        text.check_folder(tmp_path, undistilled_dev)
    # `inspect` names it for what it is, not a klein of unknown size
    from dev2pro.families.flux2.family import describe_variant

    assert describe_variant(PRESETS["flux2-dev"].without_guidance()).startswith("FLUX.2 dev architecture without "
                                                                                 "guidance embedding")
    assert describe_variant(PRESETS["flux2-klein-4b-base"]).startswith("FLUX.2 klein Base (klein-4b)")
