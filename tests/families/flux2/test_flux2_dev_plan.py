"""`dev2pro plan` for FLUX.2 dev (32B): shape-only counts against real module bytes (the tiny dev, and a full-width
dev with one block of each kind scaled to 8 + 48 blocks), the 24/32/48/80 GB presets, the text encoder as its own
phase, host RAM, adapter de-distillation, and the shipped FLUX.2 dev configs."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dev2pro.families.flux2.spec import DEV
from dev2pro.host_memory import pinned_bytes
from dev2pro.plan import CUDA_OVERHEAD, GB, PlanInputs, encoder_params, estimate
from dev2pro.presets import fitted_preset
from dev2pro.schemas import load_dedistill_config, load_train_config
from tiny_run import storage_bytes

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
ENC = {f"{k}_params": v for k, v in encoder_params(None, DEV).items()}
FIELD = {"model.gradient_checkpointing": "gradient_checkpointing", "model.fp8_storage": "fp8_storage",
         "model.fp8_keep": "fp8_keep", "model.blocks_to_swap": "blocks_to_swap",
         "model.text_encoder": "text_encoder", "model.text_encoder_dtype": "text_encoder_dtype",
         "model.vae_tiling": "vae_tiling", "train.optimizer": "optimizer"}


def _with_lora(model, spec, rank, every_linear=False):
    """A rank-``rank`` LoRA as `train` adds it (or on every Linear, as adapter de-distillation), with AdamW state."""
    from dev2pro.families import get
    from dev2pro.train.model import add_lora
    from dev2pro.train.optim import build_optimizer

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] if every_linear else \
        get("flux2").lora_targets("all_linear", spec.num_double, spec.num_single, guidance=spec.guidance_embeds)
    params = add_lora(model, names, rank, float(rank))
    opt = build_optimizer(params, "adamw", 1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return params, opt


def _measured(model, params, opt, prefix="") -> dict:
    """Bytes held by the base, the LoRA, its grads and AdamW state (under ``prefix`` only, when given)."""
    ids = {id(p) for p in params}
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n.startswith(prefix)]
    mine = {id(p) for n, p in model.named_parameters() if n.startswith(prefix) and id(p) in ids}
    state = [v for p, s in opt.state.items() if id(p) in mine for v in s.values() if torch.is_tensor(v)]
    lora = [p for p in params if id(p) in mine]
    return {"base": storage_bytes([t for _, t in named if id(t) not in ids]), "lora": storage_bytes(lora),
            "grads": storage_bytes([p.grad for p in lora]), "optimizer": storage_bytes(state)}


def test_plan_matches_allocated_bytes_on_tiny_flux2_dev(flux2_dev_dir):
    from dev2pro.flux.checkpoint import load_transformer

    model, ckpt = load_transformer(flux2_dev_dir, dtype=torch.bfloat16, fp8_storage=True)
    spec = ckpt.spec()
    got = _measured(model, *_with_lora(model, spec, 8))
    plan = estimate(PlanInputs(spec, "bf16", fp8_storage=True, rank=8, optimizer="adamw"))
    want = {"base": plan.base_bytes, "lora": plan.lora_bytes, "grads": plan.grad_bytes,
            "optimizer": plan.optimizer_bytes}
    for k in want:
        assert want[k] == pytest.approx(got[k], rel=0.05), (k, want[k], got[k])


def test_adapter_dedistill_plan_matches_the_student_it_loads(flux2_dev_dir):
    """`load_student` with adapter_rank + fp8: the frozen fp8 base and a LoRA on every Linear, as the plan counts."""
    from dev2pro.train.model import load_student

    student = load_student(str(flux2_dev_dir), "cpu", torch.bfloat16, gradient_checkpointing=False, adapter_rank=4,
                           fp8_storage=True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    got = _measured(student, params, opt)
    from dev2pro.flux.checkpoint import open_checkpoint

    plan = estimate(PlanInputs(open_checkpoint(flux2_dev_dir).spec(), "bf16", fp8_storage=True, rank=4,
                               targets="every_linear", ema=True))
    assert plan.lora_bytes == got["lora"] and plan.ema_bytes == plan.lora_bytes
    assert plan.base_bytes == pytest.approx(got["base"], rel=0.05)
    assert plan.optimizer_bytes == pytest.approx(got["optimizer"], rel=0.05)


@pytest.mark.slow
def test_full_width_bytes_scale_to_the_24gb_plan_with_swap():
    """A full-width FLUX.2 dev with 1 double + 1 single block (zero weights, fp8 storage, LoRA r16, AdamW): its real
    bytes per block and outside the blocks, scaled to 8 + 48 blocks with the 24 GB preset's swap, within 10% of the
    plan's static bytes and training peak."""
    from dev2pro.families.flux2.spec import build_transformer
    from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage
    from dev2pro.train.blockswap import swap_positions

    small = DEV.with_(num_double=1, num_single=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_transformer(small, device="meta")
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    inp = PlanInputs(DEV, "bf16", image_tokens=(4096,), rank=16, **ENC)
    chosen = fitted_preset(inp, 24)
    inp = replace(inp, **{FIELD[k]: tuple(v) if isinstance(v, list) else v for k, v in chosen.items()})
    enable_fp8_storage(model, Fp8Policy.from_names(inp.fp8_keep), compute_dtype=torch.bfloat16)
    params, opt = _with_lora(model, small, 16)
    total = _measured(model, params, opt)
    dbl = _measured(model, params, opt, "transformer_blocks.0.")
    sgl = _measured(model, params, opt, "single_transformer_blocks.0.")
    outside = {k: total[k] - dbl[k] - sgl[k] for k in total}
    n_d, n_s = DEV.num_double, DEV.num_single
    swapped = swap_positions(n_d, n_s, inp.blocks_to_swap)
    resident_d = n_d - sum(p < n_d for p in swapped)
    resident_s = n_s - sum(p >= n_d for p in swapped)
    window = sum(sorted([dbl["base"]] * (n_d - resident_d) + [sgl["base"]] * (n_s - resident_s))[-2:])
    scaled = outside["base"] + resident_d * dbl["base"] + resident_s * sgl["base"] + window + sum(
        outside[k] + n_d * dbl[k] + n_s * sgl[k] for k in ("lora", "grads", "optimizer"))
    plan = estimate(inp)
    act = max(plan.activations.values())
    print(f"\nFLUX.2 dev at 24 GB ({chosen}): plan static {plan.static_bytes / GB:.2f} GB vs scaled real bytes "
          f"{scaled / GB:.2f} GB (ratio {plan.static_bytes / scaled:.4f}); train peak {plan.train_peak() / GB:.2f} vs "
          f"{(scaled + act) / GB:.2f} GB")
    assert inp.blocks_to_swap > 0 and inp.fp8_storage
    assert plan.static_bytes == pytest.approx(scaled, rel=0.10)
    assert plan.train_peak() == pytest.approx(scaled + act, rel=0.10)
    full_base = outside["base"] + n_d * dbl["base"] + n_s * sgl["base"]
    assert plan.base_bytes == pytest.approx(full_base, rel=0.02)
    assert pinned_bytes(plan.swapped_bytes) <= plan.host_ram  # the swapped blocks live in pinned host RAM


@pytest.mark.parametrize("gb", [24, 32, 48, 80])
def test_presets_fit_each_card_and_keep_the_text_encoder_apart(gb):
    inp = PlanInputs(DEV, "bf16", image_tokens=(4096,), rank=16, sample_pixels=1024 * 1024, **ENC)
    chosen = fitted_preset(inp, gb)
    s = replace(inp, **{FIELD[k]: tuple(v) if isinstance(v, list) else v for k, v in chosen.items()})
    plan = estimate(s)
    assert plan.peak + CUDA_OVERHEAD <= gb * GB, chosen
    # the 24B encoder is never counted beside the transformer: caching is its own phase of the peak
    assert plan.peak == max(plan.train_peak(), plan.sampling_peak, plan.caching_peak)
    moved = estimate(replace(s, text_encoder="gpu" if s.text_encoder == "cpu" else "cpu"))
    assert moved.train_peak() == plan.train_peak() and moved.sampling_peak == plan.sampling_peak
    if gb <= 32:
        assert chosen["model.fp8_storage"] and chosen["model.blocks_to_swap"] > 0
    if gb == 24:
        assert chosen["model.text_encoder"] == "cpu" and chosen["model.text_encoder_dtype"] == "fp8"
        assert plan.host_parts["training"] >= pinned_bytes(plan.swapped_bytes) > plan.swapped_bytes


def _sparse_dev(folder: Path) -> Path:
    """A FLUX.2 dev folder whose transformer has the real header and a 64 GB hole (the plan reads headers only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flux2_dev_plan", CONFIGS.parent / "bench" / "flux2_dev_plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_sparse_dev(folder)
    return folder


def test_plan_command_on_the_shipped_configs(tmp_path, capsys):
    from dev2pro.cli import main

    model, data = _sparse_dev(tmp_path / "FLUX.2-dev"), tmp_path / "data"
    data.mkdir()
    sets = ["--set", f'model.path="{model}"', "--set", f'data.folders=[{{path="{data}"}}]']
    assert main(["plan", str(CONFIGS / "dedistill-flux2-dev.toml"), "--vram", "80", *sets]) == 0
    out = capsys.readouterr().out
    assert "EMA of the trained weights" in out and "fits" in out and "its own phase" in out
    assert main(["plan", str(CONFIGS / "dedistill-flux2-dev.toml"), "--vram", "24", *sets]) == 0
    assert "model.blocks_to_swap" in capsys.readouterr().out  # the advice names the swap that fits
    assert main(["plan", str(CONFIGS / "dedistill-flux2-dev.toml"), "--vram", "24", *sets, "--set",
                 "model.blocks_to_swap=44", "--set", 'model.text_encoder="cpu"']) == 0
    out = capsys.readouterr().out
    assert "block swap 44" in out and "fits:" in out and "host RAM peak" in out
    sets_t = sets + ["--set", 'model.adapter=""']
    assert main(["plan", str(CONFIGS / "train-flux2-dev.toml"), "--vram", "24", *sets_t]) == 0
    out = capsys.readouterr().out
    assert "computed from the plan for this FLUX.2 model" in out and "fits:" in out


def test_the_flux2_dev_configs_load(tmp_path):
    d = load_dedistill_config(CONFIGS / "dedistill-flux2-dev.toml")
    assert d.train.adapter_rank > 0 and d.model.fp8_storage and d.model.gradient_checkpointing
    assert d.objective in ("flow", "cfg_teacher") and d.sample.cfg == 4.0 and d.data.resolution == 1024
    assert d.model.text_encoder_dtype == "fp8" and d.train.ema_decay > 0
    assert d.model.path == str(CONFIGS.parent / "models/FLUX.2-dev")
    t = load_train_config(CONFIGS / "train-flux2-dev.toml")
    assert t.train.guidance == 1.0 and t.sample.guidance == 4.0
    assert t.model.adapter == str(CONFIGS.parent / "runs/dev2pro-flux2-dev/dev2pro-flux2-dev-adapter.safetensors")
    # the adapter train's config names is what the dedistill config exports
    assert Path(t.model.adapter).name == f"{d.save.name}-adapter.safetensors"
