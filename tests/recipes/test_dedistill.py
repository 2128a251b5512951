"""`dev2pro dedistill` end to end on the tiny model folder and real images (scikit-image's data folder)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.recipes.dedistill import dedistill
from dev2pro.schemas import load_dedistill_config
from tiny_run import model_and_data


@pytest.fixture
def images(sk_images):
    return sk_images


def _toml(tmp_path, model_dir, images, out="run", steps=16, objective="flow", batch=1, extra="", checkpointing=False):
    text = f"""
objective = "{objective}"
{model_and_data(model_dir, images, tmp_path.parent / "dedistill-cache", checkpointing, data=f"batch_size = {batch}")}

[teacher]
w_min = 1.0
w_max = 4.0

[train]
steps = {steps}
lr = 2e-3
warmup_steps = 2
schedule = "cosine"
seed = 5
mixed_precision = "no"
ema_decay = 0.9

[save]
output_dir = "{tmp_path / out}"
every = 4
formats = ["bfl", "diffusers"]
{extra}
"""
    path = tmp_path / f"{out}.toml"
    path.write_text(text)
    return path


def _learns(losses, n=5):
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    assert last < first * 0.9, (first, last)


def test_flow_run_learns_and_exports_loadable_model(tmp_path, tiny_dev_dir, images):
    cfg = load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, steps=20))
    summary = dedistill(cfg, progress=False)
    print([round(x, 4) for x in summary["losses"]])
    _learns(summary["losses"])
    out = Path(cfg.save.output_dir)
    from dev2pro.flux.checkpoint import load_transformer, open_checkpoint
    from dev2pro.flux.inspection import describe
    ckpt = open_checkpoint(out / "dev2pro.safetensors")
    info = describe(ckpt)
    assert ckpt.layout == "bfl" and info["spec"]["guidance_embeds"] is True
    from safetensors import safe_open
    with safe_open(str(out / "dev2pro.safetensors"), "pt") as f:  # what it is, not a temp file's name
        assert f.metadata()["dev2pro.source"] == "dev2pro dedistill export dev2pro"
        assert f.metadata()["dev2pro.recipe"] == "dedistill"
    model, _ = load_transformer(out / "dev2pro.safetensors", dtype=torch.float32)
    folder, _ = load_transformer(out / "dev2pro-diffusers", dtype=torch.float32)
    a, b = model.state_dict(), folder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # weights moved away from the start, and the EMA (not the raw weights) was exported
    start, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    assert not torch.equal(start.state_dict()["x_embedder.weight"], a["x_embedder.weight"])
    assert (out / "logs").is_dir() and (out / "summary.json").exists()


def test_fused_rope_dedistills_the_same_weights(tmp_path, tiny_dev_dir, images, monkeypatch):
    """`train.fused_rope = true`: the same losses and exported weights as diffusers' rotation (fp32 round-off)."""
    from dev2pro.train import rope

    calls, rotate = [], rope.rotate
    monkeypatch.setattr(rope, "rotate", lambda *a: calls.append(1) or rotate(*a))
    runs = {}
    try:
        for out, fused in (("plain", "false"), ("fused", "true")):
            cfg = load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, out=out, steps=4),
                                        [f"train.fused_rope={fused}"])
            runs[out] = dedistill(cfg, progress=False)["losses"], load_file(str(tmp_path / out / "dev2pro.safetensors"))
            assert bool(calls) == (fused == "true")
    finally:
        rope.use_fused_rope(False)
    (l0, w0), (l1, w1) = runs["plain"], runs["fused"]
    assert torch.allclose(torch.tensor(l1), torch.tensor(l0), rtol=1e-5) and w0.keys() == w1.keys()
    assert all(torch.allclose(w1[k], w0[k], rtol=1e-5, atol=1e-7) for k in w0)


@pytest.fixture(scope="module")
def other_dev_dir(tmp_path_factory):
    """Another tiny dev (other seed) as teacher: the student starts far from it, so learning shows in the loss."""
    from dev2pro.flux.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-dev-7", variant="dev", seed=7)


def test_cfg_teacher_learns_and_drops_guidance(tmp_path, tiny_dev_dir, other_dev_dir, images):
    cfg = load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, steps=20, objective="cfg_teacher"),
                                ["save.keep_guidance=false", f'model.teacher="{other_dev_dir}"'])
    summary = dedistill(cfg, progress=False)
    print([round(x, 4) for x in summary["losses"]])
    _learns(summary["losses"])
    out = Path(cfg.save.output_dir)
    from diffusers import FluxTransformer2DModel

    from dev2pro.flux.checkpoint import open_checkpoint
    from dev2pro.flux.inspection import describe
    assert describe(open_checkpoint(out / "dev2pro.safetensors"))["spec"]["guidance_embeds"] is False
    model = FluxTransformer2DModel.from_pretrained(out / "dev2pro-diffusers")
    assert model.config.guidance_embeds is False
    assert not any("guidance" in k for k in model.state_dict())


