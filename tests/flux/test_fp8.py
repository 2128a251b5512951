"""fp8: rounding error bounds, the keep-in-bf16 policy on real key names, ComfyUI's scaled-fp8 layout, and fp8
storage on a tiny FluxTransformer2DModel (exact forward, peft LoRA training, gradient checkpointing)."""

import copy

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux.fp8 import (
    SCALE_BUFFER,
    Fp8Linear,
    Fp8Policy,
    dequantize,
    dequantize_entry,
    detect_fp8_format,
    enable_fp8_storage,
    is_scale_key,
    param_bytes,
    parse_comfy_quant,
    quantize,
    relative_error_bound,
    scale_key_for,
    scaled_fp8_entries,
    scaled_fp8_marker,
)
from dev2pro.flux.spec import TINY, build_transformer

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


# --- quantise / dequantise ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_round_trip_error_within_half_ulp_for_normal_values(dtype):
    g = torch.Generator().manual_seed(0)
    finfo = torch.finfo(dtype)
    # log-uniform magnitudes across the whole normal range, random signs
    logs = torch.empty(20000).uniform_(torch.log2(torch.tensor(finfo.tiny)).item(), 8.7, generator=g)
    t = torch.exp2(logs) * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    q, scale = quantize(t, scaled=False, dtype=dtype)
    assert scale is None and q.dtype == dtype
    rel = ((dequantize(q, None, torch.float32) - t).abs() / t.abs()).max().item()
    assert rel <= relative_error_bound(dtype) and rel > relative_error_bound(dtype) / 2  # the bound is tight
    assert relative_error_bound(E4M3) == 2**-4 and relative_error_bound(E5M2) == 2**-3

    q, scale = quantize(t, scaled=True, dtype=dtype)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == pytest.approx(t.abs().max().item() / finfo.max)
    back = dequantize(q, scale, torch.float32)
    normal = q.float().abs() >= finfo.tiny  # values the scale pushed below the normal range lose precision
    assert normal.float().mean() > 0.99
    assert ((back - t).abs() / t.abs())[normal].max().item() <= relative_error_bound(dtype)


def test_scaled_is_more_accurate_than_plain_for_small_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 1e-3  # typical of Flux linears
    plain, _ = quantize(w, scaled=False)
    q, scale = quantize(w, scaled=True)
    err_plain = (dequantize(plain, None, torch.float32) - w).norm() / w.norm()
    err_scaled = (dequantize(q, scale, torch.float32) - w).norm() / w.norm()
    assert (plain.float() == 0).float().mean() > 0.5  # plain e4m3 flushes most of them (< 2^-10) to zero
    assert err_scaled < relative_error_bound() / 2 < err_plain
    assert err_scaled * 10 < err_plain


def test_out_of_range_values_clamp_instead_of_nan():
    t = torch.tensor([500.0, -1e6, 448.0, float("inf"), 1.0])
    q, _ = quantize(t, scaled=False)
    assert torch.isfinite(q.float()).all()
    assert q.float().tolist() == [448.0, -448.0, 448.0, 448.0, 1.0]
    big = torch.tensor([1e5, -3e5, 2e3])
    q, scale = quantize(big, scaled=True)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == 448.0
    assert torch.allclose(dequantize(q, scale, torch.float32), big, rtol=2**-4)
    with pytest.raises(ValueError):
        quantize(torch.tensor([1.0, float("nan")]), scaled=True)


def test_all_zero_tensor_gets_scale_one():
    q, scale = quantize(torch.zeros(3, 4), scaled=True)
    assert scale.item() == 1.0 and (q.float() == 0).all()


# --- policy -------------------------------------------------------------------------------------------------------

