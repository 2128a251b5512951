"""`dev2pro train` end to end on a tiny model folder and real images (scikit-image's data folder)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from tiny_run import SAMPLES, model_and_data, run_killed, run_signalled
from tiny_run import same_tensors as _same_lora

@pytest.fixture
def images(sk_images):
    return sk_images


def _toml(tmp_path, model_dir, images, out="run", steps=24, extra=""):
    text = model_and_data(model_dir, images, tmp_path / "cache", model='dtype = "fp32"', data="batch_size = 1") + f"""

[lora]
rank = 8
alpha = 8

[train]
steps = {steps}
lr = 1e-2
seed = 3
timestep_sampling = "sigmoid"

[save]
output_dir = "{tmp_path / out}"
every = 4
{extra}
"""
    path = tmp_path / f"{out}.toml"
    path.write_text(text)
    return path


# Golden losses of the first steps for the config above (seed 3); CPU fp32 is deterministic here.
GOLDEN = [1.3690, 1.3591, 1.3369, 1.2484]


def test_tiny_run_pins_losses_and_learns(tmp_path, tiny_dev_dir, images):
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images))
    summary = train(cfg, progress=False)
    losses = summary["losses"]
    assert len(losses) == 24
    print([round(x, 4) for x in losses])
    assert losses[:4] == pytest.approx(GOLDEN, rel=2e-3)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first * 0.9, (first, last)
    out = Path(cfg.save.output_dir)
    lora = load_file(str(out / "lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora
    assert lora["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (24, 64)  # 3 x rank fused
    assert (out / "config.toml").exists() and (out / "logs").is_dir()
    from PIL import Image
    with Image.open(out / "loss.png") as im:  # the loss curve beside the run
        im.verify()
    # the resolved config reloads to the same values
    again = load_train_config(out / "config.toml")
    assert again.train.lr == cfg.train.lr and again.lora.rank == 8
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"] == "8"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "sigmoid"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    # kohya's dataset fields, which its and Civitai's metadata viewers show
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert meta["ss_output_name"] == "lora" and sum(d["img_count"] for d in dirs.values()) == int(
        meta["ss_num_train_images"]) > 0 and set(json.loads(meta["ss_tag_frequency"])) <= set(dirs)
    assert meta["ss_resolution"] == str((cfg.data.resolution,) * 2) and float(meta["ss_training_started_at"]) > 0


def test_resume_after_kill_is_bit_identical(tmp_path, tiny_dev_dir, images):
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, images, out="full", steps=10)), progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, out="killed", steps=10)
    run_killed(cfg_path, 6)  # died right after step 6 (state saved at step 4)
    killed = Path(tmp_path / "killed")
    assert (killed / "state" / "step-000004").is_dir() and not (killed / "lora.safetensors").exists()
    with pytest.raises(UserError, match="--resume"):
        train(load_train_config(cfg_path), progress=False)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    a = load_file(str(tmp_path / "full" / "lora.safetensors"))
    b = load_file(str(killed / "lora.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == full["losses"][4:]
    # summary.json holds the whole run's losses, resumed or not (the session's are the returned ones)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["losses"] == full["losses"] and (summary["steps"], summary["session_steps"]) == (10, 6)


def test_lora_trained_on_one_base_samples_on_another(tmp_path, tiny_dev_dir, tiny_pro_dir, images):
    """Train on tiny 'dev2pro' (here: the pro folder's transformer), sample on tiny dev via inference_base."""
    extra = """
[sample]
every = 2
prompts = ["an astronaut", "a photo"]
seeds = [1, 2]
steps = 2
width = 64
height = 64
"""
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=2, extra=extra),
                            [f'model.transformer="{tiny_pro_dir}"', f'model.inference_base="{tiny_dev_dir}"',
                             'save.formats=["kohya", "diffusers"]'])
    train(cfg, progress=False)
    out = Path(cfg.save.output_dir)
    from PIL import Image
    from dev2pro.sampling import LABEL_FONT_SIZE
    grid = Image.open(out / "samples" / "step000002.png")
    band = LABEL_FONT_SIZE + 6
    assert grid.size == (128, 128 + 4 * band)  # 2 prompts x 2 seeds of 64 px + title, seed and prompt bands
    assert grid.info.get("base", "").endswith("tiny-dev")
    assert grid.info["title"].startswith("step 2") and json.loads(grid.info["rows"]) == ["an astronaut", "a photo"]
    assert json.loads(grid.info["cols"]) == ["seed 1", "seed 2"]
    baseline = Image.open(out / "samples" / "step000000.png")  # before training: the base alone
    assert baseline.size == grid.size and baseline.info["title"].startswith("step 0")
    # the kohya and diffusers files hold the same LoRA and apply to the dev base identically
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.lora.formats import load_lora
    from dev2pro.lora.ops import apply_lora
    outs = []
    for name in ("lora.safetensors", "lora.diffusers.safetensors"):
        model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
        apply_lora(model, load_lora(out / name))
        g = torch.Generator().manual_seed(0)
        x = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32,
                 generator=g), pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                 return_dict=False)
        with torch.no_grad():
            outs.append(model(**x)[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def _expect_error(tmp_path, tiny_dev_dir, images, match, overrides=(), text_extra=""):
    from dev2pro.errors import UserError as UE
    with pytest.raises(UE, match=match):
        cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, extra=text_extra),
                                ["save.overwrite=true", *overrides])
        train(cfg, progress=False)


