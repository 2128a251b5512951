"""`dev2pro train` (and `dedistill`) when a folder, a path or a state is not what the run expects: ``--overwrite``
replaces every file of the previous run (and puts them all back if the new start stops before its first state), a
missing input path is refused by its field before the run folder exists, ``--resume`` takes a run folder and says
what a state of another kind of run or another model is."""

import errno
import json
from pathlib import Path

import pytest

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.recipes import train_lora
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config
from tiny_run import SAMPLES, lora_run_toml, model_and_data



def _lora(tmp_path, model_dir, images, out="run", steps=4, cache="cache", samples=True):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=3, cache=cache,
                         save='every = 2\nformats = ["kohya", "diffusers"]', extra=SAMPLES if samples else "")


def _dedistill_toml(tmp_path, model_dir, images, out="dd", steps=2, extra=""):
    path = tmp_path / f"{out}.toml"
    path.write_text(model_and_data(model_dir, images, tmp_path / "cache") + f"""
[train]
steps = {steps}
lr = 1e-3
mixed_precision = "no"

[save]
output_dir = "{tmp_path / out}"
every = 2
formats = ["bfl"]
dtype = "fp32"
{extra}
""")
    return path


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder but its data cache (kept across runs), by relative path."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] != "cache"}


def _without_run_record(state: Path) -> None:
    """The state as dev2pro wrote it before states recorded their run (``common.json`` without ``run``)."""
    meta = json.loads((state / "common.json").read_text())
    meta["state"]["__dict__"] = [kv for kv in meta["state"]["__dict__"] if kv[0] != "run"]
    (state / "common.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_replaces_every_file_of_the_previous_run(tmp_path, tiny_dev_dir, sk_images):
    """The audit's commands: 4 steps saving and sampling every 2, then 1 step with --overwrite. Nothing of the first
    run is left (step LoRA files in both layouts, its grids, its TensorBoard events); a *.safetensors file the run
    never wrote is not touched."""
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    old_events = {p.name for p in (run / "logs").iterdir()}
    assert {"lora-step000002.safetensors", "lora-step000002.diffusers.safetensors", "samples/step000004.png",
            "state/step-000004/common.json"} <= set(_files(run))
    (run / "notes.safetensors").write_bytes(b"mine")
    assert main(["train", str(cfg), "--set", "train.steps=1", "--overwrite", "--no-progress"]) == 0
    files = _files(run)
    events = [f for f in files if f.startswith("logs/")]
    assert len(events) == 1 and Path(events[0]).name not in old_events
    assert set(files) - set(events) == {
        "config.toml", "summary.json", "loss.png", "lora.safetensors", "lora.diffusers.safetensors",
        "notes.safetensors", "samples/step000000.png", "samples/step000001.png",
        "state/step-000001/common.json", "state/step-000001/common.safetensors",
        "state/step-000001/rank-00000-of-00001.safetensors"}
    assert files["notes.safetensors"] == b"mine"
    assert json.loads(files["summary.json"])["steps"] == 1
    assert not (run / ".previous-run").exists()


def test_an_overwrite_start_that_fails_at_its_first_save_puts_the_previous_run_back_whole(
        tmp_path, tiny_dev_dir, sk_images, monkeypatch):
    """The new start (another save.name) renders its step-0 grid, logs to TensorBoard and writes its first step LoRA
    files, then the state write fails: the folder is the previous run's again, byte for byte -- its LoRA files,
    grids and events back, the failed start's own files gone -- and it still resumes."""
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images)
    train(load_train_config(cfg), progress=False, quiet=True)
    run = tmp_path / "run"
    before = _files(run)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_lora, "save_training_state", full_disk)
    with pytest.raises(UserError, match="save step 2 in"):
        train(load_train_config(cfg, ["save.overwrite=true", 'save.name="other"']), progress=False, quiet=True)
    monkeypatch.undo()
    assert _files(run) == before
    assert not list(run.glob("other*")) and not (run / ".previous-run").exists()
    assert len(train(load_train_config(cfg, ["train.steps=6"]), resume="latest", progress=False,
                     quiet=True)["losses"]) == 2


