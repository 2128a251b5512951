"""The memory plan against bytes actually allocated on the CPU (weights, LoRA, grads, optimizer state)."""

import pytest
import torch

from dev2pro.flux.spec import FLUX_DEV, build_transformer
from dev2pro.plan import GB, VRAM_PRESETS, PlanInputs, advise, estimate, optimizer_state_bytes, render
from tiny_run import storage_bytes

ALL_FP8 = ("norms", "biases", "embedders", "final")


def _lora(model, spec, rank, optimizer):
    from dev2pro.lora.targets import target_modules
    from dev2pro.train.model import add_lora
    from dev2pro.train.optim import build_optimizer

    names = target_modules("all_linear", spec.num_double, spec.num_single, guidance=spec.guidance_embeds)
    params = add_lora(model, names, rank, float(rank))
    opt = build_optimizer(params, optimizer, 1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the optimizer state
    return params, opt


def _measured(model, params, opt) -> dict:
    ids = {id(p) for p in params}
    base = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in ids]
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"base": storage_bytes(base), "lora": storage_bytes(params),
            "grads": storage_bytes([p.grad for p in params]), "optimizer": storage_bytes(state)}


def _check(plan, got):
    want = {"base": plan.base_bytes, "lora": plan.lora_bytes, "grads": plan.grad_bytes,
            "optimizer": plan.optimizer_bytes}
    for k in want:
        assert want[k] == pytest.approx(got[k], rel=0.05), (k, want[k], got[k])
    assert sum(want.values()) == pytest.approx(sum(got.values()), rel=0.05)


@pytest.mark.parametrize("fp8,keep,optimizer", [(False, None, "adamw"), (True, None, "adamw"),
                                                (True, ALL_FP8, "adafactor")])
def test_plan_matches_allocated_bytes_on_tiny(tiny_dev_dir, fp8, keep, optimizer):
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.fp8 import Fp8Policy

    keep = keep or ("norms", "biases", "embedders", "modulation", "final")
    model, ckpt = load_transformer(tiny_dev_dir, dtype=torch.bfloat16, fp8_storage=fp8,
                                   policy=Fp8Policy.from_names(keep))
    spec = ckpt.spec()
    params, opt = _lora(model, spec, 8, optimizer)
    plan = estimate(PlanInputs(spec, "bf16", fp8_storage=fp8, fp8_keep=keep, rank=8, optimizer=optimizer))
    _check(plan, _measured(model, params, opt))


@pytest.mark.slow
@pytest.mark.parametrize("fp8", [False, True])
def test_plan_matches_allocated_bytes_full_width(fp8):
    """A full-width FLUX.1 with 2 double + 2 single blocks (weights zero-filled: only their bytes matter)."""
    from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage

    spec = FLUX_DEV.with_(num_double=2, num_single=2)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_transformer(spec, device="meta")
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    if fp8:
        enable_fp8_storage(model, Fp8Policy(), compute_dtype=torch.bfloat16)
    model.requires_grad_(False)
    params, opt = _lora(model, spec, 16, "adamw")
    plan = estimate(PlanInputs(spec, "bf16", fp8_storage=fp8, rank=16, optimizer="adamw"))
    got = _measured(model, params, opt)
    _check(plan, got)
    assert got["base"] > (0.9 if fp8 else 1.8) * GB  # really full width


def test_optimizer_state_formulas_order():
    shapes = [(16, 3072), (3072, 16)]
    adamw, eight, prodigy, adafactor = (optimizer_state_bytes(o, shapes) for o in
                                        ("adamw", "adamw8bit", "prodigy", "adafactor"))
    assert adamw == 8 * 2 * 16 * 3072 + 8 and eight < adamw / 3 and prodigy == 2 * adamw - 8 and adafactor < eight


def test_plan_swap_and_checkpointing_lower_the_peak():
    base = PlanInputs(FLUX_DEV, "bf16", fp8_storage=True, image_tokens=(1024, 4096))
    p0, p16 = estimate(base), estimate(PlanInputs(**{**base.__dict__, "blocks_to_swap": 16}))
    assert p16.swapped_bytes > 16 * 0.3 * GB and p16.train_peak() < p0.train_peak() - p16.swapped_bytes + \
        p16.swap_window_bytes + 1
    no_ckpt = estimate(PlanInputs(**{**base.__dict__, "gradient_checkpointing": False}))
    assert no_ckpt.activations[4096] > 5 * p0.activations[4096]
    text = render(p16)
    assert "block swap 16" in text and "4096 image tokens" in text


