"""`dev2pro demo --family flux2-dev`: the family table's pieces (fast: profile and arm wiring, the tiny dev folder's
Mistral3 prompt cache, the codec through Flux2Pipeline's packed output, one render at guidance) and the quick
profile end to end (slow: ~2-3 min on 2 cores)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.lab import demo_families, flux2_dev, klein
from dev2pro.lab.world import concept_caption
from dev2pro.recipes import demo


# ------------------------------------------------------------------------------------------------ wiring
def test_family_table_rows():
    f1, f2 = demo_families.get("flux1"), demo_families.get("flux2-dev")
    assert (f1.dev_guidance, f1.lora_format, f1.lora_suffix, f1.out) == (3.5, "kohya", "", "demo-out")
    assert (f2.dev_guidance, f2.lora_format, f2.lora_suffix, f2.out) == (4.0, "diffusers", ".diffusers",
                                                                          "demo-flux2-dev-out")
    assert f2.text_len == flux2_dev.TEXT_LEN and f2.sample_arm is flux2_dev.sample_arm
    with pytest.raises(UserError, match="unknown demo family"):
        demo_families.get("flux3")


def test_profiles_and_arms_are_wired_per_family():
    profiles = demo.PROFILES_BY_FAMILY["flux2-dev"]
    assert set(profiles) == {"quick", "default", "full"} and demo.PROFILES_BY_FAMILY["flux1"] is demo.PROFILES
    for p in profiles.values():
        assert 0 < p.lora_short < p.lora_steps and p.seeds >= 3 and p.adapter_arms
    arms = demo.arms_for(4.0)
    assert arms["A"] == ("dev", 4.0, "dev @ 4.0") and arms["B"][:2] == ("dev", 1.0) and arms["C"][0] == "dev2pro"
    assert arms["D"][0] == "pro" and demo.ARMS == demo.arms_for(3.5)  # FLUX.1's table is unchanged
    fam = demo_families.get("flux2-dev")
    p = profiles["quick"]
    bases = {k: {"file": f"{k}.safetensors"} for k in ("pro", "dev", "dev2pro")}
    chosen = {a: v for a, v in arms.items() if a != "E"}
    jobs = demo._arm_jobs(Path("/r"), p, chosen, bases, {"C-ext": "ext.safetensors", "C-lora": "lora.safetensors"},
                          Path("/m"), Path("/p.safetensors"), {s: Path(f"/s{s}") for s in range(p.seeds)}, fam)
    assert len(jobs) == p.seeds * (len(chosen) + 1)  # every arm and the no-LoRA reference, per seed
    by = {(j["arm"], j["seed"]): j for j in jobs}
    assert all(j["family"] == "flux2-dev" and j["guidances"] == [4.0, 1.0] and j["text_len"] == 40 for j in jobs)
    assert by[("A", 0)]["guidance"] == 4.0 and by[("B", 0)]["guidance"] == 1.0
    assert by[("D", 1)]["base"] == by[("D", 1)]["target"] == "pro.safetensors"  # the oracle: on pro, with CFG
    assert by[("C", 2)]["base"] == "dev2pro.safetensors" and by[("C", 2)]["target"] == "dev.safetensors"
    assert by[("C-ext", 0)]["adapter"] == "ext.safetensors" and by[("C-ext", 0)]["base"] == "dev.safetensors"
    assert by[("ref", 0)]["target"] == "dev.safetensors" and "base" not in by[("ref", 0)]


def test_unknown_profile_and_family_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown demo profile"):
        demo.run_demo(str(tmp_path / "x"), profile="huge", family="flux2-dev")
    with pytest.raises(UserError, match="unknown demo family"):
        demo.run_demo(str(tmp_path / "y"), family="flux9")


# ------------------------------------------------------------------------------------------------ pieces
@pytest.fixture(scope="module")
def dev_models(tmp_path_factory):
    """The demo's tiny FLUX.2 dev folder (Mistral3 embeddings scaled) and pro's start file, written once."""
    return flux2_dev.write_model(tmp_path_factory.mktemp("f2dev") / "models")


def test_model_folder_and_pro_start(dev_models):
    from safetensors import safe_open

    from dev2pro.flux.checkpoint import open_checkpoint

    folder, pro = dev_models
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    dev_spec = open_checkpoint(folder).spec()
    assert dev_spec.guidance_embeds and dev_spec.hidden == flux2_dev.DEV_SPEC.hidden == 128
    with safe_open(pro, "pt") as f:
        assert not any("guidance" in k for k in f.keys())
    pro_spec = open_checkpoint(pro).spec()
    assert not pro_spec.guidance_embeds and pro_spec.variant == "klein-base"  # undistilled: true CFG
    assert pro_spec.architecture()[:6] == dev_spec.architecture()[:6]


def test_prompt_cache_shapes_and_prompts_survive(dev_models, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    folder, _ = dev_models
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    longest = max(len(tok.apply_chat_template([{"role": "system", "content": SYSTEM_MESSAGE},
                                               {"role": "user", "content": concept_caption(k)}]))
                  for k in range(10))
    assert longest <= flux2_dev.TEXT_LEN  # no caption is cut (the pipeline truncates at the end)
    encode = flux2_dev.load_text_encoder(folder)
    rec = encode([concept_caption(3), concept_caption(7)])
    assert rec["prompt_embeds"].shape == (2, flux2_dev.TEXT_LEN, 96) and rec["prompt_embeds"].dtype == torch.bfloat16
    pe = rec["prompt_embeds"].float()
    # the scaled embeddings keep the prompt's words in the stacked hidden states (10/20/30 of 40 random layers)
    assert (pe[0] - pe[1]).norm() / pe[0].norm() > 0.05
    out = klein.write_prompts(encode, [concept_caption(k) for k in range(10)], tmp_path / "prompts.safetensors")
    embeds, pooled = flux2_dev.prompt_embeds(out)
    assert embeds.shape == (10, flux2_dev.TEXT_LEN, 96) and pooled is None
    assert klein.load_prompts(out)["empty_embeds"].shape == (flux2_dev.TEXT_LEN, 96)


def test_codec_round_trips_through_flux2_pipelines_packed_output(dev_models):
    """Flux2Pipeline hands back packed, batch-normalised tokens; ``render`` maps them to VAE space and ``to_stored``
    back: a stored latent survives the trip exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dev2pro.families import get
    from dev2pro.families.flux2.sampling import vae_space
    from dev2pro.flux.latents import pack

    folder, _ = dev_models
    fam = get("flux2")
    vae = fam.load_vae(folder)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    model, _ = __import__("dev2pro.flux.checkpoint", fromlist=["x"]).load_transformer(folder, dtype=torch.float32)
    pipe = fam.build_pipeline({"vae": vae, "scheduler": sched}, model)
    assert type(pipe).__name__ == "Flux2Pipeline"
    rgb = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    z = klein.encode(rgb)
    back = klein.to_stored(vae_space(pipe, pack(z), klein.SIZE, klein.SIZE), klein.bn_stats(vae))
    assert np.abs(klein.decode(back) - rgb).max() < 1e-5


