"""LyCORIS / DoRA files written by other tools (BFL-key names as ComfyUI users share them): `lora info`, `lora merge`
(BFL and diffusers bases, strength), `sample`'s loader; and bad files refused in one line."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_ref import comfy_merge, key_map
from dev2pro.errors import ConfigError, UserError
from dev2pro.flux import checkpoint as C
from dev2pro.flux.keys import bfl_to_diffusers, diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import load_lora
from dev2pro.recipes import lora_tools as T
from dev2pro.sampling import load_base
from dev2pro.schemas import load_train_config

H = TINY.hidden


def _r(g, *shape, s=0.1):
    return torch.randn(*shape, generator=g) * s


def foreign_file(path):
    """LoKr on a fused qkv and the final adaLN, LoHa on a fused linear1, column DoRA on a proj: BFL key names."""
    g = torch.Generator().manual_seed(7)
    mlp = TINY.mlp_hidden
    sd = {  # img_attn.qkv: 192 x 64 = kron((12, 8), (16, 8)), w2 decomposed at rank 4
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": _r(g, 12, 8),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a": _r(g, 16, 4),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b": _r(g, 4, 8),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_final_layer_adaLN_modulation_1.lokr_w1": _r(g, 8, 8),  # both whole: no alpha applies
        "lora_unet_final_layer_adaLN_modulation_1.lokr_w2": _r(g, 16, 8),
        "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(1.0),
        "lora_unet_single_blocks_1_linear1.hada_w1_a": _r(g, 3 * H + mlp, 4),
        "lora_unet_single_blocks_1_linear1.hada_w1_b": _r(g, 4, H),
        "lora_unet_single_blocks_1_linear1.hada_w2_a": _r(g, 3 * H + mlp, 4),
        "lora_unet_single_blocks_1_linear1.hada_w2_b": _r(g, 4, H),
        "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(4.0),
        "lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": _r(g, 4, H),
        "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": _r(g, H, 4),
        "lora_unet_double_blocks_1_img_attn_proj.alpha": torch.tensor(4.0),
        "lora_unet_double_blocks_1_img_attn_proj.dora_scale": 1.0 + _r(g, 1, H),
    }
    save_file(sd, str(path), {"ss_network_module": "lycoris.kohya"})
    return sd


@pytest.fixture
def files(tmp_path):
    model = build_transformer(TINY, seed=0)
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}
    base = tmp_path / "base-bfl.safetensors"
    save_file(bfl, str(base))
    lyco = tmp_path / "lyco.safetensors"
    return base, bfl, lyco, foreign_file(lyco)


def test_info_names_the_type(files, capsys):
    _, _, lyco, _ = files
    out = T.info(str(lyco))
    assert out["type"] == "dora+loha+lokr" and out["modules"] == 4 and out["family"] == "FLUX.1"
    text = capsys.readouterr().out
    assert "type:     dora+loha+lokr" in text and "lokr dim=4 alpha=2" in text and "dora(in)" in text


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merge_matches_comfyui_on_bfl_and_diffusers_bases(tmp_path, files, strength):
    base, bfl, lyco, sd = files
    ref = comfy_merge(bfl, sd, key_map(bfl, TINY.num_double, TINY.num_single, H, TINY.mlp_hidden), strength)
    got = load_file(str(T.merge(str(base), [(str(lyco), strength)], str(tmp_path / "m.safetensors"))))
    changed = [k for k in ref if not torch.equal(ref[k], bfl[k])]
    assert len(changed) == 4
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    dif_base = tmp_path / "base-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers(bfl).items()}, str(dif_base))
    got_d = load_file(str(T.merge(str(dif_base), [(str(lyco), strength)], str(tmp_path / "md.safetensors"))))
    for k, v in bfl_to_diffusers(ref).items():
        torch.testing.assert_close(got_d[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_sample_loader_applies_it_like_the_merged_base(tmp_path, files):
    base, bfl, lyco, _ = files
    merged = T.merge(str(base), [(str(lyco), 1.0)], str(tmp_path / "m.safetensors"))
    applied, _ = load_base(base, [(str(lyco), 1.0)])
    plain, _ = load_base(merged)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
             generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.4]),
             img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(applied(**x)[0], plain(**x)[0], rtol=1e-5, atol=1e-6)


def test_convert_keeps_the_deltas_and_refuses_a_layout_nobody_reads(tmp_path, files):
    base, _, lyco, _ = files
    out = T.convert(str(lyco), str(tmp_path / "c.safetensors"), "comfy")
    a, b = (load_file(str(T.merge(str(base), [(str(p), 1.0)], str(tmp_path / f"m{i}.safetensors"))))
            for i, p in enumerate((lyco, out)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("diffusion_model.double_blocks.0.img_attn.qkv.lokr_") for k in load_file(str(out)))
    with pytest.raises(UserError, match="fused BFL weight"):
        T.convert(str(lyco), str(tmp_path / "d.safetensors"), "diffusers")
    assert not (tmp_path / "d.safetensors").exists()


def test_lokr_without_w2_is_one_line_naming_file_and_field(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(8, 8),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(UserError) as e:
        load_lora(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "lokr_w2" in msg and "re-export" in msg


def test_dora_scale_of_a_wrong_shape_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "bad-dora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": _r(g, 4, H),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": _r(g, H, 4),
               "lora_unet_double_blocks_0_img_attn_proj.dora_scale": _r(g, 1, 7)}, str(path))
    with pytest.raises(UserError, match=r"dora_scale has shape \(1, 7\)"):
        load_lora(path)


def test_unknown_adapter_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.type.*'lokra'.*lora, dora, lokr, loha.*did you mean"):
        load_train_config(None, ["lora.type=lokra"], data={"model": {"path": str(tmp_path)}})


def test_a_base_of_the_other_family_is_refused(tmp_path, files, klein_base_dir):
    _, _, lyco, _ = files
    with pytest.raises(UserError, match="FLUX.1 but"):
        load_lora(lyco, family="flux2", base=klein_base_dir)


def test_a_merged_adapter_applied_again_replaces_itself(files):
    """The training sampler re-applies its adapter under one name; merged (non-peft) modules must not stack."""
    from dev2pro.lora.ops import apply_lora

    base, _, lyco, _ = files
    model, _ = load_base(base)
    lw = load_lora(lyco)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, lw, 1.0, adapter_name="sample")
    once = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, lw, 1.0, adapter_name="sample")
    assert any(not torch.equal(once[k], before[k]) for k in before)
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())


def test_flux2_bfl_lokr_from_ai_toolkit_agrees_with_comfyui_and_diffusers(tmp_path, klein_base_dir):
    """A FLUX.2 LoKr as ai-toolkit writes it (``diffusion_model.<BFL path>``, a fused ``img_attn.qkv``): our merge
    equals ComfyUI's formula and diffusers' own loader (which fuses the model's qkv to hold it)."""
    from diffusers import Flux2KleinPipeline

    from dev2pro.families.flux2.keys import diffusers_to_bfl as flux2_to_bfl
    from dev2pro.families.flux2.spec import TINY_KLEIN as K

    g = torch.Generator().manual_seed(3)
    h = K.hidden
    sd = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": _r(g, 12, 8),  # 3h x h = kron((12, 8), (16, 8))
          "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": _r(g, 16, 2),
          "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": _r(g, 2, 8),
          "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0),
          "diffusion_model.single_blocks.1.linear2.lokr_w1": _r(g, 8, 16),  # h x 4h: kron((8, 16), (8, 16))
          "diffusion_model.single_blocks.1.linear2.lokr_w2": _r(g, 8, 16)}  # (LyCORIS' near-square factors)
    lyco = tmp_path / "ai-toolkit-lokr.safetensors"
    save_file(sd, str(lyco))
    assert load_lora(lyco).family == "flux2"
    pipe = Flux2KleinPipeline.from_pretrained(klein_base_dir, torch_dtype=torch.float32)
    base = flux2_to_bfl(pipe.transformer.state_dict())
    ref = comfy_merge(base, sd, key_map(base, K.num_double, K.num_single, h))
    assert T.merge(str(klein_base_dir), [(str(lyco), 1.0)], str(tmp_path / "merged"))
    ours, _ = C.load_transformer(tmp_path / "merged", dtype=torch.float32)
    got = flux2_to_bfl(ours.state_dict())
    assert sum(not torch.equal(ref[k], base[k]) for k in ref) == 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    pipe.load_lora_weights(str(lyco), adapter_name="k")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    fused = {k: v for k, v in theirs.items() if "to_qkv" in k or "to_added_qkv" in k}
    assert fused  # diffusers fused q/k/v to hold the fused LoKr
    q, k_, v = (ours.state_dict()[f"transformer_blocks.0.attn.{p}.weight"] for p in ("to_q", "to_k", "to_v"))
    torch.testing.assert_close(theirs["transformer_blocks.0.attn.to_qkv.weight"], torch.cat([q, k_, v]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs["single_transformer_blocks.1.attn.to_out.weight"],
                               ours.state_dict()["single_transformer_blocks.1.attn.to_out.weight"], rtol=1e-5,
                               atol=1e-6)
