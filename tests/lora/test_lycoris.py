"""LoKr / LoHa / DoRA adapters: peft-trained modules -> files -> ComfyUI's formulas (``comfy_ref``), dev2pro's merge,
diffusers' loaders and peft itself all give the same weights; files other tools write are read; bad files refused."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_ref import comfy_merge, key_map
from dev2pro import families
from dev2pro.errors import UserError
from dev2pro.families.flux2.keys import diffusers_to_bfl as flux2_to_bfl
from dev2pro.families.flux2.spec import TINY_KLEIN
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY
from dev2pro.lora.dora import is_peft_dora
from dev2pro.lora.formats import load_lora, save_lora
from dev2pro.lora.merge import merge_loras
from dev2pro.lora.ops import apply_lora, lora_from_peft_model
from dev2pro.lora.peft_adapters import rebased
from dev2pro.train.model import add_lora

SPECS = {"flux1": TINY, "flux2": TINY_KLEIN}


def trained(kind, family="flux1", seed=0, **kw):
    """A tiny model with a peft adapter of ``kind`` on every linear, its weights moved off their init."""
    spec = SPECS[family]
    model = families.build_transformer(spec, seed=0, dtype=torch.float32)
    names = families.get(family).lora_targets("all_linear", spec.num_double, spec.num_single, [], None, None,
                                              spec.guidance_embeds)
    params = add_lora(model, names, 4, 2.0, kind=kind, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if "magnitude" in str(p.shape) else 0.05))
    return model.eval()


def peft_merged(model, family):
    """peft's own merged weights (BFL names): the training truth."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    sd = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
          if not any(s in k for s in ("lora_", "lokr_", "hada_"))}
    return (diffusers_to_bfl if family == "flux1" else flux2_to_bfl)(sd)


def base_file(tmp_path, model, family):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():  # the base weights under the adapter
        if isinstance(m, BaseTunerLayer):
            m.unmerge()
    sd = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
          if not any(s in k for s in ("lora_", "lokr_", "hada_"))}
    bfl = (diffusers_to_bfl if family == "flux1" else flux2_to_bfl)(sd)
    path = tmp_path / f"base-{family}.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    return path, bfl


def comfy_map(bfl, family):
    spec = SPECS[family]
    return key_map(bfl, spec.num_double, spec.num_single, spec.hidden,
                   spec.mlp_hidden if family == "flux1" else None)


@pytest.mark.parametrize("kind,family,kw", [("dora", "flux1", {}), ("lokr", "flux1", {}), ("loha", "flux1", {}),
                                            ("lokr", "flux1", {"lokr_factor": 16, "lokr_decompose_both": True}),
                                            ("lokr", "flux2", {}), ("dora", "flux2", {})])
