"""LoRA layouts: round trips, agreement between layouts and with the readers in the wild (diffusers, ComfyUI's rule)."""

import json
import resource

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dev2pro.errors import UserError
from dev2pro.flux.keys import module_pieces
from dev2pro.flux.spec import FLUX_DEV, TINY, build_transformer
from dev2pro.lora.formats import (ADAPTER_METADATA_KEY, LoraModule, LoraWeights, detect_layout, kohya_metadata,
                                  load_lora, lora_from_state_dict, lora_to_state_dict, save_lora)
from dev2pro.lora.ops import apply_lora, lora_delta


@pytest.fixture(scope="module")
def tiny():
    return build_transformer(TINY, seed=0)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_lora(model, seed=0, skip=(), only=None, std=0.1, uniform=False):
    """A LoRA on every Linear (incl. fused q/k/v/mlp parts and norm_out), ranks 1-4; alpha/rank is 2 everywhere
    (``uniform``) or varies, so the parts of one fused module have different scales."""
    g = torch.Generator().manual_seed(seed)
    lw = LoraWeights()
    for i, (name, lin) in enumerate(linears(model).items()):
        if name in skip or (only is not None and not only(name)):
            continue
        r = 1 + i % 4
        lw[name] = LoraModule(torch.randn(r, lin.in_features, generator=g) * std,
                              torch.randn(lin.out_features, r, generator=g) * std, float(2 * r if uniform else [r, 2 * r, 1, 3][i % 4]))
    return lw


def assert_same_deltas(a, b, atol=1e-6):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        torch.testing.assert_close(lora_delta(a[k]), lora_delta(b[k]), atol=atol, rtol=1e-5, msg=k)


def inputs(spec, seed=0, n_img=16, n_txt=8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, n_img, spec.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, n_txt, spec.context_dim, generator=g),
                pooled_projections=torch.randn(1, spec.pooled_dim, generator=g), timestep=torch.tensor([0.4]),
                guidance=torch.tensor([3.5]), img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(n_txt, 3))


def comfyui_bfl_deltas(sd, prefix="lora_unet_"):
    """What ComfyUI adds to each BFL weight: up @ down * alpha / lora_down.shape[0] (alpha missing -> 1)."""
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            down, up = sd[k].float(), sd[f"{name}.lora_up.weight"].float()
            alpha = sd[f"{name}.alpha"].item() / down.shape[0] if f"{name}.alpha" in sd else 1.0
            out[name[len(prefix):]] = up @ down * alpha
    return out


def bfl_deltas_from(lw, spec):
    """Our diffusers-named deltas assembled into BFL weights with flux.keys (independent of the writer)."""
    out = {}
    for p in module_pieces(spec.num_double, spec.num_single, spec.hidden, spec.mlp_hidden, True):
        if p.diffusers not in lw:
            continue
        d = lora_delta(lw[p.diffusers])
        rows = d if p.diffusers_rows is None else d[slice(*p.diffusers_rows)]
        full = out.setdefault(p.bfl.replace(".", "_"), {})
        full[(p.bfl_rows or (0, d.shape[0]))] = rows
    return {k: torch.cat([v for _, v in sorted(parts.items())]) for k, parts in out.items()}


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("uniform", [True, False])
def test_kohya_diffusers_kohya_round_trip(tiny, tmp_path, uniform):
    lw = random_lora(tiny, uniform=uniform)
    k1 = load_lora(save_lora(lw, tmp_path / "a.safetensors", "kohya"))
    d = load_lora(save_lora(k1, tmp_path / "b.safetensors", "diffusers"))
    k2 = load_lora(save_lora(d, tmp_path / "c.safetensors", "kohya"))
    for got in (k1, d, k2):
        # Equal scales within a fused module: bit-exact (copies, zero padding, power-of-two baking). Different
        # scales share one alpha, folded into the ups: fp32 rounding.
        assert_same_deltas(lw, got, atol=0 if uniform else 1e-7)
    assert {k: m.rank for k, m in k2.items()} == {k: m.rank for k, m in lw.items()}  # padding trimmed
    first, second = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "c.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first) or not uniform