def test_dev_render_at_guidance_and_pro_with_true_cfg(dev_models, tmp_path):
    """``sample_arm`` on dev (embedded guidance) and on pro (true CFG): samples files in ``lab/arms``' format, and
    the guidance input changes dev's images."""
    from dev2pro.lab.arms import load_samples

    folder, pro = dev_models
    encode = flux2_dev.load_text_encoder(folder)
    prompts = klein.write_prompts(encode, [concept_caption(k) for k in range(10)], tmp_path / "p.safetensors")
    kw = dict(seed=0, per_class=1, steps=2, guidances=(4.0, 1.0))
    for name in ("dev", "pro"):
        (tmp_path / name).mkdir()
    dev_files = flux2_dev.sample_arm(tmp_path / "dev", folder, {"none": None}, prompts, folder, **kw)
    pro_files = flux2_dev.sample_arm(tmp_path / "pro", pro, {"none": None}, prompts, folder, **kw)
    for files in (dev_files, pro_files):
        s = load_samples(files["none"])
        assert set(s) == {"g4.0", "g1.0"}
        assert all(a.shape == (10, 8, 8, 3) and np.isfinite(a).all() and 0 <= a.min() <= a.max() <= 1
                   for a in s.values())
        assert not np.array_equal(s["g4.0"], s["g1.0"])  # dev: embedded guidance; pro: CFG 4 vs none


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    summary = demo.run_demo(str(root), profile="quick", seeds=2, progress=False, family="flux2-dev")
    saved = json.loads((root / "results.json").read_text())
    assert saved["family"] == "flux2-dev" and saved["command"] == "dev2pro demo --family flux2-dev --quick --seeds 2"
    assert saved["guidances"] == [4.0, 1.0] and saved["main_setting"] == {"length": "long", "guidance": 4.0}
    arms = list(summary["arms"])
    assert arms == ["A", "B", "C", "C-ext", "C-lora", "D"]
    rows = {(r["arm"], r["length"], r["guidance"]): r["metrics"] for r in summary["table"]["rows"]}
    assert set(rows) == {(a, length, g) for a in arms for length in ("short", "long") for g in (4.0, 1.0)}
    for (arm, _, _), m in rows.items():
        assert len(m["digits"]["values"]) == 2  # seeds=2: one fewer than --quick's (CI time)
        for k in ("style", "digits"):
            assert 0.0 <= m[k]["mean"] <= 1.0
        assert math.isfinite(m["fd_real"]["mean"]) and m["fd_real"]["mean"] >= 0
        if arm != "D":
            assert math.isfinite(m["fd_oracle"]["mean"]) and m["integrity"]["mean"] >= 0
    assert all(math.isfinite(s["last"]) for s in summary["stages"].values())
    fid = summary["adapters"]
    assert fid["recommended_rank"] in demo.ADAPTER_RANKS and fid["model"]["dev (no adapter)"]["unexplained"] == 1.0
    md = (root / "report.md").read_text()
    assert "Toy FLUX.2 [dev] family" in md and "**Verdict.**" in md and "guidance 4.0 (main setting)" in md
    assert "| C − B |" in md and "## Adapter fidelity by rank" in md
    with __import__("safetensors").safe_open(str(root / "runs" / "dev" / "dev.safetensors"), "pt") as f:
        assert any(k.startswith("guidance_in") for k in f.keys())  # dev got a guidance embedding from pro
    assert (root / "report.html").is_file()
