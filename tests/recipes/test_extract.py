"""`dev2pro lora extract`: randomized vs exact SVD, the retained-energy report, the --energy warning, --ranks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from dev2pro.lora.ops import decompose, extract, lora_delta, rank_errors
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
