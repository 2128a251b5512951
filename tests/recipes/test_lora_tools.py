"""`dev2pro lora merge | extract | convert | info` on tiny checkpoints in real layouts."""

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.flux import checkpoint as C
from dev2pro.flux import convert as flux_convert
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora
from dev2pro.lora.ops import apply_lora, lora_delta
from dev2pro.recipes import lora_tools as T

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
           "transformer_blocks.1.ff.net.2", "single_transformer_blocks.2.proj_mlp",
           "single_transformer_blocks.0.attn.to_q"]


def _random_lora(model, rank=4, seed=0, magnitude=0.05):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    lw = LoraWeights()
    for name in TARGETS:
        w = mods[name].weight
        lw[name] = LoraModule(torch.randn(rank, w.shape[1], generator=g) * magnitude,
                              torch.randn(w.shape[0], rank, generator=g) * magnitude, alpha=2.0)
    return lw


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
                generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.4]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


@pytest.fixture
def base(tmp_path):
    model = build_transformer(TINY, seed=0)
    path = tmp_path / "base-bfl.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}, str(path))
    lw = _random_lora(model)
    lora = save_lora(lw, tmp_path / "l.safetensors", "kohya")
    return path, lora, lw


@pytest.mark.parametrize("dtype", [None, "bf16", "fp8-scaled"])
def test_merge_then_forward_equals_lora_applied_forward(tmp_path, base, dtype):
    path, lora, _ = base
    src = path if dtype is None else flux_convert.convert(path, tmp_path / f"{dtype}.safetensors", layout="comfy", dtype=dtype)
    merged = T.merge(str(src), [(str(lora), 0.7)], str(tmp_path / "merged.safetensors"))
    ck = C.open_checkpoint(merged)
    assert ck.layout == C.open_checkpoint(src).layout and ck.fp8_format == C.open_checkpoint(src).fp8_format
    plain, _ = C.load_transformer(merged, dtype=torch.float32)
    ref, _ = C.load_transformer(src, dtype=torch.float32)
    apply_lora(ref, load_lora(lora), 0.7)
    with torch.no_grad():
        a, b = plain(**_x())[0], ref(**_x())[0]
    # fp32: float rounding only; bf16: the merged weight is rounded to bf16 once; fp8: requantised (e4m3 bound)
    tol = {None: 1e-5, "bf16": 2e-2, "fp8-scaled": 2e-1}[dtype]
    assert (a - b).abs().max() < tol * b.abs().max(), (dtype, (a - b).abs().max())
    unchanged = "double_blocks.0.img_mlp.0.weight"
    assert torch.equal(ck.get(unchanged), C.open_checkpoint(src).get(unchanged))


def test_extract_recovers_delta_and_error_is_monotone(tmp_path, base):
    path, lora, lw = base
    merged = T.merge(str(path), [(str(lora), 1.0)], str(tmp_path / "merged.safetensors"))
    errors = []
    for r in (1, 2, 4, 8):
        out = tmp_path / f"x{r}.safetensors"
        report = T.extract_lora(str(path), str(merged), str(out), rank=r)
        got = load_lora(out)
        assert set(got) == set(lw), set(got) ^ set(lw)
        err = sum(float((lora_delta(got[n]) - lora_delta(lw[n])).norm() ** 2) for n in lw) ** 0.5
        errors.append(err)
        if r >= 4:  # the LoRA has rank 4: full recovery
            assert err < 1e-5 and all(v["energy"] > 0.999999 for v in report["layers"].values())
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:])), errors
    with pytest.raises(UserError, match="identical"):
        T.extract_lora(str(path), str(path), str(tmp_path / "none.safetensors"), rank=4)


def test_lora_convert_round_trip_and_cli(tmp_path, base, capsys):
    _, lora, lw = base
    assert main(["lora", "convert", str(lora), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"),
                 "--to", "kohya"]) == 0
    back = load_lora(tmp_path / "k.safetensors")
    assert all(torch.allclose(lora_delta(back[n]), lora_delta(lw[n]), atol=1e-7) for n in lw)
    assert main(["lora", "info", "--json", str(lora)]) == 0
    assert '"layout": "kohya"' in capsys.readouterr().out


