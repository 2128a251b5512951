"""Strength calibration maths (strength.py): the effect measure and the search, on known curves."""

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.strength import calibrate, effect


def test_effect_is_the_mean_per_image_rms_and_ignores_batch_order():
    base = torch.zeros(3, 2, 4, 4)
    moved = base.clone()
    moved[0] += 1.0  # RMS 1 for image 0, 0 for the others
    moved[2] += 2.0
    assert effect(moved, base) == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert effect(moved.flip(0), base.flip(0)) == effect(moved, base)


@pytest.mark.parametrize("true_strength", [0.6, 1.0, 1.37, 2.2])
def test_calibrate_recovers_the_crossing_of_a_monotone_curve(true_strength):
    curve = lambda s: 0.3 * (s / true_strength) + 0.05 * (s / true_strength) ** 2  # noqa: E731
    cal = calibrate(curve(true_strength), curve)
    assert cal.strength == pytest.approx(true_strength, rel=1e-3)
    assert cal.points[0][0] == 0.5 and len(cal.points) <= 8 + 6  # grid up to the bracket, then 6 bisections


def test_calibrate_says_when_the_target_never_reaches_the_reference():
    cal = calibrate(10.0, lambda s: s)  # the grid stops at 3.0
    assert cal.strength is None and "search higher strengths" in cal.note
    with pytest.raises(UserError, match="does not change the reference"):
        calibrate(0.0, lambda s: s)
