"""Every LoRA tool on FLUX.2 (tiny klein): `lora info | convert | merge | extract`, `sampling.load_base`, adapters, and
the one-line family errors. References are diffusers' own: ``Flux2LoraLoaderMixin`` loading, peft ``fuse_lora``."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.families.flux2 import lora_keys as K
from dev2pro.families.flux2.tiny import write_bfl_transformer
from dev2pro.flux import checkpoint as C
from dev2pro.flux import convert as flux_convert
from dev2pro.lora import adapter as adaptermod
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora
from dev2pro.recipes import lora_tools as T
from dev2pro.sampling import load_base

pytest.importorskip("peft")
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin  # noqa: E402

LAYOUTS = ("kohya", "comfy", "diffusers")
# parts of fused BFL linears (q, k without v), the adaLN whose halves BFL swaps, a shared modulation, embedders
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.add_v_proj",
           "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.ff.linear_in", "transformer_blocks.0.ff_context"
           ".linear_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.3.attn.to_out",
           "norm_out.linear", "double_stream_modulation_img.linear", "x_embedder", "context_embedder", "proj_out")
# what diffusers' kohya reader drops (with a warning): compare it only on the rest
KOHYA_DROPPED = ("stream_modulation", "norm_out.linear")


def transformer(folder) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32).eval()


def random_lora(model, names=TARGETS, rank=4, alpha=3.0, seed=0, magnitude=0.1, dtype=torch.float32) -> LoraWeights:
    """A FLUX.2 LoRA on ``names`` with random A and B (alpha/rank = 0.75: not a power of two, the hard case)."""
    g, mods = torch.Generator().manual_seed(seed), dict(model.named_modules())
    lw = LoraWeights(family="flux2")
    for n in names:
        w = mods[n].weight
        lw[n] = LoraModule((torch.randn(rank, w.shape[1], generator=g) * magnitude).to(dtype),
                           (torch.randn(w.shape[0], rank, generator=g) * magnitude).to(dtype), alpha)
    return lw


def inputs(seed=0) -> dict:
    from dev2pro.families import get

    g = torch.Generator().manual_seed(seed)
    x, pe = torch.randn(1, 4, 128, generator=g), torch.randn(1, 5, 96, generator=g)
    return {**get("flux2").model_inputs(x, torch.tensor([0.6]), {"prompt_embeds": pe}, 4, 4, None, "cpu",
                                        torch.float32), "return_dict": False}


def run(model, seed=0) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(seed))[0]


def diffusers_load(model, path, scale=1.0, name="x"):
    """``model`` with ``path`` loaded by diffusers (Flux2LoraLoaderMixin), as its pipelines do."""
    sd, md = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    Flux2LoraLoaderMixin.load_lora_into_transformer(sd, transformer=model, metadata=md, adapter_name=name)
    model.set_adapters([name], weights=[scale])
    return model


def same_lora(a, b) -> bool:
    return set(a) == set(b) and all(a[n].alpha == b[n].alpha and a[n].up.dtype == b[n].up.dtype and
                                    torch.equal(a[n].down, b[n].down) and torch.equal(a[n].up, b[n].up) for n in a)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def klein(klein_base_dir):
    return klein_base_dir, transformer(klein_base_dir)


@pytest.fixture(scope="module")
def lora_files(klein, tmp_path_factory):
    """The random LoRA in each of our three layout names."""
    d = tmp_path_factory.mktemp("flux2-loras")
    lw = random_lora(klein[1])
    return lw, {lay: save_lora(lw, d / f"l.{lay}.safetensors", lay) for lay in LAYOUTS}


# ------------------------------------------------------------------------------------- files, info, convert
def test_files_are_flux2_layouts_and_read_back_exactly(lora_files):
    lw, files = lora_files
    first = {"kohya": "lora_unet_", "comfy": "diffusion_model.", "diffusers": "transformer."}
    for lay, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert all(k.startswith(first[lay]) for k in keys)
        assert K.detect_layout(keys) == {"kohya": "kohya", "comfy": "bfl", "diffusers": "peft"}[lay]
        assert meta["format"] == "pt"
        back = load_lora(path)
        assert (back.family, back.layout) == ("flux2", lay) and same_lora(back, lw)
    with safe_open(str(files["comfy"]), framework="pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys())  # diffusers raises on .alpha in this layout


def test_info_names_family_and_layout(lora_files, capsys):
    for lay, path in lora_files[1].items():
        out = T.info(str(path))
        assert (out["family"], out["layout"], out["modules"]) == ("FLUX.2", lay, len(TARGETS))
        assert "family:   FLUX.2" in capsys.readouterr().out


@pytest.mark.parametrize("src", LAYOUTS)
def test_convert_round_trips_are_bit_identical(lora_files, tmp_path, src):
    """src -> dst -> src for both other layouts (6 directions in all): the same bytes, file for file."""
    lw, files = lora_files
    for dst in LAYOUTS:
        if dst == src:
            continue
        main(["lora", "convert", str(files[src]), str(tmp_path / f"{dst}.safetensors"), "--layout", dst])
        there = load_lora(tmp_path / f"{dst}.safetensors")
        assert there.layout == dst and same_lora(there, lw)
        back = T.convert(str(tmp_path / f"{dst}.safetensors"), str(tmp_path / f"back-{dst}.safetensors"), src)
        assert back.read_bytes() == files[src].read_bytes(), (src, dst)


def test_attention_preset_in_diffusers_names_is_flux2(klein, tmp_path):
    """``single_transformer_blocks.N.attn.to_qkv_mlp_proj`` sorts before every other key of an attention-only
    diffusers file and starts like FLUX.1's ``attn.to_q``: it must not make the file FLUX.1."""
    names = [n for n in TARGETS if ".attn." in n]  # double q/k/out/add_v + single to_qkv_mlp_proj (+ to_out)
    names.remove("single_transformer_blocks.3.attn.to_out")  # FLUX.2-only by itself: would hide the case
    lw = random_lora(klein[1], names)
    path = save_lora(lw, tmp_path / "attn.safetensors", "diffusers")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys())[0].startswith("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj")
    back = load_lora(path)
    assert back.family == "flux2" and same_lora(back, lw)
    assert K.lora_family(["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"])[0] == "flux2"
    assert K.lora_family(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])[0] == "flux1"