def test_an_overwrite_killed_while_setting_the_previous_run_aside_is_undone(tmp_path):
    """Killed with the summary not yet moved (no record that the set-aside completed): the next start puts the
    previous run back whole -- it did not drop the states because a summary was in the folder."""
    from dev2pro.train.lifecycle import PREVIOUS, prepare_output_dir
    from dev2pro.train.run import RunFolder

    run = tmp_path / "run"
    (run / "state" / "step-000004").mkdir(parents=True)
    for name in ("common.json", "common.safetensors"):
        (run / "state" / "step-000004" / name).write_text("{}")
    (run / "config.toml").write_text('[save]\nname = "mine"\n')
    for name in ("summary.json", "mine.safetensors", "mine-step000002.safetensors", "mine-fp8.safetensors"):
        (run / name).write_text(name)
    (run / "samples").mkdir()
    (run / "samples" / "step000002.png").write_text("png")
    before = _files(run)
    prepare_output_dir(RunFolder(run), None, True, say=lambda m: None)
    assert sorted(p.name for p in run.iterdir()) == [PREVIOUS]  # the name came from the previous config.toml
    (run / PREVIOUS / ".set-aside.json").unlink()
    (run / PREVIOUS / "summary.json").rename(run / "summary.json")
    said = []
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        prepare_output_dir(RunFolder(run), None, False, say=said.append)
    assert _files(run) == before and not (run / PREVIOUS).exists()
    assert said == [f"save.overwrite: this start saved no state, so the previous run in {run} is back as it was"]


def _fake_run(run, step=4, name="mine"):
    (run / "state" / f"step-{step:06d}").mkdir(parents=True)
    for part in ("common.json", "common.safetensors"):
        (run / "state" / f"step-{step:06d}" / part).write_text("{}")
    (run / "config.toml").write_text(f'[save]\nname = "{name}"\n')
    (run / f"{name}-step{step:06d}.safetensors").write_text("lora")
    return run / "state" / f"step-{step:06d}"


def test_resuming_another_runs_state_into_a_folder_holding_a_run_is_refused(tmp_path):
    """--resume A's state with save.output_dir = B, where B holds a run of its own: B's LoRA files, samples and logs
    would mix with A's continuation. Refused unless --overwrite (B's run set aside); a new folder or one of B's own
    older states (not only the newest) resume as before."""
    from dev2pro.train.lifecycle import PREVIOUS, prepare_output_dir
    from dev2pro.train.run import RunFolder

    a_state, b = _fake_run(tmp_path / "a"), tmp_path / "b"
    _fake_run(b, step=2, name="theirs")
    older = _fake_run(b, step=1, name="theirs")
    before = _files(b)
    with pytest.raises(UserError) as e:
        prepare_output_dir(RunFolder(b), str(a_state), False, say=lambda m: None)
    assert str(e.value) == (f"output folder {b} already holds a run, and --resume {a_state} continues another run's "
                            "state in it (their LoRA files, samples and logs would mix): choose a new or empty "
                            "save.output_dir, or set save.overwrite = true (--overwrite) to set its run aside")
    assert _files(b) == before
    assert prepare_output_dir(RunFolder(b), str(older), False, say=lambda m: None) == b / "state"  # its own: fine
    assert prepare_output_dir(RunFolder(tmp_path / "new"), str(a_state), False, say=lambda m: None)
    prepare_output_dir(RunFolder(b), str(a_state), True, say=lambda m: None)
    assert sorted(p.name for p in b.iterdir()) == [PREVIOUS] and (a_state / "common.json").is_file()
    (b / PREVIOUS).rename(tmp_path / "kept")
    (b / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds other files"):
        prepare_output_dir(RunFolder(b), str(a_state), False, say=lambda m: None)


def test_a_run_folder_with_a_wandb_folder_can_be_overwritten(tmp_path):
    """wandb/ is a run's own (logging.wandb): --overwrite sets it aside like logs/, it is not a foreign entry."""
    from dev2pro.train.lifecycle import PREVIOUS, prepare_output_dir
    from dev2pro.train.run import RunFolder, folder_status

    run = tmp_path / "run"
    (run / "wandb" / "offline-run").mkdir(parents=True)
    (run / "wandb" / "offline-run" / "run.wandb").write_text("x")
    (run / "config.toml").write_text("")
    assert folder_status(run) == "started"
    (run / "lora.safetensors").write_text("x")
    prepare_output_dir(RunFolder(run), None, True, say=lambda m: None)
    assert (run / PREVIOUS / "wandb" / "offline-run" / "run.wandb").is_file() and not (run / "wandb").exists()


def test_dedistill_overwrite_replaces_its_exports_samples_and_logs(tmp_path, tiny_dev_dir, sk_images):
    """A dedistill run exporting a BFL file, an fp8 file and a diffusers folder with grids, then the same folder
    with --overwrite, another save.name and one format: none of the first run's exports or grids is left."""
    grids = '[sample]\nevery = 2\nprompts = ["a photo"]\nseeds = [1]\nsteps = 1\nwidth = 32\nheight = 32\n'
    cfg = _dedistill_toml(tmp_path, tiny_dev_dir, sk_images, steps=4, extra="\n" + grids)
    dedistill(load_dedistill_config(cfg, ['save.formats=["bfl", "fp8", "diffusers"]']), progress=False)
    run = tmp_path / "dd"
    assert {"dev2pro.safetensors", "dev2pro-fp8.safetensors", "samples/step000002-g1.png"} <= set(_files(run))
    assert (run / "dev2pro-diffusers").is_dir()
    dedistill(load_dedistill_config(cfg, ["save.overwrite=true", "train.steps=1", "save.every=0",
                                          'save.name="again"']), progress=False)
    files = _files(run)
    assert not [f for f in files if f.startswith("dev2pro")] and not (run / "dev2pro-diffusers").exists()
    assert sorted(f for f in files if f.startswith("samples/")) == ["samples/step000001-cfg.png",
                                                                     "samples/step000001-g1.png"]
    assert len([f for f in files if f.startswith("logs/")]) == 1 and "again.safetensors" in files
    assert not (run / "state").exists()  # save.every = 0: the old run's states went with it


# ------------------------------------------------------------------------------------------------ missing paths
@pytest.mark.parametrize("field, value", [
    ("model.path", "{tmp}/nope"),  # with model.transformer set to a file that exists
    ("model.inference_base", "/nonexistent/FLUX.1-dev"),
    ("model.adapter", "{tmp}/no-adapter.safetensors"),
    ("data.shards", "{tmp}/no-shards/index.json"),
])
def test_a_missing_input_path_is_refused_by_its_field_before_the_run_folder(tmp_path, tiny_dev_dir, sk_images, capsys,
                                                                             field, value):
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, samples=False)
    value = value.format(tmp=tmp_path)
    sets = [f'{field}="{value}"', f'model.transformer="{tiny_dev_dir / "transformer"}"',
            'sample.prompts=["a photo"]']
    assert main(["train", str(cfg), *[a for s in sets for a in ("--set", s)], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dev2pro train: error: {field}: {value} does not exist; give ") and "\n" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("field, sets", [
    ("model.path", ['model.transformer="{model}/transformer"']),
    ("model.teacher", ['objective="cfg_teacher"']),
])
def test_dedistill_refuses_a_missing_input_path_by_its_field(tmp_path, tiny_dev_dir, sk_images, field, sets):
    cfg = _dedistill_toml(tmp_path, tiny_dev_dir, sk_images)
    missing = tmp_path / "nope"
    overrides = [s.format(model=tiny_dev_dir) for s in sets] + [f'{field}="{missing}"']
    with pytest.raises(UserError) as e:
        dedistill(load_dedistill_config(cfg, overrides), progress=False)
    assert str(e.value).startswith(f"{field}: {missing} does not exist; give ")
    assert not (tmp_path / "dd").exists()