def test_bad_input_gives_clear_errors(tmp_path, tiny_dev_dir, images, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(tmp_path, tiny_dev_dir, empty, "no images")
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    shutil.copy(images / "coffee.png", nocap / "coffee.png")
    _expect_error(tmp_path, tiny_dev_dir, nocap, "caption", ['data.default_caption=""'])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(images / "coffee.png", corrupt / "coffee.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    _expect_error(tmp_path, tiny_dev_dir, corrupt, "broken.png", ["data.strict=true"])
    _expect_error(tmp_path, tiny_dev_dir, images, "did you mean 'train.steps'", ["train.stepz=3"])
    _expect_error(tmp_path, tiny_dev_dir, images, "timestep_sampling", ['train.timestep_sampling="cosmic"'])
    _expect_error(tmp_path, tiny_dev_dir, images, "rank must be > 0", ["lora.rank=0"])
    sdxl = tmp_path / "sdxl.safetensors"
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sdxl))
    _expect_error(tmp_path, tiny_dev_dir, images, "SDXL", [f'model.transformer="{sdxl}"'])
    # through the CLI: one line, exit status 2, no traceback
    from dev2pro.cli import main
    cfg = _toml(tmp_path, tiny_dev_dir, images, out="cli")
    assert main(["train", str(cfg), "--set", "lora.rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "lora.rank must be > 0" in err and "Traceback" not in err


def test_print_config_lists_every_option(capsys):
    from dev2pro.cli import main
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    for key in ("[model]", "inference_base", "fp8_storage", "[lora]", "timestep_sampling", "guidance = 1.0",
                "[sample]", "guidance = 3.5", "keep_last", "caption_dropout"):
        assert key in out


def test_example_config_is_valid():
    cfg = load_train_config(Path(__file__).parents[2] / "configs" / "train_lora.toml")
    assert cfg.train.guidance == 1.0 and cfg.sample.guidance == 3.5 and cfg.model.fp8_storage
    assert cfg.model.inference_base.endswith("FLUX.1-dev")


def test_shards_from_dev2pro_cache_train_like_the_folder(tmp_path, tiny_dev_dir, images):
    """`dev2pro cache` output as data.shards: same samples, same order, same losses as the folder itself."""
    from dev2pro.recipes.cache import cache

    idx = cache([str(images)], str(tiny_dev_dir), str(tmp_path / "cached"), per_shard=2, resolution=64,
                bucket_step=64, t5_max_length=512, default_caption="a photo")["index"]
    folder = train(load_train_config(_toml(tmp_path, tiny_dev_dir, images, out="folder", steps=6)), progress=False)
    sharded = train(load_train_config(_toml(tmp_path, tiny_dev_dir, images, out="shards", steps=6),
                                      ["data.folders=[]", f'data.shards="{idx}"']), progress=False)
    assert sharded["losses"] == pytest.approx(folder["losses"], rel=1e-4)


# ------------------------------------------------------------------------------------------------ run lifecycle
@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dev_dir, sk_images):
    """Uninterrupted runs of 8 and 12 steps (no periodic saves) for the bit-identity checks below."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for n in (8, 12):
        cfg = load_train_config(_toml(root, tiny_dev_dir, sk_images, out=f"ref{n}", steps=n), ["save.every=0"])
        runs[n] = (train(cfg, progress=False, quiet=True), Path(cfg.save.output_dir))
    return runs


def test_failed_start_is_rerun_without_flags(tmp_path, tiny_dev_dir, images, capsys):
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=2)
    with pytest.raises(UserError, match="model.path: .*no-such-model does not exist"):  # before the run folder
        train(load_train_config(cfg_path, [f'model.path="{tmp_path / "no-such-model"}"']), progress=False)
    assert not (tmp_path / "run").exists()
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    shutil.copy(images / "coffee.png", nocap / "coffee.png")
    with pytest.raises(UserError, match="caption"):
        train(load_train_config(cfg_path, ['data.default_caption=""', f'data.folders=[{{path="{nocap}"}}]']),
              progress=False)
    out = tmp_path / "run"
    assert (out / "config.toml").exists() and not (out / "state").exists()
    with pytest.raises(UserError, match=r"never saved.*without --resume"):
        train(load_train_config(cfg_path), resume="latest", progress=False)
    summary = train(load_train_config(cfg_path), progress=False)  # no flag needed
    assert len(summary["losses"]) == 2 and (out / "lora.safetensors").exists()
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(UserError, match="--resume"):  # a run that saved is still protected
        train(load_train_config(cfg_path), progress=False)


def _hold_lock(folder):
    code = ("import sys, time; from pathlib import Path; from dev2pro.train.run import RunLock; "
            "lock = RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_trainer_in_the_same_folder(tmp_path, tiny_dev_dir, images):
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=2)
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(UserError, match=rf"PID {holder.pid}\b"):
            train(load_train_config(cfg_path), resume="latest", progress=False)
        with pytest.raises(UserError, match=rf"PID {holder.pid}\b"):
            train(load_train_config(cfg_path), progress=False)
    finally:
        holder.kill()
        holder.wait()
    train(load_train_config(cfg_path), progress=False)  # the dead holder's lock is stale: taken over


def test_extending_steps_continues_from_the_end(tmp_path, tiny_dev_dir, images, reference, capsys):
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=8)
    first = train(load_train_config(cfg_path, ["save.every=0"]), progress=False)
    out = tmp_path / "run"
    assert (out / "state" / "step-000008").is_dir()  # the last step saves a resumable state
    assert first["losses"] == reference[8][0]["losses"]
    capsys.readouterr()
    again = train(load_train_config(cfg_path, ["save.every=0"]), resume="latest", progress=False)
    assert again["losses"] == [] and "already finished at step 8" in capsys.readouterr().out
    more = train(load_train_config(cfg_path, ["save.every=0", "train.steps=12"]), resume="latest", progress=False)
    text = capsys.readouterr().out
    assert f"resumed from step 8 ({out / 'state' / 'step-000008'})" in text
    assert more["losses"] == reference[12][0]["losses"][8:]
    assert _same_lora(out / "lora.safetensors", reference[12][1] / "lora.safetensors")


def test_final_lora_and_state_exist_even_if_final_sampling_crashes(tmp_path, tiny_dev_dir, images, monkeypatch):
    from dev2pro.train.samples import LoraSampler

    real = LoraSampler.sample

    def crash_at_the_end(self, model, step, folder, bar, *a, **k):
        if step == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, model, step, folder, bar, *a, **k)

    monkeypatch.setattr(LoraSampler, "sample", crash_at_the_end)
    extra = '[sample]\nprompts = ["a photo"]\nsteps = 1\nwidth = 64\nheight = 64\n'
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=4, extra=extra), ["save.every=0"])
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, progress=False)
    out = tmp_path / "run"
    assert (out / "lora.safetensors").exists() and (out / "state" / "step-000004").is_dir()
    assert (out / "samples" / "step000000.png").exists()  # the step-0 baseline came before training


def test_disk_full_at_the_final_save_keeps_a_state(tmp_path, tiny_dev_dir, images, reference, monkeypatch):
    import errno

    from dev2pro.train import export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_lora", full)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=8)
    with pytest.raises(UserError, match=r"(?i)lora\.safetensors.*no space left.*state.*step-000008.*--resume"):
        train(load_train_config(cfg_path, ["save.every=0"]), progress=False)
    out = tmp_path / "run"
    assert (out / "state" / "step-000008").is_dir() and not (out / "lora.safetensors").exists()
    monkeypatch.undo()
    done = train(load_train_config(cfg_path, ["save.every=0"]), resume="latest", progress=False)
    assert done["losses"] == [] and _same_lora(out / "lora.safetensors", reference[8][1] / "lora.safetensors")


def _nan_at(monkeypatch, bad_steps):
    """The loss of the given (1-based) steps becomes NaN, at the loop's one loss call site."""
    from dev2pro.train import loop

    real, calls = loop.objective_loss, []

    def loss(*a, **k):
        calls.append(1)
        value, parts = real(*a, **k)
        return (value * float("nan") if len(calls) in bad_steps else value), parts

    monkeypatch.setattr(loop, "objective_loss", loss)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path, tiny_dev_dir, images, monkeypatch):
    _nan_at(monkeypatch, {7})
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=10))  # saves every 4 steps
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 7.*state/step-000004"):
        train(cfg, progress=False)
    out = tmp_path / "run"
    assert not (out / "lora.safetensors").exists()
    states = sorted(p.name for p in (out / "state").iterdir())
    assert states == ["step-000004"]
    saved = load_file(str(out / "state" / "step-000004" / "rank-00000-of-00001.safetensors"))
    lora = {k: v for k, v in saved.items() if k.startswith("model/") and ".lora_" in k}
    assert lora and all(torch.isfinite(t).all() for t in saved.values())


