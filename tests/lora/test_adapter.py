"""The training adapter: a frozen side-branch LoRA that is on for training and off for samples (lora/adapter.py)."""

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage, quantize
from dev2pro.flux.spec import FLUX_DEV, TINY, build_transformer
from dev2pro.lora import adapter as A
from dev2pro.lora.formats import LoraModule, LoraWeights
from dev2pro.lora.merge import add_delta
from dev2pro.lora.ops import apply_lora, lora_delta, lora_from_peft_model
from dev2pro.lora.targets import target_modules
from dev2pro.plan import PlanInputs, estimate, render
from dev2pro.plan import adapter_params_in_file


def _lora(model, names, rank, rel, seed):
    """A rank-``rank`` LoRA whose delta on each layer has Frobenius norm ``rel`` x the weight's."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    lw = LoraWeights()
    for n in names:
        w = mods[n].weight
        m = LoraModule(torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g), rank)
        m.up = m.up * (rel * float(w.detach().norm()) / float(lora_delta(m).norm()))
        lw[n] = m
    return lw


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
                generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.4]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]),
                return_dict=False)


def _out(model, seed=0):
    with torch.no_grad():
        return model(**_x(seed))[0]


def _trainable(model):
    names = target_modules("attention", TINY.num_double, TINY.num_single)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights=True), "default")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n and ".default." in n)
    return names


def test_adapter_is_frozen_on_by_default_switchable_and_equals_the_merged_base(merged_sd):
    base = build_transformer(TINY, seed=0)
    adapter = _lora(base, _linears(base), rank=4, rel=0.05, seed=1)
    model = build_transformer(TINY, seed=0)
    lora_names = _trainable(model)
    with torch.no_grad():  # a non-zero trained LoRA, so "default" matters in every comparison
        for n, p in model.named_parameters():
            if ".lora_B.default." in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    A.attach(model, adapter)
    assert A.is_enabled(model)
    adapter_params = [p for n, p in model.named_parameters() if f".{A.ADAPTER}." in n]
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapter_params and not any(p.requires_grad for p in adapter_params)
    assert len(trained) == 2 * len(lora_names) and all(p.dtype == torch.float32 for p in adapter_params)
    # adapter on == the LoRA on the base with the adapter merged into its weights (fp32 round-off)
    merged = build_transformer(TINY, seed=0)
    merged.load_state_dict(merged_sd(merged.state_dict(), [(adapter, 1.0)]))
    apply_lora(merged, lora_from_peft_model(model, "default"), adapter_name="default")
    torch.testing.assert_close(_out(model), _out(merged), atol=1e-5, rtol=1e-5)
    # adapter off == the plain base with the same LoRA, bit for bit; the switch keeps the adapter frozen
    plain = build_transformer(TINY, seed=0)
    apply_lora(plain, lora_from_peft_model(model, "default"), adapter_name="default")
    with A.disabled(model):
        assert not A.is_enabled(model)
        assert torch.equal(_out(model), _out(plain))
        assert not any(p.requires_grad for p in adapter_params)
    assert A.is_enabled(model) and not any(p.requires_grad for p in adapter_params)
    assert sum(p.requires_grad for p in model.parameters()) == len(trained)
    # backward reaches only the trained LoRA
    model(**_x())[0].square().mean().backward()
    assert all(p.grad is None for p in adapter_params) and all(p.grad is not None for p in trained)


def test_fp8_merge_loses_the_adapter_but_the_side_branch_keeps_it(merged_sd):
    """A dev -> dev2pro delta is small next to the weights (2% of each weight's norm here): merged into e4m3
    storage it mostly rounds away or turns into rounding noise; as a bf16/fp32 side branch over the fp8 base it
    survives. Effect = output change the adapter causes; error = distance to the fp32 effect, relative to it."""
    torch.manual_seed(0)
    ref = build_transformer(TINY, seed=0)
    names = [n for n in _linears(ref) if Fp8Policy().should_quantize(n + ".weight", (2, 2))]
    adapter = _lora(ref, names, rank=8, rel=0.02, seed=2)
    x = _out(ref)
    with_adapter = build_transformer(TINY, seed=0)
    A.attach(with_adapter, adapter)
    effect = _out(with_adapter) - x

    def fp8_model(state=None):
        m = build_transformer(TINY, seed=0)
        if state is not None:
            m.load_state_dict(state)
        enable_fp8_storage(m, Fp8Policy(), compute_dtype=torch.float32)
        return m

    fp8_base = fp8_model()
    side = fp8_model()
    A.attach(side, adapter, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in side.named_parameters() if A.ADAPTER in n)
    assert any(p.dtype == torch.float8_e4m3fn for p in side.parameters())
    side_effect = _out(side) - _out(fp8_base)
    merged_effect = _out(fp8_model(merged_sd(ref.state_dict(), [(adapter, 1.0)]))) - _out(fp8_base)
    side_err = float((side_effect - effect).norm() / effect.norm())
    merged_err = float((merged_effect - effect).norm() / effect.norm())
    print(f"relative error of the adapter's effect: side branch {side_err:.3f}, merged into fp8 {merged_err:.3f}")
    assert merged_err > 0.5 and side_err < 0.1
    # at the weights: what the fp8 storage changes is mostly rounding noise, not the delta
    w = ref.transformer_blocks[0].attn.to_q.weight.detach()
    d = lora_delta(adapter["transformer_blocks.0.attn.to_q"])
    q0, s0 = quantize(w, scaled=True)
    q1, s1 = add_delta(q0, d, s0)  # what `lora merge` does to a scaled-fp8 file's weight
    stored = q1.float() * s1 - q0.float() * s0
    assert float((stored - d).norm() / d.norm()) > 0.5


def test_parameter_bytes_one_base_with_adapter_vs_two_bases():
    # the shape-only count equals what real modules hold on the tiny family (LoRA fp32, adapter bf16 here)
    model = build_transformer(TINY, seed=0)
    lora_names = _trainable(model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    plain = build_transformer(TINY, seed=0)
    A.attach(model, _lora(plain, _linears(plain), rank=4, rel=0.01, seed=3), dtype=torch.bfloat16)
    want = A.training_bytes(TINY, lora_names, 4, adapter_rank=4, compute=torch.float32)
    assert A.held_bytes(model) == want["base"] + want["lora"] + want["adapter"]
    assert A.held_bytes(plain) == want["base"]
    # FLUX.1 shapes (meta device): one base + rank-64 adapter vs two bases, LoRA rank 16 on all linears
    targets = target_modules("all_linear", FLUX_DEV.num_double, FLUX_DEV.num_single)
    for policy in (None, Fp8Policy()):  # bf16 bases, fp8 storage with the default keep policy
        one = A.training_bytes(FLUX_DEV, targets, 16, adapter_rank=64, fp8_policy=policy)
        two = A.training_bytes(FLUX_DEV, targets, 16, inference_base=True, fp8_policy=policy)
        ratio = one["total"] / two["total"]
        print(f"fp8={policy is not None}: adapter {one['total'] / 2**30:.2f} GiB vs two bases "
              f"{two['total'] / 2**30:.2f} GiB = {ratio:.3f}x")
        assert ratio <= 0.55


def test_dev2pro_plan_counts_the_adapter_instead_of_a_second_base(tmp_path):
    shapes = A.linear_shapes(FLUX_DEV)
    params = sum(64 * (o + i) for o, i in shapes.values())  # a rank-64 adapter on every linear
    for fp8 in (False, True):
        two = estimate(PlanInputs(FLUX_DEV, fp8_storage=fp8, sample_pixels=1024 * 1024, inference_base=True))
        one = estimate(PlanInputs(FLUX_DEV, fp8_storage=fp8, sample_pixels=1024 * 1024, adapter_params=params))
        assert one.adapter_bytes == 2 * params  # bf16 compute: a bf16 adapter
        assert one.host_ram / two.host_ram <= 0.55  # parameter bytes held: one base + adapter vs two bases
        assert one.peak < 0.65 * two.peak and one.static_bytes - two.static_bytes == one.adapter_bytes
        assert "training adapter (347M params" in render(one)
    f = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 10), "lora_unet_x.lora_up.weight": torch.zeros(6, 4),
               "lora_unet_x.alpha": torch.tensor(4.0)}, str(f))
    assert adapter_params_in_file(str(f)) == 64 and adapter_params_in_file("") == 0
