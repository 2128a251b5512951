"""W&B as an optional logger beside TensorBoard: a clear error naming the extra when it is missing, the same values
as TensorBoard through a fake module, and a real offline run (no account, no network) when wandb is installed."""

import sys
import types

import pytest

from dev2pro.errors import UserError
from dev2pro.train.progress import Progress
from dev2pro.train.wandb_log import open_wandb
from dev2pro.train.watch import check_optional_packages


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def fake_wandb():
    mod = types.ModuleType("wandb")
    mod.runs = []
    mod.Settings = lambda **kw: kw
    mod.Image = lambda image: ("image", image.size)

    def init(**kwargs):
        mod.runs.append(FakeRun(**kwargs))
        return mod.runs[-1]

    mod.init = init
    return mod


def test_missing_wandb_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(UserError, match=r"pip install 'dev2pro\[wandb\]'"):
        open_wandb("p", "offline", tmp_path, "run", {})
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"logging.wandb = true needs the wandb package: pip install 'dev2pro\[wandb\]'"):
        check_optional_packages(True, "adamw")
    check_optional_packages(False, "adamw")


def test_progress_sends_the_tensorboard_values_to_wandb(monkeypatch, tmp_path):
    from PIL import Image

    mod = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", mod)
    sink = open_wandb("proj", "offline", tmp_path / "run", "run", {"train": {"lr": 0.1}})
    run = mod.runs[0]
    assert run.init["project"] == "proj" and run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path / "run")
    assert run.init["config"] == {"train": {"lr": 0.1}} and run.init["settings"]["console"] == "off"
    bar = Progress(4, 0, "train", tmp_path / "logs", enabled=False, log_every=2, sinks=[sink])
    for step, loss in ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)):
        bar.update(step, loss, 1e-3, {"grad_norm": 0.5})
    bar.validation(4, {"overall": 0.3, "per_sigma": {"0.1": 0.2, "0.5": 0.4}})
    bar.image("samples", Image.new("RGB", (8, 6)), 4)
    bar.close()
    steps = [s for s, _ in run.logged]
    assert steps == [2, 4, 4, 4]  # every log_every steps, then the validation and the image
    assert run.logged[0][1] == {"loss/step": 0.5, "lr": 1e-3, "grad_norm": 0.5, "loss/smoothed": pytest.approx(
        0.9 * 1.0 + 0.1 * 0.5)}
    assert run.logged[2][1] == {"val/loss": 0.3, "val/sigma_0.1": 0.2, "val/sigma_0.5": 0.4}
    assert run.logged[3][1] == {"samples": ("image", (8, 6))} and run.finished
    assert bar.val == 0.3


def test_offline_run_without_an_account(tmp_path, tiny_dev_dir, sk_images, monkeypatch):
    pytest.importorskip("wandb")
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config
    from tiny_run import model_and_data

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no credentials anywhere
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text("log_every = 1\n" + model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache",
                                                      model='dtype = "fp32"') + f"""
[lora]
rank = 4
[train]
steps = 2
[save]
output_dir = "{tmp_path / 'run'}"
[logging]
wandb = true
project = "dev2pro-test"
""")
    summary = train(load_train_config(path), progress=False)
    assert len(summary["losses"]) == 2
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert not (tmp_path / "wandb").exists()  # nothing written outside the run folder