def test_skip_policy_skips_non_finite_steps(tmp_path, tiny_dev_dir, images, monkeypatch):
    _nan_at(monkeypatch, {3})
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=5), ['train.nan_policy="skip"'])
    summary = train(cfg, progress=False)
    assert summary["skipped_steps"] == [3]
    lora = load_file(str(tmp_path / "run" / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in lora.values())
    import json
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())  # valid JSON: no bare NaN
    assert saved["losses"][2] is None and saved["skipped_steps"] == [3]


def test_nan_base_and_infinite_lr_end_with_a_clear_error(tmp_path, tiny_dev_dir, images, capsys):
    from safetensors.torch import save_file

    from dev2pro.cli import main
    from dev2pro.flux.checkpoint import load_transformer

    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["single_transformer_blocks.1.proj_out.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan-base.safetensors"
    save_file(sd, str(bad))
    cfg = _toml(tmp_path, tiny_dev_dir, images, steps=3)
    assert main(["train", str(cfg), "--no-progress", "--set", f'model.transformer="{bad}"']) == 2
    err = capsys.readouterr().err
    assert ("non-finite" in err or "NaN" in err) and "Traceback" not in err
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert main(["train", str(cfg), "--set", "train.lr=inf", "--set", "save.overwrite=true"]) == 2
    assert "lr" in capsys.readouterr().err


def test_no_progress_mode_prints_a_summary_progress_and_saves(tmp_path, tiny_dev_dir, images, capsys):
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=6), ["log_every=2"])
    train(cfg, progress=False)
    out_dir = tmp_path / "run"
    text = capsys.readouterr().out
    for needle in ("5 images", "bucket", "64x64 (5)", "steps 6", "epoch", "rank 8", "guidance 1.0",
                   f"tensorboard --logdir {out_dir / 'logs'}", "train step 2/6", "train step 4/6", "train step 6/6",
                   f"saved step 4: {out_dir / 'lora-step000004.safetensors'}",
                   f"saved the final LoRA at step 6: {out_dir / 'lora.safetensors'}"):
        assert needle in text, needle
    assert text.count("tensorboard --logdir") == 1