def test_all_layouts_agree_and_are_detected(tiny, tmp_path):
    lw = random_lora(tiny, seed=1, uniform=True)
    for layout in ("kohya", "comfy", "diffusers"):
        path = save_lora(lw, tmp_path / f"{layout}.safetensors", layout)
        assert detect_layout(load_file(path)) == layout
        got = load_lora(path)
        assert got.layout == layout
        assert_same_deltas(lw, got, atol=0)


def test_kohya_file_gives_our_deltas_under_comfyui_rule(tiny, tmp_path):
    lw = random_lora(tiny, seed=2)
    sd = load_file(save_lora(lw, tmp_path / "k.safetensors", "kohya"))
    ours = bfl_deltas_from(lw, TINY)
    comfy = comfyui_bfl_deltas(sd)
    assert ours.keys() == comfy.keys()
    for k in ours:
        torch.testing.assert_close(comfy[k], ours[k], atol=1e-6, rtol=1e-5, msg=k)
    # kohya split_qkv shape: stacked downs, block-diagonal ups with equal-width column blocks
    down, up = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"], sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    w, h = down.shape[0] // 4, TINY.hidden
    assert up.shape == (3 * h + TINY.mlp_hidden, 4 * w)
    assert not up[:h, w:].any() and not up[h:2 * h, :w].any() and not up[3 * h:, :3 * w].any()


def test_partial_fused_module_uses_zero_blocks(tiny, tmp_path):
    keep = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_mlp")
    lw = random_lora(tiny, seed=3, only=lambda n: n in keep, uniform=True)
    path = save_lora(lw, tmp_path / "p.safetensors", "kohya")
    sd = load_file(path)
    assert sorted(k for k in sd if k.endswith(".alpha")) == [
        "lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_single_blocks_1_linear1.alpha"]
    qkv = comfyui_bfl_deltas(sd)["double_blocks_0_img_attn_qkv"]
    assert not qkv[TINY.hidden:2 * TINY.hidden].any()  # k rows untouched
    assert_same_deltas(lw, load_lora(path), atol=0)


