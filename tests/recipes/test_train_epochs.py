"""`dev2pro train` in epochs (``train.epochs``, ``save.every_epochs``, ``sample.every_epochs``) and with
``save.keep_loras``: the epochs become steps once the dataset is counted (5 images at batch 1: 5 batches per
epoch), the run's config.toml and summary record them, a crashed run resumes to the same final LoRA, a resume on a
changed dataset keeps the step count it started with, and only the newest step LoRA files of the run are kept."""

import contextlib
import io
import json
import re
import shutil

import pytest
from PIL import Image
from safetensors import safe_open

from dev2pro.cli import main
from dev2pro.errors import ConfigError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import TrainConfig, load_dedistill_config, load_train_config
from dev2pro.train import epochs, loop
from dev2pro.train.lifecycle import prune_step_loras
from tiny_run import lora_run_toml, same_tensors

EPOCHS = "epochs = 1.2"  # 1.2 x 5 batches = 6 steps
EVERY = "every_epochs = 1"  # every 5 steps


def _cfg(tmp_path, images, model, out="run", train_="", save=""):
    return lora_run_toml(tmp_path, model, images, out, steps=1000, seed=3, train=train_ or EPOCHS, save=save or EVERY)


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_dev_dir, sk_images):
    """The uninterrupted epochs run: its folder, summary and console output."""
    root = tmp_path_factory.mktemp("epochs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train(load_train_config(_cfg(root, sk_images, tiny_dev_dir)), progress=False)
    return root / "run", summary, printed.getvalue()


class Crash(Exception):
    pass


def _crash_after(monkeypatch, step: int):
    def hook(done):
        if done == step:
            raise Crash(done)
    monkeypatch.setattr(loop, "after_step", hook)


def test_epochs_become_steps_recorded_in_config_and_summary(full, capsys):
    run, summary, out = full
    assert "  train.epochs = 1.2 -> 6 steps (5 batches per epoch)" in out.splitlines()
    assert "  save.every_epochs = 1 -> every 5 steps (5 batches per epoch)" in out.splitlines()
    assert "steps 6, batch 1 x grad_accum 1, 5 batches per epoch = 1.2 epochs" in out
    assert "saved step 5:" in out and summary["steps"] == 6 and len(summary["losses"]) == 6
    recorded = json.loads((run / "summary.json").read_text())["epochs"]
    assert recorded == {"train.epochs": {"value": 1.2, "steps": 6, "per_epoch": 5, "grad_accum": 1},
                        "save.every_epochs": {"value": 1, "steps": 5, "per_epoch": 5, "grad_accum": 1}}
    text = (run / "config.toml").read_text()
    assert "# train.epochs = 1.2 -> 6 steps (5 batches per epoch)\n" in text
    saved = load_train_config(run / "config.toml")  # the run's config: the steps, no epochs left to count
    assert (saved.train.steps, saved.train.epochs, saved.save.every, saved.save.every_epochs) == (6, 0, 5, 0)
    assert epochs.recorded(text)["train.epochs"] == epochs.Resolved("train.epochs", 1.2, 6, 5)
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"
    assert main(["train", str(run / "config.toml"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\nsteps = 6\n" in printed and "\nepochs = 0.0\n" in printed and "\nevery = 5\n" in printed


def test_a_crashed_epochs_run_resumes_to_the_same_final_lora(tmp_path, tiny_dev_dir, sk_images, full, monkeypatch,
                                                             capsys):
    cfg = _cfg(tmp_path, sk_images, tiny_dev_dir)
    _crash_after(monkeypatch, 5)  # after the step-5 save (save.every_epochs = 1)
    with pytest.raises(Crash):
        train(load_train_config(cfg), progress=False, quiet=True)
    monkeypatch.setattr(loop, "after_step", None)
    run = tmp_path / "run"
    assert (run / "state" / "step-000005").is_dir() and not (run / "lora.safetensors").exists()
    resumed = train(load_train_config(cfg), resume="latest", progress=False)
    out = capsys.readouterr().out
    assert resumed["steps"] == 6 and resumed["session_steps"] == 1 and resumed["losses"] == full[1]["losses"][5:]
    assert same_tensors(run / "lora.safetensors", full[0] / "lora.safetensors")
    assert "settings changed" not in out and not list(run.glob("config.step-*.toml"))  # the same resolved config
    # the run's own config.toml holds the steps: it resumes to the same end (here: already there)
    again = train(load_train_config(run / "config.toml"), resume="latest", progress=False)
    assert again["steps"] == 6 and "already finished at step 6" in capsys.readouterr().out
    assert "# train.epochs = 1.2 -> 6 steps" in (run / "config.toml").read_text()  # the record stays


def test_a_resume_on_a_changed_dataset_keeps_the_step_count_it_started_with(tmp_path, tiny_dev_dir, sk_images,
                                                                            monkeypatch, capsys):
    images = tmp_path / "images"
    shutil.copytree(sk_images, images)
    cfg = _cfg(tmp_path, images, tiny_dev_dir)
    _crash_after(monkeypatch, 5)
    with pytest.raises(Crash):
        train(load_train_config(cfg), progress=False, quiet=True)
    monkeypatch.setattr(loop, "after_step", None)
    Image.open(images / "chelsea.png").rotate(90).save(images / "horse.png")  # 6 batches per epoch: 8 steps if counted
    resumed = train(load_train_config(cfg), resume="latest", progress=False, changed_data=True)
    out = capsys.readouterr().out
    assert resumed["steps"] == 6, out
    assert ("  train.epochs = 1.2 -> 6 steps (5 batches per epoch); 6 batches per epoch now: kept the 6 steps "
            "train.steps had when the run started (the dataset or batch size changed since)") in out.splitlines()
    assert "a new epoch order from step 5" in out
    # a new start on this dataset counts it: 1.2 x 6 = 7.2 -> 8 steps
    assert epochs.resolve({"train.epochs": 1.2}, 6, 1)[0].steps == 8


def test_keep_loras_keeps_the_newest_step_files_of_this_run_only(tmp_path, tiny_dev_dir, sk_images, monkeypatch,
                                                                capsys):
    cfg = lora_run_toml(tmp_path, tiny_dev_dir, sk_images, "run", steps=4, seed=3,
                        save='every = 1\nkeep_loras = 2\nformats = ["kohya", "diffusers"]')
    run = tmp_path / "run"
    others = ["other-step000001.safetensors", "lora-b-step000001.safetensors", "lora-step000001.txt"]

    def decoys(done):  # files of another name beside the run's own (written once the folder is the run's)
        if done == 1:
            for name in others:
                (run / name).write_text("not this run's")
    monkeypatch.setattr(loop, "after_step", decoys)
    train(load_train_config(cfg), progress=False)
    out = capsys.readouterr().out
    assert "saves: every 1 steps (the newest 2 steps' LoRA files kept: save.keep_loras)" in out
    assert ("; save.keep_loras = 2: removed lora-step000001.diffusers.safetensors, lora-step000001.safetensors"
            in out)
    names = sorted(p.name for p in run.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".txt")))
    assert names == sorted(others + ["lora-step000002.safetensors", "lora-step000002.diffusers.safetensors",
                                     "lora-step000003.safetensors", "lora-step000003.diffusers.safetensors",
                                     "lora.safetensors", "lora.diffusers.safetensors"])


def test_prune_step_loras_groups_layouts_and_spares_finals_and_other_names(tmp_path):
    made = ["lora.safetensors", "lora.comfy.safetensors", "lora-step000010.safetensors",
            "lora-step000010.comfy.safetensors", "lora-step000020.safetensors", "lora-step000030.diffusers.safetensors",
            "lora-fp8.safetensors", "lora2-step000001.safetensors", "my-lora-step000001.safetensors"]
    for name in made:
        (tmp_path / name).write_bytes(b"x")
    assert prune_step_loras(tmp_path, "lora", 0) == []  # 0: every file kept
    removed = prune_step_loras(tmp_path, "lora", 2)
    assert [p.name for p in removed] == ["lora-step000010.comfy.safetensors", "lora-step000010.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(made) - {p.name for p in removed})
    assert prune_step_loras(tmp_path, "lora", 1) == [tmp_path / "lora-step000020.safetensors"]


def test_epoch_settings_are_refused_beside_their_step_settings(tmp_path):
    base = {"model": {"path": str(tmp_path)}, "data": {"folders": [{"path": str(tmp_path)}]},
            "save": {"output_dir": str(tmp_path / "out")}}
    cfg = load_train_config(None, ["train.epochs=16", "train.steps=1000", "save.every_epochs=4"], data=base)
    assert (cfg.train.epochs, cfg.save.every_epochs, cfg.save.keep_loras) == (16.0, 4, 0)  # steps at its default
    for sets, both in ((["train.epochs=16", "train.steps=2400"], "train.epochs or train.steps, not both"),
                       (["save.every_epochs=4", "save.every=100"], "set save.every (steps) or save.every_epochs"),
                       (["sample.every_epochs=1", "sample.every=5"], "set sample.every (steps) or sample.every_epochs"),
                       (["save.keep_loras=-1"], "save.keep_loras must be >= 0"),
                       (["train.epochs=-1"], "train.epochs must be >= 0")):
        with pytest.raises(ConfigError, match=re.escape(both)) as e:
            load_train_config(None, sets, data=base)
        assert str(e.value).startswith(f"--set {sets[0]}: {sets[0].split('=')[0]}"), str(e.value)
        assert all(s.split("=")[0] in str(e.value) for s in sets), str(e.value)  # both fields named
    dd = {"model": {"path": str(tmp_path)}, "data": {"shards": str(tmp_path / "i.json")},
          "save": {"output_dir": str(tmp_path / "dd")}}
    with pytest.raises(ConfigError, match="unknown key 'save.keep_loras'"):  # dedistill writes no LoRA steps
        load_dedistill_config(None, ["save.keep_loras=2"], data=dd)


def test_epoch_counts_and_their_record():
    assert [epochs.steps_for(e, n, a) for e, n, a in ((16, 150, 1), (0.1, 30, 1), (2, 5, 3), (0.01, 5, 1))] == \
        [2400, 3, 4, 1]
    got = epochs.resolve({"train.epochs": 2.5, "sample.every_epochs": 1, "save.every": 7}, 10, 4)
    assert [(r.key, r.steps) for r in got] == [("train.epochs", 7), ("sample.every_epochs", 3)]
    assert epochs.settings(got) == {"train.steps": 7, "train.epochs": 0, "sample.every": 3, "sample.every_epochs": 0}
    text = epochs.note(got) + "[train]\nsteps = 7\n"
    assert "# train.epochs = 2.5 -> 7 steps (10 batches per epoch, grad_accum 4)\n" in text
    back = epochs.recorded(text)
    assert list(back.values()) == [epochs.Resolved(r.key, r.value, r.steps, r.per_epoch, 4) for r in got]
    # a resume: the same setting keeps its recorded steps; another value is counted anew; a setting now off whose
    # step field still holds the recorded count keeps the record (config.toml goes on saying where it came from)
    kept = epochs.resolve({"train.epochs": 2.5, "sample.every": 3}, 12, 4, back)
    assert [(r.key, r.steps, r.now) for r in kept] == [("train.epochs", 7, 12), ("sample.every_epochs", 3, 0)]
    assert epochs.resolve({"train.epochs": 3, "sample.every": 5}, 12, 4, back)[0].steps == 9
    assert epochs.note([]) == "" and epochs.recorded("steps = 5\n") == {}


def test_the_form_and_the_plan_know_the_new_fields(tmp_path, tiny_dev_dir, sk_images, capsys):
    from dev2pro.recipes.plan import run_plan
    from dev2pro.ui import forms, trainform

    specs = {s["key"]: s for s in trainform.annotate(forms.field_specs(TrainConfig))}
    assert {k: (specs[k]["kind"], specs[k]["group"]) for k in ("train.epochs", "save.every_epochs",
                                                               "save.keep_loras", "sample.every_epochs")} == {
        "train.epochs": ("float", "Optimisation"), "save.every_epochs": ("int", "Saving"),
        "save.keep_loras": ("int", "Saving"), "sample.every_epochs": ("int", "Samples during training")}
    run_plan(str(_cfg(tmp_path, sk_images, tiny_dev_dir)))
    assert ("  train.epochs = 1.2, save.every_epochs = 1: counted in steps when `dev2pro train` starts"
            in capsys.readouterr().out)


def test_a_refused_resume_leaves_the_runs_config_and_the_hints_name_train_epochs(tmp_path, tiny_dev_dir, sk_images,
                                                                                 full, capsys):
    """A resume past its (epoch-counted) end is refused before the run's config.toml is touched, naming
    train.epochs (train.steps beside it is refused); extending a finished run with keep_loras = 1 ends with one
    step file (the old final kept as a step file is pruned at the end too)."""
    from dev2pro.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    before = (run / "config.toml").read_bytes()
    with pytest.raises(UserError, match=r"at step 6, past train.steps = 5: raise train.epochs \(now 1 = 5 steps at 5 "
                                        r"batches per epoch\), e.g. --set train.epochs=2 --resume"):
        train(load_train_config(_cfg(tmp_path, sk_images, tiny_dev_dir, train_="epochs = 1")), resume="latest",
              progress=False, quiet=True)
    assert (run / "config.toml").read_bytes() == before and not list(run.glob("config.step-*.toml"))
    train(load_train_config(_cfg(tmp_path, sk_images, tiny_dev_dir)), resume="latest", progress=False)
    assert ("already finished at step 6: " in (out := capsys.readouterr().out) and "to train further, raise "
            "train.epochs (now 1.2 = 6 steps at 5 batches per epoch), e.g. --set train.epochs=2.4 --resume" in out)
    assert sorted(p.name for p in run.glob("lora-step*")) == ["lora-step000005.safetensors"]
    more = train(load_train_config(_cfg(tmp_path, sk_images, tiny_dev_dir, train_="epochs = 2.4",
                                        save="keep_loras = 1")), resume="latest", progress=False)
    assert more["steps"] == 12 and "save.keep_loras = 1: removed lora-step000005.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("lora-step*")) == ["lora-step000006.safetensors"]  # the old final