def test_guidance_distill_grows_a_guidance_embedding_that_trains(tmp_path, tiny_pro_dir, images):
    # (learning on real data is asserted by the demo test; random-weight teachers give a loss dominated by w noise)
    cfg = load_dedistill_config(_toml(tmp_path, tiny_pro_dir, images, steps=6, objective="guidance_distill"),
                                [f'model.teacher="{tiny_pro_dir}"', "train.lr=1e-3"])
    summary = dedistill(cfg, progress=False)
    assert len(summary["losses"]) == 6 and all(x > 0 for x in summary["losses"])
    from dev2pro.flux.checkpoint import open_checkpoint
    from dev2pro.flux.inspection import describe
    path = Path(cfg.save.output_dir) / "dev2pro.safetensors"
    assert describe(open_checkpoint(path))["variant"] == "dev"
    sd = load_file(path)
    assert sd["guidance_in.out_layer.weight"].abs().max() > 0  # started at zero, moved by the distillation loss


def test_guidance_distill_needs_a_teacher(tmp_path, tiny_pro_dir, images):
    from dev2pro.errors import UserError

    with pytest.raises(UserError, match="model.teacher: the guidance_distill objective needs a CFG teacher"):
        load_dedistill_config(_toml(tmp_path, tiny_pro_dir, images, steps=2, objective="guidance_distill"))



def test_a_teacher_the_flow_objective_does_not_use_is_said(tmp_path, tiny_pro_dir, images, caplog):
    from dev2pro.recipes import dedistill as recipe

    cfg = load_dedistill_config(_toml(tmp_path, tiny_pro_dir, images, steps=2), [f'model.teacher="{tiny_pro_dir}"'])
    with caplog.at_level("WARNING"):
        recipe._check_exports(cfg)
    assert "model.teacher is not used: the flow objective trains on the data alone" in caplog.text


KILL = Path(__file__).resolve().parents[1] / "kill_after_step.py"