@pytest.mark.slow
def test_ctrl_c_saves_a_state_and_resume_is_bit_identical(tmp_path, tiny_dev_dir, images, capsys):
    import signal
    steps = 30
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, images, out="full", steps=steps),
                                   ["save.every=0"]), progress=False, quiet=True)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, out="stopped", steps=steps)
    code, text = run_signalled(cfg_path, signal.SIGINT)
    assert code == 130, text[-3000:]
    stopped = tmp_path / "stopped"
    states = sorted((stopped / "state").iterdir())
    assert len(states) == 1 and "--resume" in text and "Traceback" not in text
    k = int(states[0].name.split("-")[1])
    assert 3 <= k < steps and f"interrupted at step {k}" in text
    capsys.readouterr()
    resumed = train(load_train_config(cfg_path, ["save.every=0"]), resume="latest", progress=False)
    assert f"resumed from step {k}" in capsys.readouterr().out
    assert resumed["losses"] == full["losses"][k:]
    assert _same_lora(stopped / "lora.safetensors", tmp_path / "full" / "lora.safetensors")


def test_overwrite_starts_over_without_the_old_runs_states(tmp_path, tiny_dev_dir, images):
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=8)
    train(load_train_config(cfg_path), progress=False, quiet=True)  # states at 4 and 8
    train(load_train_config(cfg_path, ["save.overwrite=true", "train.steps=2"]), progress=False, quiet=True)
    # a later --resume must find this run's last state, not the old run's step 8
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == ["step-000002"]
    assert not (tmp_path / "run" / ".previous-run").exists()  # dropped at this run's first save


