"""Validation loss (train/validation.py): held-out images, fixed sigmas and noise seeds, comparable across steps,
runs and a resume after kill -9; switching it on leaves the training losses and the LoRA bitwise unchanged."""

import json
import random
import shutil

import pytest
import torch

from dev2pro.config import ConfigError
from dev2pro.data.folders import Item
from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.train.validation import Holdout, Validator, advice, validation_loss
from tiny_run import lora_run_toml, run_killed, same_tensors


@pytest.fixture
def split_images(sk_images, tmp_path):
    """Four training photos and one held-out photo (with its caption) in two folders."""
    train_dir, held_dir = tmp_path / "train-images", tmp_path / "held-out"
    train_dir.mkdir()
    held_dir.mkdir()
    for p in sk_images.iterdir():
        shutil.copy(p, (held_dir if p.stem == "rocket" else train_dir) / p.name)
    (held_dir / "rocket.txt").write_text("a rocket on its launch pad")
    return train_dir, held_dir


def _toml(tmp_path, model_dir, images, out, steps=6, validation="", extra=""):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=5, lora="dropout = 0.2",
                         save=f"every = 2\n{extra}", extra=validation)


def _val(folder, every=2):
    return f'[validation]\nfolder = "{folder}"\nevery = {every}\nsigmas = [0.2, 0.6, 0.9]\nseeds = [0, 7]\n'


def test_validation_is_deterministic_and_leaves_training_bitwise_unchanged(tmp_path, tiny_dev_dir, split_images,
                                                                           capsys):
    train_dir, held_dir = split_images
    off = train(load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "off")), progress=False)
    on = train(load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "on", validation=_val(held_dir))),
               progress=False)
    again = train(load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "again", validation=_val(held_dir))),
                  progress=False)
    # training is the same bit for bit (LoRA dropout draws from the global RNG that validation leaves alone)
    assert on["losses"] == off["losses"] and len(on["losses"]) == 6
    assert same_tensors(tmp_path / "off" / "lora.safetensors", tmp_path / "on" / "lora.safetensors")
    # before training, every 2 steps, at the end; per sigma and overall (the mean over sigmas)
    v = on["validation"]
    assert list(v) == ["0", "2", "4", "6"]
    for r in v.values():
        assert set(r["per_sigma"]) == {"0.2", "0.6", "0.9"}
        assert r["overall"] == pytest.approx(sum(r["per_sigma"].values()) / 3, rel=1e-12)
    assert v["6"]["overall"] != v["0"]["overall"]  # the LoRA changed the held-out error
    assert again["validation"] == v  # the same numbers, exactly, in a second run
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["validation"] == v and summary["validation_best"]["step"] in (0, 2, 4, 6)
    best = min(v, key=lambda s: v[s]["overall"])
    assert summary["validation_best"]["step"] == int(best)
    out = capsys.readouterr().out
    assert "validation at step 2: loss" in out and "best validation loss" in out
    assert "validation: 1 held-out image(s)" in out
    # TensorBoard has val/loss and val/sigma_<s> at the validated steps
    from dev2pro.ui.monitor import read_scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = read_scalars(tmp_path / "on" / "logs")
    assert [p[0] for p in scalars["val"]] == [0, 2, 4, 6]
    assert scalars["val"][-1][1] == pytest.approx(v["6"]["overall"], rel=1e-6)
    ea = EventAccumulator(str(tmp_path / "on" / "logs"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("val/sigma_0.6")] == pytest.approx([v[s]["per_sigma"]["0.6"] for s in v])


@pytest.mark.slow  # ~20 s: a killed subprocess run and its resume
def test_validation_numbers_survive_a_kill_and_resume(tmp_path, tiny_dev_dir, split_images):
    train_dir, held_dir = split_images
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "full", validation=_val(held_dir))),
                 progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, train_dir, "killed", validation=_val(held_dir))
    run_killed(cfg_path, 5)  # dies right after step 5 (state at 4)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    assert resumed["losses"] == full["losses"][4:]
    assert resumed["validation"] == full["validation"]  # steps 0-4 from the state, 6 measured again: identical
    assert same_tensors(tmp_path / "full" / "lora.safetensors", tmp_path / "killed" / "lora.safetensors")


