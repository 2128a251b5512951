"""The web app and validation / EMA / W&B / schedule-free: the Train form shows the new options with words in their
Advanced groups, the Monitor's run info carries the validation curve and the best step, and in a real headless
Chromium the Monitor page draws the validation curve beside the loss curve."""

import json
import os
from pathlib import Path

import pytest

from dev2pro.schemas import TrainConfig
from dev2pro.ui import forms, trainform
from dev2pro.ui.monitor import run_info

NEW = ("train.ema_decay", "validation.folder", "validation.fraction", "validation.every", "validation.sigmas",
       "validation.seeds", "logging.wandb", "logging.project", "logging.mode")


def test_train_form_labels_and_groups_the_new_options():
    specs = {s["key"]: s for s in trainform.annotate(forms.field_specs(TrainConfig))}
    for key in NEW:
        assert key in specs and specs[key]["label"] == trainform.LABELS[key] and not specs[key]["basic"]
    assert {specs[k]["group"] for k in NEW if k.startswith("validation.")} == {"Validation loss"}
    assert {specs[k]["group"] for k in NEW if k.startswith("logging.")} == {"Logging"}
    assert specs["log_every"]["group"] == "Logging" and specs["train.ema_decay"]["group"] == "Optimisation"
    assert "schedulefree_adamw" in specs["train.optimizer"]["choices"]
    assert specs["validation.sigmas"]["kind"] == "list" and specs["logging.mode"]["choices"] == ["offline", "online"]


def write_run(run: Path, steps: int = 10):
    """A run folder as `dev2pro train` leaves it with validation on: loss every step, val/loss every 2 steps."""
    from torch.utils.tensorboard import SummaryWriter

    run.mkdir(parents=True)
    (run / "config.toml").write_text(f"[train]\nsteps = {steps}\n")
    w = SummaryWriter(str(run / "logs"))
    for s in range(1, steps + 1):
        w.add_scalar("loss/step", 1.0 / s, s, walltime=1000 + s)
        w.add_scalar("loss/smoothed", 1.0 / s, s, walltime=1000 + s)
        w.add_scalar("lr", 1e-3, s, walltime=1000 + s)
    val = {s: 0.5 + (s - 6) ** 2 / 100 for s in range(0, steps + 1, 2)}  # best at step 6
    for s, v in val.items():
        w.add_scalar("val/loss", v, s, walltime=1000 + s)
        w.add_scalar("val/sigma_0.5", v, s, walltime=1000 + s)
    w.close()
    (run / "summary.json").write_text(json.dumps({
        "steps": steps, "losses": [1.0] * steps, "validation": {str(s): {"overall": v, "per_sigma": {"0.5": v}}
                                                                  for s, v in val.items()},
        "validation_best": {"step": 6, "overall": 0.5, "advice": ["best validation loss 0.5000 at step 6 of 10"]}}))
    return val


def test_run_info_has_the_validation_curve_and_best_step(tmp_path):
    val = write_run(tmp_path / "runs" / "a")
    info = run_info(tmp_path / "runs" / "a", tmp_path)
    assert info["scalars"]["val"] == [[s, pytest.approx(v)] for s, v in val.items()]
    assert info["summary"]["validation_best"]["step"] == 6 and "validation" not in info["summary"]
    assert len(info["scalars"]["loss"]) == 10


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
def test_monitor_page_draws_the_validation_curve(tmp_path, ui_server, browser_page):
    ws = tmp_path / "ws"
    val = write_run(ws / "runs" / "a")
    (ws / "runs" / "b").mkdir(parents=True)  # a run without validation: an empty plot that says how to get one
    (ws / "runs" / "b" / "config.toml").write_text("[train]\nsteps = 4\n")
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(ws / "runs" / "b" / "logs"))
    w.add_scalar("loss/step", 1.0, 1)
    w.close()
    url = ui_server.start(ws)
    page = browser_page
    page.goto(url + "/#monitor")
    page.click("#tab-monitor")
    page.select_option("#run-select", "runs/a")
    page.wait_for_function(f"+document.getElementById('val-plot').dataset.points === {len(val)}")
    points = page.get_attribute("#val-plot polyline.val", "points").split()
    assert len(points) == len(val)
    ys = [float(p.split(",")[1]) for p in points]
    assert ys.index(max(ys)) == 3  # step 6 (lowest loss) is drawn lowest: the largest y in SVG coordinates
    assert "best 0.5000 at step 6" in page.inner_text("#val-caption")
    assert int(page.get_attribute("#loss-plot", "data-points")) == 10
    if os.environ.get("DEV2PRO_UI_SCREENSHOTS"):  # for a look at the page
        Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]) / "monitor-validation.png"),
                        full_page=True)
    page.select_option("#run-select", "runs/b")
    page.wait_for_function("document.getElementById('val-plot').textContent.includes('no validation')")