@pytest.mark.parametrize("bad", ["model.blocks_to_swap=60", "lora.double_blocks=[5]"])
def test_an_overwrite_start_refused_later_leaves_the_previous_run_resumable(tmp_path, tiny_dev_dir, images, bad,
                                                                           capsys):
    """--overwrite with a setting only a later check refuses: the previous run's states, config and summary are
    back as they were (it used to lose its states), and it resumes."""
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=4)
    train(load_train_config(cfg_path), progress=False, quiet=True)  # states at 2 and 4, summary
    run = tmp_path / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "state" in p.parts
              or p.name in ("config.toml", "summary.json")}
    with pytest.raises(UserError, match="blocks"):
        train(load_train_config(cfg_path, ["save.overwrite=true", bad]), progress=False)
    assert "this start saved no state, so the previous run in" in capsys.readouterr().out
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "state" in p.parts
             or p.name in ("config.toml", "summary.json")}
    assert after == before and not (run / ".previous-run").exists()
    resumed = train(load_train_config(cfg_path, ["train.steps=6"]), resume="latest", progress=False, quiet=True)
    assert len(resumed["losses"]) == 2


def test_an_overwrite_start_killed_before_its_first_save_gives_the_previous_run_back(tmp_path):
    """A start killed (no finally) between setting the old run aside and its first save: the next start in the
    folder puts the previous run back first, then decides as for any run that saved."""
    from dev2pro.train.lifecycle import PREVIOUS, prepare_output_dir
    from dev2pro.train.run import RunFolder

    run = tmp_path / "run"
    (run / "state" / "step-000004").mkdir(parents=True)
    for name in ("common.json", "common.safetensors"):
        (run / "state" / "step-000004" / name).write_text("{}")
    (run / "config.toml").write_text("old")
    (run / "lora.safetensors").write_text("x")
    prepare_output_dir(RunFolder(run), None, True, say=lambda m: None)
    assert (run / PREVIOUS / "state" / "step-000004").is_dir() and not (run / "config.toml").exists()
    (run / "config.toml").write_text("new")  # the killed start wrote its config and nothing else
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        prepare_output_dir(RunFolder(run), None, False, say=lambda m: None)
    assert (run / "config.toml").read_text() == "old" and (run / "state" / "step-000004").is_dir()
    assert not (run / PREVIOUS).exists()


