"""FLUX.2 through the family seam: detection, the checkpoint layer (inspect / convert / load), the one predict call
site and the stored-latent layout -- against diffusers' own classes as the reference."""

import json

import pytest
import torch
from safetensors import safe_open

from dev2pro import families
from dev2pro.choices import FAMILIES
from dev2pro.errors import CheckpointError
from dev2pro.families.flux2 import latents as L
from dev2pro.families.flux2.tiny import write_bfl_transformer
from dev2pro.flux.checkpoint import load_transformer, open_checkpoint
from dev2pro.flux.convert import convert
from dev2pro.objectives import ModelInputs, predict


def test_registry_names_match_the_torch_free_choices():
    assert FAMILIES == tuple(families.families()) == ("flux1", "flux2")


@pytest.fixture(scope="module")
def klein_files(tmp_path_factory, klein_distilled_dir):
    d = tmp_path_factory.mktemp("klein-files")
    bfl = write_bfl_transformer(klein_distilled_dir, d / "klein.safetensors")
    comfy = write_bfl_transformer(klein_distilled_dir, d / "klein-comfy.safetensors", prefix="model.diffusion_model.")
    return {"folder": klein_distilled_dir, "bfl": bfl, "comfy": comfy}


def test_each_family_is_detected_from_its_keys_and_never_mistaken(klein_files, tiny_dev_dir, flux2_dev_dir):
    for path in klein_files.values():
        ckpt = open_checkpoint(path)
        assert ckpt.family.name == "flux2" and ckpt.spec().variant == "klein-distilled"
    assert open_checkpoint(flux2_dev_dir).spec().variant == "dev"
    assert open_checkpoint(tiny_dev_dir).family.name == "flux1"
    with pytest.raises(CheckpointError, match=r"model.family = 'flux1', but its keys are FLUX\.2's"):
        open_checkpoint(klein_files["bfl"], family="flux1")
    with pytest.raises(CheckpointError, match=r"model.family = 'flux2', but its keys are FLUX\.1's"):
        open_checkpoint(tiny_dev_dir, family="flux2")


def test_bfl_file_loads_as_the_folder_and_as_diffusers_own_single_file_conversion(klein_files):
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    ours, _ = load_transformer(klein_files["bfl"], dtype=torch.float32)
    folder = Flux2Transformer2DModel.from_pretrained(str(klein_files["folder"] / "transformer"))
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(klein_files["bfl"])))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, folder.state_dict()[k]) and torch.equal(v, theirs[k]), k


def test_convert_round_trip_is_bit_exact_and_fp8_within_tolerance(tmp_path, klein_files):
    folder = convert(klein_files["comfy"], tmp_path / "diffusers", layout="diffusers")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "Flux2Transformer2DModel" and config["guidance_embeds"] is False
    back = convert(folder, tmp_path / "back.safetensors", layout="bfl")
    with safe_open(str(klein_files["bfl"]), "pt") as a, safe_open(str(back), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert b.metadata()["dev2pro.flux2_variant"] == "klein-distilled"
        assert b.metadata()["modelspec.architecture"].startswith("flux-2-")
    ref, _ = load_transformer(klein_files["bfl"], dtype=torch.float32)
    fp8 = convert(klein_files["bfl"], tmp_path / "fp8.safetensors", dtype="fp8-scaled")
    q, ckpt = load_transformer(fp8, dtype=torch.float32)
    assert ckpt.fp8_format == "fp8-scaled"
    for k, v in ref.state_dict().items():  # e4m3: 3 mantissa bits, per-tensor scale
        err = (q.state_dict()[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)
        assert err < 0.07, (k, float(err))


def test_predict_builds_flux2_inputs_as_the_pipeline_does(klein_files):
    """The one call site: packed stored latents + stacked text through the family give what the transformer gives
    for the pipeline's own packing and ids."""
    from diffusers import Flux2KleinPipeline

    model, _ = load_transformer(klein_files["bfl"], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 8, 6, generator=g)  # stored latents: 32 channels at 1/8
    pe = torch.randn(2, 7, 96, generator=g)
    sig = torch.tensor([0.3, 0.8])
    from dev2pro.flux.latents import pack
    ours = predict(model, ModelInputs(pack(x), sig, pe, None, 8, 6), 1.0, "cpu", torch.float32)
    patched = L.patchify(x)
    ref = model(hidden_states=Flux2KleinPipeline._pack_latents(patched), encoder_hidden_states=pe, timestep=sig,
                img_ids=Flux2KleinPipeline._prepare_latent_ids(patched), guidance=None,
                txt_ids=Flux2KleinPipeline._prepare_text_ids(pe), return_dict=False)[0]
    assert torch.equal(ours, ref)


def test_stored_latents_pack_to_the_pipelines_tokens_and_decode_back(klein_files):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from dev2pro.flux.latents import pack
    vae = AutoencoderKLFlux2.from_pretrained(str(klein_files["folder"] / "vae"))
    px = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    stored = L.encode_images(vae, px)
    assert stored.shape == (1, 32, 8, 6)
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    theirs = Flux2KleinPipeline._pack_latents(pipe._encode_vae_image(px, None))
    assert torch.allclose(pack(stored), theirs, atol=1e-6)
    assert torch.allclose(L.to_vae_latents(vae, stored), vae.encode(px).latent_dist.mode(), atol=1e-5)
