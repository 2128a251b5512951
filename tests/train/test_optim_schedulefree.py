"""Schedule-free AdamW (``train.optimizer = "schedulefree_adamw"``): its eval (averaged) weights are what is saved,
sampled and validated, the training weights come back bitwise after each of those, the LR schedule is constant,
and a killed run resumes bit-identical."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.config import ConfigError
from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.train.optim import build_optimizer, build_scheduler, is_schedule_free, published_weights
from dev2pro.train.watch import check_optional_packages
from tiny_run import lora_run_toml, run_killed, same_tensors

schedulefree = pytest.importorskip("schedulefree")


def _stepped(steps=3, warmup=0):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = build_optimizer([p], "schedulefree_adamw", lr=0.1, warmup_steps=warmup)
    for _ in range(steps):
        p.grad = torch.randn(4, 3)
        opt.step()
        opt.zero_grad()
    return p, opt


def test_published_weights_are_the_eval_average_and_training_weights_come_back_bitwise():
    p, opt = _stepped()
    y, z = p.detach().clone(), opt.state[p]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0]
    with published_weights([p], opt):
        assert not opt.param_groups[0]["train_mode"]
        torch.testing.assert_close(p.detach(), torch.lerp(y, z, 1 - 1 / beta1), rtol=0, atol=1e-7)
        assert not torch.allclose(p.detach(), y)
    assert torch.equal(p.detach(), y) and opt.param_groups[0]["train_mode"]  # bitwise, ready to step
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    with published_weights(list(plain.param_groups[0]["params"]), plain):  # other optimisers: untouched
        pass
    assert not is_schedule_free(plain) and is_schedule_free(opt)
    from dev2pro.plan import optimizer_state_bytes  # the plan prices its state: z + exp_avg_sq in fp32
    assert optimizer_state_bytes("schedulefree_adamw", [(4, 3)]) == 4 * 3 * 8


def test_schedule_is_constant_and_other_schedules_are_refused():
    p, opt = _stepped(steps=0, warmup=5)
    sched = build_scheduler(opt, 5, 100, "constant")
    lrs = []
    for _ in range(3):  # the warmup is the optimiser's own (its scheduled_lr); our multiplier stays 1
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        lrs.append((sched.get_last_lr()[0], opt.param_groups[0]["scheduled_lr"]))
    assert [a for a, _ in lrs] == [0.1, 0.1, 0.1] and [b for _, b in lrs] == pytest.approx([0.02, 0.04, 0.06])
    with pytest.raises(ConfigError, match='train.schedule = "constant"'):
        build_scheduler(opt, 0, 100, "cosine")


def _toml(tmp_path, model_dir, images, out, steps=4, extra=""):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=2, save='every = 2\nformats = ["diffusers"]',
                         train=f'optimizer = "schedulefree_adamw"\nwarmup_steps = 1\n{extra}')


def test_config_refuses_a_schedule_or_an_ema_with_schedulefree(tmp_path, tiny_dev_dir, sk_images):
    path = _toml(tmp_path, tiny_dev_dir, sk_images, "run")
    with pytest.raises(ConfigError, match='train.schedule = \\\\?"constant'):
        load_train_config(path, ['train.schedule="cosine"'])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_train_config(path, ["train.ema_decay=0.99"])


def test_trains_and_saves_the_eval_weights(tmp_path, tiny_dev_dir, sk_images, capsys):
    summary = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "run")), progress=False)
    losses = summary["losses"]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    assert "schedule-free AdamW: the LoRA files and samples hold its averaged (eval) weights" in capsys.readouterr().out
    state = load_file(str(tmp_path / "run" / "state" / "step-000004" / "rank-00000-of-00001.safetensors"))
    saved = load_file(str(tmp_path / "run" / "lora.diffusers.safetensors"))
    names = [k[len("model/"):] for k in state if k.startswith("model/")]
    assert len(names) == len(saved) > 0
    moved = 0
    for n in names:
        y, z = state[f"model/{n}"], state[f"optim/z/{n}"]  # the training weights and the optimiser's z
        x = torch.lerp(y, z, 1 - 1 / 0.9)  # schedule-free's eval weights (betas[0] = 0.9)
        key = "transformer." + n.replace(".default.", ".")
        torch.testing.assert_close(saved[key], x, rtol=0, atol=1e-7)
        moved += not torch.allclose(saved[key], y)
    assert moved > 0  # the file is not simply the training weights


@pytest.mark.slow  # ~20 s: a killed subprocess run and its resume
def test_schedulefree_run_resumes_bit_identical_after_kill(tmp_path, tiny_dev_dir, sk_images):
    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "full", steps=6)), progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, "killed", steps=6)
    run_killed(cfg_path, 5)  # dies right after step 5 (state at 4)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    assert resumed["losses"] == full["losses"][4:]
    assert same_tensors(tmp_path / "full" / "lora.diffusers.safetensors",
                        tmp_path / "killed" / "lora.diffusers.safetensors")
    assert same_tensors(tmp_path / "full" / "lora-step000004.diffusers.safetensors",
                        tmp_path / "killed" / "lora-step000004.diffusers.safetensors")


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "schedulefree" else
                        real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'dev2pro\[schedulefree\]'"):
        check_optional_packages(False, "schedulefree_adamw")
    check_optional_packages(False, "adamw")  # nothing asked for: nothing refused
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # an import that fails
    with pytest.raises(ConfigError, match=r"dev2pro\[schedulefree\]"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], "schedulefree_adamw", lr=0.1)