def _pages(path):
    files = [Path(path)] if Path(path).is_file() else [f for f in Path(path).rglob("*") if f.is_file()]
    return sum(-(-f.stat().st_size // 4096) for f in files)


@pytest.mark.slow
def test_a_really_full_disk_at_the_final_save_keeps_a_state(tmp_path, tiny_dev_dir, images, reference):
    """On a small tmpfs sized to hold the run and its final state but not the final LoRA file."""
    ref = reference[8][1]
    lora_pages = _pages(ref / "lora.safetensors")
    before = _pages(ref) - lora_pages - _pages(ref / "loss.png") - _pages(ref / "summary.json") + 1  # + the lock
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (before + lora_pages // 2 + 2) * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or a user namespace)")
    try:
        cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=8),
                                ["save.every=0", f'save.output_dir="{disk / "run"}"'])
        with pytest.raises(UserError, match=r"(disk is full|no space left).*state .*step-000008 is kept.*--resume"):
            train(cfg, progress=False, quiet=True)
        assert (disk / "run" / "state" / "step-000008").is_dir() and not (disk / "run" / "lora.safetensors").exists()
        assert not [p for p in (disk / "run").iterdir() if p.name.startswith(".") and p.name != ".dev2pro.lock"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_disk_full_at_a_periodic_save_is_one_line_naming_the_last_state(tmp_path, tiny_dev_dir, images,
                                                                        monkeypatch):
    from safetensors import SafetensorError

    from dev2pro.train import export

    real, calls = export.save_lora, []

    def full_on_the_second_save(*a, **k):  # the Rust writer's way of saying it
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*a, **k)

    monkeypatch.setattr(export, "save_lora", full_on_the_second_save)
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=10))  # saves at 4 and 8
    with pytest.raises(UserError, match=r"save step 8 .*(disk is full|no space left).*last saved state is .*step-000004.*--resume"):
        train(cfg, progress=False, quiet=True)


def test_every_sample_grid_gets_its_console_line(tmp_path, tiny_dev_dir, images, capsys):
    """--no-progress: the grids of sample.every (not only step 0 and the final one) each get a "samples:" line."""
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, images, steps=5, extra=SAMPLES), ["save.every=0"])
    train(cfg, progress=False)
    samples = Path(cfg.save.output_dir) / "samples"
    grids = sorted(p.name for p in samples.glob("step*.png"))
    assert grids == ["step000000.png", "step000002.png", "step000004.png", "step000005.png"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("samples: ")]
    assert [line.split()[1] for line in lines] == [str(samples / g) for g in grids]


