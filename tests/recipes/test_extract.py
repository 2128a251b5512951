"""`dev2pro lora extract`: randomized vs exact SVD, the retained-energy report, the --energy warning, --ranks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora
from dev2pro.lora.ops import decompose, extract, lora_delta, rank_errors
from dev2pro.lora import extraction as X
from dev2pro.recipes import lora_tools as T


def _spectrum_matrix(out, inp, seed=0, power=0.7):
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=g))
    return (u * torch.arange(1, n + 1) ** -power) @ v.T


def test_randomized_svd_keeps_the_exact_energy_and_is_chosen_when_rank_is_small():
    d = _spectrum_matrix(256, 192)
    exact, rand = decompose(d, 16, exact=True), decompose(d, 16)
    assert exact.method == "exact" and rand.method == "randomized" and rand.s.numel() == 16 + 16
    assert abs(rand.energy(16) - exact.energy(16)) / exact.energy(16) < 5e-3
    # the energy a randomized module reports is the true one of its delta: 1 - ||d - lora||^2 / ||d||^2
    module, kept = extract(d, 16)
    true = 1 - float((d - lora_delta(module)).double().norm() ** 2 / d.double().norm() ** 2)
    assert abs(kept - true) < 1e-5 and module.rank == 16
    assert decompose(d, 100).method == "exact"  # near-full ranks: the exact SVD
    torch.testing.assert_close(decompose(d, 16).s, rand.s)  # seeded: same result twice


def test_rank_errors_match_a_hand_computation():
    w, d = torch.randn(40, 30), _spectrum_matrix(40, 30, seed=1)
    f = decompose(d, 30, exact=True)
    x = torch.randn(50, 30)
    errs = rank_errors(w, d, f, [2, 30], x)
    lora = extract(d, 2, exact=True)[0]
    num, den = errs[2]
    want = (x @ (w + lora_delta(lora)).T - x @ (w + d).T).norm() / (x @ (w + d).T).norm()
    assert abs((num / den) ** 0.5 - float(want)) < 1e-5 and errs[30][0] < 1e-8 * den


@pytest.fixture
def pair(tmp_path):
    """A tiny BFL base and the same base with a rank-4 LoRA merged and one bias changed."""
    model = build_transformer(TINY, seed=0)
    sd = model.state_dict()
    a = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(sd).items()}, str(a))
    g = torch.Generator().manual_seed(1)
    lw = LoraWeights({n: LoraModule(torch.randn(4, sd[n + ".weight"].shape[1], generator=g) * 0.1,
                                    torch.randn(sd[n + ".weight"].shape[0], 4, generator=g) * 0.1, 4.0)
                      for n in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp",
                                "transformer_blocks.1.ff.net.2")})
    merged = T.merge(str(a), [(str(save_lora(lw, tmp_path / "l.safetensors", "kohya")), 1.0)],
                     str(tmp_path / "b0.safetensors"))
    from safetensors.torch import load_file

    b_sd = load_file(str(merged))
    b_sd["final_layer.linear.bias"] = b_sd["final_layer.linear.bias"] + 0.5
    b = tmp_path / "b.safetensors"
    save_file(b_sd, str(b))
    return a, b, lw


def test_extract_writes_an_energy_report_and_warns_when_the_target_is_not_met(tmp_path, pair, capsys):
    a, b, lw = pair
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", "--from", str(a), "--to", str(b), str(out), "--rank", "2",
                 "--energy", "0.99"]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "x.safetensors.json").read_text())
    assert set(report["layers"]) == set(lw)
    assert all(v["rank"] == 2 and v["energy"] < 0.99 for v in report["layers"].values())
    assert "--energy 0.99 not met in 3 of 3 layers" in err and "raise --rank" in err
    assert "final_layer.linear.bias" not in str(report["layers"]) and "proj_out.bias" in report["not_linear"]
    assert "not in the LoRA" in err
    by_rank = report["total"]["energy_by_rank"]
    assert list(by_rank) == ["1", "2"] and by_rank["1"] <= by_rank["2"] == report["total"]["retained_energy"]
    # a rank that holds the whole delta: no warning, recommended rank within the ladder
    out4 = tmp_path / "y.safetensors"
    rep = T.extract_lora(str(a), str(b), str(out4), rank=4, energy=0.99)
    assert rep["total"]["retained_energy"] > 0.999999 and not any("not met" in w for w in rep["warnings"])
    assert rep["recommended_rank"] == 4
    (tmp_path / "z.safetensors.json").write_text("{}")  # the report is an output too: never overwritten silently
    with pytest.raises(UserError, match="exists"):
        T.extract_lora(str(a), str(b), str(tmp_path / "z.safetensors"), rank=4)
    assert not (tmp_path / "z.safetensors").exists()


def test_ranks_mode_reports_fidelity_and_writes_no_lora(tmp_path, pair, capsys):
    a, b, _ = pair
    out = tmp_path / "fidelity.json"
    assert main(["lora", "extract", "--from", str(a), "--to", str(b), str(out), "--ranks", "1,2,4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("fidelity", "x"))) == ["fidelity.json"]
    rep = json.loads(out.read_text())
    errs = rep["total"]["output_error_by_rank"]
    assert errs["1"] > errs["2"] > errs["4"] and errs["4"] < 1e-5
    for layer in rep["layers"].values():
        e = layer["output_error_by_rank"]
        assert e["1"] >= e["2"] >= e["4"]
    assert rep["recommended_rank"] <= 4 and "output rel. error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # a usage error, like any other bad flag
        main(["lora", "extract", "--base", str(a), "--tuned", str(b), str(tmp_path / "f2.json"), "--ranks", "a,b"])
    assert exit_.value.code == 2
    assert "--ranks 'a,b' must be comma-separated integers" in capsys.readouterr().err


def test_a_target_not_met_is_said_whether_or_not_energy_was_given(tmp_path, pair, capsys):
    """Without --energy the default 0.9 target was 'recommended: <the cap>' with no warning even when that rank
    kept far less; with --ranks the same claim stood beside 'no rank in --ranks keeps 0.9'. Now: 'none up to rank
    k', the energy that rank keeps, and what to do -- in both modes, and energy_target_met in the report."""
    a, b, _ = pair
    assert main(["lora", "extract", "--base", str(a), "--tuned", str(b), str(tmp_path / "x.safetensors"),
                 "--rank", "1"]) == 0
    out, err = capsys.readouterr()
    rep = json.loads((tmp_path / "x.safetensors.json").read_text())
    kept = rep["total"]["energy_by_rank"]["1"]
    assert kept < 0.9 and rep["recommended_rank"] == 1 and rep["energy_target_met"] is False
    assert f"recommended rank for 0.9 of the energy: none up to rank 1 (it keeps {kept:.4f}" in out
    assert f"rank 1 keeps {kept:.3f} of the energy in total, short of the 0.9 target: raise --rank" in err
    assert any("short of the 0.9 target" in w for w in rep["warnings"])
    assert main(["lora", "extract", "--base", str(a), "--tuned", str(b), str(tmp_path / "f.json"),
                 "--ranks", "1,2"]) == 0
    out, err = capsys.readouterr()
    assert "recommended rank for 0.9 of the energy: none up to rank 2" in out
    assert "recommended rank for 0.9 of the energy: 2\n" not in out  # no claim the warning then contradicts
    assert "no rank in --ranks keeps 0.9 of the energy in total (the largest, 2, keeps" in err
    assert json.loads((tmp_path / "f.json").read_text())["energy_target_met"] is False
    # met: the smallest rank that keeps it, no warning about the target
    rep = T.extract_lora(str(a), str(b), str(tmp_path / "y.safetensors"), rank=4)
    assert rep["energy_target_met"] and rep["recommended_rank"] <= 4
    assert not any("target" in w for w in rep["warnings"])
    # a --rank off the 1, 2, 4, ... ladder is on it in the report: the best rank is the one asked for
    rep = T.extract_lora(str(a), str(b), str(tmp_path / "z.safetensors"), rank=3, energy=0.999999)
    assert list(rep["total"]["energy_by_rank"]) == [1, 2, 3] and rep["total"]["energy_by_rank"][3] < 0.999999
    assert rep["recommended_rank"] == 3 and not rep["energy_target_met"]