def test_convert_of_a_lora_that_fits_both_families(klein, tmp_path, capsys):
    """Double-block attention only: names and shapes fit FLUX.1 and klein 4B alike. Its header decides (what
    musubi, kohya and dev2pro write); without one it is read as FLUX.1 with a note, and --family flux2 writes
    FLUX.2's comfy layout, which diffusers' FLUX.2 loader reads (FLUX.1's comfy form it drops whole)."""
    names = [n for n in TARGETS if n.startswith("transformer_blocks.") and ".attn." in n]
    lw = random_lora(klein[1], names)
    bare = save_lora(lw, tmp_path / "bare.safetensors", "kohya")
    assert load_lora(bare).family is None
    main(["lora", "convert", str(bare), str(tmp_path / "as1.safetensors"), "--layout", "comfy"])
    assert "--family flux2" in capsys.readouterr().out
    with safe_open(str(tmp_path / "as1.safetensors"), framework="pt") as f:
        assert any(k.endswith(".alpha") for k in f.keys())  # FLUX.1's comfy form
    assert main(["lora", "convert", str(bare), str(tmp_path / "as2.safetensors"), "--layout", "comfy",
                 "--family", "flux2"]) == 0
    assert "note:" not in capsys.readouterr().out
    y0 = run(klein[1])
    ref = run(diffusers_load(copy.deepcopy(klein[1]), bare))
    got = run(diffusers_load(copy.deepcopy(klein[1]), tmp_path / "as2.safetensors"))
    assert rel(got - y0, ref - y0) < 1e-4 and rel(ref, y0) > 1e-3  # the same effect, and there is one
    tagged = save_lora(lw, tmp_path / "tagged.safetensors", "kohya", metadata={"ss_base_model_version":
                                                                               "flux_2_klein_4b"})
    assert load_lora(tagged).family == "flux2"
    with pytest.raises(UserError, match="FLUX.2"):
        load_lora(tagged, family="flux1")


