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
