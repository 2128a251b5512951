"""`dev2pro demo --family flux2-klein`: the 32-channel pixel codec, the report's pure pieces (fast), and the quick
profile end to end (slow: ~1.5-3 min on 2 cores)."""

import json
import math

import numpy as np
import pytest
import torch

from dev2pro.lab import klein
from dev2pro.lab import klein_report as kr

SEEDS = 2  # the quick profile's every path with one seed fewer than --quick's 3 (CI time); >1 keeps the paired stats


def test_codec_is_lossless_through_flux2s_latent_normalisation_and_packing():
    from dev2pro.families.flux2.latents import patchify, to_vae_latents
    from dev2pro.families.flux2.tiny import tiny_vae
    from dev2pro.flux.latents import pack

    rgb = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    z = klein.encode(rgb)
    assert z.shape == (3, 32, 8, 8) and z.dtype == torch.float32
    assert np.abs(klein.decode(z) - rgb).max() < 1e-5
    vae = tiny_vae()  # non-trivial batch-norm statistics: what the pipeline hands back is VAE space
    vae_space = to_vae_latents(vae, z)
    assert not torch.allclose(vae_space, z)
    assert np.abs(klein.decode(klein.to_stored(vae_space, klein.bn_stats(vae))) - rgb).max() < 1e-5
    # FLUX.1's pack of a stored latent = FLUX.2's 2x2 patches as 16 tokens of 128 channels
    tokens = pack(z)
    assert tokens.shape == (3, 16, 128)
    assert torch.equal(tokens, patchify(z).flatten(2).transpose(1, 2))
    # the shard writer's "VAE": 64x64 pixels of 8x8 blocks -> the same latent
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3) * 2 - 1
    assert torch.allclose(klein.encode_pixels(pixels), z, atol=1e-5)


def test_codec_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        klein.encode(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError):
        klein.decode(np.zeros((2, 16, 8, 8)))


def test_strength_keys_and_best_strength():
    assert klein.strength_key(None) == "none" and klein.strength_key(1.25) == "s1.25" and klein.strength_key(2) == "s2"
    assert kr.best_strength({1.0: [0.3, 0.5], 1.5: [0.2, 0.4], 2.0: [0.9]}) == 1.5  # lowest mean
    assert kr.best_strength({1.0: [0.3], 1.5: [0.3]}) == 1.0  # ties: the smaller strength
    assert kr.best_strength({1.0: [0.3], 2.0: [0.6]}, direction=+1) == 2.0


def _row(values):
    from dev2pro.lab.judges import mean_ci

    return {"values": values, **mean_ci(values)}


def test_calibration_summary_and_verdict_from_numbers():
    strengths = (1.0, 1.5)
    rows = {kr.fixed(1.0): {"style": _row([1, 1, 1]), "digits": _row([0.5, 0.6, 0.55]),
                            "fd_oracle": _row([0.5, 0.6, 0.7])},
            kr.fixed(1.5): {"style": _row([1, 1, 1]), "digits": _row([0.6, 0.7, 0.65]),
                            "fd_oracle": _row([0.2, 0.3, 0.8])},
            "D->D": {"style": _row([1, 1, 1]), "digits": _row([0.4, 0.5, 0.45]), "fd_oracle": _row([0.9, 1.0, 1.1])},
            kr.ORACLE: {"style": _row([1, 1, 1]), "digits": _row([0.7, 0.7, 0.7])}}
    results = [{"arm": "B", "seed": s, "calibration": {"recommended_strength": c, "reference_effect": 0.5}}
               for s, c in enumerate((1.4, 1.6, None))]
    table = {"rows": rows}
    cal = kr.calibration_summary(results, table, 3, strengths)
    assert cal["per_seed"] == [1.4, 1.6, None] and cal["missing"] == 1
    assert cal["best_fixed"] == 1.5 and cal["best_per_seed"] == [1.5, 1.5, 1.0]
    assert cal["calibrated"]["mean"] == pytest.approx(1.5)
    table["calibration"] = cal
    v = kr.verdict(table, strengths)
    assert "B->D @ 1 vs D->D: clearly better on digit accuracy, FD to oracle" in v
    assert "B->D @ 1.5 (best fixed strength" in v and "per seed: 1.40, 1.60, —" in v
    assert "style fidelity is at its ceiling" in v


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from dev2pro.recipes.demo_klein import run_demo_klein

    root = tmp_path_factory.mktemp("demo-klein") / "quick"
    return root, run_demo_klein(str(root), profile="quick", seeds=SEEDS, progress=False)


