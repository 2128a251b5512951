"""`dev2pro plan` for FLUX.2 klein 4B / 9B and dev at full size, from specs alone (meta device, no weights)."""

import pytest

from dev2pro.families.flux2.spec import DEV, KLEIN_4B_BASE, KLEIN_9B_BASE
from dev2pro.plan import GB, PlanInputs, encoder_params, estimate


@pytest.mark.parametrize("spec, params_b, text_b", [(KLEIN_4B_BASE, 3.876, 4.02), (KLEIN_9B_BASE, 9.079, 8.19),
                                                    (DEV, 32.22, 23.57)])
def test_plan_sizes_each_flux2_model_and_its_text_encoder(spec, params_b, text_b):
    enc = encoder_params(None, spec)
    assert enc["t5"] / 1e9 == pytest.approx(text_b, rel=1e-3) and enc["clip"] == 0
    inp = PlanInputs(spec, "bf16", image_tokens=(4096,), rank=16, **{f"{k}_params": v for k, v in enc.items()})
    bf16 = estimate(inp)
    assert bf16.base_bytes / 2 / 1e9 == pytest.approx(params_b, rel=0.01)  # every weight in bf16
    fp8 = estimate(PlanInputs(spec, "bf16", fp8_storage=True, image_tokens=(4096,), rank=16,
                              **{f"{k}_params": v for k, v in enc.items()}))
    assert 0.5 < fp8.base_bytes / bf16.base_bytes < 0.56  # block linears in fp8, the kept groups in bf16
    assert bf16.lora_params > 0 and bf16.caching_peak > enc["t5"] * 4  # fp32 text encoder while caching
    swap = estimate(PlanInputs(spec, "bf16", fp8_storage=True, blocks_to_swap=spec.num_double + spec.num_single - 2,
                               image_tokens=(4096,), rank=16, **{f"{k}_params": v for k, v in enc.items()}))
    assert swap.static_bytes < fp8.static_bytes / 2 and swap.host_ram >= fp8.base_bytes  # blocks live on the host


def test_klein_4b_lora_fits_16_gb_with_fp8_and_checkpointing():
    enc = encoder_params(None, KLEIN_4B_BASE)
    plan = estimate(PlanInputs(KLEIN_4B_BASE, "bf16", fp8_storage=True, gradient_checkpointing=True,
                               image_tokens=(4096,), text_encoder="cpu", **{f"{k}_params": v for k, v in enc.items()}))
    assert plan.train_peak() < 16 * GB - 1 * GB


@pytest.mark.parametrize("spec", [KLEIN_4B_BASE, KLEIN_9B_BASE])
def test_vram_presets_for_klein_are_computed_to_fit_each_card(spec):
    """`--vram 8|12|16|24|48` on klein: settings from the plan that fit the card, more frugal on smaller cards."""
    from dataclasses import replace

    from dev2pro.plan import CUDA_OVERHEAD
    from dev2pro.presets import fitted_preset

    enc = encoder_params(None, spec)
    inp = PlanInputs(spec, "bf16", image_tokens=(4096,), **{f"{k}_params": v for k, v in enc.items()})
    field = {"model.gradient_checkpointing": "gradient_checkpointing", "model.fp8_storage": "fp8_storage",
             "model.fp8_keep": "fp8_keep", "model.blocks_to_swap": "blocks_to_swap",
             "model.text_encoder": "text_encoder", "model.text_encoder_dtype": "text_encoder_dtype",
             "model.vae_tiling": "vae_tiling", "train.optimizer": "optimizer"}
    swaps = []
    for gb in (48, 24, 16, 12):
        chosen = fitted_preset(inp, gb)
        s = replace(inp, **{field[k]: tuple(v) if isinstance(v, list) else v for k, v in chosen.items()})
        assert estimate(s).peak + CUDA_OVERHEAD <= gb * GB, (gb, chosen)
        swaps.append((chosen["model.fp8_storage"], chosen["model.blocks_to_swap"]))
    assert swaps[0] == (False, 0)  # a 48 GB card keeps bf16 weights and no swap
    assert swaps == sorted(swaps)  # smaller cards: never less frugal
    fixed = fitted_preset(inp, 12, fixed={"model.fp8_storage"})
    assert fixed["model.fp8_storage"] is False  # what the user wrote is never changed
