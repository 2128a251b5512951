"""`dev2pro dedistill` end to end on the tiny model folder and real images (scikit-image's data folder)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.recipes.dedistill import (cfg_teacher_objective, dedistill, guidance_distill_objective,
                                       load_dedistill_config, with_guidance_embedding)


@pytest.fixture
def images(sk_images):
    return sk_images


def _toml(tmp_path, model_dir, images, out="run", steps=16, objective="flow", batch=1, extra=""):
    text = f"""
objective = "{objective}"

[model]
path = "{model_dir}"
gradient_checkpointing = false

[[data.folders]]
path = "{images}"

[data]
default_caption = "a photo"
resolution = 64
bucket_step = 64
batch_size = {batch}
cache_dir = "{tmp_path.parent / 'dedistill-cache'}"

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
    from dev2pro.flux.checkpoint import describe, load_transformer, open_checkpoint
    ckpt = open_checkpoint(out / "dev2pro.safetensors")
    info = describe(ckpt)
    assert ckpt.layout == "bfl" and info["spec"]["guidance_embeds"] is True
    model, _ = load_transformer(out / "dev2pro.safetensors", dtype=torch.float32)
    folder, _ = load_transformer(out / "dev2pro-diffusers", dtype=torch.float32)
    a, b = model.state_dict(), folder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # weights moved away from the start, and the EMA (not the raw weights) was exported
    start, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    assert not torch.equal(start.state_dict()["x_embedder.weight"], a["x_embedder.weight"])
    assert (out / "logs").is_dir() and (out / "summary.json").exists()


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

    from dev2pro.flux.checkpoint import describe, open_checkpoint
    assert describe(open_checkpoint(out / "dev2pro.safetensors"))["spec"]["guidance_embeds"] is False
    model = FluxTransformer2DModel.from_pretrained(out / "dev2pro-diffusers")
    assert model.config.guidance_embeds is False
    assert not any("guidance" in k for k in model.state_dict())


def test_cfg_teacher_loss_matches_hand_computation(tiny_dev_dir):
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.latents import image_ids, pack, text_ids

    student, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    teacher, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    with torch.no_grad():  # make student and teacher differ
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 8, 8
    x0, noise = torch.randn(b, 16, h, w, generator=g), torch.randn(b, 16, h, w, generator=g)
    sig, ws = torch.tensor([0.3, 0.8]), torch.tensor([1.5, 3.5])
    text = {"prompt_embeds": torch.randn(b, 8, 32, generator=g), "pooled": torch.randn(b, 32, generator=g)}
    empty = {"prompt_embeds": torch.randn(8, 32, generator=g), "pooled": torch.randn(32, generator=g)}
    loss, parts = cfg_teacher_objective(student, teacher, x0, noise, sig, ws, text, empty, 0.5, "cpu",
                                        torch.float32, torch.float32)

    def run(model, pe, pooled, guidance):
        x_t = pack((1 - sig.view(b, 1, 1, 1)) * x0 + sig.view(b, 1, 1, 1) * noise)
        return model(hidden_states=x_t, timestep=sig, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=pe, txt_ids=text_ids(8), img_ids=image_ids(h, w), return_dict=False)[0]

    with torch.no_grad():
        c = run(student, text["prompt_embeds"], text["pooled"], torch.ones(b))
        u = run(student, empty["prompt_embeds"].expand(b, 8, 32), empty["pooled"].expand(b, 32), torch.ones(b))
        t = run(teacher, text["prompt_embeds"], text["pooled"], ws)
    guided = u + ws.view(b, 1, 1) * (c - u)
    distill = ((guided - t) ** 2).mean()
    flow = ((c - pack(noise - x0)) ** 2).mean()
    assert parts["loss/distill"].item() == pytest.approx(distill.item(), rel=1e-5)
    assert loss.item() == pytest.approx((distill + 0.5 * flow).item(), rel=1e-5)