# (key, shape, quantised by default?, quantised with keep_modulation=False?)
POLICY_TABLE = [
    # BFL
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), True, True),
    ("double_blocks.3.txt_mlp.2.weight", (3072, 12288), True, True),
    ("double_blocks.0.img_attn.qkv.bias", (9216,), False, False),
    ("double_blocks.0.img_attn.norm.query_norm.scale", (128,), False, False),
    ("double_blocks.0.txt_attn.norm.key_norm.scale", (128,), False, False),
    ("double_blocks.0.img_mod.lin.weight", (18432, 3072), False, True),
    ("double_blocks.18.txt_mod.lin.weight", (18432, 3072), False, True),
    ("single_blocks.37.modulation.lin.weight", (9216, 3072), False, True),
    ("single_blocks.0.linear1.weight", (21504, 3072), True, True),
    ("single_blocks.0.linear2.weight", (3072, 15360), True, True),
    ("single_blocks.0.norm.query_norm.scale", (128,), False, False),
    ("img_in.weight", (3072, 64), False, False),
    ("txt_in.weight", (3072, 4096), False, False),
    ("time_in.in_layer.weight", (3072, 256), False, False),
    ("vector_in.out_layer.weight", (3072, 3072), False, False),
    ("guidance_in.in_layer.weight", (3072, 256), False, False),
    ("final_layer.linear.weight", (64, 3072), False, False),
    ("final_layer.adaLN_modulation.1.weight", (6144, 3072), False, False),  # final stays kept
    # prefixes
    ("model.diffusion_model.double_blocks.0.img_attn.proj.weight", (3072, 3072), True, True),
    ("model.diffusion_model.img_in.weight", (3072, 64), False, False),
    ("diffusion_model.single_blocks.2.modulation.lin.weight", (9216, 3072), False, True),
    # diffusers
    ("transformer_blocks.0.attn.to_q.weight", (3072, 3072), True, True),
    ("transformer_blocks.0.attn.add_k_proj.weight", (3072, 3072), True, True),
    ("transformer_blocks.0.ff_context.net.0.proj.weight", (12288, 3072), True, True),
    ("transformer_blocks.0.attn.norm_q.weight", (128,), False, False),
    ("transformer_blocks.0.attn.norm_added_k.weight", (128,), False, False),
    ("transformer_blocks.0.norm1.linear.weight", (18432, 3072), False, True),
    ("transformer_blocks.0.norm1_context.linear.weight", (18432, 3072), False, True),
    ("single_transformer_blocks.5.norm.linear.weight", (9216, 3072), False, True),
    ("single_transformer_blocks.5.proj_out.weight", (3072, 15360), True, True),  # linear2, not the final layer
    ("single_transformer_blocks.5.proj_mlp.weight", (12288, 3072), True, True),
    ("x_embedder.weight", (3072, 64), False, False),
    ("context_embedder.weight", (3072, 4096), False, False),
    ("time_text_embed.guidance_embedder.linear_1.weight", (3072, 256), False, False),
    ("norm_out.linear.weight", (6144, 3072), False, False),
    ("proj_out.weight", (64, 3072), False, False),
    ("transformer.transformer_blocks.1.attn.to_out.0.weight", (3072, 3072), True, True),
    ("transformer.transformer_blocks.1.attn.to_q.base_layer.weight", (3072, 3072), True, True),  # peft-wrapped
    ("transformer.x_embedder.weight", (3072, 64), False, False),
    # bookkeeping that must never be quantised
    ("scaled_fp8", (2,), False, False),
    ("double_blocks.0.img_attn.qkv.scale_weight", (), False, False),
]


@pytest.mark.parametrize("key,shape,default,no_mod", POLICY_TABLE)
def test_policy_decisions_on_real_key_names(key, shape, default, no_mod):
    assert Fp8Policy().should_quantize(key, shape) is default
    assert Fp8Policy(keep_modulation=False).should_quantize(key, shape) is no_mod
    # module names (no .weight) decide like their weights
    if key.endswith(".weight") and len(shape) == 2:
        assert Fp8Policy().should_quantize(key.removesuffix(".weight"), shape) is default


def test_policy_groups_names_and_patterns():
    nothing_kept = Fp8Policy.from_names([])
    assert nothing_kept.should_quantize("img_in.weight", (3072, 64))
    assert nothing_kept.should_quantize("double_blocks.0.img_attn.qkv.bias", (9216,))
    assert nothing_kept.should_quantize("transformer_blocks.0.attn.norm_q.weight", (128,))
    assert not Fp8Policy(keep_final=False).should_quantize("final_layer.adaLN_modulation.1.weight", (6144, 3072))
    assert Fp8Policy(keep_final=False, keep_modulation=False).should_quantize("norm_out.linear.weight", (6, 3))
    assert Fp8Policy.from_names("norms,biases,embedders,modulation,final") == Fp8Policy()
    assert Fp8Policy().describe() == "keep=norms,biases,embedders,modulation,final"
    assert nothing_kept.describe() == "keep=none"
    custom = Fp8Policy(keep_patterns=("double_blocks.0.*",))
    assert not custom.should_quantize("model.diffusion_model.double_blocks.0.img_mlp.0.weight", (12288, 3072))
    assert custom.should_quantize("double_blocks.1.img_mlp.0.weight", (12288, 3072))
    assert "patterns=double_blocks.0.*" in custom.describe()
    with pytest.raises(UserError, match="modulaton"):
        Fp8Policy.from_names(["norms", "modulaton"])