@pytest.mark.parametrize("gb", sorted(VRAM_PRESETS))
def test_each_preset_fits_its_card_by_the_plan(gb):
    m, t = VRAM_PRESETS[gb]["model"], VRAM_PRESETS[gb]["train"]
    tokens = (1024,) if gb <= 8 else (1024, 4096)  # 8 GB: 512^2 only
    inp = PlanInputs(FLUX_DEV, "bf16", fp8_storage=m["fp8_storage"],
                     fp8_keep=tuple(m.get("fp8_keep", PlanInputs.fp8_keep)),
                     gradient_checkpointing=m["gradient_checkpointing"], blocks_to_swap=m["blocks_to_swap"],
                     optimizer=t["optimizer"], image_tokens=tokens, text_encoder=m["text_encoder"],
                     text_encoder_dtype=m["text_encoder_dtype"], vae_tiling=m["vae_tiling"])
    fits, message = advise(inp, gb * GB)
    assert fits, message


def test_advise_names_a_setting_that_fits():
    fits, message = advise(PlanInputs(FLUX_DEV, "bf16", image_tokens=(4096,), text_encoder="cpu"), 12 * GB)
    assert not fits and "model.blocks_to_swap" in message and "model.fp8_storage = true" in message


def _cfg_toml(tmp_path, model_dir, images, model_extra=""):
    path = tmp_path / "run.toml"
    path.write_text(f"""
[model]
path = "{model_dir}"
{model_extra}
[[data.folders]]
path = "{images}"
[lora]
rank = 8
[save]
output_dir = "{tmp_path / 'run'}"
""")
    return path


def test_vram_preset_fills_what_the_user_left_unset(tmp_path, tiny_dev_dir, sk_images, capsys):
    from dev2pro.config import render_toml
    from dev2pro.presets import has_bitsandbytes
    from dev2pro.schemas import load_train_config

    path = _cfg_toml(tmp_path, tiny_dev_dir, sk_images, "vram = 12\nfp8_storage = false")
    cfg = load_train_config(path, ["model.vae_tiling=false"])
    assert cfg.model.fp8_storage is False and cfg.model.vae_tiling is False  # written by the user: kept
    assert cfg.model.blocks_to_swap == 6 and cfg.model.text_encoder == "cpu"  # preset's 16, clamped to 6 blocks
    assert cfg.model.fp8_keep == ["norms", "biases", "embedders", "final"]
    assert cfg.train.optimizer == ("adamw8bit" if has_bitsandbytes() else "adamw")
    printed = capsys.readouterr().out
    assert "--vram 12 preset: model.fp8_keep" in printed and "kept your model.fp8_storage" in printed
    # the resolved config (what a run saves) carries the chosen values and reloads to them without the preset
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(render_toml(cfg).replace("vram = 12", "vram = 0"))
    again = load_train_config(resolved)
    assert again.model.blocks_to_swap == 6 and again.model.fp8_storage is False
    with pytest.raises(Exception, match="vram"):
        load_train_config(path, ["model.vram=10"])


