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