# --- ComfyUI files ------------------------------------------------------------------------------------------------

def test_detects_legacy_new_plain_and_unquantised_files():
    bf16 = {"img_in.weight": torch.bfloat16, "double_blocks.0.img_attn.qkv.weight": torch.bfloat16}
    assert detect_fp8_format(bf16, bf16) == "none"
    plain = {**bf16, "double_blocks.0.img_attn.qkv.weight": E4M3}
    assert detect_fp8_format(plain, plain) == "fp8"
    assert detect_fp8_format(["a.weight"], {"a.weight": "F8_E4M3"}) == "fp8"  # safetensors header names
    legacy = {"model.diffusion_model.scaled_fp8": E4M3, "model.diffusion_model.img_in.weight": torch.bfloat16,
              "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": E4M3,
              "model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight": torch.float32}
    assert detect_fp8_format(legacy, legacy) == "fp8-scaled"
    new = {"double_blocks.0.img_attn.qkv.weight": E4M3, "double_blocks.0.img_attn.qkv.weight_scale": torch.float32,
           "double_blocks.0.img_attn.qkv.input_scale": torch.float32,
           "double_blocks.0.img_attn.qkv.comfy_quant": torch.uint8}
    assert detect_fp8_format(new, new) == "fp8-scaled"
    assert scale_key_for("double_blocks.0.img_attn.qkv.weight", new) == "double_blocks.0.img_attn.qkv.weight_scale"
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert scale_key_for(key, legacy) == key.replace(".weight", ".scale_weight")
    assert scale_key_for("model.diffusion_model.img_in.weight", legacy) is None
    aux = [k for k in {**legacy, **new} if is_scale_key(k)]
    assert sorted(aux) == sorted([
        "model.diffusion_model.scaled_fp8", "model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight",
        "double_blocks.0.img_attn.qkv.weight_scale", "double_blocks.0.img_attn.qkv.input_scale",
        "double_blocks.0.img_attn.qkv.comfy_quant"])
    conf = torch.tensor(list(b'{"format": "float8_e4m3fn", "full_precision_matrix_mult": true}'), dtype=torch.uint8)
    assert parse_comfy_quant(conf) == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}


def test_dequantize_entry_per_tensor_per_row_and_blockwise():
    w = torch.randn(8, 16)
    q, s = quantize(w, scaled=True)
    assert torch.equal(dequantize_entry(q, s, torch.float32), q.float() * s)
    assert dequantize_entry(q, s.reshape(1), torch.bfloat16).dtype == torch.bfloat16
    rows = torch.rand(8) + 0.5
    assert torch.equal(dequantize_entry(q, rows, torch.float32), q.float() * rows[:, None])
    assert torch.equal(dequantize_entry(q, rows[:, None], torch.float32), q.float() * rows[:, None])
    with pytest.raises(CheckpointError, match="block-wise"):
        dequantize_entry(q, torch.ones(2, 4), torch.float32)
    with pytest.raises(CheckpointError):
        dequantize_entry(torch.zeros(8, 8, dtype=torch.uint8), torch.ones(()), torch.bfloat16)


