"""`dev2pro train --resume` when something changed since the saved state: a finished run extended keeps its
previous final LoRA as that step's files, changed settings are said and the earlier config.toml kept, a changed
dataset is refused with what changed (or continued on with --resume-changed-data), a state past train.steps is
refused before any "resumed" line, a copied run folder's config says how to resume the copy, and SIGTERM saves a
state and exits 143 like a preempted job should."""

import os
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.train.folder import RunFolder
from dev2pro.train.lifecycle import own_entries
from tiny_run import lora_run_toml, run_signalled, same_tensors


def _cfg(tmp_path, model_dir, images, out="run", steps=4):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=3,
                         save='every = 2\nformats = ["kohya", "diffusers"]')


def test_extending_a_finished_run_keeps_its_final_lora_and_config(tmp_path, tiny_dev_dir, sk_images, capsys):
    """The audit's commands: 4 steps, then --resume to 6 with another lr and schedule. The step-4 LoRA (both
    layouts) is kept as lora-step000004.*, byte for byte; the settings that changed are one line; the first
    config is kept as config.step-000004.toml (and set aside by --overwrite with the rest of the run)."""
    cfg = _cfg(tmp_path, tiny_dev_dir, sk_images)
    train(load_train_config(cfg), progress=False, quiet=True)
    run = tmp_path / "run"
    finals = {p.name: p.read_bytes() for p in (run / "lora.safetensors", run / "lora.diffusers.safetensors")}
    first_config = (run / "config.toml").read_text()
    assert main(["train", str(cfg), "--resume", "--set", "train.steps=6", "--set", "train.lr=2e-2", "--set",
                 'train.schedule="cosine"', "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (run / "lora-step000004.safetensors").read_bytes() == finals["lora.safetensors"]
    assert (run / "lora-step000004.diffusers.safetensors").read_bytes() == finals["lora.diffusers.safetensors"]
    assert (run / "lora.safetensors").read_bytes() != finals["lora.safetensors"]  # the step-6 LoRA now
    assert (f"kept the previous final LoRA (step 4) as {run / 'lora-step000004.safetensors'}, "
            f"{run / 'lora-step000004.diffusers.safetensors'} before this run writes its final LoRA at step 6") in out
    line = next(x for x in out.splitlines() if x.startswith("settings changed since step 4"))
    assert "(config.step-000004.toml keeps the earlier ones)" in line
    assert 'train.lr 0.01 -> 0.02' in line and 'train.schedule "constant" -> "cosine"' in line
    assert "train.steps 4 -> 6" in line and "save.overwrite" not in line and "train.seed" not in line
    assert out.index("settings changed") < out.index("resumed from step 4")
    assert (run / "config.step-000004.toml").read_text() == first_config
    assert "lr = 0.02" in (run / "config.toml").read_text()
    # a resume that changes nothing: no line, no new kept config; the kept final is not replaced either
    assert main(["train", str(cfg), "--resume", "--set", "train.steps=6", "--set", "train.lr=2e-2", "--set",
                 'train.schedule="cosine"', "--no-progress"]) == 0
    assert "settings changed" not in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("config*.toml")) == ["config.step-000004.toml", "config.toml"]
    assert run / "config.step-000004.toml" in own_entries(RunFolder(run), ["lora"])
    assert main(["train", str(cfg), "--overwrite", "--set", "train.steps=1", "--no-progress"]) == 0
    assert not (run / "config.step-000004.toml").exists() and not (run / "lora-step000004.safetensors").exists()


def test_a_resume_past_train_steps_is_refused_before_any_resumed_line(tmp_path, tiny_dev_dir, sk_images, capsys):
    cfg = _cfg(tmp_path, tiny_dev_dir, sk_images)
    train(load_train_config(cfg), progress=False, quiet=True)
    capsys.readouterr()
    with pytest.raises(UserError, match=r"is at step 4, past train.steps = 2: set train.steps above 4"):
        train(load_train_config(cfg, ["train.steps=2"]), resume="latest", progress=False)
    out = capsys.readouterr().out
    assert "resumed from" not in out and "kept the previous final" not in out
    assert not (tmp_path / "run" / "lora-step000004.safetensors").exists()


def test_a_changed_dataset_is_refused_with_what_changed_or_continued_on(tmp_path, tiny_dev_dir, sk_images, capsys):
    images = tmp_path / "images"
    shutil.copytree(sk_images, images)
    cfg = _cfg(tmp_path, tiny_dev_dir, images)
    train(load_train_config(cfg), progress=False, quiet=True)
    run = tmp_path / "run"
    (images / "astronaut.txt").write_text("another caption")  # same count, another caption
    shutil.copy(images / "coffee.png", images / "coffee2.png")  # one more item (the same picture twice)
    os.remove(images / "rocket.jpg")  # rocket replaced by another picture
    Image.open(images / "chelsea.png").rotate(90).save(images / "horse.png")
    with pytest.raises(UserError) as e:
        train(load_train_config(cfg, ["train.steps=6"]), resume="latest", progress=False)
    msg = str(e.value)
    assert "the dataset changed since the checkpoint" in msg and "2 added, 1 removed, 1 caption(s) changed" in msg
    assert "5 items with repeats then, 6 now" in msg and "--resume-changed-data" in msg, msg
    assert not (run / "state" / "step-000006").exists()
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "--resume-changed-data", "--set", "train.steps=6",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("resumed from step 4 (" in out and "the dataset changed (2 added, 1 removed, 1 caption(s) changed; 5 "
            "items with repeats then, 6 now): --resume-changed-data, a new epoch order from step 4") in out, out
    assert (run / "state" / "step-000006").is_dir()
    # the continued run resumes exactly like any other: step 6 -> 8 equals a run that did 6 -> 8 without a stop
    shutil.copytree(run, tmp_path / "twin")
    train(load_train_config(cfg, ["train.steps=8"]), resume="latest", progress=False, quiet=True)
    twin_cfg = _cfg(tmp_path, tiny_dev_dir, images, out="twin")
    train(load_train_config(twin_cfg, ["train.steps=7"]), resume="latest", progress=False, quiet=True)
    train(load_train_config(twin_cfg, ["train.steps=8"]), resume="latest", progress=False, quiet=True)
    assert same_tensors(run / "lora.safetensors", tmp_path / "twin" / "lora.safetensors")


def test_resume_changed_data_needs_resume(tmp_path, tiny_dev_dir, sk_images, capsys):
    assert main(["train", str(_cfg(tmp_path, tiny_dev_dir, sk_images)), "--resume-changed-data"]) == 2
    assert "--resume-changed-data continues a saved run: pass it with --resume" in capsys.readouterr().err


def test_resume_from_a_copied_run_folder_says_how(tmp_path, tiny_dev_dir, sk_images, capsys):
    cfg = _cfg(tmp_path, tiny_dev_dir, sk_images, steps=2)
    train(load_train_config(cfg), progress=False, quiet=True)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(tmp_path / "run")
    assert main(["train", str(copy / "config.toml"), "--resume", "--set", "train.steps=4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"nothing to resume: {tmp_path / 'run'} holds no run" in err
    assert (f"this config.toml lives in {copy} (a run folder with saved states); pass --resume {copy} "
            f"(dev2pro train {copy / 'config.toml'} --resume {copy}), or set save.output_dir") in err
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 2  # its own config: no hint
    assert "lives in" not in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_state_and_exits_143(tmp_path, tiny_dev_dir, sk_images):
    cfg = _cfg(tmp_path, tiny_dev_dir, sk_images, steps=40)
    code, text = run_signalled(cfg, signal.SIGTERM)
    assert code == 143, text[-3000:]
    states = sorted((tmp_path / "run" / "state").iterdir())
    assert len(states) == 1 and "Traceback" not in text, text[-3000:]
    k = int(states[0].name.split("-")[1])
    assert 3 <= k < 40 and f"interrupted at step {k}: state saved in {states[0]}; resume with: dev2pro train" in text
    assert "dev2pro train: terminated (SIGTERM)" in text
    assert not Path(tmp_path / "run" / ".dev2pro.lock").exists()


def test_dedistill_sigterm_then_a_resume_with_other_settings(tmp_path, tiny_dev_dir, sk_images, monkeypatch,
                                                             capsys):
    """dedistill: SIGTERM mid-step saves the state at the end of the step and raises Terminated (the CLI's 143);
    the resume with another lr says so and keeps the first config; a resume past train.steps says nothing else."""
    from dev2pro.recipes.dedistill import dedistill
    from dev2pro.schemas import load_dedistill_config
    from dev2pro.train import loop
    from dev2pro.train.run import Terminated
    from tiny_run import model_and_data

    cfg = tmp_path / "dd.toml"
    cfg.write_text(model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache") + f"""
[train]
steps = 4
lr = 1e-3
mixed_precision = "no"

[save]
output_dir = "{tmp_path / 'dd'}"
every = 4
formats = ["bfl"]
dtype = "fp32"
""")
    real, calls = loop.objective_loss, []

    def sigterm_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "objective_loss", sigterm_in_step_2)
    with pytest.raises(Terminated):
        dedistill(load_dedistill_config(cfg), progress=False)
    monkeypatch.undo()
    run = tmp_path / "dd"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step-000002"]
    assert "interrupted at step 2" in capsys.readouterr().out
    dedistill(load_dedistill_config(cfg, ["train.lr=2e-3"]), resume="latest", progress=False)
    out = capsys.readouterr().out
    assert "settings changed since step 2 (config.step-000002.toml keeps the earlier ones): train.lr 0.001 -> " \
           "0.002" in out and "resumed from step 2" in out
    assert "lr = 0.001" in (run / "config.step-000002.toml").read_text()
    with pytest.raises(UserError, match="is at step 4, past train.steps = 3"):
        dedistill(load_dedistill_config(cfg, ["train.steps=3", "train.lr=2e-3"]), resume="latest", progress=False)
    assert "resumed from" not in capsys.readouterr().out