@pytest.mark.parametrize("field", ["path", "masks", "controls"])
def test_a_missing_data_folder_is_refused_by_its_field_before_the_run_folder(tmp_path, tiny_dev_dir, sk_images,
                                                                             field):
    """Found by the dataset scan before, after config.toml and the memory plan were written; now one line naming
    the [[data.folders]] entry and its field, with nothing written (train and dedistill)."""
    missing = tmp_path / "nope"
    for run, cfg in (("run", load_train_config(_lora(tmp_path, tiny_dev_dir, sk_images, samples=False))),
                     ("dd", load_dedistill_config(_dedistill_toml(tmp_path, tiny_dev_dir, sk_images)))):
        setattr(cfg.data.folders[0], field, str(missing))
        with pytest.raises(UserError) as e:
            (train if run == "run" else dedistill)(cfg, progress=False)
        assert str(e.value).startswith(f"data.folders[0].{field}: {missing} does not exist; give the folder of ")
        assert not (tmp_path / run).exists()
    (tmp_path / "file.txt").write_text("x")
    cfg = load_dedistill_config(_dedistill_toml(tmp_path, tiny_dev_dir, sk_images))
    cfg.data.folders[0].controls = [str(sk_images), str(tmp_path / "file.txt")]
    with pytest.raises(UserError, match=r"data.folders\[0\].controls: .*file.txt is not a folder; give the folder"):
        dedistill(cfg, progress=False)


# ------------------------------------------------------------------------------------------------ --resume
def test_resume_takes_a_run_folder(tmp_path, tiny_dev_dir, sk_images, capsys):
    """--resume RUN_FOLDER: its own folder is --resume alone; another run's folder resumes from that run's newest
    complete state; either way the line says which state it took."""
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, samples=False)
    train(load_train_config(cfg), progress=False)
    run = tmp_path / "run"
    (run / "state" / "step-000006").mkdir()  # a save cut short: not complete, skipped
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "train.steps=6", "--resume", str(run), "--no-progress"]) == 0
    assert (f"resumed from step 4 ({run / 'state' / 'step-000004'}, the newest complete state in {run})"
            in capsys.readouterr().out)
    other = _lora(tmp_path, tiny_dev_dir, sk_images, out="other", samples=False)
    summary = train(load_train_config(other, ["train.steps=8"]), resume=str(run), progress=False)
    assert f"resumed from step 6 ({run / 'state' / 'step-000006'}, the newest complete state in {run})" in \
        capsys.readouterr().out
    assert len(summary["losses"]) == 2
    started = _lora(tmp_path, tiny_dev_dir, sk_images, out="started", samples=False)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.toml").write_text("")
    with pytest.raises(UserError, match="nothing to resume: .*started was started but never saved"):
        train(load_train_config(started), resume=str(tmp_path / "started"), progress=False)


