"""train.optim: optimisers by name (clear errors for missing optional packages) and the LR schedules."""

import math

import pytest
import torch

from dev2pro.errors import ConfigError
from dev2pro.train.optim import build_optimizer, build_scheduler, lr_lambda


def test_schedules_warm_up_linearly_then_hold_or_decay():
    assert [lr_lambda(s, 4, 12, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(4, 4, 12, "cosine") == 1.0 and lr_lambda(12, 4, 12, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(8, 4, 12, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_lambda(8, 4, 12, "linear") == pytest.approx(0.5) and lr_lambda(10, 4, 12, "linear") == 0.25
    assert lr_lambda(12, 0, 12, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(50, 0, 12, "linear") == 0.0  # past the end: no negative LR
    assert lr_lambda(0, 0, 12, "cosine") == 1.0


def test_scheduler_drives_the_optimizer_lr():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([w], "adamw", 1e-3)
    sched = build_scheduler(opt, 2, 6, "cosine")
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [1e-3 * lr_lambda(s, 2, 6, "cosine") for s in range(6)]
    assert lrs == pytest.approx(want) and lrs[0] == pytest.approx(5e-4)
    assert math.isclose(max(lrs), 1e-3)


def test_names_are_checked_and_frozen_params_are_left_out():
    w, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    opt = build_optimizer([w, frozen], "adamw", 1e-3, weight_decay=0.1)
    assert opt.param_groups[0]["params"] == [w] and opt.param_groups[0]["weight_decay"] == 0.1
    assert isinstance(build_optimizer([w], "adafactor", 1e-3), torch.optim.Adafactor)
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        build_optimizer([w], "sgd", 1e-3)
    with pytest.raises(ConfigError, match="unknown lr schedule 'step'"):
        build_scheduler(opt, 0, 10, "step")
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # the CPU machines: the error says how to install it, never a silent fallback
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            build_optimizer([w], "adamw8bit", 1e-3)