def test_stale_exact_header_is_ignored(klein, tmp_path):
    """A comfy file keeps alpha in ``dev2pro.lora_exact``; a tool that resizes the tensors but copies the header
    (kohya's resize_lora does) must be read from its tensors, as ComfyUI reads it, not with the old rank/alpha."""
    name = "transformer_blocks.0.attn.to_out.0"
    path = save_lora(random_lora(klein[1], [name], rank=4, alpha=3.0), tmp_path / "r4.safetensors", "comfy")
    with safe_open(str(path), framework="pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert name in json.loads(meta["dev2pro.lora_exact"])
    key = "diffusion_model.double_blocks.0.img_attn.proj.lora_"
    u, sv, vh = torch.linalg.svd(sd[key + "B.weight"].double() @ sd[key + "A.weight"].double(), full_matrices=False)
    sd[key + "B.weight"], sd[key + "A.weight"] = (u[:, :2] * sv[:2]).float().contiguous(), vh[:2].float().contiguous()
    save_file(sd, str(tmp_path / "r2.safetensors"), meta)
    m = load_lora(tmp_path / "r2.safetensors", family="flux2")[name]
    assert (m.rank, m.alpha) == (2, 2.0)  # comfy layout: no alpha, so what ComfyUI applies is up @ down
    assert torch.allclose(m.up @ m.down * m.scale, sd[key + "B.weight"] @ sd[key + "A.weight"])


def test_bf16_lora_round_trips_bit_identical(klein, tmp_path):
    lw = random_lora(klein[1], dtype=torch.bfloat16, alpha=5.0)  # scale 1.25: folding needs a wider B dtype
    a = save_lora(lw, tmp_path / "a.safetensors", "diffusers")
    for lay in ("kohya", "comfy"):
        mid = T.convert(str(a), str(tmp_path / f"{lay}.safetensors"), lay)
        assert same_lora(load_lora(mid), lw)
        assert T.convert(str(mid), str(tmp_path / f"back-{lay}.safetensors"), "diffusers").read_bytes() == \
            a.read_bytes()


def test_save_refuses_nan_and_unknown_layout(klein, tmp_path):
    lw = random_lora(klein[1])
    lw["x_embedder"].up[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        save_lora(lw, tmp_path / "nan.safetensors", "diffusers")
    with pytest.raises(UserError, match="xlabs"):
        save_lora(random_lora(klein[1]), tmp_path / "x.safetensors", "xlabs")
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------- load_base
@pytest.mark.parametrize("lay", ["diffusers", "kohya"])
def test_load_base_equals_diffusers_loading(klein, tmp_path, lay):
    folder, base = klein
    names = TARGETS if lay == "diffusers" else [n for n in TARGETS if not any(d in n for d in KOHYA_DROPPED)]
    path = save_lora(random_lora(base, names), tmp_path / "l.safetensors", lay)
    ours, _ = load_base(folder, [(str(path), 0.8)])
    ref = diffusers_load(copy.deepcopy(base), path, 0.8)
    want, got = run(ref), run(ours)
    assert rel(want, run(base)) > 1e-2  # the LoRA changes the output
    assert rel(got, want) < 1e-5


def test_load_base_bfl_layout_equals_our_peft_load(klein, lora_files):
    """diffusers 0.42 reads the BFL-key layout but does not swap the final adaLN's halves: compare with our own
    load of the diffusers-layout file instead, and show the quirk."""
    folder, base = klein
    files = lora_files[1]
    got, _ = load_base(folder, [(str(files["comfy"]), 1.0)])
    peft, _ = load_base(folder, [(str(files["diffusers"]), 1.0)])
    want = run(diffusers_load(copy.deepcopy(base), files["diffusers"]))
    assert rel(run(got), run(peft)) < 1e-6 and rel(run(peft), want) < 1e-5
    assert rel(run(diffusers_load(copy.deepcopy(base), files["comfy"])), want) > 1e-3  # diffusers' adaLN bug


# ----------------------------------------------------------------------------------------------- merge
def fused_reference(folder, lora_path, scale, base_sd=None) -> dict:
    """diffusers' own merge: load_lora_into_transformer + fuse_lora + unload_lora, weights by diffusers name."""
    m = transformer(folder)
    if base_sd is not None:
        m.load_state_dict(base_sd)
    diffusers_load(m, lora_path)
    m.fuse_lora(lora_scale=scale)
    m.unload_lora()
    return m.state_dict()


@pytest.mark.parametrize("kind", ["folder", "bfl", "comfy"])
def test_merge_equals_diffusers_fuse(klein, lora_files, tmp_path, kind):
    folder = klein[0]
    base = {"folder": folder, "bfl": None, "comfy": None}[kind] or write_bfl_transformer(
        folder, tmp_path / "base.safetensors", prefix="model.diffusion_model." if kind == "comfy" else "")
    out = tmp_path / ("merged" if kind == "folder" else "merged.safetensors")
    main(["lora", "merge", "--base", str(base), "--lora", f"{lora_files[1]['kohya']}:0.7", str(out)])
    ck = C.open_checkpoint(out)
    assert ck.layout == C.open_checkpoint(base).layout and ck.family.name == "flux2"
    merged, _ = C.load_transformer(out, dtype=torch.float32)
    ref = fused_reference(folder, lora_files[1]["diffusers"], 0.7)
    got = merged.state_dict()
    assert set(got) == set(ref)
    changed = [k for k in ref if not torch.equal(ref[k], klein[1].state_dict()[k])]
    assert len(changed) == len(TARGETS)
    for k in ref:
        assert (got[k] - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max(), k
    assert rel(run(merged), run(fused_as_model(folder, ref))) < 1e-5


def fused_as_model(folder, sd):
    m = transformer(folder)
    m.load_state_dict(sd)
    return m


@pytest.mark.parametrize("dtype", ["fp8", "fp8-scaled"])
def test_merge_into_fp8_keeps_scheme_and_equals_diffusers_within_fp8(klein, lora_files, tmp_path, dtype):
    folder = klein[0]
    src = flux_convert.convert(folder, tmp_path / f"{dtype}.safetensors", layout="comfy", dtype=dtype)
    out = T.merge(str(src), [(str(lora_files[1]["comfy"]), 1.0)], str(tmp_path / "merged.safetensors"))
    ck_in, ck_out = C.open_checkpoint(src), C.open_checkpoint(out)
    assert ck_out.fp8_format == ck_in.fp8_format == dtype and ck_out.dtypes == ck_in.dtypes
    base_sd = C.load_transformer(src, dtype=torch.float32)[0].state_dict()  # the fp8 base, dequantised
    ref = fused_reference(folder, lora_files[1]["diffusers"], 1.0, base_sd)
    got = C.load_transformer(out, dtype=torch.float32)[0].state_dict()
    for k in ref:  # e4m3: one rounding is within 2^-4 of the value, or half its subnormal step 2^-10 (scale <= 1)
        assert ((got[k] - ref[k]).abs() <= ref[k].abs() * 2 ** -4 + 2 ** -10).all(), k


# ------------------------------------------------------------------------------------------------ extract
def test_extract_between_flux2_checkpoints(klein_base_dir, klein_distilled_dir, tmp_path):
    """Full rank: base + extracted LoRA = the tuned model's linears (fp32 round-off); FLUX.2 layout and metadata."""
    out = tmp_path / "x.safetensors"
    main(["lora", "extract", "--base", str(klein_base_dir), "--tuned", str(klein_distilled_dir), str(out),
          "--rank", "64", "--exact"])
    lw = load_lora(out)
    assert (lw.family, lw.layout) == ("flux2", "kohya")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux_2" and meta["modelspec.architecture"] == "flux-2-custom/lora"
    assert meta["ss_network_module"] == "networks.lora_flux_2"
    merged = T.merge(str(klein_base_dir), [(str(out), 1.0)], str(tmp_path / "merged"))
    a = transformer(klein_distilled_dir).state_dict()
    b = C.load_transformer(merged, dtype=torch.float32)[0].state_dict()
    linears = [k for k, v in a.items() if v.ndim == 2]
    assert len(linears) == len(K.diffusers_targets(2, 4, guidance=False))
    for k in linears:
        assert (b[k] - a[k]).abs().max() <= 1e-5 * a[k].abs().max(), k


# ------------------------------------------------------------------------------------------ wrong family
def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "FLUX.1" in msg and "FLUX.2" in msg, msg
    return msg


@pytest.fixture(scope="module")
def flux1_lora(tiny_dev_dir, tmp_path_factory):
    """A FLUX.1 LoRA whose names say FLUX.1 (single-block to_q, norm1)."""
    from dev2pro.flux.checkpoint import load_transformer

    m, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    names = ("single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear")
    lw = random_lora(m, names)
    lw.family = None
    return save_lora(lw, tmp_path_factory.mktemp("f1") / "flux1.safetensors", "kohya")


def test_merge_refuses_the_other_family(tiny_dev_dir, klein, lora_files, flux1_lora, tmp_path):
    with pytest.raises(UserError) as e:
        T.merge(str(tiny_dev_dir), [(str(lora_files[1]["kohya"]), 1.0)], str(tmp_path / "m"))
    assert "is FLUX.2 but base model" in one_line(e)
    with pytest.raises(UserError) as e:
        T.merge(str(klein[0]), [(str(flux1_lora), 1.0)], str(tmp_path / "m"))
    assert "is FLUX.1 but base model" in one_line(e)
    assert not (tmp_path / "m").exists()


def test_load_base_and_adapter_refuse_the_other_family(tiny_dev_dir, klein, lora_files, flux1_lora):
    """`sample --lora` and `compare` arms load through load_base; `train`'s model.adapter through attach_file."""
    for base, lora in ((tiny_dev_dir, lora_files[1]["diffusers"]), (klein[0], flux1_lora)):
        with pytest.raises(UserError) as e:
            load_base(base, [(str(lora), 1.0)])
        one_line(e)
    with pytest.raises(UserError) as e:
        adaptermod.attach_file(copy.deepcopy(klein[1]), flux1_lora)
    one_line(e)


def test_sample_cli_refuses_the_other_family(tiny_dev_dir, lora_files, tmp_path, capsys):
    rc = main(["sample", "--model", str(tiny_dev_dir), "--lora", str(lora_files[1]["comfy"]), "--prompt", "a cat",
               "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "FLUX.2" in err and "FLUX.1" in err, err


def test_extract_refuses_flux1_against_flux2(tiny_dev_dir, klein, tmp_path):
    with pytest.raises(UserError) as e:
        T.extract_lora(str(tiny_dev_dir), str(klein[0]), str(tmp_path / "x.safetensors"), rank=4)
    one_line(e)
    assert not (tmp_path / "x.safetensors").exists()


def test_undecidable_file_reads_as_the_base_family(klein, tmp_path):
    """Attention-only double-block LoRAs fit FLUX.1 and FLUX.2 alike: the base decides, FLUX.1 by default."""
    lw = random_lora(klein[1], ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0"))
    path = save_lora(lw, tmp_path / "a.safetensors", "kohya")
    assert K.lora_family(*(lambda f: (list(f.keys()), {k: f.get_slice(k).get_shape() for k in f.keys()}))(
        safe_open(str(path), framework="pt")))[0] is None
    assert load_lora(path).family is None
    assert same_lora(load_lora(path, family="flux2"), lw)
    ours, _ = load_base(klein[0], [(str(path), 1.0)])
    ref = diffusers_load(copy.deepcopy(klein[1]), save_lora(lw, tmp_path / "p.safetensors", "diffusers"))
    assert rel(run(ours), run(ref)) < 1e-5


def test_compare_arm_refuses_the_other_family(tiny_dev_dir, lora_files, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{tiny_dev_dir}"\nprompts = ["a red cat"]\nseeds = [0]\nsteps = 1\nsize = "64x64"\n'
                      f'out = "{tmp_path / "cmp"}"\n[[arms]]\nname = "dev + klein LoRA"\n'
                      f'loras = ["{lora_files[1]["kohya"]}:0.8"]\n')
    rc = main(["compare", str(config)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc != 0 and err.startswith("dev2pro compare: error: arm 'dev + klein LoRA': LoRA"), err
    assert f"is FLUX.2 but base model {tiny_dev_dir} is FLUX.1" in err  # before any arm loads or renders


def test_info_names_the_base_variant_from_the_metadata(klein, tmp_path, capsys):
    """`lora info` says which FLUX.2 base a LoRA is for (dev vs a klein size), read from what trainers write."""
    from dev2pro.families.flux2.spec import PRESETS
    from dev2pro.lora.flux2 import kohya_fields

    lw = random_lora(klein[1])
    for preset, base in (("flux2-dev", "flux-2-dev"), ("flux2-klein-4b-base", "flux-2-klein-4b")):
        path = save_lora(lw, tmp_path / f"{preset}.safetensors", "kohya", metadata=kohya_fields(PRESETS[preset]))
        out = T.info(str(path))
        assert out["base"] == base and f"base:     {base}\n" in capsys.readouterr().out
    plain = T.info(str(save_lora(lw, tmp_path / "plain.safetensors", "kohya")))
    assert "base" not in plain  # nothing recorded: nothing claimed