def _fp8_copy(src, dst):
    from dev2pro.flux import convert as flux_convert

    return flux_convert.convert(src, dst, layout="bfl", dtype="fp8-scaled")


def test_an_fp8_side_is_warned_about_with_its_measured_rounding(tmp_path, pair, capsys):
    """An fp8 copy's rounding is part of B - A: extracting from it makes a LoRA of rounding noise. The header says
    which side is fp8; the rounding is measured (the exact side re-quantised) against the difference."""
    from safetensors.torch import load_file

    from dev2pro.flux import checkpoint as C

    a, b, _ = pair
    small = load_file(str(b))  # a fine-tune's change well below fp8's rounding: ~0.3% of each weight
    base = load_file(str(a))
    for k in small:
        small[k] = base[k] + 0.003 * (small[k] - base[k]) / max(float((small[k] - base[k]).abs().max()), 1e-12) * \
            base[k].abs().mean()
    tuned = tmp_path / "tuned.safetensors"
    save_file(small, str(tuned))
    tuned8 = _fp8_copy(tuned, tmp_path / "tuned-fp8.safetensors")
    rep = T.extract_lora(str(a), str(tuned8), str(tmp_path / "x.safetensors"), rank=2)
    err = capsys.readouterr().err
    assert rep["fp8"]["sides"] == {"--tuned": {"path": str(tuned8), "format": "fp8-scaled"}}
    assert 0 < rep["fp8"]["layers_measured"] <= X.FP8_PROBE_LAYERS
    # the measured share against the truth (the fp8 copy against the exact tuned weights), on every layer
    ca, c8, ct = (C.open_checkpoint(p) for p in (a, tuned8, tuned))
    num = den = 0.0
    for key, shape in ca.shapes.items():
        if len(shape) == 2:
            w8, wt, wa = (c.get_dequantized(key, torch.float32) for c in (c8, ct, ca))
            num, den = num + float((w8 - wt).square().sum()), den + float((w8 - wa).square().sum())
    assert rep["fp8"]["rounding_share"] > 0.5 and abs(rep["fp8"]["rounding_share"] - num / den) < 0.15
    assert f"--tuned {tuned8} stores fp8 weights (fp8-scaled): about" in err
    assert "mostly rounding noise; extract from the bf16/fp32 files instead" in err
    assert "extract from the bf16/fp32 files rather than raising the rank" in err  # not 'raise --rank'
    # the exact files: no fp8 warning; fp8 on both sides: said, without a measurement
    assert "fp8" not in T.extract_lora(str(a), str(tuned), str(tmp_path / "y.safetensors"), rank=2)
    a8 = _fp8_copy(a, tmp_path / "a-fp8.safetensors")
    rep = T.extract_lora(str(a8), str(tuned8), str(tmp_path / "z.safetensors"), rank=2)
    assert set(rep["fp8"]["sides"]) == {"--base", "--tuned"} and "rounding_share" not in rep["fp8"]
    assert any(w.startswith(f"--base {a8} and --tuned {tuned8} store fp8 weights") for w in rep["warnings"])


