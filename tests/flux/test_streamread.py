"""The convert fast path (flux/streamread.py): chunked reads and quantisation equal the whole-tensor reference bit
for bit, the fused finite checks catch what the writer's scan caught, and the prefetching keeps file order."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.flux import convert as flux_convert
from dev2pro.flux import fp8
from dev2pro.flux import streamread as S
from dev2pro.outputs import NonFiniteError, count_nonfinite


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"w": (torch.randn(300, 170, generator=g) * 0.03).to(torch.bfloat16),
         "z": torch.zeros(64, 8, dtype=torch.bfloat16), "h": torch.randn(5, 7, generator=g).half(),
         "f": torch.randn(33, 3, generator=g)}
    path = tmp_path / "w.safetensors"
    save_file(t, str(path))
    return path, t


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("chunk", [1000, 1 << 22])
def test_stream_quantize_equals_fp8_quantize_bit_for_bit(weights, monkeypatch, scaled, chunk):
    path, t = weights
    monkeypatch.setattr(S, "CHUNK", chunk)  # several chunks, with a partial last one, and a single chunk
    for key in t:
        src = S.TensorFile(path, key)
        assert torch.equal(src.read(), t[key])
        q, scale = S.stream_quantize(src, key, scaled, torch.float8_e4m3fn)
        ref_q, ref_scale = fp8.quantize(t[key], scaled=scaled)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), key
        assert (scale is None and ref_scale is None) or torch.equal(scale, ref_scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_sources_are_refused_in_every_path(tmp_path, weights, monkeypatch, bad):
    path, t = weights
    t = {k: v.clone() for k, v in t.items()}
    t["w"][7, 9] = bad
    save_file(t, str(path))
    monkeypatch.setattr(S, "CHUNK", 1000)
    for scaled in (True, False):
        with pytest.raises(NonFiniteError, match="tensor w holds"):
            S.stream_quantize(S.TensorFile(path, "w"), "w", scaled, torch.float8_e4m3fn)
    with pytest.raises(NonFiniteError, match="tensor w holds 1 NaN/inf"):
        S.check_finite("w", t["w"])
    for v in (t["z"], t["h"], t["f"]):
        assert S.check_finite("x", v) is v
    # a finite tensor whose sum overflows is not refused (the check is exact, not a sum)
    big = torch.full((4,), 3e38)
    assert S.check_finite("big", big) is big


def test_fp8_bits_check_matches_the_exact_count():
    for dtype, nan_bits in ((torch.float8_e4m3fn, 0x7F), (torch.float8_e5m2, 0x7C)):
        q = torch.randn(50, 20).clamp(-10, 10).to(dtype)
        assert S.check_finite("q", q) is q
        raw = q.view(torch.uint8)
        raw[3, 4] = nan_bits | 0x80  # negative NaN (e4m3fn) / -inf (e5m2)
        assert count_nonfinite(q) == 1
        with pytest.raises(NonFiniteError, match="holds 1 NaN/inf"):
            S.check_finite("q", q)


def test_prefetched_keeps_order_and_propagates_errors():
    calls = []

    def make(i):
        def produce():
            calls.append(i)
            if i == 3:
                raise NonFiniteError("tensor 3 holds 1 NaN/inf value(s) of 1")
            return torch.full((1,), float(i))
        return produce

    entries = S.prefetched([(f"k{i}", torch.float32, (1,), make(i)) for i in range(5)])
    assert [e[3]().item() for e in entries[:3]] == [0.0, 1.0, 2.0]
    with pytest.raises(NonFiniteError):
        entries[3][3]()
    assert calls[:4] == [0, 1, 2, 3]  # produced in file order, one ahead at most


def test_convert_keeps_results_and_refuses_nan_without_writing(tmp_path, weights):
    """convert's files are the reference conversion's tensors; NaN in a kept-bf16 tensor is refused."""
    from dev2pro.flux.spec import TINY, build_transformer
    from dev2pro.flux.keys import diffusers_to_bfl

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_to_bfl(build_transformer(TINY, seed=0)
                                                                           .state_dict()).items()}
    src = tmp_path / "bfl.safetensors"
    save_file(sd, str(src))
    out = flux_convert.convert(src, tmp_path / "q.safetensors", dtype="fp8-scaled")
    q = load_file(str(out))
    policy = fp8.Fp8Policy()
    for k, v in sd.items():
        if v.ndim == 2 and policy.should_quantize(k, tuple(v.shape)):
            ref, scale = fp8.quantize(v, scaled=True)
            assert torch.equal(q[k].view(torch.uint8), ref.view(torch.uint8)), k
            assert torch.equal(q[k.removesuffix(".weight") + ".scale_weight"], scale.reshape(()))
        else:
            assert torch.equal(q[k], v), k
    kept = next(k for k, v in sd.items() if v.ndim == 1)
    sd[kept][0] = float("nan")
    save_file(sd, str(src))
    with pytest.raises(NonFiniteError, match=f"{kept}.*NaN/inf.*nothing was written"):
        flux_convert.convert(src, tmp_path / "bad.safetensors", dtype="fp8-scaled")
    assert not (tmp_path / "bad.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
