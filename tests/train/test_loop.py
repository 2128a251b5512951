"""The one step driver (train/loop.py): what runs between steps, in which order, and how a stop or a non-finite
step is handled -- with a stand-in step, so the schedule itself is what is tested."""

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.train import loop
from dev2pro.train.loop import Events, Optimization, run_steps
from dev2pro.train.run import NonFiniteGuard


class _Bar:
    smoothed = None

    def __init__(self):
        self.updates = []

    def start_clock(self):
        pass

    def update(self, step, loss, lr, extra=None):
        self.updates.append((step, loss))


def _opt():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return p, Optimization(torch.nn.Linear(1, 1), [p], optimizer, scheduler)


def _compute(p, losses):
    it = iter(losses)

    def compute():
        p.grad = torch.ones_like(p)
        return next(it), {"grad_norm": 1.0}
    return compute


def test_schedule_order_and_last_step():
    """Saves come before samples; neither runs after the last step unless ``save_last``; history grows."""
    p, opt = _opt()
    calls, history = [], [9.0]
    events = Events(save=lambda d: calls.append(("save", d)), save_every=2,
                    sample=lambda d: calls.append(("sample", d)), sample_every=2)
    r = run_steps(1, 6, _compute(p, [1.0, 2.0, 3.0, 4.0, 5.0]), opt, NonFiniteGuard("stop", 1, lambda: ""), _Bar(),
                  events, history)
    assert calls == [("save", 2), ("sample", 2), ("save", 4), ("sample", 4)]
    assert r.losses == [1.0, 2.0, 3.0, 4.0, 5.0] and history == [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.equal(p.detach(), torch.full((2,), -5.0))  # five SGD steps of lr 1 on gradient 1
    calls.clear()
    p, opt = _opt()
    events.save_last = True
    run_steps(0, 3, _compute(p, [1.0, 1.0, 1.0]), opt, NonFiniteGuard("stop", 1, lambda: ""), _Bar(), events, [])
    assert calls == [("save", 2), ("sample", 2), ("save", 3)]


def test_skip_policy_leaves_weights_and_stop_policy_raises():
    p, opt = _opt()
    r = run_steps(0, 3, _compute(p, [1.0, float("nan"), 1.0]), opt, NonFiniteGuard("skip", 3, lambda: ""), _Bar(),
                  Events(), [])
    assert r.skipped == [2] and torch.equal(p.detach(), torch.full((2,), -2.0))
    p, opt = _opt()
    with pytest.raises(UserError, match="non-finite loss .* at step 2.*CONTEXT"):
        run_steps(0, 3, _compute(p, [1.0, float("inf"), 1.0]), opt, NonFiniteGuard("stop", 1, lambda: "CONTEXT"),
                  _Bar(), Events(), [])


def test_interrupt_saves_then_stops_and_after_step_hook(monkeypatch):
    p, opt = _opt()
    seen, done_steps = [], []
    monkeypatch.setattr(loop, "after_step", done_steps.append)
    events = Events(interrupted=seen.append, any_rank=lambda flag: len(done_steps) == 1)  # "Ctrl-C" after step 2
    with pytest.raises(KeyboardInterrupt):
        run_steps(0, 5, _compute(p, [1.0] * 5), opt, NonFiniteGuard("stop", 1, lambda: ""), _Bar(), events, [])
    assert seen == [2] and done_steps == [1]  # stopped at the end of step 2, before its after_step