def test_an_adapter_extracted_from_a_de_distillation_keeps_its_provenance(tmp_path, pair):
    """dev -> dev2pro extracted from a de-distillation export: the adapter says so, so `sample --adapter` renders
    dev + adapter as dev2pro is used (``sampling.dedistilled``); from any other file it says nothing of the kind."""
    from dev2pro.flux.convert import convert
    from dev2pro.guidance_defaults import dedistilled

    a, b, _ = pair
    d2p = convert(b, tmp_path / "d2p.safetensors", extra_metadata={"dev2pro.recipe": "dedistill",
                                                                   "dev2pro.objective": "flow"})
    T.extract_lora(str(a), str(d2p), str(tmp_path / "ad.safetensors"), rank=4)
    T.extract_lora(str(a), str(b), str(tmp_path / "pl.safetensors"), rank=4)
    made, plain = (load_lora(tmp_path / n).metadata for n in ("ad.safetensors", "pl.safetensors"))
    assert dedistilled(made) and made["dev2pro.extracted_to"] == "d2p.safetensors"
    assert not dedistilled(plain) and "dev2pro.recipe" not in plain
    info = T.info(str(tmp_path / "ad.safetensors"))
    assert "a de-distillation adapter (objective flow)" in info["dedistill"]
    assert "dedistill" not in T.info(str(tmp_path / "pl.safetensors"))