def test_trained_file_comfyui_dev2pro_merge_and_peft_agree(tmp_path, kind, family, kw):
    model = trained(kind, family, **kw)
    lw = lora_from_peft_model(model)
    assert lw.adapter == kind and lw.family == family
    path = save_lora(rebased(lw, model) if is_peft_dora(lw) else lw, tmp_path / "a.safetensors", "kohya")
    truth = peft_merged(model, family)
    base, bfl = base_file(tmp_path, model, family)
    sd = load_file(str(path))
    ours = load_file(str(merge_loras(base, [(str(path), 1.0)], tmp_path / "m.safetensors")))
    theirs = comfy_merge(bfl, sd, comfy_map(bfl, family))
    changed = 0
    for k, w in truth.items():
        torch.testing.assert_close(theirs[k], w.float(), rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(ours[k], w.float(), rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
        changed += not torch.equal(w.float(), bfl[k].float())
    assert changed >= 10  # the adapter does move the weights
    if kind != "dora":  # whole modules under kohya names, slices of fused weights under diffusers names
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_proj.") for k in sd)
        assert any(k.startswith("lora_transformer_transformer_blocks_0_attn_to_q.") for k in sd)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["dev2pro.adapter_type"] == kind
    if kw:  # factor 16, both decomposed where the rank allows: w1 (16 x 16) a product, w2 (4 x 4) whole
        assert sd["lora_unet_double_blocks_0_img_attn_proj.lokr_w1_a"].shape == (16, 4)
        assert "lora_unet_double_blocks_0_img_attn_proj.lokr_w2" in sd


def test_merge_into_fp8_and_bf16_bases(tmp_path):
    from dev2pro.flux import checkpoint as C

    from dev2pro.flux import convert as flux_convert
    model = trained("lokr")
    path = save_lora(lora_from_peft_model(model), tmp_path / "a.safetensors", "kohya")
    truth = peft_merged(model, "flux1")
    base, _ = base_file(tmp_path, model, "flux1")
    from dev2pro.flux.fp8 import dequantize, quantize

    def stored(t, dtype):  # the exact merged weight stored once in ``dtype``: the best a merge can do
        if dtype == "bf16":
            return t.bfloat16().float()
        return dequantize(*quantize(t, scaled=dtype == "fp8-scaled"), torch.float32)

    for dtype in ("bf16", "fp8", "fp8-scaled"):
        src = flux_convert.convert(base, tmp_path / f"{dtype}.safetensors", layout="comfy", dtype=dtype)
        merged = C.open_checkpoint(merge_loras(src, [(str(path), 1.0)], tmp_path / f"m-{dtype}.safetensors"))
        assert merged.fp8_format == C.open_checkpoint(src).fp8_format
        for k in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"):
            w = merged.get_dequantized(k, torch.float32)
            err = float((w - truth[k]).norm() / truth[k].norm())
            best = float((stored(truth[k], dtype) - truth[k]).norm() / truth[k].norm())
            print(f"{dtype} {k}: relative error {err:.2e} (storing the exact result once: {best:.2e})")
            assert err < 1.6 * best, (dtype, k, err, best)  # two roundings (base, result): ~sqrt(2)


def test_dora_diffusers_layout_loads_in_diffusers_like_peft(tmp_path):
    model = trained("dora")
    lw = lora_from_peft_model(model)
    path = save_lora(lw, tmp_path / "d.safetensors", "diffusers")
    from diffusers import FluxPipeline

    sd, meta = FluxPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])["transformer.use_dora"]
    fresh = families.build_transformer(TINY, seed=0, dtype=torch.float32)
    fresh.load_lora_adapter(sd, prefix="transformer", metadata=meta, adapter_name="d")
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x)[0], model(**x)[0], rtol=1e-4, atol=1e-5)
    back = load_lora(path)
    assert back.adapter == "dora" and all(m.axis == "out" for m in back.values())


def test_flux2_lokr_diffusers_layout_loads_in_diffusers(tmp_path):
    from diffusers import Flux2KleinPipeline

    model = trained("lokr", "flux2")
    path = save_lora(lora_from_peft_model(model), tmp_path / "k.safetensors", "diffusers")
    sd, meta = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    fresh = families.build_transformer(TINY_KLEIN, seed=0, dtype=torch.float32)
    fresh.load_lora_adapter(sd, prefix="transformer", metadata=meta, adapter_name="k")
    truth = peft_merged(model, "flux2")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in fresh.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    got = flux2_to_bfl({k.replace(".base_layer.", "."): v for k, v in fresh.state_dict().items() if "lokr_" not in k})
    for k in truth:
        torch.testing.assert_close(got[k], truth[k], rtol=1e-5, atol=2e-6)


def test_unreadable_layouts_are_refused(tmp_path):
    loha = lora_from_peft_model(trained("loha"))
    with pytest.raises(UserError, match="diffusers 0.42 loads no LoHa"):
        save_lora(loha, tmp_path / "x.safetensors", "diffusers")
    assert not (tmp_path / "x.safetensors").exists()
    dora = lora_from_peft_model(trained("dora"))
    with pytest.raises(UserError, match="base weights it was trained on"):
        save_lora(dora, tmp_path / "y.safetensors", "kohya")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
                generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.4]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