def test_lora_tool_errors(tmp_path, base, capsys):
    path, lora, _ = base
    other = LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)})
    bad = save_lora(other, tmp_path / "other.safetensors", "diffusers")
    with pytest.raises(UserError, match="another model"):
        T.merge(str(path), [(str(bad), 1.0)], str(tmp_path / "m.safetensors"))
    assert main(["lora", "merge", "--base", str(path), "--lora", f"{lora}:abc", str(tmp_path / "m.safetensors")]) == 2
    assert "scale" in capsys.readouterr().err
    assert main(["lora", "info", str(tmp_path / "missing.safetensors")]) == 2
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(junk))
    assert main(["lora", "info", str(junk)]) == 2
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    assert main(["lora", "merge", "--base", str(path), "--lora", str(lora), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ safety (issue 10)
def _bad_lora(tmp_path, lw, name, **change):
    """A diffusers-layout LoRA file with one module changed (written with safetensors' own writer)."""
    from dev2pro.lora.formats import lora_to_state_dict

    lw = LoraWeights({**lw, name: LoraModule(change.get("down", lw[name].down), change.get("up", lw[name].up),
                                             lw[name].alpha)})
    sd, meta = lora_to_state_dict(lw, "diffusers")
    path = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def test_wrong_shape_lora_is_invalid_for_info_and_merge(tmp_path, base, capsys):
    path, _, lw = base
    up = lw["transformer_blocks.0.attn.to_k"].up
    bad = _bad_lora(tmp_path, lw, "transformer_blocks.0.attn.to_k", up=torch.cat([up, up[:8]]))  # 72 rows, not 64
    assert main(["lora", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "transformer_blocks.0.attn.to_k" in err and "72x64" in err and "64x64" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["lora", "merge", "--base", str(path), "--lora", str(bad), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "transformer_blocks.0.attn.to_k" in err and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_non_finite_lora_is_refused_by_merge_sample_and_info(tmp_path, base, capsys):
    from dev2pro.sampling import load_base

    path, _, lw = base
    up = lw["transformer_blocks.1.ff.net.2"].up.clone()
    up[3, 1] = float("inf")
    bad = _bad_lora(tmp_path, lw, "transformer_blocks.1.ff.net.2", up=up)
    assert main(["lora", "merge", "--base", str(path), "--lora", str(bad), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "transformer_blocks.1.ff.net.2" in err and str(bad) in err
    assert not (tmp_path / "m.safetensors").exists()
    assert main(["lora", "info", str(bad)]) == 2
    with pytest.raises(UserError, match="NaN/inf"):
        load_base(path, [(str(bad), 1.0)])


def test_merge_refuses_to_write_onto_its_base_or_lora(tmp_path, base, capsys):
    path, lora, _ = base
    before = path.read_bytes(), lora.read_bytes()
    for out in (path, lora):
        assert main(["lora", "merge", "--base", str(path), "--lora", str(lora), str(out), "--overwrite"]) == 2
        assert "replace what this command reads" in capsys.readouterr().err
    assert main(["lora", "convert", str(lora), str(lora), "--to", "comfy", "--overwrite"]) == 2
    assert (path.read_bytes(), lora.read_bytes()) == before


def test_merged_file_with_non_finite_values_is_not_written(tmp_path, base, capsys):
    """A finite LoRA on a base whose fp16 weights overflow: the writer's own check refuses the output."""
    path, _, lw = base
    sd = C.open_checkpoint(path)
    weights = {k: sd.get(k).to(torch.float16) for k in sd.shapes}
    weights["double_blocks.0.img_attn.qkv.weight"][:] = 65000.0  # near fp16's max; the delta pushes it over
    half = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(half))
    big = _bad_lora(tmp_path, lw, "transformer_blocks.0.attn.to_q", up=lw["transformer_blocks.0.attn.to_q"].up * 1e5,
                    down=lw["transformer_blocks.0.attn.to_q"].down.abs() + 1)
    assert main(["lora", "merge", "--base", str(half), "--lora", str(big), str(tmp_path / "m.safetensors")]) == 2
    assert "NaN/inf" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_alpha_with_several_elements_is_one_line_for_info_merge_and_sample(tmp_path, base, capsys):
    """Issue 18.7: ``.alpha`` holding a vector raised 'a Tensor with 4 elements cannot be converted to Scalar'."""
    from safetensors.torch import load_file

    from dev2pro.sampling import load_base

    path, lora, _ = base
    sd = load_file(str(lora))
    key = next(k for k in sd if k.endswith(".alpha"))
    sd[key] = torch.full((4,), 2.0)
    bad = tmp_path / "vector-alpha.safetensors"
    save_file(sd, str(bad))
    for argv in (["lora", "info", str(bad)],
                 ["lora", "merge", "--base", str(path), "--lora", str(bad), str(tmp_path / "m.safetensors")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"{bad}: LoRA module" in lines[0] and "alpha holds 4 values (shape (4,)), not one number" in lines[0]
    with pytest.raises(UserError, match=r"alpha holds 4 values"):
        load_base(path, [(str(bad), 1.0)])
    assert not (tmp_path / "m.safetensors").exists()
