"""Tiny FLUX.2 dev through the checkpoint layer: dev2pro's conversion of a BFL (and ComfyUI-prefixed, and fp8) file
equals diffusers' own single-file conversion, and `inspect` tells dev how it is sampled."""

import json

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from dev2pro.families.flux2.tiny import write_bfl_transformer
from dev2pro.flux.checkpoint import load_transformer, open_checkpoint
from dev2pro.flux.convert import convert
from dev2pro.flux.inspection import describe


@pytest.fixture(scope="module")
def dev_files(tmp_path_factory, flux2_dev_dir):
    d = tmp_path_factory.mktemp("dev-files")
    return {"bfl": write_bfl_transformer(flux2_dev_dir, d / "flux2-dev.safetensors"),
            "comfy": write_bfl_transformer(flux2_dev_dir, d / "comfy.safetensors", prefix="model.diffusion_model.")}


def test_dev_bfl_file_converts_as_diffusers_single_file_does(dev_files, flux2_dev_dir, tmp_path):
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(dev_files["bfl"])))
    single = Flux2Transformer2DModel.from_single_file(str(dev_files["bfl"]), config=str(flux2_dev_dir),
                                                      subfolder="transformer", local_files_only=True,
                                                      torch_dtype=torch.float32).state_dict()
    assert any(k.startswith("time_guidance_embed.guidance_embedder") for k in theirs)  # dev: guidance embedding
    for name, path in dev_files.items():
        ours = load_transformer(path, dtype=torch.float32)[0].state_dict()
        folder = convert(path, tmp_path / f"{name}-diffusers", layout="diffusers")
        written = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        assert set(ours) == set(theirs) == set(written) == set(single)
        for k in theirs:  # fp32 files: equal bit for bit (the tolerance would be fp32 round-off)
            assert torch.equal(ours[k], theirs[k].float()) and torch.equal(written[k], theirs[k]), (name, k)
            assert torch.equal(single[k], theirs[k].float()), k
        config = json.loads((folder / "config.json").read_text())
        assert config["_class_name"] == "Flux2Transformer2DModel" and config["guidance_embeds"] is True


def test_dev_fp8_round_trip_and_inspect(dev_files, tmp_path):
    fp8 = convert(dev_files["bfl"], tmp_path / "fp8.safetensors", dtype="fp8-scaled")
    a = load_transformer(dev_files["bfl"], dtype=torch.float32)[0].state_dict()
    b = load_transformer(fp8, dtype=torch.float32)[0].state_dict()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    assert 0 < worst < 0.07  # e4m3 with a per-tensor scale: within one fp8 step of the largest weight
    info = describe(open_checkpoint(fp8))
    assert info["spec"]["guidance_embeds"] is True and info["variant"] == "dev"
