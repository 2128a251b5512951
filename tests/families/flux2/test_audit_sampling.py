"""Training grids of FLUX.2 klein: a distilled training base is sampled as it is used (as `dev2pro sample` renders it),
the start-up says which klein a LoRA should be trained on, and titles name the model folder, not "transformer"."""

import json
import logging

import pytest
import torch
from PIL import Image

from dev2pro import families
from dev2pro.errors import UserError
from dev2pro.flux.checkpoint import load_transformer, open_checkpoint
from dev2pro.sampling import prepare_family
from dev2pro.train.model import add_lora
from dev2pro.train.preflight import check_training_inputs
from dev2pro.train.samples import GridSpec, LoraSampler, title_name


@pytest.fixture(scope="module")
def klein_grid(klein_distilled_dir):
    """Components and one prompt's embeddings of the tiny klein folders (Base and distilled share the text stack)."""
    components, embeds, negative = prepare_family(klein_distilled_dir, families.get("flux2"), ["a red cat"])
    return components, GridSpec(["a red cat"], [0], embeds, negative, 2, 64, 64)


def _sampler(grid, spec, **kw):
    components, grid_spec = grid
    return LoraSampler(grid_spec, components, "cpu", torch.float32, guidance=3.5, cfg=3.5, family="flux2",
                       training_guidance_embeds=False, training_spec=spec, **kw)


def test_a_distilled_training_base_is_sampled_as_it_is_used(klein_grid, klein_distilled_dir, tmp_path, caplog):
    """No inference base: the training base's variant decides (`dev2pro sample`'s rule): no CFG at its own 4 steps,
    one grid (no "-base" twin of the same model), with a warning that distilled is not the model to train on."""
    model, ckpt = load_transformer(klein_distilled_dir, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="dev2pro.train.samples"):
        sampler = _sampler(klein_grid, ckpt.spec())
    assert [r.getMessage() for r in caplog.records] == [
        "the training base is FLUX.2 klein distilled, which is not the model to train a LoRA on (it is step-distilled: "
        "a LoRA trained on it fits it poorly); train on klein Base (model.path = the klein Base folder) and sample on "
        "distilled with model.inference_base = the klein distilled folder's transformer"]
    assert sampler.distilled and sampler.steps == 4 and sampler.guidance.to_dict() == \
        {"mode": "true_cfg", "embedded": None, "cfg": 1.0}
    assert sampler.describe() == "1 image(s) at 4 steps"
    path = sampler.sample(model, 3, tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step000003.png"]
    with Image.open(path) as im:
        assert im.text["title"] == "step 3  |  no CFG, 4 steps  |  training base"
        assert json.loads(im.text["guidance"]) == {"mode": "true_cfg", "embedded": None, "cfg": 1.0}


def test_a_base_run_without_inference_base_says_its_samples_show_base(klein_grid, klein_base_dir, caplog):
    spec = open_checkpoint(klein_base_dir).spec()
    with caplog.at_level(logging.WARNING, logger="dev2pro.train.samples"):
        sampler = _sampler(klein_grid, spec)
    assert not sampler.distilled and sampler.steps == 2 and sampler.guidance.describe() == "true CFG 3.5"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and notes[0].startswith("note: the samples show the LoRA on FLUX.2 klein Base") and \
        "set model.inference_base = the klein distilled folder's transformer" in notes[0]


def test_grid_titles_name_the_model_folder_not_transformer(klein_grid, klein_base_dir, klein_distilled_dir, tmp_path):
    assert title_name(f"{klein_distilled_dir}/transformer") == "klein-distilled"
    assert title_name("/m/FLUX.2-klein-4B/transformer/diffusion_pytorch_model.safetensors") == "FLUX.2-klein-4B"
    assert title_name("/m/flux2-klein-4b.safetensors") == "flux2-klein-4b.safetensors"
    model, ckpt = load_transformer(klein_base_dir, dtype=torch.float32)
    add_lora(model, ["transformer_blocks.0.attn.to_q"], 2, 2.0)
    sampler = _sampler(klein_grid, ckpt.spec(), inference_base=str(klein_distilled_dir / "transformer"))
    assert sampler.describe() == "1 image(s) at 4 steps, 1 on the training base at 2 steps"
    path = sampler.sample(model, 1, tmp_path, None)
    with Image.open(path) as im:
        assert im.text["title"] == "step 1  |  no CFG, 4 steps  |  klein-distilled"
        assert im.text["base"] == str(klein_distilled_dir / "transformer")  # the record keeps the whole path
    with Image.open(tmp_path / "step000001-base.png") as im:
        assert im.text["title"] == "step 1  |  true CFG 3.5, 2 steps  |  training base"


def test_train_refuses_a_klein_transformer_of_another_size_than_the_folder(klein_base_dir, tmp_path):
    """The check `dev2pro sample` now shares: the folder's text encoder is as wide as its own transformer reads."""
    from dev2pro.families.flux2.spec import TINY_KLEIN

    wide = TINY_KLEIN.with_(hidden=128, context_dim=192, axes_dim=(8, 8, 8, 8)).with_variant("klein-base")
    other = tmp_path / "klein-wide" / "transformer"
    families.build_transformer(wide, seed=0).save_pretrained(other)
    with pytest.raises(UserError, match=f"^model.transformer {other} is a FLUX.2 klein custom 128 wide transformer "
                                        f"reading text 192 wide, model.path {klein_base_dir} holds"):
        check_training_inputs(str(other), str(klein_base_dir))
    check_training_inputs(str(klein_base_dir / "transformer"), str(klein_base_dir))  # its own size: fine


def test_train_on_klein_distilled_renders_its_grids_as_it_is_used(tmp_path, klein_distilled_dir, sk_images, caplog):
    """The recipe passes the training base's spec: a run on distilled (no inference base) renders no CFG, 4 steps."""
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config
    from tiny_run import lora_run_toml

    cfg = lora_run_toml(tmp_path, klein_distilled_dir, sk_images, "run", steps=1, seed=0,
                        extra='[sample]\nprompts = ["a red cat"]\nwidth = 64\nheight = 64')
    with caplog.at_level(logging.WARNING):
        train(load_train_config(cfg), progress=False, quiet=True)
    assert any("not the model to train a LoRA on" in r.getMessage() for r in caplog.records)
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [p.name for p in grids] == ["step000000.png", "step000001.png"]  # the base before training, the end
    for grid in grids:
        with Image.open(grid) as im:
            assert json.loads(im.text["guidance"]) == {"mode": "true_cfg", "embedded": None, "cfg": 1.0}
            assert "no CFG, 4 steps" in im.text["title"]


def test_sample_guidance_on_klein_is_said_to_be_unread(tmp_path, klein_base_dir, tiny_dev_dir, caplog):
    """klein has no guidance input: a sample.guidance the user wrote is named as unread (sample.cfg is the knob);
    left out, or on FLUX.1 dev (where it is read), nothing is said."""
    from dev2pro.schemas import load_train_config

    base = [f'model.path="{klein_base_dir}"', 'save.output_dir="out"', f'data.folders=[{{path="{tmp_path}"}}]']
    with caplog.at_level(logging.WARNING, logger="dev2pro.recipe_inputs"):
        cfg = load_train_config(None, base + ["sample.guidance=7"])
        load_train_config(None, base)
        load_train_config(None, [f'model.path="{tiny_dev_dir}"', *base[1:], "sample.guidance=7"])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("sample.guidance = 7 is not read") and "set sample.cfg" in said[0]
    assert cfg.sample.cfg == 4.0  # klein Base's own true CFG, untouched by the unread key
