"""Checkpoint reading, loading, conversion and the errors users see (tiny models in real key layouts)."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import checkpoint as C
from dev2pro.flux import convert as flux_convert
from dev2pro.flux import inspection
from dev2pro.flux import fp8
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import FLUX_DEV, TINY, build_transformer


def _tiny_sd(dtype=torch.float32, seed=0, guidance=True):
    spec = TINY.with_(guidance_embeds=guidance)
    return build_transformer(spec, seed=seed, dtype=dtype).state_dict()


def _inputs(spec=TINY, seed=0, tokens=16, txt=8):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, spec.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, spec.context_dim, generator=g),
        pooled_projections=torch.randn(1, spec.pooled_dim, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                           indexing="ij"), -1).reshape(-1, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]) if spec.guidance_embeds else None,
        return_dict=False,
    )


@pytest.fixture
def bfl_file(tmp_path):
    sd = diffusers_to_bfl(_tiny_sd())
    path = tmp_path / "tiny-bfl.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _write(layout, src, dst, **kw):
    return flux_convert.convert(src, dst, layout=layout, **kw)


# ------------------------------------------------------------------------------------------------ detection
def test_detects_every_layout(tmp_path, bfl_file, tiny_dev_dir):
    assert C.open_checkpoint(tiny_dev_dir).layout == "diffusers-folder"
    assert C.open_checkpoint(bfl_file).layout == "bfl"
    comfy = _write("comfy", bfl_file, tmp_path / "c.safetensors")
    ck = C.open_checkpoint(comfy)
    assert ck.layout == "comfy" and ck.prefix == "model.diffusion_model."
    single = tmp_path / "d.safetensors"
    save_file(_tiny_sd(), str(single))
    assert C.open_checkpoint(single).layout == "diffusers"
    info = inspection.describe(ck)
    assert (info["double_blocks"], info["single_blocks"], info["hidden"], info["heads"]) == (2, 4, 64, 4)
    assert info["params"] == sum(v.numel() for v in _tiny_sd().values())
    assert info["variant"] == "dev" and info["fp8"] == "none"
    assert info["dtypes"]["attention"] == {"fp32": 16}  # qkv x2 + proj x2 per double block


def test_sharded_diffusers_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SHARD_BYTES", 200_000)  # force several shards on a tiny model
    src = tmp_path / "src.safetensors"
    save_file(_tiny_sd(), str(src))
    out = flux_convert.convert(src, tmp_path / "sharded", layout="diffusers")
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ck = C.open_checkpoint(out)
    assert ck.layout == "diffusers-folder" and len(set(ck.files.values())) > 1
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel.from_pretrained(out)
    ref = _tiny_sd()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trips_between_every_layout_are_bit_exact(tmp_path, dtype):
    sd = _tiny_sd(dtype)
    start = tmp_path / "start.safetensors"
    save_file(sd, str(start))
    paths = {lay: flux_convert.convert(start, tmp_path / f"from-{lay}", layout=lay) for lay in ("bfl", "comfy", "diffusers")}
    paths["diffusers-file"] = start
    for a, src in paths.items():
        for b in ("bfl", "comfy", "diffusers"):
            mid = flux_convert.convert(src, tmp_path / f"{a}-{b}", layout=b)
            got = _load_any(flux_convert.convert(mid, tmp_path / f"{a}-{b}-back", layout="diffusers"))
            assert set(got) == set(sd)
            assert all(torch.equal(got[k], sd[k]) and got[k].dtype == dtype for k in sd), (a, b)


def _load_any(path):
    ck = C.open_checkpoint(path)
    return {k: ck.get(k) for k in ck.shapes}


def test_fp8_conversion_error_within_e4m3_bound_and_policy(tmp_path, bfl_file):
    src = C.open_checkpoint(bfl_file)
    for dtype in ("fp8", "fp8-scaled"):
        out = flux_convert.convert(bfl_file, tmp_path / f"{dtype}.safetensors", dtype=dtype)
        ck = C.open_checkpoint(out)
        assert ck.fp8_format == ("fp8-scaled" if dtype == "fp8-scaled" else "fp8")
        meta = ck.metadata
        assert meta["dev2pro.dtype"] == dtype and "modulation" in meta["dev2pro.dtype_policy"]
        for k in ck.shapes:
            ref = src.get(k).float()
            if ck.dtypes[k] != torch.float8_e4m3fn:
                # keep-in-bf16 policy: norms, biases, embedders, modulation, final layer
                assert ck.dtypes[k] == torch.bfloat16
                assert ref.ndim == 1 or not fp8.Fp8Policy().should_quantize(k, ref.shape)
                continue
            got = ck.get_dequantized(k, torch.float32)
            big = ref.abs() > (2.0 ** -6 if dtype == "fp8" else ref.abs().max() * 2.0 ** -6)  # normal range
            rel = ((got - ref).abs() / ref.abs())[big]
            assert rel.max() <= 2.0 ** -4 + 1e-6, (k, rel.max())
        assert ck.dtypes["double_blocks.0.img_attn.qkv.weight"] == torch.float8_e4m3fn
        assert ck.dtypes["double_blocks.0.img_mod.lin.weight"] == torch.bfloat16


def test_scaled_fp8_is_more_accurate_on_small_weights(tmp_path):
    sd = {k: (v * 1e-3 if v.ndim == 2 else v) for k, v in diffusers_to_bfl(_tiny_sd()).items()}
    src = tmp_path / "small.safetensors"
    save_file(sd, str(src))
    errs = {}
    for dtype in ("fp8", "fp8-scaled"):
        ck = C.open_checkpoint(flux_convert.convert(src, tmp_path / f"{dtype}.safetensors", dtype=dtype))
        k = "double_blocks.0.img_attn.qkv.weight"
        errs[dtype] = ((ck.get_dequantized(k, torch.float32) - sd[k]).norm() / sd[k].norm()).item()
    assert errs["fp8-scaled"] < errs["fp8"] / 4, errs


def test_keep_policy_can_quantise_modulation(tmp_path, bfl_file):
    policy = fp8.Fp8Policy.from_names(["norms", "biases", "embedders", "final"])
    out = flux_convert.convert(bfl_file, tmp_path / "all.safetensors", dtype="fp8", policy=policy)
    ck = C.open_checkpoint(out)
    assert ck.dtypes["double_blocks.0.img_mod.lin.weight"] == torch.float8_e4m3fn
    assert ck.dtypes["img_in.weight"] == torch.bfloat16


# ------------------------------------------------------------------------------------------------ loading
def test_diffusers_folder_written_by_convert_matches_own_loader(tmp_path, bfl_file):
    from diffusers import FluxTransformer2DModel

    out = flux_convert.convert(bfl_file, tmp_path / "folder", layout="diffusers")
    theirs = FluxTransformer2DModel.from_pretrained(out).eval()
    ours, _ = C.load_transformer(bfl_file, dtype=torch.float32)
    x = _inputs()
    with torch.no_grad():
        a, b = theirs(**x)[0], ours(**x)[0]
    mine = ours.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in theirs.state_dict().items())  # bitwise equal weights
    # outputs: equal up to fp32 round-off (a view vs a contiguous copy of the same weight can take another kernel)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_comfy_scaled_fp8_file_loads_with_scales_applied(tmp_path):
    """A hand-made ComfyUI scaled-fp8 file: weight = fp8 * scale_weight, marker tensor at the top level."""
    sd = diffusers_to_bfl(_tiny_sd())
    out, expected = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and "qkv" in k or "linear1" in k and k.endswith("weight"):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            out["model.diffusion_model." + k] = q
            out["model.diffusion_model." + k[:-len("weight")] + "scale_weight"] = scale.reshape(())
            expected[k] = q.float() * scale
        else:
            out["model.diffusion_model." + k] = v
            expected[k] = v
    # ComfyUI writes the marker under the model prefix
    out["model.diffusion_model.scaled_fp8"] = out.pop("scaled_fp8")
    path = tmp_path / "comfy-scaled.safetensors"
    save_file(out, str(path))
    ck = C.open_checkpoint(path)
    assert ck.layout == "comfy" and ck.fp8_format == "fp8-scaled"
    model, _ = C.load_transformer(path, dtype=torch.float32)
    want = _diff(expected)
    got = model.state_dict()
    for k in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.proj_mlp.weight"):
        assert torch.equal(got[k], want[k]), k
    # and the scale is not 1: plain fp8 values would be far off
    assert not torch.allclose(got["transformer_blocks.0.attn.to_q.weight"],
                              _diff({k: (v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v)
                                     for k, v in sd.items()})["transformer_blocks.0.attn.to_q.weight"])


def _diff(bfl_sd):
    from dev2pro.flux.keys import bfl_to_diffusers
    return bfl_to_diffusers(bfl_sd)


def test_fp8_storage_load_matches_dequantized(tmp_path, bfl_file):
    path = flux_convert.convert(bfl_file, tmp_path / "s.safetensors", dtype="fp8-scaled")
    stored, _ = C.load_transformer(path, dtype=torch.float32, fp8_storage=True)
    plain, _ = C.load_transformer(path, dtype=torch.float32)
    assert stored.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert fp8.param_bytes(stored) < 0.6 * fp8.param_bytes(plain)
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(stored(**x)[0], plain(**x)[0], atol=1e-5)


def test_dedistilled_without_guidance_reported_and_loaded(tmp_path):
    sd = diffusers_to_bfl(_tiny_sd(guidance=False))
    assert not any(k.startswith("guidance_in") for k in sd)
    path = tmp_path / "dedistilled.safetensors"
    save_file(sd, str(path))
    info = inspection.describe(C.open_checkpoint(path))
    assert info["variant"] == "pro" and not info["guidance_embeds"] and "true CFG" in info["variant_detail"]
    model, _ = C.load_transformer(path, dtype=torch.float32)
    assert model.config.guidance_embeds is False
    with torch.no_grad():
        assert model(**_inputs(TINY.with_(guidance_embeds=False)))[0].shape == (1, 16, 64)


def test_drop_guidance_writes_a_pro_like_model(tmp_path, bfl_file):
    from diffusers import FluxTransformer2DModel

    out = flux_convert.convert(bfl_file, tmp_path / "pro", layout="diffusers", drop_guidance=True)
    model = FluxTransformer2DModel.from_pretrained(out)
    assert model.config.guidance_embeds is False


# ------------------------------------------------------------------------------------------------ errors
def test_errors_are_clear(tmp_path, bfl_file):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        C.open_checkpoint(junk)

    data = bfl_file.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        C.open_checkpoint(trunc)

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        C.open_checkpoint(sdxl)
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, str(sd3))
    with pytest.raises(CheckpointError, match="SD3"):
        C.open_checkpoint(sd3)

    extra = load_file(str(bfl_file))
    extra["double_blocks.0.img_attn.lora.weight"] = torch.zeros(2)
    bad = tmp_path / "extra.safetensors"
    save_file(extra, str(bad))
    with pytest.raises(CheckpointError, match="not part of a Flux transformer"):
        C.open_checkpoint(bad)

    shape = load_file(str(bfl_file))
    shape["double_blocks.1.img_mlp.2.weight"] = torch.zeros(64, 7)
    bad = tmp_path / "shape.safetensors"
    save_file(shape, str(bad))
    with pytest.raises(CheckpointError, match="shape"):
        C.load_transformer(bad)

    pt = tmp_path / "model.ckpt"
    torch.save(load_file(str(bfl_file)), pt)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        C.open_checkpoint(pt)
    assert C.open_checkpoint(pt, allow_pickle=True).layout == "bfl"

    with pytest.raises(UserError, match="does not exist"):
        flux_convert.convert(bfl_file, tmp_path / "nope" / "out.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):  # root ignores permissions
        with pytest.raises(UserError, match="not writable"):
            flux_convert.convert(bfl_file, ro / "out.safetensors")
    out = flux_convert.convert(bfl_file, tmp_path / "once.safetensors")
    with pytest.raises(UserError, match="--overwrite"):
        flux_convert.convert(bfl_file, out)
    flux_convert.convert(bfl_file, out, overwrite=True)


def test_cli_inspect_and_convert(tmp_path, bfl_file, capsys):
    from dev2pro.cli import main

    assert main(["inspect", str(bfl_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "bfl" and info["variant"] == "dev"
    out = tmp_path / "fp8.safetensors"
    assert main(["convert", str(bfl_file), str(out), "--layout", "comfy", "--dtype", "fp8-scaled"]) == 0
    assert C.open_checkpoint(out).fp8_format == "fp8-scaled"
    assert "convert:" in capsys.readouterr().err  # the byte bar (tqdm writes to stderr)
    quiet = tmp_path / "quiet.safetensors"
    assert main(["convert", str(bfl_file), str(quiet), "--layout", "comfy", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.startswith(f"wrote {quiet}")  # a log gets the result line only
    assert main(["convert", str(bfl_file), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"\x00" * 4)
    assert main(["inspect", str(junk)]) == 2


def test_scaled_fp8_is_refused_for_a_diffusers_folder(tmp_path, bfl_file, capsys):
    """diffusers' from_pretrained drops ComfyUI's scale_weight tensors (a warning) and runs unscaled fp8 weights:
    a folder it cannot read right is refused, asked for or kept from a scaled source, before anything is written;
    plain fp8 there and scaled fp8 in one file still convert."""
    from dev2pro.cli import main

    scaled = tmp_path / "scaled.safetensors"
    assert main(["convert", str(bfl_file), str(scaled), "--layout", "comfy", "--dtype", "fp8-scaled",
                 "--no-progress"]) == 0
    capsys.readouterr()
    for src, args in ((bfl_file, ["--layout", "diffusers", "--dtype", "fp8-scaled"]),
                      (scaled, ["--layout", "diffusers"])):
        out = tmp_path / f"folder-{src.stem}"
        assert main(["convert", str(src), str(out), *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "scale_weight tensors, which diffusers' from_pretrained ignores" in err and "--dtype fp8 " in err
        assert not out.exists()
    plain = tmp_path / "plain"
    assert main(["convert", str(scaled), str(plain), "--layout", "diffusers", "--dtype", "fp8", "--no-progress"]) == 0
    assert C.open_checkpoint(plain).fp8_format == "fp8"


def test_streaming_writer_header_is_valid_safetensors(tmp_path):
    from dev2pro.outputs import save_safetensors

    t = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(3, dtype=torch.float8_e4m3fn),
         "c": torch.tensor(2.5)}
    path = save_safetensors(t, tmp_path / "x.safetensors", {"k": "v"})
    back = load_file(str(path))
    assert all(torch.equal(back[k].float(), t[k].float()) and back[k].dtype == t[k].dtype for k in t)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + n) % 8 == 0


@pytest.mark.slow
def test_bfl_output_matches_diffusers_converter_full_width(tmp_path):
    """diffusers' BFL converter hard-codes hidden 3072: check our BFL writer against it at full width."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    spec = FLUX_DEV.with_(num_double=1, num_single=1)
    sd = build_transformer(spec, seed=0, dtype=torch.bfloat16).state_dict()
    src = tmp_path / "d.safetensors"
    save_file(sd, str(src))
    del sd
    out = flux_convert.convert(src, tmp_path / "bfl.safetensors", layout="bfl")
    theirs = convert_flux_transformer_checkpoint_to_diffusers(load_file(str(out)))
    ref = load_file(str(src))
    assert set(theirs) == set(ref)
    assert all(torch.equal(theirs[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------ safety (issue 10)
def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(tmp_path, tiny_dev_dir):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_dev_dir, dst)
    return dst


def test_convert_never_deletes_a_model_folder(tmp_path, model_copy, bfl_file, capsys):
    from dev2pro.cli import main

    before = _snapshot(model_copy)
    assert {"model_index.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer_2/tokenizer.json"} <= set(before)
    cases = [[str(model_copy), str(model_copy), "--layout", "diffusers"],  # the command
             [str(bfl_file), str(model_copy), "--layout", "diffusers"],  # a layout onto a model folder
             [str(bfl_file), str(model_copy)],  # a .safetensors onto a model folder
             [str(model_copy), str(model_copy / "transformer"), "--layout", "diffusers"],  # onto its own source
             [str(model_copy / "transformer"), str(model_copy / "transformer" / "diffusion_pytorch_model.safetensors"),
              "--layout", "bfl"],
             [str(bfl_file), str(model_copy / "vae"), "--layout", "diffusers"]]  # same file names, not a transformer
    for args in cases:
        assert main(["convert", *args, "--overwrite"]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "error:" in err, err
        assert _snapshot(model_copy) == before, args  # every file still there, byte for byte
    assert not [p for p in tmp_path.rglob(".dev2pro-tmp-*")]


def test_convert_replaces_only_its_own_earlier_output(tmp_path, bfl_file):
    out = flux_convert.convert(bfl_file, tmp_path / "t", layout="diffusers")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt.*does not write"):
        flux_convert.convert(bfl_file, out, layout="diffusers", overwrite=True)
    (out / "notes.txt").unlink()
    flux_convert.convert(bfl_file, out, layout="diffusers", dtype="bf16", overwrite=True)  # its own files: replaced
    assert C.open_checkpoint(out).dtypes["x_embedder.weight"] == torch.bfloat16
    same = flux_convert.convert(bfl_file, tmp_path / "same.safetensors")
    with pytest.raises(UserError, match="is the input"):
        flux_convert.convert(same, same, dtype="bf16", overwrite=True)


def test_missing_components_are_reported_and_not_converted(tmp_path, bfl_file, capsys):
    from dev2pro.cli import main

    sd = load_file(str(bfl_file))
    part = tmp_path / "no-final.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("final_layer")}, str(part))
    info = inspection.describe(C.open_checkpoint(part))
    assert info["complete"] is False and info["missing"] == [
        "final_layer.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias",
        "final_layer.linear.weight"]
    assert inspection.describe(C.open_checkpoint(bfl_file))["missing"] == []
    assert main(["inspect", str(part)]) == 0
    assert "missing     final_layer.adaLN_modulation.1, final_layer.linear (4 tensors)" in capsys.readouterr().out
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(part), str(out)]) == 2
    err = capsys.readouterr().err
    assert "final_layer.linear" in err and "--allow-incomplete" in err and not out.exists()
    assert main(["convert", str(part), str(out), "--allow-incomplete"]) == 0
    assert set(load_file(str(out))) == {k for k in sd if not k.startswith("final_layer")}


def test_non_finite_base_is_caught_at_load_and_never_converted(tmp_path, bfl_file, capsys):
    from dev2pro.cli import main

    sd = load_file(str(bfl_file))
    sd["single_blocks.1.linear2.weight"][5, 7] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(UserError, match=r"single_blocks.1.linear2.weight holds 1 NaN/inf"):
        C.load_transformer(bad)
    q = tmp_path / "fp8.safetensors"
    flux_convert.convert(bfl_file, q, dtype="fp8")
    raw = load_file(str(q))
    raw["double_blocks.0.img_mlp.0.weight"].view(torch.uint8)[0, 0] = 0x7F  # an e4m3fn NaN
    save_file(raw, str(q))
    with pytest.raises(UserError, match="img_mlp.0.weight.*NaN/inf"):
        C.load_transformer(q, fp8_storage=True)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(bad), str(out)]) == 2
    assert "NaN/inf" in capsys.readouterr().err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_temps_of_a_killed_convert_are_removed_by_the_next_run(tmp_path, bfl_file):
    import socket
    import subprocess

    from dev2pro import outputs

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale_file = tmp_path / f".dev2pro-tmp-out.safetensors-{dead.pid}@{host}-0123abcd"
    stale_file.write_bytes(b"half a tensor")
    stale_dir = tmp_path / f".dev2pro-tmp-out-{dead.pid}@{host}-89abcdef"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f".dev2pro-tmp-other-{os.getpid()}@{host}-00000000"  # a live writer's: kept
    live.write_bytes(b"x")
    other_host = tmp_path / f".dev2pro-tmp-x-{dead.pid}@not-{host}-00000000"  # maybe alive elsewhere: kept
    other_host.write_bytes(b"x")
    legacy = [tmp_path / ".out.safetensors.k2x_9abc.tmp", tmp_path / ".out.safetensors.old"]  # older dev2pro
    for p in legacy:
        (p / "out.safetensors").mkdir(parents=True)
    outputs._cleaned.clear()
    flux_convert.convert(bfl_file, tmp_path / "out.safetensors")
    assert not stale_file.exists() and not stale_dir.exists() and not any(p.exists() for p in legacy)
    assert live.exists() and other_host.exists()


