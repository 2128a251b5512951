"""Sampling-side LoRA loading (`sampling.load_base`, used by sample, compare, calibrate and the klein demo) reads a
trained klein LoRA -- single blocks' fused `attn.to_qkv_mlp_proj` and plain `attn.to_out` included -- in every
layout dev2pro writes, and the loaded adapter reproduces the trained model's output."""

import pytest
import torch


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "comfy"])
def test_load_base_applies_a_full_klein_lora(tmp_path, klein_base_dir, layout):
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from dev2pro import sampling as S
    from dev2pro.train.export import save_lora_files

    folder = klein_base_dir / "transformer"
    trained = Flux2Transformer2DModel.from_pretrained(str(folder))
    ends = ("attn.to_qkv_mlp_proj", "attn.to_out", "attn.to_q", "ff.linear_in", "ff.linear_out")
    targets = [n for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ends)]
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    assert any("single_transformer_blocks.0.attn.to_out.lora_B" in n for n, _ in trained.named_parameters())
    file = save_lora_files(trained, tmp_path, "l", [layout], {})[0]
    loaded, _ = S.load_base(str(folder), [(str(file), 1.0)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 128, generator=g)
    txt = torch.randn(1, 6, trained.config.joint_attention_dim, generator=g)
    ids = torch.zeros(1, 16, 4, dtype=torch.long)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    txt_ids = torch.zeros(1, 6, 4, dtype=torch.long)
    txt_ids[0, :, 3] = torch.arange(6)
    kw = dict(hidden_states=x, encoder_hidden_states=txt, timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=txt_ids,
              guidance=None, return_dict=False)
    with torch.no_grad():
        want, got = trained.eval()(**kw)[0], loaded(**kw)[0]
        base = Flux2Transformer2DModel.from_pretrained(str(folder)).eval()(**kw)[0]
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_lora_of_another_size_is_named_before_any_render(tmp_path, klein_base_dir, capsys):
    """Two LoRAs, the second from a wider klein: `sample` names that file (from the headers, before the model
    loads); `compare` names the arm and the file before its first arm renders, and writes nothing."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from dev2pro.cli import main
    from dev2pro.families.flux2.spec import TINY_KLEIN
    from dev2pro.families.flux2.tiny import write_tiny
    from dev2pro.train.export import save_lora_files

    wide = write_tiny(tmp_path / "wide", variant="klein-base", seed=5,
                      spec=TINY_KLEIN.with_(hidden=96, num_heads=6, num_double=3, num_single=5))
    files = {}
    for name, folder in (("fits", klein_base_dir), ("wide", wide)):
        m = Flux2Transformer2DModel.from_pretrained(str(folder / "transformer"))
        m.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn.to_q"], init_lora_weights=False))
        files[name] = save_lora_files(m, tmp_path / name, "l", ["diffusers"], {})[0]
    assert main(["sample", "--model", str(klein_base_dir), "--lora", str(files["fits"]), "--lora",
                 f"{files['wide']}:0.8", "--prompt", "p", "--size", "64x64", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"LoRA {files['wide']} does not fit" in err and "another model size" in err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""model = "{klein_base_dir}"
prompts = ["p"]
size = "64x64"
steps = 1
out = "{tmp_path / 'cmp'}"
[[arms]]
name = "good"
loras = ["{files['fits']}"]
[[arms]]
name = "bad"
loras = ["{files['wide']}"]
""")
    assert main(["compare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "arm 'bad': LoRA" in err and str(files["wide"]) in err and not (tmp_path / "cmp").exists()
