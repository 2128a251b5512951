"""`dev2pro train` / `dedistill` on tiny FLUX.2 klein: Base-trained LoRA sampled on the distilled model next to
Base, FLUX.2 LoRA layouts, a distilled student without guidance embedding, and the one-line pairing errors."""


import pytest
import torch
from safetensors import safe_open

from dev2pro.errors import UserError
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config


def _data(images, cache):
    return f"""
[[data.folders]]
path = "{images}"

[data]
default_caption = "a photo"
resolution = 64
bucket_step = 64
cache_dir = "{cache}"
"""


def test_klein_lora_trains_on_base_and_samples_on_distilled(tmp_path, klein_base_dir, klein_distilled_dir, sk_images,
                                                           capsys):
    cfg = tmp_path / "k.toml"
    cfg.write_text(f"""
[model]
path = "{klein_base_dir}"
inference_base = "{klein_distilled_dir / 'transformer'}"
dtype = "fp32"
gradient_checkpointing = false
{_data(sk_images, tmp_path / 'cache')}
[lora]
rank = 4
[train]
steps = 2
guidance = 3.5
[sample]
prompts = ["a red cat"]
steps = 2
size = "64x64"
cfg = 3.0
baseline = false
[save]
output_dir = "{tmp_path / 'run'}"
formats = ["kohya", "comfy", "diffusers"]
""")
    summary = train(load_train_config(cfg), progress=False)
    run = tmp_path / "run"
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    # Base has no guidance embedding: the startup line says the value is not read, not "guidance 3.5 in training"
    assert "no guidance input in training" in (out := capsys.readouterr().out) and \
        "train.guidance = 3.5 is not read" in out and "guidance 3.5 in training" not in out
    assert "LoRA: rank 4, alpha 16 (scale 4)," in out  # alpha's default is not rank's: the scale is shown
    assert (run / "samples" / "step000002.png").exists() and (run / "samples" / "step000002-base.png").exists()
    from PIL import Image
    with Image.open(run / "samples" / "step000002.png") as im:
        assert "4 steps" in im.text["title"] and "no CFG" in im.text["title"]  # the distilled model as it is used
    with Image.open(run / "samples" / "step000002-base.png") as im:
        assert "true CFG 3" in im.text["title"]
    with safe_open(str(run / "lora.diffusers.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["dev2pro.inference_base"] == "klein-distilled/transformer"  # not just "transformer"
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert any("to_qkv_mlp_proj" in k for k in keys)  # FLUX.2's fused single-block projection was trained
    with safe_open(str(run / "lora.comfy.safetensors"), "pt") as f:
        assert all(k.startswith("diffusion_model.") for k in f.keys())
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())


def test_klein_text_encoder_with_a_flux2_dev_transformer_is_one_line(tmp_path, klein_base_dir, flux2_dev_dir,
                                                                      sk_images):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"""
[model]
path = "{klein_base_dir}"
transformer = "{flux2_dev_dir / 'transformer'}"
dtype = "fp32"
{_data(sk_images, tmp_path / 'cache')}
[train]
steps = 1
[save]
output_dir = "{tmp_path / 'run'}"
""")
    with pytest.raises(UserError, match=r"is a FLUX\.2 dev transformer, model\.path .* is a FLUX\.2 klein folder "
                                        r"\(Flux2KleinPipeline\), whose text encoder does not fit it") as e:
        train(load_train_config(cfg), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_klein_distilled_student_learns_one_cfg_scale_without_guidance_embedding(tmp_path, klein_base_dir,
                                                                                 sk_images):
    base = f"""objective = "guidance_distill"
[model]
path = "{klein_base_dir}"
teacher = "{klein_base_dir}"
gradient_checkpointing = false
{_data(sk_images, tmp_path / 'cache')}
[train]
steps = 2
mixed_precision = "no"
[save]
output_dir = "{tmp_path / 'run'}"
"""
    (tmp_path / "d.toml").write_text(base + "[teacher]\nw_min = 4.0\nw_max = 4.0\n")
    summary = dedistill(load_dedistill_config(tmp_path / "d.toml"), progress=False)
    assert len(summary["losses"]) == 2 and summary["losses"][0] > 0
    with safe_open(str(tmp_path / "run" / "dev2pro.safetensors"), "pt") as f:
        assert not any(k.startswith("guidance_in") for k in f.keys())  # klein-like: no guidance embedding
        assert "single_stream_modulation.lin.weight" in f.keys()  # written as a FLUX.2 BFL file
    (tmp_path / "e.toml").write_text(base.replace('"run"', '"run2"').replace(str(tmp_path / "run"),
                                                                               str(tmp_path / "run2"))
                                     + "[teacher]\nw_min = 1.0\nw_max = 4.0\n")
    with pytest.raises(UserError, match="set teacher.w_min = teacher.w_max"):
        dedistill(load_dedistill_config(tmp_path / "e.toml"), progress=False)
    # dropping the guidance embedding is FLUX.1's export: refused before training, nothing written
    (tmp_path / "f.toml").write_text(base.replace(str(tmp_path / "run"), str(tmp_path / "run3")) +
                                     "keep_guidance = false\n[teacher]\nw_min = 4.0\nw_max = 4.0\n")
    with pytest.raises(UserError, match="save.keep_guidance = false drops FLUX.1's guidance embedding; this base "
                                        "is FLUX.2"):
        dedistill(load_dedistill_config(tmp_path / "f.toml"), progress=False)
    assert not (tmp_path / "run3").exists()


def test_the_shipped_klein_config_trains_base_and_samples_distilled(tmp_path, klein_base_dir, klein_distilled_dir,
                                                                     sk_images, capsys):
    """configs/train-klein.toml as a user runs it, on the tiny folders: only paths and sizes overridden."""
    from pathlib import Path

    from dev2pro.cli import main

    shipped = Path(__file__).parents[3] / "configs" / "train-klein.toml"
    cfg = load_train_config(shipped)
    assert cfg.model.vram == 16 and cfg.sample.cfg == 4.0 and cfg.save.formats == ["kohya", "comfy", "diffusers"]
    assert cfg.model.inference_base == str(shipped.parents[1] / "models/FLUX.2-klein-4B/transformer")
    sets = [f'model.path="{klein_base_dir}"', f'model.inference_base="{klein_distilled_dir / "transformer"}"',
            f'data.folders=[{{path="{sk_images}"}}]', "data.resolution=64", "data.bucket_step=64",
            f'data.cache_dir="{tmp_path / "cache"}"', "train.steps=2", "sample.every=2", "sample.steps=2",
            'sample.size="64x64"', "sample.baseline=false", "save.every=0", f'save.output_dir="{tmp_path / "run"}"']
    assert main(["plan", str(shipped), *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    summary = train(load_train_config(shipped, sets), progress=False)
    # the console says what is rendered: the distilled model at its own 4 steps, Base at the configured ones
    assert "rendering final samples (2 image(s) at 4 steps, 2 on the training base at 2 steps)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    from PIL import Image
    with Image.open(run / "samples" / "step000002.png") as im:
        assert "4 steps" in im.text["title"] and "no CFG" in im.text["title"]  # distilled, as it is used
    with Image.open(run / "samples" / "step000002-base.png") as im:
        assert "true CFG 4" in im.text["title"]  # Base, at the config's cfg
    assert all((run / name).is_file() for name in ("lora.safetensors", "lora.comfy.safetensors",
                                                   "lora.diffusers.safetensors"))


def test_inference_base_of_another_size_is_refused_before_anything_runs(tmp_path, klein_base_dir, tiny_dev_dir,
                                                                         sk_images):
    """klein 4B Base with a 9B distilled (here: a wider tiny klein), or a FLUX.1 model: one line naming the field,
    before caching and before the run folder exists (it used to fail at the first sample grid)."""
    from dev2pro.families.flux2.spec import TINY_KLEIN
    from dev2pro.families.flux2.tiny import write_tiny

    wide = write_tiny(tmp_path / "wide", variant="klein-distilled", seed=5,
                      spec=TINY_KLEIN.with_(hidden=96, num_heads=6, num_double=3, num_single=5))

    def config(inference_base):
        cfg = tmp_path / "k.toml"
        cfg.write_text(f"""
[model]
path = "{klein_base_dir}"
inference_base = "{inference_base}"
{_data(sk_images, tmp_path / 'cache')}
[train]
steps = 1
[sample]
prompts = ["a cat"]
[save]
output_dir = "{tmp_path / 'run'}"
""")
        return load_train_config(cfg)

    with pytest.raises(UserError, match=r"model.inference_base .* \(3 double \+ 5 single blocks\), the training "
                                        r"base .* \(2 \+ 4\): a LoRA fits only the size it was trained on"):
        train(config(wide / "transformer"), progress=False)
    with pytest.raises(UserError, match=r"model.inference_base .*FLUX.1"):
        train(config(tiny_dev_dir), progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_klein_base_samples_default_to_its_own_true_cfg(tmp_path, klein_base_dir, tiny_pro_dir, sk_images):
    """sample.cfg left unset: 4.0 on klein Base (Flux2KleinPipeline's default), the schema's 3.5 on a FLUX.1 model
    without guidance embedding; a written value is kept."""
    import inspect

    from diffusers import Flux2KleinPipeline

    assert inspect.signature(Flux2KleinPipeline.__call__).parameters["guidance_scale"].default == 4.0

    def cfg(model_dir, extra=""):
        toml = tmp_path / "g.toml"
        toml.write_text(f'[model]\npath = "{model_dir}"\n{_data(sk_images, tmp_path / "c")}\n[sample]\n{extra}\n'
                        f'[save]\noutput_dir = "{tmp_path / "r"}"\n')
        return load_train_config(toml).sample.cfg

    assert cfg(klein_base_dir) == 4.0 and cfg(tiny_pro_dir) == 3.5
    assert cfg(klein_base_dir, "cfg = 2.5") == 2.5
