"""`dev2pro dedistill` with train.adapter_rank: de-distillation as a LoRA on a frozen dev, exported as an adapter."""

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.errors import UserError
from dev2pro.flux.checkpoint import load_transformer
from dev2pro.lora.formats import load_lora
from dev2pro.lora.ops import lora_delta
from dev2pro.recipes.dedistill import dedistill
from dev2pro.schemas import load_dedistill_config

from .test_dedistill import _run_cli, _toml

def _cfg(tmp_path, model_dir, images, out, objective="cfg_teacher", steps=6, rank=4):
    """The dedistill tests' tiny config (EMA, state every 4 steps) and the override that makes it an adapter run."""
    return _toml(tmp_path, model_dir, images, out=out, steps=steps, objective=objective), \
        [f"train.adapter_rank={rank}"] if rank else []


def _load(path, overrides):
    return load_dedistill_config(path, overrides)


@pytest.mark.slow
def test_adapter_dedistill_trains_only_a_lora_exports_it_and_resumes(tmp_path, tiny_dev_dir, sk_images):
    path, over = _cfg(tmp_path, tiny_dev_dir, sk_images, "adapter")
    run = dedistill(_load(path, over), progress=False)
    full_path, _ = _cfg(tmp_path, tiny_dev_dir, sk_images, "full", rank=0)
    full = dedistill(_load(full_path, []), progress=False)
    # step 1: the LoRA starts at zero (student = dev = the teacher), so the loss is the full fine-tune's
    assert run["losses"][0] == pytest.approx(full["losses"][0], rel=1e-6)
    out = tmp_path / "adapter"
    kohya, diffusers = load_lora(out / "dev2pro-adapter.safetensors"), load_lora(
        out / "dev2pro-adapter.diffusers.safetensors")
    dev, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    linears = {n for n, m in dev.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(diffusers) == linears and set(kohya) == linears
    assert all(m.rank == 4 for m in diffusers.values())
    for n in linears:
        torch.testing.assert_close(lora_delta(kohya[n]), lora_delta(diffusers[n]), atol=1e-6, rtol=1e-5)
    assert sum(float(lora_delta(m).norm()) for m in diffusers.values()) > 0  # it learned something
    assert not (out / "dev2pro.safetensors").exists()
    # the state holds the LoRA, not the frozen base
    state = sorted((out / "state").iterdir())[-1]
    keys = [k for f in state.glob("*.safetensors") for k in load_file(str(f))]
    assert keys and all("lora_" in k for k in keys if k.startswith("model/"))
    # killed after step 5 and resumed: the same adapter, bit for bit
    killed_path, _ = _cfg(tmp_path, tiny_dev_dir, sk_images, "killed")
    proc = _run_cli([str(killed_path), "--set", over[0]], kill_after=5)
    assert proc.returncode == 17, proc.stderr[-3000:]
    resumed = dedistill(_load(killed_path, over), resume="latest", progress=False)
    assert resumed["losses"] == run["losses"][4:]
    a = load_file(str(out / "dev2pro-adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "dev2pro-adapter.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_dedistill_config_errors(tmp_path, tiny_dev_dir, sk_images):
    path, _ = _cfg(tmp_path, tiny_dev_dir, sk_images, "x", objective="guidance_distill")
    with pytest.raises(UserError, match="supports flow and cfg_teacher"):
        load_dedistill_config(path, ["train.adapter_rank=4"])
    with pytest.raises(UserError, match="only a frozen base"):
        load_dedistill_config(path.with_name("x.toml"), ["model.fp8_storage=true"])


def test_adapter_dedistill_says_the_full_export_settings_do_not_apply(tmp_path, tiny_dev_dir, sk_images, caplog):
    from dev2pro.recipes import dedistill as recipe

    path, over = _cfg(tmp_path, tiny_dev_dir, sk_images, "a")
    cfg = _load(path, over + ['save.formats=["bfl", "fp8"]'])
    with caplog.at_level("WARNING"):
        recipe._check_exports(cfg)
    assert "adapter de-distillation (train.adapter_rank) exports the adapter" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        recipe._check_exports(_load(path, over + ['save.formats=["bfl"]', 'save.dtype="bf16"',
                                                  "save.keep_guidance=true"]))
    assert not caplog.text  # the defaults: nothing to say