def test_an_empty_validation_folder_is_one_line_and_writes_nothing(tmp_path, tiny_dev_dir, split_images):
    train_dir, _ = split_images
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "run", validation=_val(empty)))
    with pytest.raises(UserError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("validation.folder:") and "validation.fraction" in msg
    assert not (tmp_path / "run").exists()


def test_a_validation_folder_training_reads_is_refused(tmp_path, tiny_dev_dir, split_images):
    """The training folder itself, a folder holding it, or a folder inside a recursive one: one line, nothing
    written. A folder beside it, or inside a non-recursive one (not read by training), is fine."""
    from dev2pro.train.validation import check_holdout

    train_dir, held_dir = split_images
    cases = {"is the training folder": train_dir, "holds the training folder": tmp_path}
    for how, folder in cases.items():
        cfg = load_train_config(_toml(tmp_path, tiny_dev_dir, train_dir, "run", validation=_val(folder)))
        with pytest.raises(UserError, match=rf"^validation.folder: .* {how} .*validation.fraction") as e:
            train(cfg, progress=False)
        assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    inner = train_dir / "held"
    inner.mkdir()
    shutil.copy(next(held_dir.glob("rocket.*")), inner / "rocket.jpg")
    with pytest.raises(UserError, match="is inside the training folder"):
        check_holdout(str(inner), [(str(train_dir), True)])
    check_holdout(str(inner), [(str(train_dir), False)])  # a plain folder's subfolders are not trained on
    check_holdout(str(held_dir), [(str(train_dir), True)])


def test_config_refuses_conflicting_validation_settings(tmp_path, tiny_dev_dir, split_images):
    train_dir, held_dir = split_images
    path = _toml(tmp_path, tiny_dev_dir, train_dir, "run", validation=_val(held_dir))
    with pytest.raises(ConfigError, match="validation.folder or validation.fraction"):
        load_train_config(path, ["validation.fraction=0.2"])
    with pytest.raises(ConfigError, match="sigmas"):
        load_train_config(path, ["validation.sigmas=[0.0, 0.5]"])
    with pytest.raises(ConfigError, match="data.shards"):
        load_train_config(path, [f'data.shards="{tmp_path / "index.json"}"'])


def test_fraction_holds_out_by_file_name_hash_whatever_the_order(tmp_path):
    items = [Item(tmp_path / f"dir{i % 3}" / f"img{i:02d}.png", f"caption {i}", 1) for i in range(20)]
    kept, held = Holdout(fraction=0.2).split(items, scan=None)
    assert len(held) == 4 and len(kept) == 16 and not {h.path for h in held} & {k.path for k in kept}
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    kept2, held2 = Holdout(fraction=0.2).split(shuffled, scan=None)
    assert {h.path.name for h in held2} == {h.path.name for h in held}
    moved = [Item(tmp_path / "elsewhere" / it.path.name, it.caption, 1) for it in items]  # names, not folders
    assert {h.path.name for h in Holdout(fraction=0.2).split(moved, scan=None)[1]} == {h.path.name for h in held}
    assert len(Holdout(fraction=0.01).split(items, scan=None)[1]) == 1  # at least one image
    with pytest.raises(UserError, match="validation.fraction"):
        Holdout(fraction=0.5).split(items[:1], scan=None)
    from types import SimpleNamespace  # regularization images (data.folders role = "reg") are never held out
    mixed = [SimpleNamespace(path=it.path, role="reg" if i % 2 else "train") for i, it in enumerate(items)]
    kept, held = Holdout(fraction=0.2).split(mixed, scan=None)
    assert len(held) == 2 and all(h.role == "train" for h in held) and len(kept) == 18


def test_evaluation_restores_rng_and_modes(tiny_dev_dir, tmp_path):
    """The validator restores the global RNG even when the model draws from it, and every module's mode."""
    from dev2pro.data.loader import CacheEntry, CachedDataset
    from dev2pro.flux.checkpoint import load_transformer
    from safetensors.torch import save_file

    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(16, 8, 8, generator=g)}, str(tmp_path / "lat.safetensors"))
    save_file({"prompt_embeds": torch.randn(8, 32, generator=g), "pooled": torch.randn(32, generator=g)},
              str(tmp_path / "txt.safetensors"))
    ds = CachedDataset([CacheEntry(tmp_path / "lat.safetensors", tmp_path / "txt.safetensors")])
    model.train()
    model.transformer_blocks[0].eval()  # a mixed state must come back as it was
    model.register_forward_pre_hook(lambda m, args: [torch.rand(3)] and None)  # a global-RNG draw (as dropout does)
    v = Validator(ds, [0.25, 0.75], [1], every=2, guidance=1.0, device="cpu", dtype=torch.float32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = v.evaluate(model, 2)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and not model.transformer_blocks[0].training and model.single_transformer_blocks[0].training
    assert v.evaluate(model, 4) == first and v.history.keys() == {2, 4}
    # batched sigmas (rows) give the same numbers to float round-off
    other = validation_loss(model, ds, [0.25, 0.75], [1], 1.0, "cpu", torch.float32, rows=2)
    assert other["overall"] == pytest.approx(first["overall"], rel=1e-5)
    assert v.due(0, 10) and v.due(4, 10) and v.due(10, 10) and not v.due(3, 10)


def test_advice_names_the_file_or_the_save_every(tmp_path):
    f = tmp_path / "lora-step000040.safetensors"
    files = {40: f}
    assert "use " + str(f) in advice((40, 0.3), 100, files.get, 20)[0]
    line = advice((60, 0.3), 100, files.get, 20)[0]
    assert "at step 60" in line and "save.every = 20" in line
    assert "did not improve" in advice((0, 0.5), 100, files.get, 20)[0]
    assert advice(None, 100, files.get, 20) == []
