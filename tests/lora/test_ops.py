"""LoRA maths: apply == merge == manual delta, SVD extraction, peft round trips, clear errors."""

import math

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights
from dev2pro.lora.ops import apply_lora, extract, extract_pair, lora_delta, lora_from_peft_model, merge_into


def random_lora(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    lw = LoraWeights()
    for i, (name, lin) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        r = 1 + i % 4
        lw[name] = LoraModule(torch.randn(r, lin.in_features, generator=g) * std,
                              torch.randn(lin.out_features, r, generator=g) * std, float([r, 2 * r, 1, 3][i % 4]))
    return lw


def inputs(seed=0, n_img=16, n_txt=8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, n_img, TINY.in_channels, generator=g),
                encoder_hidden_states=torch.randn(2, n_txt, TINY.context_dim, generator=g),
                pooled_projections=torch.randn(2, TINY.pooled_dim, generator=g), timestep=torch.tensor([0.2, 0.9]),
                guidance=torch.tensor([1.0, 3.5]), img_ids=torch.randn(n_img, 3, generator=g),
                txt_ids=torch.zeros(n_txt, 3))


def forward(model, x):
    with torch.no_grad():
        return model(**x).sample


def merged_model(lws_and_scales):
    model = build_transformer(TINY, seed=0)
    sd = model.state_dict()
    for lw, scale in lws_and_scales:
        sd = merge_into(sd, lw, scale)
    model.load_state_dict(sd)
    return model


# ------------------------------------------------------------------------------------------- apply and merge
def test_apply_lora_equals_manually_added_deltas():
    model = build_transformer(TINY, seed=0)
    lw, x = random_lora(model), inputs()
    plain = forward(model, x)
    manual = build_transformer(TINY, seed=0)
    with torch.no_grad():
        for name, m in lw.items():
            manual.get_submodule(name).weight += 0.7 * (m.up @ m.down) * (m.alpha / m.rank)
    apply_lora(model, lw, scale=0.7)
    got, want = forward(model, x), forward(manual, x)
    assert (want - plain).abs().max() > 0.1  # the LoRA matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # fp32: LoRA branch vs merged weight, summation order


def test_merge_then_forward_equals_lora_forward():
    model = build_transformer(TINY, seed=0)
    lw, x = random_lora(model, seed=8), inputs(seed=1)
    apply_lora(model, lw)
    torch.testing.assert_close(forward(merged_model([(lw, 1.0)]), x), forward(model, x), atol=1e-5, rtol=0)


def test_second_adapter_keeps_the_first_active():
    model = build_transformer(TINY, seed=0)
    a, b, x = random_lora(model, seed=1), random_lora(model, seed=2), inputs()
    apply_lora(model, a, adapter_name="a")
    apply_lora(model, b, scale=0.5, adapter_name="b")
    torch.testing.assert_close(forward(model, x), forward(merged_model([(a, 1.0), (b, 0.5)]), x), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="already has an adapter named 'a'"):
        apply_lora(model, a, adapter_name="a")


def test_merge_keeps_dtype_and_matches_in_bf16():
    model = build_transformer(TINY, seed=0)
    lw = random_lora(model, seed=3)
    sd16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    merged = merge_into(sd16, lw)
    assert all(merged[k].dtype == torch.bfloat16 for k in merged)
    want = merge_into({k: v.float() for k, v in sd16.items()}, lw)
    for k in lw:  # fp32 maths, then one rounding to bf16 at the end
        assert torch.equal(merged[f"{k}.weight"], want[f"{k}.weight"].to(torch.bfloat16))
        assert not torch.equal(merged[f"{k}.weight"], sd16[f"{k}.weight"])