def test_resume_of_a_path_that_does_not_exist_writes_nothing(tmp_path, tiny_dev_dir, sk_images, capsys):
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, samples=False)
    gone = tmp_path / "elsewhere" / "state" / "step-000002"
    assert main(["train", str(cfg), "--resume", str(gone), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {gone}: does not exist; pass a run folder" in err and "keep_last" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def dd_state(tmp_path_factory, tiny_dev_dir, sk_images):
    """A dedistill (full fine-tune) run's state at step 2."""
    root = tmp_path_factory.mktemp("dd-state")
    dedistill(load_dedistill_config(_dedistill_toml(root, tiny_dev_dir, sk_images)), progress=False)
    return root / "dd"


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_of_a_dedistill_state_in_train_says_what_it_is(tmp_path, tiny_dev_dir, sk_images, dd_state, recorded):
    """Not "the LoRA's target modules differ": a full fine-tune's state, and the command that continues it -- read
    from what the state records, or (a state of an older dev2pro) from its tensors and its run's config."""
    run = tmp_path / "dd"
    import shutil

    shutil.copytree(dd_state, run)
    state = run / "state" / "step-000002"
    if not recorded:
        _without_run_record(state)
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, samples=False)
    with pytest.raises(UserError) as e:
        train(load_train_config(cfg, ["train.steps=6"]), resume=str(state), progress=False)
    assert str(e.value) == (f"{state} is a full fine-tune's state (`dev2pro dedistill`: every weight trained), and "
                            f"this run trains a LoRA: continue it with `dev2pro dedistill {run / 'config.toml'} "
                            f"--resume {state}`, or start this run without --resume (in another save.output_dir, or "
                            f"with --overwrite)")
    assert not (tmp_path / "run").exists()  # said from the headers, before the run folder or any cache exists


def test_resume_of_a_lora_state_in_dedistill_says_what_it_is(tmp_path, tiny_dev_dir, sk_images):
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, steps=2, samples=False)
    train(load_train_config(cfg), progress=False, quiet=True)
    state = tmp_path / "run" / "state" / "step-000002"
    dd = _dedistill_toml(tmp_path, tiny_dev_dir, sk_images, steps=4)
    for overrides, doing, fix in (
            ([], "every weight (a full de-distillation)", f"continue it with `dev2pro train {tmp_path / 'run'}/"
                                                          f"config.toml --resume {state}`"),
            (["train.adapter_rank=4"], "a de-distillation adapter (train.adapter_rank)", "continue it with")):
        with pytest.raises(UserError) as e:
            dedistill(load_dedistill_config(dd, overrides), resume=str(state), progress=False)
        assert str(e.value).startswith(f"{state} is a LoRA training state (`dev2pro train`), and this run trains "
                                       f"{doing}: {fix}")
        assert not (tmp_path / "dd").exists()


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_of_a_klein_lora_state_in_a_flux1_run_names_the_models(tmp_path, tiny_dev_dir, klein_base_dir,
                                                                      sk_images, recorded):
    klein = _lora(tmp_path, klein_base_dir, sk_images, out="klein", steps=2, cache="cache-klein", samples=False)
    train(load_train_config(klein), progress=False, quiet=True)
    state = tmp_path / "klein" / "state" / "step-000002"
    if not recorded:
        _without_run_record(state)
    cfg = _lora(tmp_path, tiny_dev_dir, sk_images, samples=False)
    with pytest.raises(UserError) as e:
        train(load_train_config(cfg, ["train.steps=6"]), resume=str(state), progress=False)
    msg = str(e.value)
    if recorded:
        assert msg.startswith(f"{state} is a state of another model family: it trained FLUX.2 klein (64 wide, ")
        assert "this run trains FLUX.1 (64 wide, 2 double + 4 single blocks); a state resumes only on the model it " \
               "was trained on" in msg
        assert not (tmp_path / "run").exists()  # before the run folder, the FLUX.1 caching and the model load
    else:  # nothing recorded: the trained modules this model does not have
        assert msg.startswith(f"{state} is a state of another model: it trained ") and "which this run's FLUX.1 " \
            "model does not have" in msg
    assert msg.endswith(f"continue it with `dev2pro train {tmp_path / 'klein' / 'config.toml'} --resume {state}`, or "
                        "start this run without --resume (in another save.output_dir, or with --overwrite)")
    assert "target modules differ" not in msg
