"""LoRA maths: apply == merge (``lora.merge``) == manual delta, SVD extraction, peft round trips, clear errors."""

import math

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from dev2pro.errors import UserError
from dev2pro.flux import checkpoint as C
from dev2pro.flux.fp8 import quantize, relative_error_bound
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from dev2pro.lora.merge import add_delta, deltas_for, merge_loras
from dev2pro.lora.ops import apply_lora, extract, extract_pair, lora_delta, lora_from_peft_model


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


@pytest.fixture
def merged_model(merged_sd):
    """The tiny model (seed 0) with LoRAs merged by ``merge_loras`` (through files)."""
    def build(lws_and_scales):
        model = build_transformer(TINY, seed=0)
        model.load_state_dict(merged_sd(model.state_dict(), lws_and_scales))
        return model
    return build


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


def test_merge_then_forward_equals_lora_forward(merged_model):
    model = build_transformer(TINY, seed=0)
    lw, x = random_lora(model, seed=8), inputs(seed=1)
    apply_lora(model, lw)
    torch.testing.assert_close(forward(merged_model([(lw, 1.0)]), x), forward(model, x), atol=1e-5, rtol=0)


def test_second_adapter_keeps_the_first_active(merged_model):
    model = build_transformer(TINY, seed=0)
    a, b, x = random_lora(model, seed=1), random_lora(model, seed=2), inputs()
    apply_lora(model, a, adapter_name="a")
    apply_lora(model, b, scale=0.5, adapter_name="b")
    torch.testing.assert_close(forward(model, x), forward(merged_model([(a, 1.0), (b, 0.5)]), x), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="already has an adapter named 'a'"):
        apply_lora(model, a, adapter_name="a")


def test_merge_keeps_dtype_and_matches_in_bf16(tmp_path):
    model = build_transformer(TINY, seed=0)
    lw = random_lora(model, seed=3)
    sd16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for k, m in lw.items():  # the per-tensor step: fp32 maths, then one rounding to bf16 at the end
        w = sd16[f"{k}.weight"]
        merged, scale = add_delta(w, lora_delta(m))
        assert merged.dtype == torch.bfloat16 and scale is None
        assert torch.equal(merged, (w.float() + lora_delta(m)).to(torch.bfloat16))
        assert not torch.equal(merged, w)
    # the whole file: every tensor stays bf16, untouched ones are bit-identical
    base = tmp_path / "bf16.safetensors"
    save_file({k: v.contiguous() for k, v in sd16.items()}, str(base))
    lora = save_lora(lw, tmp_path / "l.safetensors", "diffusers")
    out = C.open_checkpoint(merge_loras(base, [(str(lora), 0.5)], tmp_path / "m.safetensors"))
    assert set(out.dtypes.values()) == {torch.bfloat16} and set(out.shapes) == set(sd16)
    for key, w in sd16.items():
        name = key.removesuffix(".weight")
        want = add_delta(w, 0.5 * lora_delta(lw[name]))[0] if name in lw and key.endswith(".weight") else w
        assert torch.equal(out.get(key), want), key


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_merge_dequantises_adds_and_requantises_with_the_same_scheme(fmt):
    g = torch.Generator().manual_seed(9)
    w, d = torch.randn(64, 48, generator=g) * 0.02, torch.randn(64, 48, generator=g) * 0.01
    bound = relative_error_bound(fmt)
    q0, s0 = quantize(w, scaled=True, dtype=fmt)
    q1, s1 = add_delta(q0, d, s0)  # scaled fp8: a fresh per-tensor scale for the new amax
    want = q0.float() * s0 + d
    assert q1.dtype == fmt and s1.shape == () and s1.dtype == torch.float32
    assert torch.isclose(s1, want.abs().max() / torch.finfo(fmt).max)
    # one rounding to fp8: at most half an ulp of the value (plus the subnormal step near zero)
    err = (q1.float() * s1 - want).abs()
    subnormal_step = torch.finfo(fmt).tiny * torch.finfo(fmt).eps
    assert (err <= bound * want.abs() * (1 + 1e-5) + s1 * subnormal_step).all()
    assert float((q1.float() * s1 - q0.float() * s0 - d).norm() / d.norm()) < 0.5  # a large delta survives
    plain, none = add_delta(w.to(fmt), d)  # plain fp8 casts stay plain
    assert plain.dtype == fmt and none is None
    assert torch.equal(plain, (w.to(fmt).float() + d).to(fmt))
    half, kept = add_delta(w.half(), d, torch.tensor(2.0))  # a non-fp8 weight: cast back, any scale passed through
    assert half.dtype == torch.float16 and float(kept) == 2.0 and torch.equal(half, (w.half().float() + d).half())


def test_apply_and_merge_errors(tmp_path):
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
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    wide_f, missing_f = (str(save_lora(lw, tmp_path / f"{n}.safetensors", "diffusers"))
                         for n, lw in (("wide", wide), ("missing", missing)))
    ckpt = C.open_checkpoint(base)
    with pytest.raises(UserError, match=r"wide.safetensors: module 'transformer_blocks.0.attn.to_k' gives a \(96, "
                                        r"96\) delta but the base weight is \(64, 64\); the LoRA is for another "
                                        r"model size"):
        deltas_for(ckpt, [(wide_f, 1.0)])
    with pytest.raises(UserError, match=r"missing.safetensors: module 'transformer_blocks.7.attn.to_q' has no weight "
                                        r"in base .*base.safetensors; the LoRA is for another model"):
        merge_loras(base, [(missing_f, 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    # several LoRAs on one weight add up, each with its own scale
    other = LoraWeights({"transformer_blocks.0.attn.to_k": LoraModule(torch.ones(1, h), torch.ones(h, 1), 1.0)})
    ok = [(str(save_lora(other, tmp_path / "a.safetensors", "kohya")), 0.5),
          (str(save_lora(other, tmp_path / "b.safetensors", "diffusers")), -2.0)]
    assert torch.equal(deltas_for(ckpt, ok)["transformer_blocks.0.attn.to_k.weight"], torch.full((h, h), -1.5))


# ----------------------------------------------------------------------------------------------- peft models
@pytest.mark.filterwarnings("ignore:Already found a")
def test_lora_from_peft_model_reads_patterns_and_rslora(merged_model):
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


def test_extract_pair_recovers_a_merged_lora(merged_model):
    model = build_transformer(TINY, seed=0)
    a_sd = model.state_dict()
    lora = random_lora(model, seed=7)
    lora.pop("proj_out")  # one linear left unchanged
    b_sd = merged_model([(lora, 1.0)]).state_dict()
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
