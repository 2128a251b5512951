"""Flow-matching maths for Flux: noising, target, loss, timestep sampling and the sampling schedule.

Flux is a rectified flow. A training sample at noise level ``sigma`` in [0, 1] is the straight-line mix
``x_sigma = (1 - sigma) * x0 + sigma * noise``; the transformer predicts the velocity ``noise - x0`` (constant
along the line) and is trained with plain MSE. Everything else is *which* sigmas we visit:

- training draws sigma per sample: ``uniform``; ``sigmoid`` (logit-normal, SD3's choice, mass around 0.5);
  ``shift`` (kohya's fixed shift ``s*t / (1 + (s-1)*t)`` on logit-normal draws, more mass at high noise);
  ``flux_shift`` (BFL's resolution-dependent shift: ``mu`` grows linearly with the image token count, so larger
  images spend more time at high noise, where their low frequencies are decided).
- sampling walks BFL's ``get_schedule``: ``linspace(1, 0, steps + 1)`` pushed through the same time shift.

The transformer scales sigma by 1000 itself, so these functions only ever deal in sigma in [0, 1].
All functions are pure; randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch

from dev2pro.errors import ConfigError

from .choices import TIMESTEP_MODES  # noqa: E402 -- re-exported: the list lives with the other choices


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor that broadcasts over every dim of ``like`` but the batch dim."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The point at noise level ``sigma`` (scalar or one per sample) on the line from ``x0`` to ``noise``."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model predicts: d x_sigma / d sigma = noise - x0."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
              token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``weights`` (B,), each sample's mean error is weighted before the batch mean;
    with ``token_weights`` (broadcastable to ``pred``, e.g. a loss mask as (B, T, 1) or (B, T, D)), each sample's
    error is their weighted mean ``sum(w * err) / sum(w)`` (a sample weighted 0 everywhere contributes 0).

    Without either, exactly the plain mean (no multiplication by ones). Computed in float32: bf16 predictions
    squared and summed over ~1M latent values lose most of their bits.
    """
    err = (pred.float() - target.float()).pow(2)
    if weights is None and token_weights is None:
        return err.mean()
    flat = err.reshape(err.shape[0], -1)
    if token_weights is None:
        per_sample = flat.mean(dim=1)  # (B,)
    else:
        tw = token_weights.to(err).expand_as(err).reshape(err.shape[0], -1)
        per_sample = (flat * tw).sum(dim=1) / tw.sum(dim=1).clamp_min(1e-12)  # (B,)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()


def flux_mu(
    image_seq_len: int | float,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """BFL's resolution-dependent shift: linear in image tokens through (256, 0.5) and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, sigma: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """BFL's time shift ``e^mu / (e^mu + (1/t - 1)^sigma)``: maps 0 -> 0 and 1 -> 1, bends t upwards for mu > 0."""
    if not isinstance(t, torch.Tensor):
        return float(time_shift(mu, sigma, torch.tensor(t, dtype=torch.float64)))
    # t = 0 gives 1/0 = inf and a result of exactly 0, as intended (the last sampling step is clean).
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_sigmas(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The SD3 / kohya fixed shift ``shift * t / (1 + (shift - 1) * t)``; shift > 1 favours high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_sigmas(
    n: int,
    mode: str,
    generator: torch.Generator,
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 3.0,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """Draw ``n`` training sigmas in [0, 1] (float32, on the generator's device) with one of ``TIMESTEP_MODES``.

    ``sigmoid_scale`` widens the logit-normal draws of the non-uniform modes; ``shift`` is used by ``shift``;
    ``image_seq_len`` (packed image tokens, (H/16) * (W/16) for an H x W image) is required by ``flux_shift``.
    """
    if mode not in TIMESTEP_MODES:
        raise ConfigError(f"unknown timestep sampling mode {mode!r}; choose one of {', '.join(TIMESTEP_MODES)}")
    if mode == "shift" and shift <= 0:
        raise ConfigError(f"timestep shift must be > 0 (1.0 means no shift), got {shift}")
    if mode == "flux_shift" and image_seq_len is None:
        raise ValueError("timestep mode 'flux_shift' needs image_seq_len (packed image tokens per sample)")
    device = generator.device
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, device=device))
    if mode == "sigmoid":
        return t
    if mode == "shift":
        return shift_sigmas(t, shift)
    return time_shift(flux_mu(image_seq_len), 1.0, t)