def test_apply_and_merge_errors():
    model = build_transformer(TINY, seed=0)
    h = TINY.hidden
    missing = LoraWeights({"transformer_blocks.7.attn.to_q": LoraModule(torch.zeros(2, h), torch.zeros(h, 2), 2.0)})
    with pytest.raises(UserError, match=r"'transformer_blocks\.7\.attn\.to_q' is not a linear layer of this model "
                                        r"\(2 double / 4 single blocks, hidden 64\)"):
        apply_lora(model, missing)
    wide = LoraWeights({"transformer_blocks.0.attn.to_k": LoraModule(torch.zeros(2, 96), torch.zeros(96, 2), 2.0)})
    with pytest.raises(UserError, match=r"'transformer_blocks\.0\.attn\.to_k' is 96x96 but the model's layer is 64x64"):
        apply_lora(model, wide)
    assert not getattr(model, "peft_config", {})  # nothing half-loaded
    sd = model.state_dict()
    with pytest.raises(UserError, match="is 96x96 but the base weight"):
        merge_into(sd, wide)
    with pytest.raises(UserError, match="has no weight 'transformer_blocks.7.attn.to_q.weight'"):
        merge_into(sd, missing)
    assert merge_into(sd, missing, strict=False).keys() == sd.keys()
    fp8 = {"transformer_blocks.0.attn.to_k.weight": torch.zeros(96, 96).to(torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match="dequantise"):
        merge_into(fp8, wide)


# ----------------------------------------------------------------------------------------------- peft models
@pytest.mark.filterwarnings("ignore:Already found a")
def test_lora_from_peft_model_reads_patterns_and_rslora():
    from peft import LoraConfig

    model = build_transformer(TINY, seed=0)
    targets = ["to_q", "to_k", "proj_mlp", "norm_out.linear"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     rank_pattern={"^transformer_blocks.1.attn.to_q": 2}, alpha_pattern={"proj_mlp": 3})
    model.add_adapter(cfg, adapter_name="trained")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_v"], use_rslora=True,
                                 init_lora_weights=False), adapter_name="rs")
    model.set_adapters(["trained", "rs"])
    lw = {**lora_from_peft_model(model, "trained"), **lora_from_peft_model(model, "rs")}
    assert lw["transformer_blocks.1.attn.to_q"].rank == 2 and lw["transformer_blocks.0.attn.to_q"].rank == 4
    assert lw["single_transformer_blocks.0.proj_mlp"].alpha == 3 and lw["norm_out.linear"].alpha == 8
    assert math.isclose(lw["transformer_blocks.0.attn.to_v"].scale, 4 / math.sqrt(4))
    x = inputs()
    torch.testing.assert_close(forward(merged_model([(lw, 1.0)]), x), forward(model, x), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="no LoRA adapter 'nope'"):
        lora_from_peft_model(model, "nope")


def test_apply_then_read_back_is_identity():
    model = build_transformer(TINY, seed=0)
    lw = random_lora(model, seed=4)
    apply_lora(model, lw, adapter_name="x")
    back = lora_from_peft_model(model, "x")
    assert back.keys() == lw.keys()
    for k in lw:
        torch.testing.assert_close(lora_delta(back[k]), lora_delta(lw[k]), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ extraction
def test_extract_full_rank_reproduces_delta():
    delta = torch.randn(48, 80, generator=torch.Generator().manual_seed(5))
    module, kept = extract(delta, rank=48)
    assert module.rank == 48 and module.alpha == 48 and math.isclose(kept, 1.0, rel_tol=1e-9)
    torch.testing.assert_close(lora_delta(module), delta, atol=1e-5, rtol=1e-5)


def test_extract_error_never_grows_with_rank_and_energy_picks_smallest_rank():
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(64, 32, generator=g) @ torch.diag(torch.logspace(0, -3, 32)) @ torch.randn(32, 32, generator=g)
    errors, energies = [], []
    for rank in range(1, 33):
        module, kept = extract(delta, rank)
        errors.append(float((lora_delta(module) - delta).norm()))
        energies.append(kept)
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4 * errors[0]
    assert all(b >= a - 1e-12 for a, b in zip(energies, energies[1:]))
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    for target in (0.5, 0.9, 0.99):
        module, kept = extract(delta, rank=32, energy=target)
        k = int((torch.cumsum(s2, 0) / s2.sum() < target).sum()) + 1
        assert module.rank == k and kept >= target and energies[k - 2] < target
    assert extract(delta, rank=3, energy=0.999)[0].rank == 3  # capped by rank


def test_extract_pair_recovers_a_merged_lora():
    model = build_transformer(TINY, seed=0)
    a_sd = model.state_dict()
    lora = random_lora(model, seed=7)
    lora.pop("proj_out")  # one linear left unchanged
    b_sd = merge_into(a_sd, lora)
    lw, report = extract_pair(a_sd, b_sd, rank=8, energy=1 - 1e-7)
    assert lw.keys() == lora.keys()
    assert "proj_out.weight" in report["identical"] and "x_embedder.bias" in report["not_linear"]
    for name, m in lora.items():
        assert lw[name].rank == m.rank and report["layers"][name]["retained_energy"] > 1 - 1e-7
        torch.testing.assert_close(lora_delta(lw[name]), lora_delta(m), atol=1e-5, rtol=1e-4, msg=name)
    x = inputs()
    got = build_transformer(TINY, seed=0)
    apply_lora(got, lw)
    torch.testing.assert_close(forward(got, x), forward(merged_model([(lora, 1.0)]), x), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="different model sizes"):
        extract_pair(a_sd, {"x_embedder.weight": torch.zeros(3, 3)}, rank=4)