def _run_cli(args, kill_after: int = 0, launcher=None):
    """``dev2pro dedistill ARGS`` in a subprocess (under ``launcher``: torchrun / accelerate launch), killed right
    after step ``kill_after`` when set (``tests/kill_after_step.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = [str(KILL), str(kill_after)] if kill_after else ["-m", "dev2pro.cli"]
    cmd = (launcher or [sys.executable]) + entry + ["dedistill", *args, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_kill_gives_same_weights(tmp_path, tiny_dev_dir, images):
    full = dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, out="full", steps=8)),
                     progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, out="killed", steps=8)
    proc = _run_cli([str(cfg_path)], kill_after=5)
    assert proc.returncode == 17, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    assert (killed / "state" / "step-000004").is_dir() and not (killed / "dev2pro.safetensors").exists()
    resumed = dedistill(load_dedistill_config(cfg_path), resume="latest", progress=False)
    a = load_file(str(tmp_path / "full" / "dev2pro.safetensors"))
    b = load_file(str(killed / "dev2pro.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == full["losses"][4:]
    assert _losses(killed)["losses"] == full["losses"]  # the whole run's, resumed or not


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# fp32 export: compare unrounded weights. AdamW turns last-bit differences of the summed gradients into update
# differences of up to ~lr on near-zero gradients, so the weight tolerance is stated against lr = 1e-4: over 6-8
# steps the measured worst weight difference is ~2e-6 (DDP and FSDP alike); asserted < 1e-5.
MULTI = ["--set", 'save.formats=["bfl"]', "--set", 'save.dtype="fp32"', "--set", "train.lr=1e-4"]
WEIGHT_TOL, LOSS_TOL = 1e-5, 1e-6


def _torchrun(n=2):
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n)]


def _weights(folder):
    return load_file(str(Path(folder) / "dev2pro.safetensors"))


def _worst(a, b):
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _losses(folder):
    import json

    return json.loads((Path(folder) / "summary.json").read_text())


@pytest.fixture(scope="module")
def multi_root(tmp_path_factory, tiny_dev_dir, sk_images):
    """Configs shared by the multi-process tests: 6 steps, state every 4, grids at 6, per-block checkpointing,
    EMA."""
    root = tmp_path_factory.mktemp("multi")
    grids = '[sample]\nevery = 6\nprompts = ["a cat"]\nseeds = [0, 1]\nsteps = 2\nwidth = 32\nheight = 32\n'
    one = _toml(root, tiny_dev_dir, sk_images, out="one", steps=6, batch=2, checkpointing=True, extra=grids)
    two = _toml(root, tiny_dev_dir, sk_images, out="two", steps=6, batch=1, checkpointing=True, extra=grids)
    return root, one, two


@pytest.fixture(scope="module")
def one_process(multi_root):
    """The reference: 1 process x batch 2 (the global batch of 2 ranks x batch 1)."""
    root, one, _ = multi_root
    p = _run_cli([str(one), *MULTI])
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "one"


@pytest.fixture(scope="module")
def fsdp_two(multi_root):
    """2 ranks x batch 1 under torchrun with FSDP2 sharding each block (train.distributed = "fsdp")."""
    root, _, two = multi_root
    p = _run_cli([str(two), *MULTI, "--set", 'train.distributed="fsdp"', "--set",
                  f'save.output_dir="{root / "fsdp"}"'], launcher=_torchrun())
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "fsdp"


def test_two_processes_match_one(multi_root, one_process):
    """2 ranks x batch 1 (gloo DDP under torchrun) == 1 process x batch 2: the same global batches and draws."""
    root, _, two = multi_root
    p2 = _run_cli([str(two), *MULTI, "--set", 'train.distributed="ddp"', "--set",
                   f'save.output_dir="{root / "ddp"}"'], launcher=_torchrun())
    assert p2.returncode == 0, p2.stderr[-3000:]
    worst = _worst(_weights(one_process), _weights(root / "ddp"))
    print(f"DDP 2 ranks vs 1 process: worst weight difference {worst:.2e}")
    assert worst < WEIGHT_TOL, worst
    la, lb = _losses(one_process), _losses(root / "ddp")
    assert lb["world_size"] == 2 and lb["distributed"] == "ddp" and lb["losses"] == pytest.approx(la["losses"],
                                                                                                 abs=LOSS_TOL)


def test_fsdp_two_processes_match_one(one_process, fsdp_two):
    """FSDP2 (per-block shards, gloo, activation checkpointing) on 2 ranks == 1 process with the same global batch."""
    worst = _worst(_weights(one_process), _weights(fsdp_two))
    print(f"FSDP 2 ranks vs 1 process: worst weight difference {worst:.2e}")
    assert worst < WEIGHT_TOL, worst
    la, lb = _losses(one_process), _losses(fsdp_two)
    assert lb["world_size"] == 2 and lb["distributed"] == "fsdp"
    assert lb["losses"] == pytest.approx(la["losses"], abs=LOSS_TOL)
    import numpy as np
    from PIL import Image

    for tag in ("g1", "cfg"):  # grids rendered by both ranks through the sharded model == the 1-process grids
        a, b = (np.asarray(Image.open(d / "samples" / f"step000006-{tag}.png"), dtype=np.int16)
                for d in (one_process, fsdp_two))
        print(f"sample grid {tag}: worst pixel difference {np.abs(a - b).max()}")
        from dev2pro.sampling import LABEL_FONT_SIZE
        labels = 3 * (LABEL_FONT_SIZE + 6)  # title, seed and prompt bands of the labelled grid
        assert a.shape == b.shape == (32 + labels, 64, 3) and np.abs(a - b).max() <= 2
    state = fsdp_two / "state" / "step-000004"  # sharded: one file per rank + the common part
    assert sorted(f.name for f in state.iterdir()) == ["common.json", "common.safetensors",
                                                       "rank-00000-of-00002.safetensors",
                                                       "rank-00001-of-00002.safetensors"]


@pytest.mark.slow
def test_fsdp_kill_and_resume_gives_the_same_weights(multi_root, one_process, fsdp_two):
    """Launched through the shipped CPU FSDP accelerate config, killed after step 5, resumed from the sharded
    state of step 4: the same weights as the uninterrupted FSDP run (which loaded its start weights shard by shard
    on the meta device; this config loads them whole, then shards). The same state resumed by 1 process (other
    world size, no FSDP) ends within the 1-vs-2-process tolerance of the 1-process run."""
    import shutil

    root, _, two = multi_root
    launch = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu-fsdp.yaml"),
              "--main_process_port", "0"]
    args = [str(two), *MULTI, "--set", f'save.output_dir="{root / "killed"}"']
    p = _run_cli(args, kill_after=5, launcher=launch)
    killed = root / "killed"
    assert p.returncode != 0 and (killed / "state" / "step-000004").is_dir(), p.stderr[-3000:]
    assert not (killed / "dev2pro.safetensors").exists()
    shutil.copytree(killed, root / "killed-one")  # the same state, resumed below by one process
    p = _run_cli([*args, "--resume", "latest"], launcher=launch)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(killed)["distributed"] == "fsdp"  # the accelerate FSDP config was honoured on CPU
    a, b = _weights(fsdp_two), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), _worst(a, b)
    whole, ref = _losses(killed)["losses"], _losses(fsdp_two)["losses"]  # summary.json: the whole run's losses
    assert len(whole) == len(ref) and whole[4:] == ref[4:]  # the resumed steps, exactly

    p = _run_cli([str(multi_root[1]), *MULTI, "--set", f'save.output_dir="{root / "killed-one"}"', "--resume",
                  "latest"])
    assert p.returncode == 0, p.stderr[-3000:]
    worst = _worst(_weights(one_process), _weights(root / "killed-one"))
    print(f"2-rank FSDP state resumed by 1 process: worst weight difference {worst:.2e}")
    assert worst < WEIGHT_TOL, worst


# what each shipped accelerate config must configure: (processes, machines, mixed precision, FSDP settings or None)
def test_sample_grids_at_guidance_1_and_true_cfg(tmp_path, tiny_dev_dir, images, capsys):
    extra = """