def test_guidance_distill_loss_matches_hand_computation(tiny_pro_dir):
    """Meng et al. Alg. 1: the student at guidance w regresses onto the teacher's u + w (c - u)."""
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.latents import image_ids, pack, text_ids

    teacher, _ = load_transformer(tiny_pro_dir, dtype=torch.float32)
    student = with_guidance_embedding(teacher)
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 8, 8
    x0, noise = torch.randn(b, 16, h, w, generator=g), torch.randn(b, 16, h, w, generator=g)
    sig, ws = torch.tensor([0.3, 0.8]), torch.tensor([1.5, 3.5])
    text = {"prompt_embeds": torch.randn(b, 8, 32, generator=g), "pooled": torch.randn(b, 32, generator=g)}
    empty = {"prompt_embeds": torch.randn(8, 32, generator=g), "pooled": torch.randn(32, generator=g)}

    def run(model, pe, pooled, guidance):
        x_t = pack((1 - sig.view(b, 1, 1, 1)) * x0 + sig.view(b, 1, 1, 1) * noise)
        return model(hidden_states=x_t, timestep=sig, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=pe, txt_ids=text_ids(8), img_ids=image_ids(h, w), return_dict=False)[0]

    with torch.no_grad():
        c = run(teacher, text["prompt_embeds"], text["pooled"], None)
        u = run(teacher, empty["prompt_embeds"].expand(b, 8, 32), empty["pooled"].expand(b, 32), None)
        # the grown embedding adds nothing yet: the student equals the teacher at any guidance
        s = run(student, text["prompt_embeds"], text["pooled"], ws)
        assert torch.allclose(s, c, atol=1e-6)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        s = run(student, text["prompt_embeds"], text["pooled"], ws)
    loss, parts = guidance_distill_objective(student, teacher, x0, noise, sig, ws, text, empty, "cpu",
                                             torch.float32, torch.float32)
    expected = ((s - (u + ws.view(b, 1, 1) * (c - u))) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["loss/distill"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_guidance_distill_grows_a_guidance_embedding_that_trains(tmp_path, tiny_pro_dir, images):
    # (learning on real data is asserted by the demo test; random-weight teachers give a loss dominated by w noise)
    cfg = load_dedistill_config(_toml(tmp_path, tiny_pro_dir, images, steps=6, objective="guidance_distill"),
                                [f'model.teacher="{tiny_pro_dir}"', "train.lr=1e-3"])
    summary = dedistill(cfg, progress=False)
    assert len(summary["losses"]) == 6 and all(x > 0 for x in summary["losses"])
    from dev2pro.flux.checkpoint import describe, open_checkpoint
    path = Path(cfg.save.output_dir) / "dev2pro.safetensors"
    assert describe(open_checkpoint(path))["variant"] == "dev"
    sd = load_file(path)
    assert sd["guidance_in.out_layer.weight"].abs().max() > 0  # started at zero, moved by the distillation loss


def test_guidance_distill_needs_a_teacher(tmp_path, tiny_pro_dir, images):
    from dev2pro.errors import UserError

    cfg = load_dedistill_config(_toml(tmp_path, tiny_pro_dir, images, steps=2, objective="guidance_distill"))
    with pytest.raises(UserError, match="model.teacher"):
        dedistill(cfg, progress=False)


def _run_cli(args, env_extra=None, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "dev2pro.recipes.dedistill", *args, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_kill_gives_same_weights(tmp_path, tiny_dev_dir, images):
    full = dedistill(load_dedistill_config(_toml(tmp_path, tiny_dev_dir, images, out="full", steps=8)),
                     progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, images, out="killed", steps=8)
    proc = _run_cli([str(cfg_path)], {"DEV2PRO_STOP_AFTER_STEP": "6"})
    assert proc.returncode == 17, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    assert (killed / "state" / "step-000004").is_dir() and not (killed / "dev2pro.safetensors").exists()
    resumed = dedistill(load_dedistill_config(cfg_path), resume="latest", progress=False)
    a = load_file(str(tmp_path / "full" / "dev2pro.safetensors"))
    b = load_file(str(killed / "dev2pro.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == full["losses"][4:]


def test_two_processes_match_one(tmp_path, tiny_dev_dir, images):
    """2 ranks x batch 1 (gloo DDP under torchrun) == 1 process x batch 2: the same global batches and draws."""
    one = _toml(tmp_path, tiny_dev_dir, images, out="one", steps=4, batch=2)
    two = _toml(tmp_path, tiny_dev_dir, images, out="two", steps=4, batch=1)
    # fp32 export: compare unrounded weights. AdamW turns last-bit differences of the gradient all-reduce into
    # update differences of up to ~lr on near-zero gradients, so the weight tolerance is stated against lr = 1e-4.
    fp32 = ["--set", 'save.formats=["bfl"]', "--set", 'save.dtype="fp32"', "--set", "train.lr=1e-4"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    p2 = _run_cli([str(two), *fp32], launcher=torchrun)
    assert p2.returncode == 0, p2.stderr[-3000:]
    p1 = _run_cli([str(one), *fp32])
    assert p1.returncode == 0, p1.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "dev2pro.safetensors"))
    b = load_file(str(tmp_path / "two" / "dev2pro.safetensors"))
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    import json
    la = json.loads((tmp_path / "one" / "summary.json").read_text())["losses"]
    lb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert lb["world_size"] == 2 and lb["losses"] == pytest.approx(la, abs=1e-6)
