"""What the console shows: the bar's postfix every step, progress lines without a bar, the loss plot."""

import math

import pytest
from PIL import Image

from dev2pro.train.lossplot import save_loss_plot
from dev2pro.train.progress import Progress


def test_bar_postfix_follows_every_step():
    p = Progress(10, 0, "train", None, enabled=True, log_every=5)
    for step, loss in enumerate([1.0, 0.5, 0.25], start=1):
        p.update(step, loss, 1e-3)
        # the raw loss of this step and the smoothed value are both current (not 5 steps old)
        assert f"loss={loss:.4f}" in p.bar.postfix and f"avg={p.smoothed:.4f}" in p.bar.postfix
    p.close()


def test_scalars_every_log_every_steps_and_at_the_last(tmp_path):
    """TensorBoard (what the web app's Monitor reads) and the sinks get the last step too: a 4-step run with
    log_every 10 showed step 0 and no loss curve."""
    seen = []

    class Sink:
        def log(self, values, step):
            seen.append((step, "sink"))

        def close(self):
            pass

    p = Progress(13, 0, "train", tmp_path / "logs", enabled=False, log_every=5, sinks=[Sink()])
    scalars = []
    p.writer.add_scalar = lambda tag, value, step: scalars.append((tag, step))
    for step in range(1, 14):
        p.update(step, 1.0, 1e-4)
    p.close()
    assert sorted({s for t, s in scalars if t == "loss/step"}) == [5, 10, 13]
    assert [s for s, _ in seen] == [5, 10, 13]


def test_no_bar_prints_a_line_every_log_every_steps(capsys):
    p = Progress(6, 0, "train", None, enabled=False, lines=True, log_every=2)
    for step in range(1, 7):
        p.update(step, 1.0 / step, 1e-4)
    p.close()
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("train step")]
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert "loss 0.5000" in lines[0] and "lr 1.00e-04" in lines[0] and "ETA" in lines[0]


def test_non_finite_losses_do_not_poison_the_smoothed_value():
    p = Progress(4, 0, "train", None, enabled=False)
    p.update(1, 1.0, 1e-3)
    p.update(2, math.nan, 1e-3)
    assert p.smoothed == 1.0
    p.close()


@pytest.mark.parametrize("n", [1, 3, 500])
def test_loss_plot_is_a_valid_image(tmp_path, n):
    losses = [1.0 / (i + 1) for i in range(n)]
    if n > 2:
        losses[1] = None  # a skipped step
    path = save_loss_plot(losses, tmp_path / "loss.png", title="run")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 320 and im.size[1] >= 200
        px = im.convert("RGB")
        colours = len(set(px.getdata()))
    assert colours > 2  # axes and a curve, not a blank canvas


def test_loss_plot_with_nothing_finite_writes_nothing(tmp_path):
    assert save_loss_plot([None, math.nan], tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