[sample]
every = 2
prompts = ["a red cat", "a photo"]
seeds = [1, 2, 3]
steps = 2
width = 32
height = 48
cfg = 4.0
"""
    cfg = load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, steps=4, extra=extra))
    dedistill(cfg, progress=False)
    samples = Path(cfg.save.output_dir) / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step000002-cfg.png", "step000002-g1.png",
                                                         "step000004-cfg.png", "step000004-g1.png"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("samples: ")]
    assert [line.split(" (")[0] for line in lines] == [  # every grid written gets its console line
        f"samples: {samples / f'step{s:06d}-g1.png'}, {samples / f'step{s:06d}-cfg.png'}" for s in (2, 4)]
    from PIL import Image

    grids = {p.name: Image.open(p) for p in samples.iterdir()}
    from dev2pro.sampling import LABEL_FONT_SIZE
    band = LABEL_FONT_SIZE + 6  # labelled: a title and seed band, a prompt band over each row
    assert all(g.size == (3 * 32, 2 * 48 + 4 * band) for g in grids.values())  # cols = seeds, rows = prompts
    import json

    guidance = {name: json.loads(g.text["guidance"]) for name, g in grids.items()}
    assert guidance["step000004-cfg.png"] == {"mode": "embedded", "embedded": 1.0, "cfg": 4.0}
    assert guidance["step000004-g1.png"] == {"mode": "embedded", "embedded": 1.0, "cfg": 1.0}
    import numpy as np

    assert not np.array_equal(np.asarray(grids["step000004-g1.png"]), np.asarray(grids["step000004-cfg.png"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.save.output_dir) / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/g1", "samples/cfg"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/cfg")] == [2, 4]


def test_export_trains_as_a_lora_base_and_inspects(tmp_path, tiny_dev_dir, images, capsys):
    """The BFL file `dedistill` writes is `model.transformer` of `dev2pro train` and passes `dev2pro inspect`."""
    import math

    from dev2pro.cli import main as cli_main
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    cfg = load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, steps=2), ['save.formats=["bfl"]'])
    exported = Path(dedistill(cfg, progress=False)["files"][0])
    assert cli_main(["inspect", str(exported)]) == 0
    assert "layout      bfl" in capsys.readouterr().out
    lora = load_train_config(None, data={
        "model": {"path": str(tiny_dev_dir), "transformer": str(exported), "dtype": "fp32",
                  "gradient_checkpointing": False, "t5_max_length": 512},
        "data": {"folders": [{"path": str(images)}], "default_caption": "a photo", "resolution": 64,
                 "cache_dir": str(tmp_path.parent / "dedistill-cache")},
        "lora": {"rank": 4, "alpha": 4}, "train": {"steps": 3, "lr": 1e-3, "seed": 1},
        "save": {"output_dir": str(tmp_path / "lora")}})
    summary = train(lora, progress=False)
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in summary["losses"])
    assert (tmp_path / "lora" / "lora.safetensors").is_file()