@pytest.mark.slow
def test_quick_klein_demo_end_to_end(quick):
    from dev2pro.recipes.demo_klein import CFG, DISTILLED_STEPS, STRENGTHS

    root, summary = quick
    saved = json.loads((root / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(summary["table"]))
    rows = saved["table"]["rows"]
    assert {kr.fixed(s) for s in STRENGTHS} | {"D->D", kr.ORACLE} <= set(rows)  # results.json sorts its keys
    for name, metrics in rows.items():
        assert set(metrics) == ({"style", "digits", "fd_real"} if name == kr.ORACLE else set(kr.ROW_METRICS))
        for m in metrics.values():
            assert m["n"] == SEEDS and m["lo"] <= m["mean"] <= m["hi"] and math.isfinite(m["half"])
    cal = saved["table"]["calibration"]
    assert len(cal["per_seed"]) == SEEDS and cal["best_fixed"] in STRENGTHS
    assert cal["calibrated"] is not None and cal["calibrated"]["mean"] > 0  # a calibrated strength was found
    assert kr.CALIBRATED in rows
    assert all(st["improved"] for st in saved["stages"].values()), saved["stages"]
    assert set(saved["stages"]) == {"base", "distilled"} | {f"lora-{a}-seed{s}" for a in "BD" for s in range(SEEDS)}
    md = (root / "report.md").read_text()
    assert "**Verdict.**" in md and saved["table"]["verdict"] in md
    for title in ("## Arms", "## Paired differences", "## Strength: calibrated vs measured best", "## References",
                  "NOT step-distilled", f"{DISTILLED_STEPS} steps, no CFG", f"true CFG {CFG:g}"):
        assert title in md
    # the distilled model is klein-like (no guidance embedding), written as a FLUX.2 BFL file
    from safetensors import safe_open
    with safe_open(str(root / "runs" / "distilled" / "distilled.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "single_stream_modulation.lin.weight" in keys and not any(k.startswith("guidance_in") for k in keys)
    assert (root / "arms" / "B-seed0" / "calibration.json").is_file()
    assert len(list((root / "grids").glob("*.png"))) == len(rows)


@pytest.mark.parametrize("family, module, out", [("flux2-klein", "demo_klein", "demo-klein-out"),
                                                 ("flux1", "demo", "demo-out"),
                                                 ("flux2-dev", "demo", "demo-flux2-dev-out")])
def test_cli_family_picks_the_demo(monkeypatch, tmp_path, family, module, out):
    import importlib

    from dev2pro.cli import main

    calls = []
    mod = importlib.import_module(f"dev2pro.recipes.{module}")
    name = "run_demo_klein" if module == "demo_klein" else "run_demo"
    monkeypatch.setattr(mod, name, lambda *a: calls.append(a))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--family", family, "--quick", "--seeds", "3", "--no-progress"]) == 0
    assert calls == [(out, "quick", 3, False, False, 2) + (() if module == "demo_klein" else (family,))]


@pytest.mark.slow
def test_demo_calibration_agrees_with_the_calibrate_recipe(quick, tmp_path):
    """The demo's batched measurement and `dev2pro calibrate`'s recipe (one image per call, its own text encoding)
    recommend the same strength for the same LoRA, prompts and seeds."""
    from dev2pro.lab.world import concept_caption
    from dev2pro.recipes.calibrate import run_calibrate
    from dev2pro.recipes.demo_klein import CALIBRATE_GRID, CFG, DISTILLED_STEPS, PROFILES

    root, _ = quick
    model, lora = root / "models" / "klein", root / "arms" / "B-seed0" / "lora.diffusers.safetensors"
    base, distilled = root / "runs" / "base" / "base.safetensors", root / "runs" / "distilled" / "distilled.safetensors"
    captions, seeds, steps = [concept_caption(k) for k in (3, 8)], [7, 8], PROFILES["quick"].base_sample_steps
    prompts = klein.write_prompts(klein.load_text_encoder(model), captions, tmp_path / "p.safetensors")
    ours = klein.calibrate(base, distilled, lora, prompts, model, seeds=seeds, base_steps=steps, cfg=CFG,
                           distilled_steps=DISTILLED_STEPS, strengths=CALIBRATE_GRID)
    theirs = run_calibrate(str(model), str(lora), str(distilled), captions, reference=str(base), seeds=seeds,
                           size=(klein.SIZE, klein.SIZE), reference_steps=steps, reference_cfg=CFG,
                           steps=DISTILLED_STEPS, cfg=1.0, strengths=CALIBRATE_GRID,
                           max_sequence_length=klein.TEXT_LEN)
    assert ours["recommended_strength"] is not None
    assert ours["reference_effect"] == pytest.approx(theirs["reference_effect"], rel=0.02)
    assert ours["recommended_strength"] == pytest.approx(theirs["recommended_strength"], rel=0.05)


@pytest.mark.slow
def test_quick_edit_demo_learns_to_use_the_reference(quick, tmp_path, monkeypatch):
    """`demo --family flux2-klein-edit --quick` (1 seed: 150-step Base, 300-step LoRAs, 50 held-out references).
    Measured: E 0.48 digit agreement, T 0.12, B 0.16 (chance 0.10); the asserted margins are about half of E's lead.
    Its Base is the klein demo's (same model, shards and settings: the stage is reused as a rerun reuses it; a
    redone stage is bit-identical, tests/recipes/test_demo.py), which saves this test the Base's training."""
    import shutil

    from dev2pro.errors import UserError
    from dev2pro.recipes import demo_edit, demo_klein
    from dev2pro.recipes.demo_edit import run_demo_edit

    klein_root, _ = quick
    assert (demo_edit.PROFILES["quick"].base_steps, demo_edit.PROFILES["quick"].batch) == \
        (demo_klein.PROFILES["quick"].base_steps, demo_klein.PROFILES["quick"].batch)
    real_stage = demo_edit.base_stage

    def klein_base(root, *args):
        shutil.copytree(klein_root / "runs" / "base", root / "runs" / "base")
        return real_stage(root, *args)

    monkeypatch.setattr(demo_edit, "base_stage", klein_base)
    root = tmp_path / "quick"
    summary = run_demo_edit(str(root), profile="quick", progress=False)
    monkeypatch.setattr(demo_edit, "base_stage", real_stage)
    saved = json.loads((root / "results.json").read_text())
    assert saved["table"]["verdict"] == summary["table"]["verdict"]
    rows, paired = saved["table"]["rows"], saved["table"]["paired"]
    e, t, b = (rows[a]["digits"]["mean"] for a in "ETB")
    assert e > 0.3 and e > t + 0.15 and e > b + 0.15, (e, t, b)
    assert paired["E-T"]["digits"]["clear_images"] == 1 and paired["E-B"]["digits"]["clear_images"] == 1
    assert rows["E"]["style"]["mean"] > 0.8 and rows["B"]["style"]["mean"] < 0.2  # the LoRA brings the style
    assert rows["E"]["pix"]["mean"] < rows["T"]["pix"]["mean"] < rows["B"]["pix"]["mean"]
    assert saved["table"]["verdict"].startswith("The edit LoRA uses its reference, which the Base alone does not")
    assert all(st["improved"] for st in saved["stages"].values()), saved["stages"]
    assert set(saved["stages"]) == {"base", "lora-E-seed0", "lora-T-seed0"}
    md = (root / "report.md").read_text()
    assert "**Verdict.**" in md and saved["table"]["verdict"] in md and "## Caveats" in md
    assert (root / "grids" / "edits-seed0.png").stat().st_size > 1000
    for a in "ETB":
        assert (root / "arms" / f"{a}-seed0" / "samples.npz").is_file()
    # every training image went through the codec, references included (E's cache holds "control" latents)
    from dev2pro.data.cache import CONTROL_NAME, load_cached
    cached = [load_cached(f) for f in (root / "arms" / "E-seed0" / "cache" / "latents").glob("*.safetensors")]
    assert len(cached) == 50 and all(CONTROL_NAME in c for c in cached)
    # a rerun reuses every stage and measures the same; another profile in the folder needs --overwrite
    mtime = (root / "arms" / "E-seed0" / "samples.npz").stat().st_mtime_ns
    again = run_demo_edit(str(root), profile="quick", progress=False)["table"]
    assert json.dumps(again, sort_keys=True) == json.dumps(summary["table"], sort_keys=True)
    assert (root / "arms" / "E-seed0" / "samples.npz").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="--overwrite"):
        run_demo_edit(str(root), profile="default", progress=False)
