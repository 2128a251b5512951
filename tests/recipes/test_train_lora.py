"""`dev2pro train` end to end on a tiny model folder and real images (scikit-image's data folder)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import load_train_config, train

@pytest.fixture
def images(sk_images):
    return sk_images


def _toml(tmp_path, model_dir, images, out="run", steps=24, extra=""):
    text = f"""
[model]
path = "{model_dir}"
dtype = "fp32"
gradient_checkpointing = false

[[data.folders]]
path = "{images}"

[data]
default_caption = "a photo"
resolution = 64
bucket_step = 64
batch_size = 1
cache_dir = "{tmp_path / 'cache'}"

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
    # the resolved config reloads to the same values
    again = load_train_config(out / "config.toml")
    assert again.train.lr == cfg.train.lr and again.lora.rank == 8
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"] == "8"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "sigmoid"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_resume_after_kill_is_bit_identical(tmp_path, tiny_dev_dir, images):
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, images, out="full", steps=10)), progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, out="killed", steps=10)
    env = {**os.environ, "DEV2PRO_STOP_AFTER_STEP": "6", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dev2pro.cli", "train", str(cfg_path), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]  # died right after step 6 (state saved at step 4)
    killed = Path(tmp_path / "killed")
    assert (killed / "state" / "step-000004").is_dir() and not (killed / "lora.safetensors").exists()
    with pytest.raises(UserError, match="--resume"):
        train(load_train_config(cfg_path), progress=False)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    a = load_file(str(tmp_path / "full" / "lora.safetensors"))
    b = load_file(str(killed / "lora.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == full["losses"][4:]


def test_lora_trained_on_one_base_samples_on_another(tmp_path, tiny_dev_dir, tiny_pro_dir, images):
    """Train on tiny 'dev2pro' (here: the pro folder's transformer), sample on tiny dev via inference_base."""
    extra = f"""
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
    grid = Image.open(out / "samples" / "step000002.png")
    assert grid.size == (128, 128)  # 2 prompts x 2 seeds of 64 px
    assert grid.info.get("base", "").endswith("tiny-dev")
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