def test_sampling_applies_each_type_like_peft(tmp_path):
    """`sample`'s route (ops.apply_lora): LoKr/LoHa as peft adapters, ComfyUI DoRA merged -- same output as peft."""
    x = _inputs(1)
    for kind in ("lokr", "loha", "dora"):
        model = trained(kind)
        lw = lora_from_peft_model(model)
        path = save_lora(rebased(lw, model) if kind == "dora" else lw, tmp_path / f"{kind}.safetensors", "kohya")
        fresh = families.build_transformer(TINY, seed=0, dtype=torch.float32).eval()
        apply_lora(fresh, load_lora(path), 1.0, adapter_name="s")
        with torch.no_grad():
            torch.testing.assert_close(fresh(**x)[0], model(**x)[0], rtol=1e-4, atol=1e-5, msg=kind)


def test_sampler_swaps_a_lokr_adapter_and_keeps_fp8_storage(tmp_path):
    """The training sampler deletes and re-applies its 'sample' adapter each time; on fp8 storage the adapter is a
    side branch: the fp8 weights stay bit for bit, the output moves as in fp32."""
    from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage

    model = trained("lokr")
    lw = lora_from_peft_model(model)
    x = _inputs(2)
    fresh = families.build_transformer(TINY, seed=0, dtype=torch.float32).eval()
    for _ in range(2):
        apply_lora(fresh, lw, 1.0, adapter_name="sample")
        with torch.no_grad():
            torch.testing.assert_close(fresh(**x)[0], model(**x)[0], rtol=1e-4, atol=1e-5)
        fresh.delete_adapters("sample")
    fp8 = families.build_transformer(TINY, seed=0, dtype=torch.float32).eval()
    enable_fp8_storage(fp8, Fp8Policy(), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in fp8.state_dict().items()}
    with torch.no_grad():
        plain = fp8(**x)[0]
    apply_lora(fp8, lw, 1.0, adapter_name="sample")
    after = {k.replace(".base_layer.", "."): v for k, v in fp8.state_dict().items()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert fp8.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = fp8(**x)[0]
        effect = model(**x)[0] - families.build_transformer(TINY, seed=0, dtype=torch.float32).eval()(**x)[0]
    # the adapter's effect survives fp8 storage (a merge into e4m3 weights would round much of it away)
    assert float((out - plain - effect).norm() / effect.norm()) < 0.25


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_block_swap_keeps_lycoris_weights_trainable(kind):
    """Block swap streams frozen base weights only: a LoKr/LoHa run with 4 swapped blocks equals the plain run."""
    from dev2pro.train.blockswap import BlockSwap

    def run(n):
        model = trained(kind, seed=1).train()
        params = [p for p in model.parameters() if p.requires_grad]
        swap = BlockSwap(model, n, "cpu").place() if n else None
        opt = torch.optim.AdamW(params, lr=1e-2)
        x, losses = _inputs(3), []
        target = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(4))
        for _ in range(3):
            loss = (model(**x)[0] - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        del swap
        return losses, [p.detach().clone() for p in params]

    (la, pa), (lb, pb) = run(0), run(4)
    assert la == lb and la[0] != la[-1] and all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_peft_dora_on_scaled_fp8_is_merged_not_read_unscaled():
    """peft's DoRA layer would norm the fp8 weights without their scales: on scaled fp8 storage it is merged (with
    a warning that fp8 rounds), and the merged weights stay scaled fp8."""
    from dev2pro.flux.fp8 import SCALE_BUFFER, Fp8Policy, enable_fp8_storage

    model = trained("dora")
    lw = lora_from_peft_model(model)
    fp8 = families.build_transformer(TINY, seed=0, dtype=torch.float32).eval()
    enable_fp8_storage(fp8, Fp8Policy(), compute_dtype=torch.float32)
    q = fp8.transformer_blocks[0].attn.to_q
    before = q.weight.clone()
    with pytest.warns(UserWarning, match="fp8 storage"):
        apply_lora(fp8, lw, 1.0, adapter_name="d")
    assert q.weight.dtype == torch.float8_e4m3fn and SCALE_BUFFER in q._buffers and not torch.equal(q.weight, before)
    assert not any("lora_" in n for n, _ in fp8.named_parameters())
