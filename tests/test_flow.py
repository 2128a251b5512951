"""Flow-matching maths checked against hand computations."""

import math

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from dev2pro.errors import ConfigError
from dev2pro.flow import (
    TIMESTEP_MODES,
    flow_loss,
    flow_target,
    flux_mu,
    noisy_input,
    sample_sigmas,
    shift_sigmas,
    time_shift,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noisy_input_endpoints_and_midpoint():
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen(1)), torch.randn(3, 4, 2, 2, generator=gen(2))
    assert torch.equal(noisy_input(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noisy_input(x0, noise, torch.ones(3)), noise)
    torch.testing.assert_close(noisy_input(x0, noise, 0.5), (x0 + noise) / 2)


def test_noisy_input_broadcasts_one_sigma_per_sample():
    x0, noise = torch.zeros(2, 5, 3), torch.ones(2, 5, 3)  # packed tokens (B, T, C)
    out = noisy_input(x0, noise, torch.tensor([0.25, 0.75]))
    assert torch.all(out[0] == 0.25) and torch.all(out[1] == 0.75)


def test_target_is_velocity_along_the_line():
    x0, noise = torch.randn(2, 8, generator=gen(3)), torch.randn(2, 8, generator=gen(4))
    assert torch.equal(flow_target(x0, noise), noise - x0)
    # d/dsigma of the noisy input equals the target
    a, b = noisy_input(x0, noise, 0.3), noisy_input(x0, noise, 0.7)
    torch.testing.assert_close((b - a) / 0.4, flow_target(x0, noise))


def test_loss_is_manual_mse_and_weighted_per_sample():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    # squared errors: sample0 [1, 4] mean 2.5; sample1 [0, 4] mean 2.0
    assert flow_loss(pred, target).item() == pytest.approx(4.5 / 2)
    assert flow_loss(pred, target, torch.tensor([2.0, 0.0])).item() == pytest.approx((2 * 2.5 + 0) / 2)
    bf16 = flow_loss(pred.bfloat16(), target.bfloat16())
    assert bf16.dtype == torch.float32


def test_flux_mu_matches_bfl_and_diffusers():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    for n in (64, 256, 1024, 4096, 8192):
        assert flux_mu(n) == pytest.approx(calculate_shift(n))


def test_time_shift_known_values():
    assert time_shift(0.0, 1.0, 0.5) == pytest.approx(0.5)  # mu 0 is the identity
    assert time_shift(0.0, 1.0, 0.2) == pytest.approx(0.2)
    # e^1 / (e^1 + (1/0.5 - 1)) = e / (e + 1)
    assert time_shift(1.0, 1.0, 0.5) == pytest.approx(math.e / (math.e + 1))
    # sigma exponent: (1/0.25 - 1)^2 = 9 -> 1 / (1 + 9)
    assert time_shift(0.0, 2.0, 0.25) == pytest.approx(0.1)
    t = torch.tensor([0.0, 1.0])
    assert time_shift(1.15, 1.0, t).tolist() == [0.0, 1.0]


def test_shift_sigmas_known_values():
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigmas(0.5, 1.0) == pytest.approx(0.5)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_sample_sigmas_modes_statistics():
    n = 20000
    uniform = sample_sigmas(n, "uniform", gen())
    assert uniform.shape == (n,) and uniform.dtype == torch.float32
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    sigmoid = sample_sigmas(n, "sigmoid", gen())
    assert abs(sigmoid.mean().item() - 0.5) < 0.01
    assert sigmoid.std() < uniform.std()  # logit-normal concentrates around the middle
    wide = sample_sigmas(n, "sigmoid", gen(), sigmoid_scale=3.0)
    assert wide.std() > sigmoid.std()
    shifted = sample_sigmas(n, "shift", gen(), shift=3.0)
    assert shifted.mean() > 0.6  # shift > 1 moves mass to high noise
    torch.testing.assert_close(shifted, shift_sigmas(sigmoid, 3.0))  # same draws, then shifted
    small = sample_sigmas(n, "flux_shift", gen(), image_seq_len=256)
    large = sample_sigmas(n, "flux_shift", gen(), image_seq_len=4096)
    torch.testing.assert_close(large, time_shift(1.15, 1.0, sigmoid))
    assert 0.5 < small.mean() < large.mean()  # bigger images -> more time at high noise


def test_sample_sigmas_deterministic_given_generator():
    for mode in TIMESTEP_MODES:
        a = sample_sigmas(16, mode, gen(7), image_seq_len=1024)
        b = sample_sigmas(16, mode, gen(7), image_seq_len=1024)
        assert torch.equal(a, b)
        assert not torch.equal(a, sample_sigmas(16, mode, gen(8), image_seq_len=1024))


def test_sample_sigmas_bad_inputs():
    with pytest.raises(ConfigError) as e:
        sample_sigmas(4, "logit", gen())
    msg = str(e.value)
    assert "'logit'" in msg and all(m in msg for m in TIMESTEP_MODES)
    with pytest.raises(ConfigError, match="shift must be > 0"):
        sample_sigmas(4, "shift", gen(), shift=0.0)
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_sigmas(4, "flux_shift", gen())


def test_time_shift_with_flux_mu_is_bfl_get_schedule():
    """BFL's get_schedule(4, 1024): linspace(1, 0, 5) time-shifted by mu(1024) -- the shift flux_shift sampling uses."""
    mu = 0.5 + 0.65 * 768 / 3840
    assert flux_mu(1024) == pytest.approx(mu)
    sigmas = time_shift(flux_mu(1024), 1.0, torch.linspace(1, 0, 5))
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in (0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected))
    assert torch.all(sigmas[:-1] > sigmas[1:])