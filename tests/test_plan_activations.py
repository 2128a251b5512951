"""The memory plan's activation model against what autograd really keeps.

A one-double-block, one-single-block model of each family (real head dim 128, every Linear LoRA'd as training does
it: ``add_lora`` + ``lora_in_compute_dtype``) runs one bf16 forward under ``saved_tensors_hooks``; the bytes of the
distinct storages saved inside each block must match ``activations.block_saved_bytes`` within 5%. Left out: weights and
buffers (the LoRA's bf16 compute copies included: the plan counts them as LoRA memory) and storages both blocks save
(the rotary tables and FLUX.2's shared modulation, made once per step outside the blocks). A view keeps its whole
storage alive, so it counts whole. The q/k RMSNorms run as on CUDA: there
``aten::rms_norm`` is the fused kernel, whose backward keeps the bf16 input and the fp32 rstd, where the CPU's
composite path keeps an fp32 copy of the input.
"""

import pytest
import torch
import torch.nn.functional as F

from dev2pro import activations as A
from dev2pro import plan as P
from dev2pro.families.flux2.spec import KLEIN_4B
from dev2pro.flux.spec import FLUX_DEV, FluxSpec


class _FusedRmsNorm(torch.autograd.Function):
    """What CUDA's ``aten::_fused_rms_norm`` saves for backward: its input (own dtype) and rstd (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, eps, dims):
        rstd = torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True) + eps)
        y = x.float() * rstd
        ctx.save_for_backward(x, rstd, weight)
        return (y if weight is None else y * weight).type_as(x)

    @staticmethod
    def backward(ctx, grad):  # forward-only measurement
        raise NotImplementedError


def _cuda_rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    return _FusedRmsNorm.apply(x, weight, torch.finfo(torch.float32).eps if eps is None else eps, dims)


def _spec(family: str, hidden: int):
    if family == "flux1":
        return FluxSpec(hidden=hidden, num_heads=hidden // 128, num_double=1, num_single=1, context_dim=256,
                        pooled_dim=64)
    return KLEIN_4B.with_(hidden=hidden, num_heads=hidden // 128, num_double=1, num_single=1, context_dim=768)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
@pytest.mark.parametrize("lora_dtype", ["compute", "fp32"])
def test_block_activation_units_match_what_autograd_saves(family, lora_dtype, monkeypatch):
    monkeypatch.setattr(F, "rms_norm", _cuda_rms_norm)
    spec, img, txt = _spec(family, 512), 256, 64
    got = A.measure_saved_bytes(spec, lora_dtype, img, txt)
    inp = P.PlanInputs(spec, "bf16", lora_dtype=lora_dtype, rank=16, image_tokens=(img,), text_tokens=txt)
    planned = A.block_saved_bytes(inp, P.lora_layers(P._meta_model(spec), inp), img)
    for kind, pos in (("double", 0), ("single", 1)):
        assert planned[pos] == pytest.approx(got[kind], rel=0.05), (kind, planned[pos] / got[kind])


def test_units_hold_at_another_width_rank_and_token_split(monkeypatch):
    """Scale-free: a wider model, another rank and a text-heavier split keep the FLUX.1 estimate within 5%."""
    monkeypatch.setattr(F, "rms_norm", _cuda_rms_norm)
    spec, img, txt = _spec("flux1", 1024), 64, 128
    got = A.measure_saved_bytes(spec, "compute", img, txt, rank=64)
    inp = P.PlanInputs(spec, "bf16", lora_dtype="compute", rank=64, image_tokens=(img,), text_tokens=txt)
    planned = A.block_saved_bytes(inp, P.lora_layers(P._meta_model(spec), inp), img)
    assert planned[0] == pytest.approx(got["double"], rel=0.05)
    assert planned[1] == pytest.approx(got["single"], rel=0.05)


@pytest.mark.parametrize("settings, measured_gb", [
    (dict(gradient_checkpointing=False), {1024: 37.85, 4096: 67.66}),  # the old unit count said 44.4 and 87.0
    (dict(), {1024: 23.86, 4096: 25.66}),
    (dict(fp8_storage=True), {1024: 16.06, 4096: 17.86})])
def test_the_h200_peaks_are_within_3_percent(settings, measured_gb):
    """bench/results/gpu_train-h200-2026-11-28.md: FLUX.1 full size, bf16, rank 16, LoRA in fp32 (the default then),
    512 text tokens; peak allocated GB at 512^2 and 1024^2 without checkpointing, with it, and fp8 with it."""
    keep = ("norms", "biases", "embedders", "modulation", "final")
    for img, gb in measured_gb.items():
        inp = P.PlanInputs(FLUX_DEV, "bf16", lora_dtype="fp32", rank=16, image_tokens=(img,), text_tokens=512,
                           fp8_keep=keep, **settings)
        assert P.estimate(inp).train_peak() / P.GB == pytest.approx(gb, rel=0.03), img