def test_writer_entries_and_marker_round_trip_through_safetensors(tmp_path):
    policy = Fp8Policy()
    w = torch.randn(64, 32, dtype=torch.bfloat16) * 0.02
    out = scaled_fp8_entries("double_blocks.0.img_attn.qkv.weight", w, policy)
    assert set(out) == {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.scale_weight"}
    scale = out["double_blocks.0.img_attn.qkv.scale_weight"]
    assert out["double_blocks.0.img_attn.qkv.weight"].dtype == E4M3
    assert scale.dtype == torch.float32 and scale.shape == ()  # 0-d, as ComfyUI's scale_weight parameter
    kept = scaled_fp8_entries("img_in.weight", w, policy)
    assert kept["img_in.weight"] is w
    bias = scaled_fp8_entries("double_blocks.0.img_attn.qkv.bias", w[0], Fp8Policy(keep_biases=False))
    assert list(bias) == ["double_blocks.0.img_attn.qkv.bias"] and bias["double_blocks.0.img_attn.qkv.bias"].dtype == E4M3
    plain = scaled_fp8_entries("double_blocks.0.img_attn.qkv.weight", w, policy, scaled=False)
    assert list(plain) == ["double_blocks.0.img_attn.qkv.weight"]
    with pytest.raises(UserError, match="e4m3fn"):
        scaled_fp8_entries("double_blocks.0.img_attn.qkv.weight", w, policy, dtype=E5M2)
    assert scaled_fp8_entries("double_blocks.0.img_attn.qkv.weight", w, policy, scaled=False, dtype=E5M2)[
        "double_blocks.0.img_attn.qkv.weight"].dtype == E5M2

    marker = scaled_fp8_marker()
    assert marker.dtype == E4M3 and marker.shape == (2,)
    path = tmp_path / "m.safetensors"
    prefixed = {"model.diffusion_model." + k: v for k, v in {**out, **kept}.items()}
    save_file({**prefixed, "model.diffusion_model.scaled_fp8": marker}, str(path))
    back = load_file(str(path))
    assert detect_fp8_format(back, {k: v.dtype for k, v in back.items()}) == "fp8-scaled"
    wk = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    restored = dequantize_entry(back[wk], back[scale_key_for(wk, back)], torch.float32)
    assert ((restored - w.float()).abs() <= relative_error_bound() * w.float().abs().max()).all()


# --- fp8 storage on a live model ----------------------------------------------------------------------------------

def tiny_inputs(batch=2, side=4, txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    ids = torch.zeros(n, 3)
    ids[:, 1] = torch.arange(n) // side
    ids[:, 2] = torch.arange(n) % side
    return dict(hidden_states=torch.randn(batch, n, TINY.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, TINY.context_dim, generator=g),
                pooled_projections=torch.randn(batch, TINY.pooled_dim, generator=g),
                timestep=torch.rand(batch, generator=g), guidance=torch.full((batch,), 3.5),
                img_ids=ids, txt_ids=torch.zeros(txt, 3), return_dict=False)


def dequantised_copy(fp8_model, reference):
    """``reference`` with every Fp8Linear weight of ``fp8_model`` replaced by its fp32 dequantisation."""
    ref = copy.deepcopy(reference)
    ref_modules = dict(ref.named_modules())
    for name, m in fp8_model.named_modules():
        if isinstance(m, Fp8Linear):
            ref_modules[name].weight.data = dequantize(m.weight, m._buffers.get(SCALE_BUFFER), torch.float32)
    return ref


def test_fp8_storage_forward_matches_dequantised_weights_and_saves_bytes():
    base = build_transformer(TINY, seed=0).eval()
    model = copy.deepcopy(base)
    before = param_bytes(model)
    names = enable_fp8_storage(model, Fp8Policy(), compute_dtype=torch.float32)
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.proj_out" in names
    assert not any(n.endswith(("norm1.linear", "norm.linear")) or n in ("x_embedder", "proj_out") for n in names)
    modules = dict(model.named_modules())
    numel = sum(modules[n].weight.numel() for n in names)
    assert param_bytes(model) == before - 3 * numel + 4 * len(names)  # 4 -> 1 byte each, plus a 0-d fp32 scale
    for n in names:
        assert modules[n].weight.dtype == E4M3 and not modules[n].weight.requires_grad
        assert modules[n].weight_scale.dtype == torch.float32

    ref = dequantised_copy(model, base)
    with torch.no_grad():
        out, expected, original = model(**tiny_inputs())[0], ref(**tiny_inputs())[0], base(**tiny_inputs())[0]
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-6)
    assert (out - original).abs().max() > 1e-4  # fp8 did change the weights: the comparison above means something

    all_fp8 = copy.deepcopy(base)
    mod_names = enable_fp8_storage(all_fp8, Fp8Policy(keep_modulation=False), compute_dtype=torch.float32)
    assert "transformer_blocks.1.norm1_context.linear" in mod_names and "single_transformer_blocks.3.norm.linear" in mod_names
    assert param_bytes(all_fp8) < param_bytes(model)


def test_device_and_dtype_moves_keep_fp8_storage():
    model = build_transformer(TINY, seed=0)
    enable_fp8_storage(model, Fp8Policy(keep_modulation=False), compute_dtype=torch.bfloat16)
    q = model.transformer_blocks[0].attn.to_q
    stored, scale = q.weight.detach().clone(), q.weight_scale.clone()
    model.to("cpu")
    model.to(torch.bfloat16)  # casts everything else; fp8 storage and fp32 scales stay
    assert q.weight.dtype == E4M3 and torch.equal(q.weight.view(torch.uint8), stored.view(torch.uint8))
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert model.transformer_blocks[0].norm1.linear.weight.dtype == E4M3
    assert model.x_embedder.weight.dtype == torch.bfloat16
    with torch.no_grad():
        inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v
                  for k, v in tiny_inputs().items()}
        out = model(**inputs)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert "storage=torch.float8_e4m3fn (scaled)" in repr(q)