def test_resume_with_another_lora_rank_or_targets_says_so(tmp_path, tiny_dev_dir, images):
    """Not the first mismatched tensor's shape: what differs from the saved run, and the setting that resumes it."""
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, steps=2, extra="")
    train(load_train_config(cfg_path, ["lora.rank=4", "lora.alpha=4"]), progress=False, quiet=True)
    state = tmp_path / "run" / "state" / "step-000002"
    assert state.is_dir()
    more = ["train.steps=4"]
    with pytest.raises(UserError) as e:
        train(load_train_config(cfg_path, more), resume="latest", progress=False, quiet=True)  # rank 8 in _toml
    assert str(e.value) == (f"{state}: the LoRA's rank differs from the saved run's (rank 4 saved, 8 now): keep "
                            "lora.rank = 4 to resume it, or start a new run (without --resume, in another "
                            "save.output_dir)")
    with pytest.raises(UserError, match=r"the LoRA's target modules differ from the saved run's \(\d+ saved but not "
                                        r"trained now, e.g. .*\): keep the saved run's lora.targets"):
        train(load_train_config(cfg_path, more + ["lora.rank=4", "lora.alpha=4", 'lora.targets="attention"']),
              resume="latest", progress=False, quiet=True)
    resumed = train(load_train_config(cfg_path, more + ["lora.rank=4", "lora.alpha=4"]), resume="latest",
                    progress=False, quiet=True)
    assert resumed["steps"] == 4


def test_an_overwrite_run_that_finishes_without_a_state_is_the_folders_run(tmp_path):
    """A dedistill without save.every finishes with exports and a summary but no state: the previous run set aside
    is dropped (it was put back over the finished run's files, a mix of two runs)."""
    from dev2pro.train.lifecycle import PREVIOUS, prepare_output_dir, release
    from dev2pro.train.run import RunFolder, RunLock

    run = tmp_path / "run"
    (run / "state" / "step-000004").mkdir(parents=True)
    for name in ("common.json", "common.safetensors"):
        (run / "state" / "step-000004" / name).write_text("{}")
    (run / "summary.json").write_text('{"steps": 4}')
    folder = RunFolder(run, "dedistill")
    lock = RunLock.acquire(run)
    prepare_output_dir(folder, None, True, say=lambda m: None)
    (run / "summary.json").write_text('{"steps": 1}')  # the new run finished
    said = []
    release(folder, lock, said.append)
    assert not (run / PREVIOUS).exists() and not (run / "state").exists() and not said
    assert (run / "summary.json").read_text() == '{"steps": 1}'


def test_a_guidance_embedder_lora_is_warned_about_and_written_in_every_layout(tmp_path, tiny_dev_dir, images, caplog):
    """lora.extra_targets = embedders on dev: the guidance embedder's LoRA sees guidance 1 only, so the run says its
    change at dev's 3.5 is extrapolated; the embedder LoRAs are in the kohya and the diffusers files."""
    import logging

    from dev2pro.lora.formats import load_lora
    from dev2pro.train.startup import guidance_warnings
    from tiny_run import lora_run_toml

    assert guidance_warnings(False, 3.5, ["embedders"]) == []  # no guidance embedding: nothing to warn about
    assert len(guidance_warnings(True, 1.0, ["modulation"])) == 0 and len(guidance_warnings(True, 3.5, [])) == 1
    cfg = lora_run_toml(tmp_path, tiny_dev_dir, images, "emb", steps=2, seed=1, lora='extra_targets = ["embedders"]',
                        save='formats = ["kohya", "diffusers"]')
    with caplog.at_level(logging.WARNING):
        train(load_train_config(cfg), progress=False, quiet=True)
    warned = [r.getMessage() for r in caplog.records if "guidance embedder" in r.getMessage()]
    assert len(warned) == 1 and "sees guidance 1 only" in warned[0], warned
    modules = load_lora(tmp_path / "emb" / "lora.safetensors")
    assert {"time_text_embed.guidance_embedder.linear_1", "x_embedder"} <= set(modules)
    pipe_keys = set(load_file(str(tmp_path / "emb" / "lora.diffusers.safetensors")))
    assert any("guidance_embedder" in k for k in pipe_keys)