def test_dense_fused_up_is_split_exactly(tmp_path):
    g = torch.Generator().manual_seed(4)
    h, r = TINY.hidden, 5
    sd = {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": torch.randn(r, h, generator=g),
          "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": torch.randn(3 * h, r, generator=g),
          "lora_unet_double_blocks_0_txt_attn_qkv.alpha": torch.tensor(2.5)}
    lw = lora_from_state_dict(sd)  # kohya without split_qkv: one dense LoRA on the fused linear
    assert sorted(lw) == [f"transformer_blocks.0.attn.add_{c}_proj" for c in "kqv"]
    assert all(m.rank == r for m in lw.values())  # each part shares the full down
    want = comfyui_bfl_deltas(sd)["double_blocks_0_txt_attn_qkv"]
    got = torch.cat([lora_delta(lw[f"transformer_blocks.0.attn.add_{c}_proj"]) for c in "qkv"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    again, _ = lora_to_state_dict(lw, "kohya")  # shared downs go back to the dense form, not a 3x block-diagonal
    assert all(torch.equal(again[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------ diffusers readers
def test_diffusers_file_loads_in_diffusers_with_alpha(tiny, tmp_path):
    from diffusers.loaders import FluxLoraLoaderMixin

    lw = random_lora(tiny, seed=5)
    path = save_lora(lw, tmp_path / "d.safetensors", "diffusers")
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()[ADAPTER_METADATA_KEY])
    assert cfg["transformer.r"] in (1, 2, 3, 4) and cfg["transformer.alpha_pattern"] and cfg["transformer.rank_pattern"]
    x = inputs(TINY)
    ours = build_transformer(TINY, seed=0)
    apply_lora(ours, lw)
    sd, meta = FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    theirs = build_transformer(TINY, seed=0)
    theirs.load_lora_adapter(sd, prefix="transformer", metadata=meta)
    direct = build_transformer(TINY, seed=0)  # without use_safetensors=True diffusers skips the metadata
    direct.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    no_alpha = build_transformer(TINY, seed=0)
    no_alpha.load_lora_adapter(sd, prefix="transformer")
    with torch.no_grad():
        want = ours(**x).sample
        for model in (theirs, direct):
            torch.testing.assert_close(model(**x).sample, want, atol=1e-5, rtol=0)
        assert (no_alpha(**x).sample - want).abs().max() > 1e-3  # the metadata is what carries alpha


def test_kohya_file_through_diffusers_converter_tiny(tiny, tmp_path):
    """diffusers' kohya converter hard-codes 3072 only for single blocks; double blocks work at any width."""
    from diffusers.loaders import FluxLoraLoaderMixin

    lw = random_lora(tiny, seed=6, only=lambda n: n.startswith("transformer_blocks."))
    path = save_lora(lw, tmp_path / "k.safetensors", "kohya")
    x = inputs(TINY)
    ours = build_transformer(TINY, seed=0)
    apply_lora(ours, lw)
    theirs = build_transformer(TINY, seed=0)
    theirs.load_lora_adapter(FluxLoraLoaderMixin.lora_state_dict(str(path)), prefix="transformer")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).sample, ours(**x).sample, atol=1e-5, rtol=0)


def test_xlabs_matches_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(7)
    h, r, mlp = TINY.hidden, 3, TINY.mlp_hidden
    sd = {}
    for proc, out in (("qkv_lora1", 3 * h), ("qkv_lora2", 3 * h), ("proj_lora1", h), ("proj_lora2", h)):
        sd[f"double_blocks.1.processor.{proc}.down.weight"] = torch.randn(r, h, generator=g)
        sd[f"double_blocks.1.processor.{proc}.up.weight"] = torch.randn(out, r, generator=g)
    sd["single_blocks.0.processor.proj_lora.down.weight"] = torch.randn(r, h, generator=g)
    sd["single_blocks.0.processor.proj_lora.up.weight"] = torch.randn(h, r, generator=g)
    assert detect_layout(sd) == "xlabs"
    lw = lora_from_state_dict(sd, mlp_hidden=mlp)
    ref = _convert_xlabs_flux_lora_to_diffusers(dict(sd))
    for key in ref:
        if key.endswith("lora_A.weight"):
            name = key[len("transformer."):-len(".lora_A.weight")]
            want = ref[key.replace("lora_A", "lora_B")] @ ref[key]  # xlabs has no alpha: scale 1
            got = lora_delta(lw[name])
            if name.endswith(".proj_out"):  # diffusers pads lora_A with zeros for linear2's mlp inputs at load time
                assert got.shape == (h, h + mlp) and not got[:, h:].any()
                got = got[:, :h]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert len(lw) == 9


# ------------------------------------------------------------------------------------------- files, metadata
def test_metadata_written_and_read(tiny, tmp_path):
    lw = random_lora(tiny, seed=8)
    meta = kohya_metadata(16, 8, 1.0, "flux_shift", "flux-dev2pro.safetensors", extra={"ss_steps": 100})
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_guidance_scale"] == "1.0"
    assert all(isinstance(v, str) for v in meta.values())
    d = load_lora(save_lora(lw, tmp_path / "d.safetensors", "diffusers", metadata=meta))
    assert d.metadata["ss_network_dim"] == "16" and ADAPTER_METADATA_KEY in d.metadata
    k = save_lora(d, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(k), "pt") as f:  # a stale PEFT config must not follow into a kohya file (diffusers reads it)
        assert ADAPTER_METADATA_KEY not in f.metadata() and f.metadata()["ss_steps"] == "100"


def test_save_is_atomic_and_refuses_overwrite(tiny, tmp_path):
    lw = random_lora(tiny, seed=9)
    path = save_lora(lw, tmp_path / "x.safetensors", "kohya")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        save_lora(lw, path, "kohya")
    save_lora(lw, path, "comfy", overwrite=True)
    assert detect_layout(load_file(path)) == "comfy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp file left behind
    with pytest.raises(UserError, match="cannot write"):
        save_lora(lw, tmp_path / "y.safetensors", "xlabs")


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not a Flux LoRA layout"):
        detect_layout(["model.layers.0.self_attn.q_proj.lora_A.weight"])
    with pytest.raises(UserError, match="no LoRA tensors.*base model"):
        detect_layout(["img_in.weight", "double_blocks.0.img_attn.qkv.weight"])
    with pytest.raises(UserError, match="text-encoder"):
        detect_layout(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"])
    with pytest.raises(UserError, match="LyCORIS"):
        detect_layout(["lora_unet_double_blocks_0_img_attn_qkv.lokr_w1"])
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(UserError, match="lora_unet_down_blocks_0_attentions_0_proj_in.*another model family"):
        lora_from_state_dict(sdxl)
    with pytest.raises(UserError, match="needs both"):
        lora_from_state_dict({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 4)})
    pickled = tmp_path / "l.pt"
    sd = {"lora_unet_img_in.lora_down.weight": torch.ones(2, 4), "lora_unet_img_in.lora_up.weight": torch.ones(8, 2)}
    torch.save(sd, pickled)
    with pytest.raises(UserError, match=r"l\.pt: not a safetensors file.*--allow-pickle"):
        load_lora(pickled)
    assert load_lora(pickled, allow_pickle=True)["x_embedder"].rank == 2
    with pytest.raises(UserError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"foo.lora_A.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match=r"bad\.safetensors: not a Flux LoRA"):
        load_lora(bad)


# ------------------------------------------------------------------------------------------------ full width
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a")
def test_full_width_kohya_file_through_diffusers_equals_apply_lora(tmp_path):
    """FLUX.1 widths (1 double + 1 single block, fp32, ~2.2 GB): our kohya file through diffusers' own kohya
    converter (hard-coded to 3072 / 19 / 38) gives the same transformer output as apply_lora."""
    from diffusers.loaders import FluxLoraLoaderMixin

    spec = FLUX_DEV.with_(num_double=1, num_single=1)
    model = build_transformer(spec, seed=0)
    x = inputs(spec)
    skip = ("transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp")  # partial fused modules
    blocks = random_lora(model, seed=10, skip=skip, std=0.05, only=lambda n: "blocks." in n)
    rest = random_lora(model, seed=11, std=0.02, only=lambda n: "blocks." not in n)
    with torch.no_grad():
        base = model(**x).sample
    for name, lw in (("blocks", blocks), ("all", LoraWeights({**blocks, **rest}))):
        path = save_lora(lw, tmp_path / f"{name}.safetensors", "kohya")
        apply_lora(model, lw, adapter_name=f"ours_{name}")
        model.set_adapters([f"ours_{name}"])
        with torch.no_grad():
            ours = model(**x).sample
        sd = FluxLoraLoaderMixin.lora_state_dict(str(path))  # raises on any key it cannot place
        comfy = FluxLoraLoaderMixin.lora_state_dict(str(save_lora(lw, tmp_path / f"{name}_c.safetensors", "comfy")))
        assert comfy.keys() == sd.keys() and all(torch.equal(comfy[k], sd[k]) for k in sd)  # diffusion_model. too
        unprefixed = {k.rsplit(".lora_", 1)[0] for k in sd if not k.startswith("transformer.")}
        # diffusers' converter emits embedders / final layer without the "transformer." prefix, so
        # load_lora_weights silently drops them; we re-prefix to check the numbers it produced.
        assert unprefixed == {n for n in lw if "blocks." not in n}
        sd = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in sd.items()}
        converted = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd}
        assert converted == set(lw) | set(skip)  # every module arrived; the skipped parts as zero blocks
        assert all(not sd[f"transformer.{n}.lora_B.weight"].any() for n in skip)
        model.load_lora_adapter(sd, prefix="transformer", adapter_name=f"theirs_{name}")
        injected = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and f"theirs_{name}" in m.lora_A}
        assert injected == converted  # all keys consumed
        model.set_adapters([f"theirs_{name}"])
        with torch.no_grad():
            theirs = model(**x).sample
        assert (ours - base).abs().max() > 1e-2
        torch.testing.assert_close(theirs, ours, atol=1e-5 * float(ours.abs().max()), rtol=0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 1024 ** 2  # KiB on Linux: under 8 GiB


def test_kohya_dataset_fields_count_images_and_caption_tags_per_folder():
    from dev2pro.lora.formats import kohya_dataset_fields

    images = [("/d/10_cat/a.png", "sks cat, sitting, red", 10), ("/d/10_cat/b.png", "sks cat,  red ", 10),
              ("/d/dogs/c.png", "", 1)]
    meta = kohya_dataset_fields(images, [512, 1024], "cat", 1765000000.5)
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"sks cat": 2, "sitting": 1, "red": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 2},
                                                   "dogs": {"n_repeats": 1, "img_count": 1}}
    assert (meta["ss_num_train_images"], meta["ss_resolution"], meta["ss_output_name"]) == ("21", "(1024, 1024)", "cat")
    assert meta["ss_training_started_at"] == "1765000000.5"