def _with_header(src, dst, edit):
    """A copy of ``src`` whose JSON header ``edit(header)`` changed (the data bytes are kept as they are)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


def test_a_lying_header_is_one_line_naming_the_file(tmp_path, bfl_file, capsys):
    """Issue 18.7: a header claiming a 1e6 x 1e6 weight made inspect report a trillion parameters (exit 0),
    convert ask for terabytes of free space and train die inside diffusers."""
    from dev2pro.cli import main

    key = "double_blocks.0.img_attn.qkv.weight"
    size = C.open_checkpoint(bfl_file).shapes[key]
    nbytes = size[0] * size[1] * 4

    def huge(h):
        h[key]["shape"] = [1_000_000, 1_000_000]
    lying = _with_header(bfl_file, tmp_path / "huge.safetensors", huge)
    expected = (f"{lying} has a damaged header: tensor '{key}' claims shape (1000000, 1000000) (F32, "
                f"4000000000000 bytes) but holds {nbytes} bytes. The file is corrupt or not a real checkpoint -- "
                f"download or convert it again")
    for argv in (["inspect", str(lying)], ["convert", str(lying), str(tmp_path / "out.safetensors")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"dev2pro {argv[0]}: error: {expected}"], err
    with pytest.raises(CheckpointError) as e:
        C.load_transformer(lying)
    assert str(e.value) == expected
    assert not (tmp_path / "out.safetensors").exists()

    def backwards(h):
        b, e = h[key]["data_offsets"]
        h[key]["data_offsets"] = [e, b]
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has data_offsets \[\d+, \d+\] outside the file's"):
        C.open_checkpoint(_with_header(bfl_file, tmp_path / "backwards.safetensors", backwards))

    def twice(h):  # a second name for the same bytes: every entry is consistent, the sum is not
        h["double_blocks.0.img_attn.qkv.bias"] = dict(h[key])
        h["double_blocks.0.img_attn.qkv.bias"]["shape"] = list(size)
    with pytest.raises(CheckpointError, match=r"its tensors claim \d+ bytes of data but the file holds \d+"):
        C.open_checkpoint(_with_header(bfl_file, tmp_path / "twice.safetensors", twice))

    def strange(h):
        h[key]["shape"] = [-1, 4]
    with pytest.raises(CheckpointError, match=r"has an invalid shape \[-1, 4\]"):
        C.open_checkpoint(_with_header(bfl_file, tmp_path / "negative.safetensors", strange))


def test_a_diffusers_folder_into_a_safetensors_name_is_one_bfl_file(tmp_path, tiny_dev_dir, capsys):
    """`dev2pro convert FOLDER out.safetensors` wrote a diffusers *folder* named out.safetensors; now one BFL file
    (the layout ComfyUI/Forge/BFL load), a plain name keeps the folder, and --layout diffusers into a .safetensors
    name is refused naming both fixes."""
    from dev2pro.cli import main

    assert main(["convert", str(tiny_dev_dir), str(tmp_path / "dev.safetensors"), "--no-progress"]) == 0
    assert "(layout bfl, dtype as input)" in capsys.readouterr().out
    one = C.open_checkpoint(tmp_path / "dev.safetensors")
    assert (tmp_path / "dev.safetensors").is_file() and one.layout == "bfl"
    assert "double_blocks.0.img_attn.qkv.weight" in one.shapes and not one.missing()
    folder = flux_convert.convert(tiny_dev_dir, tmp_path / "dev-copy")
    assert folder.is_dir() and C.open_checkpoint(folder).layout == "diffusers-folder"
    with pytest.raises(UserError, match=r"--layout diffusers writes a transformer folder .* name a folder "
                                        r"\(e.g. .*dev2\), or choose --layout bfl or comfy"):
        flux_convert.convert(tiny_dev_dir, tmp_path / "dev2.safetensors", layout="diffusers")
    assert not (tmp_path / "dev2.safetensors").exists()
    assert flux_convert.output_layout("comfy", "x.safetensors") == "comfy"  # a single file keeps its layout
