"""`dev2pro train --set lora.type=dora|lokr|loha` on the tiny FLUX.1 family (and LoKr on tiny klein): the saved
file, applied by a second client (ComfyUI's published formulas, ``comfy_ref``; diffusers for the layouts it loads),
gives dev2pro's own merge to fp32 round-off; the metadata says what LyCORIS says; `lora info` names the type."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfy_ref import comfy_merge, key_map
from dev2pro.cli import main
from dev2pro.families.flux2.keys import diffusers_to_bfl as flux2_to_bfl
from dev2pro.flux import checkpoint as C
from dev2pro.flux.keys import diffusers_to_bfl
from tiny_run import lora_run_toml


def train(folder, images, tmp, kind, formats, steps=3):
    tmp.mkdir(parents=True, exist_ok=True)
    toml = lora_run_toml(tmp, folder, images, kind, steps=steps, seed=3, data="batch_size = 1",
                         save=f"formats = {json.dumps(formats)}")
    assert main(["train", str(toml), "--no-progress", "--set", f"lora.type={kind}"]) == 0
    return tmp / kind


def bfl_weights(path, family):
    model, _ = C.load_transformer(path, dtype=torch.float32)
    sd = model.state_dict()
    return (diffusers_to_bfl if family == "flux1" else flux2_to_bfl)(sd), model


def check_second_client(run, base_dir, family, tmp):
    """ComfyUI's formulas on the kohya file == `dev2pro lora merge` of it (into the model folder)."""
    lora = run / "lora.safetensors"
    base, model = bfl_weights(base_dir, family)
    spec = model.config
    km = key_map(base, spec.num_layers, spec.num_single_layers, spec.num_attention_heads * spec.attention_head_dim,
                 None if family == "flux2" else 4 * spec.num_attention_heads * spec.attention_head_dim)
    theirs = comfy_merge(base, load_file(str(lora)), km)
    assert main(["lora", "merge", "--base", str(base_dir), "--lora", str(lora), str(tmp / "merged")]) == 0
    ours, merged_model = bfl_weights(tmp / "merged", family)
    moved = [k for k in base if not torch.equal(base[k], ours[k])]
    assert len(moved) >= 10
    for k in base:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    return merged_model


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_each_type_trains_and_its_file_means_the_same_to_comfyui(kind, tiny_dev_dir, sk_images, tmp_path, capsys):
    formats = ["kohya", "diffusers"] if kind == "dora" else ["kohya", "comfy"]
    run = train(tiny_dev_dir, sk_images, tmp_path, kind, formats)
    merged = check_second_client(run, tiny_dev_dir, "flux1", tmp_path)
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["dev2pro.adapter_type"] == kind
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("lora" if kind == "dora" else kind)
    assert (args.get("dora_wd") == "True") == (kind == "dora")
    if kind == "lokr":
        assert args["factor"] == "-1"
    capsys.readouterr()
    assert main(["lora", "info", str(run / "lora.safetensors")]) == 0
    assert f"type:     {kind}" in capsys.readouterr().out
    if kind == "dora":  # diffusers loads peft's DoRA as it is: the same model as our merge of the ComfyUI file
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
        pipe.load_lora_weights(str(run / "lora.diffusers.safetensors"), adapter_name="d")
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        ref = pipe.transformer.state_dict()
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    else:  # the comfy layout (diffusion_model.<BFL> keys for whole modules) merges to the same tensors
        assert any(k.startswith("diffusion_model.") for k in load_file(str(run / "lora.comfy.safetensors")))
        assert main(["lora", "merge", "--base", str(tiny_dev_dir), "--lora", str(run / "lora.comfy.safetensors"),
                     str(tmp_path / "merged-comfy")]) == 0
        again, _ = C.load_transformer(tmp_path / "merged-comfy", dtype=torch.float32)
        ref = again.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in merged.state_dict().items())


def test_klein_lokr_trains_and_diffusers_and_comfyui_agree_with_our_merge(klein_base_dir, sk_images, tmp_path):
    from diffusers import Flux2KleinPipeline

    run = train(klein_base_dir, sk_images, tmp_path, "lokr", ["kohya", "diffusers"])
    merged = check_second_client(run, klein_base_dir, "flux2", tmp_path)
    pipe = Flux2KleinPipeline.from_pretrained(klein_base_dir, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(run / "lora.diffusers.safetensors"), adapter_name="k")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ref = pipe.transformer.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")


def test_a_layout_nobody_reads_is_refused_before_training(tiny_dev_dir, sk_images, tmp_path, capsys):
    with pytest.raises(AssertionError):  # `train` asserts exit code 0
        train(tiny_dev_dir, sk_images, tmp_path, "loha", ["kohya", "diffusers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "save.formats" in err[0] and "diffusers 0.42 loads no loha" in err[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "loha" / "lora.safetensors").exists()


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_extending_steps_resumes_the_adapter_bit_identically(kind, tiny_dev_dir, sk_images, tmp_path):
    """The training state holds LoKr / DoRA weights (all trainable parameters): 2 steps + 2 resumed = 4 straight."""
    from dev2pro.recipes.train_lora import train as train_recipe
    from dev2pro.schemas import load_train_config

    straight = train(tiny_dev_dir, sk_images, tmp_path / "a", kind, ["kohya"], steps=4)
    short = train(tiny_dev_dir, sk_images, tmp_path / "b", kind, ["kohya"], steps=2)
    more = train_recipe(load_train_config(tmp_path / "b" / f"{kind}.toml", [f"lora.type={kind}", "train.steps=4"]),
                        resume="latest", progress=False)
    assert len(more["losses"]) == 2
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(short / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