def test_meta_built_model_with_assigned_fp8_weights_and_scales():
    source = build_transformer(TINY, seed=0)
    quantised = copy.deepcopy(source)
    names = enable_fp8_storage(quantised, Fp8Policy(), compute_dtype=torch.float32)
    state = {k: v for k, v in quantised.state_dict().items() if not k.endswith(SCALE_BUFFER)}
    scales = {n + ".weight": dict(quantised.named_modules())[n].weight_scale for n in names}

    meta = build_transformer(TINY, device="meta")
    meta.load_state_dict(state, assign=True)  # what the loader does: fp8 tensors go straight in
    loaded = enable_fp8_storage(meta, Fp8Policy(), compute_dtype=torch.float32, scales=scales)
    assert sorted(loaded) == sorted(names)
    with torch.no_grad():
        assert torch.equal(meta(**tiny_inputs())[0], quantised(**tiny_inputs())[0])
    with pytest.raises(ValueError, match="not fp8"):
        enable_fp8_storage(build_transformer(TINY, seed=0), Fp8Policy(), scales={"x_embedder": torch.ones(())})
    with pytest.raises(ValueError, match="not Linear"):
        enable_fp8_storage(build_transformer(TINY, seed=0), Fp8Policy(), scales={"nope.weight": torch.ones(())})


def lora_model(checkpointing, seed=0):
    model = build_transformer(TINY, seed=seed)
    enable_fp8_storage(model, Fp8Policy(keep_modulation=False), compute_dtype=torch.float32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # nonzero B so both A and B get gradients on the first step
            torch.nn.init.normal_(p, std=0.02, generator=g)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_after_fp8_storage_trains_only_lora(checkpointing):
    model = lora_model(checkpointing)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    base_q = model.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base_q, Fp8Linear) and base_q.weight.dtype == E4M3
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}

    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    loss = model(**tiny_inputs())[0].square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and p.dtype == frozen[n].dtype
            assert torch.equal(p.view(torch.uint8), frozen[n].view(torch.uint8))
    assert base_q.weight.dtype == E4M3


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    grads, calls = [], []
    for checkpointing in (False, True):
        model = lora_model(checkpointing)
        base = model.transformer_blocks[0].attn.to_q.base_layer
        count = []
        base.register_forward_hook(lambda *_: count.append(1))
        model(**tiny_inputs())[0].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(len(count))
    assert calls == [1, 2]  # checkpointing recomputed the block, through the fp8 layer, in the backward pass
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) for n in grads[0])


def test_peft_creates_lora_in_the_compute_dtype_not_fp8():
    model = build_transformer(TINY, seed=0, dtype=torch.bfloat16)
    enable_fp8_storage(model, Fp8Policy(), compute_dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k"]))
    loras = [p for n, p in model.named_parameters() if "lora_" in n]
    assert loras and all(p.dtype == torch.bfloat16 for p in loras)  # then upcast to fp32 as for any bf16 run