def test_dev2pro_plan_command_prints_the_breakdown(tmp_path, tiny_dev_dir, sk_images, capsys):
    from dev2pro.cli import main

    path = _cfg_toml(tmp_path, tiny_dev_dir, sk_images, "blocks_to_swap = 2")
    assert main(["plan", str(path), "--vram", "8", "--set", "train.optimizer=adafactor"]) == 0
    out = capsys.readouterr().out
    for text in ("base weights", "block swap 2:", "LoRA rank 8", "adafactor state", "activations at 1024 image "
                 "tokens", "caching:", "--vram 8: fits"):
        assert text in out, text
    # a config's own model.vram is the card checked when --vram is not given (as `train` checks it)
    assert main(["plan", str(path), "--set", "model.vram=12"]) == 0
    out = capsys.readouterr().out
    assert "--vram 12: fits" in out and "no GPU seen" not in out
    # plan --vram GB means what train --vram GB means: that preset (over the file's model.vram), on that card
    (tmp_path / "16").mkdir()
    path16 = _cfg_toml(tmp_path / "16", tiny_dev_dir, sk_images, "vram = 16")
    assert main(["plan", str(path16), "--vram", "12"]) == 0
    out = capsys.readouterr().out
    assert "--vram 12 preset: " in out and "--vram 16 preset" not in out and "--vram 12: fits" in out
    assert main(["plan", str(path), "--vram", "10.5"]) == 0  # not a preset size: a card to check against only
    out = capsys.readouterr().out
    assert "preset" not in out and "--vram 10.5: fits" in out
    assert main(["plan", str(path), "--vram", "32"]) == 0  # FLUX.2 presets only: FLUX.1 checks the card
    out = capsys.readouterr().out
    assert "preset" not in out and "--vram 32: fits" in out


def test_train_vram_flag_runs_and_saves_the_chosen_settings(tmp_path, tiny_dev_dir, sk_images, capsys):
    from dev2pro.cli import main

    path = _cfg_toml(tmp_path, tiny_dev_dir, sk_images, 'dtype = "fp32"')
    assert main(["train", str(path), "--vram", "16", "--set", "train.steps=2", "--set", "data.resolution=64",
                 "--set", "data.default_caption=a photo", "--set", "data.bucket_step=64",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--vram 16 preset:" in out and "memory plan" in out and "block swap 6:" in out
    saved = (tmp_path / "run" / "config.toml").read_text()
    for line in ("vram = 16", "fp8_storage = true", "blocks_to_swap = 6", "vae_tiling = true",
                 'text_encoder_dtype = "bf16"', 'dtype = "fp32"'):
        assert line in saved, line


def test_a_plan_no_card_can_hold_is_refused():
    """Issue 18.8: data.resolution = 100000 planned 47,684 GB and the run started anyway."""
    from dev2pro.errors import UserError
    from dev2pro.plan import LARGEST_CARD, check_fits_a_card

    fits = estimate(PlanInputs(FLUX_DEV, "bf16", fp8_storage=True))
    assert fits.peak < LARGEST_CARD
    check_fits_a_card(fits)
    huge = estimate(PlanInputs(FLUX_DEV, "bf16", batch_size=64, image_tokens=((4096 // 16) ** 2,)))
    with pytest.raises(UserError) as e:
        check_fits_a_card(huge)
    assert str(e.value) == (f"this run needs about {huge.peak / GB:.1f} GB of GPU memory at its peak, more than any "
                            f"single card holds (200.0 GB): lower data.resolution, data.batch_size or lora.rank (the "
                            f"plan above shows where the memory goes)")


def test_plan_and_train_refuse_before_the_run_starts(tmp_path, tiny_dev_dir, sk_images, capsys, monkeypatch):
    from dev2pro import plan
    from dev2pro.cli import main

    monkeypatch.setattr(plan, "LARGEST_CARD", 1024)  # the tiny model's plan is a few MB: pretend no card holds it
    path = _cfg_toml(tmp_path, tiny_dev_dir, sk_images)
    for argv in (["plan", str(path)], ["train", str(path), "--no-progress", "--set", "data.resolution=64",
                                       "--set", "data.default_caption=a photo"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert "more than any single card holds" in captured.err and "memory plan" in captured.out, captured.err
        assert "Traceback" not in captured.err
    assert not list((tmp_path / "run").glob("*.safetensors")) and not (tmp_path / "run" / "state").exists()


@pytest.mark.parametrize("installed", [True, False])
def test_advised_8bit_adamw_says_it_needs_bitsandbytes_where_missing(monkeypatch, installed):
    """A plan may be made on another machine than the one that trains, so 8-bit AdamW is still advised; where
    bitsandbytes is not installed the line says so."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "bitsandbytes" else real(name, *a))
    fits, message = advise(PlanInputs(FLUX_DEV, "bf16", image_tokens=(4096,), text_encoder="cpu"), 12 * GB)
    assert not fits and 'train.optimizer = "adamw8bit"' in message
    assert ("adamw8bit needs bitsandbytes, not installed here" in message) is not installed
