"""bf16 LoRA compute over fp32 masters (train/precision.py): the views, and `train` with it on the tiny family."""

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.train.precision import MasterWeights
from tiny_run import lora_run_toml, same_tensors


def _lora_model(dtype):
    torch.manual_seed(0)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["a", "b"],
                                               init_lora_weights="gaussian"), Two().to(dtype))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n:  # B nonzero too, so every LoRA weight gets a gradient
            p.data = torch.randn(p.shape) * 0.1
    return model, params


def test_views_grad_accumulation_and_no_grad_forward():
    """Inside forward/backward the LoRA is bf16; outside it is the fp32 master with an fp32 gradient that sums
    the micro-batches; a no-grad forward (samples) stays fp32; the peft forward sees bf16 weights."""
    model, params = _lora_model(torch.bfloat16)
    masters = [p.detach().clone() for p in params]
    mw = MasterWeights(model, params, torch.bfloat16)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    seen = []
    h = model.a.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    for i in range(2):
        model(x[i]).float().square().mean().backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    h.remove()
    assert seen == [torch.bfloat16, torch.bfloat16] and not mw.in_compute_view
    assert all(torch.equal(p.detach(), m) for p, m in zip(params, masters))  # masters untouched by the casts
    # the fp32 gradient is the sum of the two micro-batches' bf16 gradients (each computed on bf16 weights)
    ref, ref_params = _lora_model(torch.bfloat16)
    for p in ref_params:
        p.data = p.data.bfloat16()
    for i in range(2):
        ref(x[i]).float().square().mean().backward()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad.float(), rtol=2e-2, atol=1e-4)
        assert p.grad.abs().sum() > 0
    with torch.no_grad():
        model(x[0])
    assert all(p.dtype == torch.float32 for p in params) and not mw.in_compute_view
    mw.remove()


def _toml(tmp_path, model_dir, images, out, lora_dtype, steps, extra=""):
    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=3, lr="5e-3", model='dtype = "bf16"',
                         train=f'lora_dtype = "{lora_dtype}"\n{extra}')


@pytest.mark.slow
def test_bf16_lora_trains_like_fp32_lora_and_resumes_bit_identically(tmp_path, tiny_dev_dir, sk_images):
    """20 steps on a bf16 base: bf16-LoRA (fp32 masters) vs fp32-LoRA losses agree to bf16 round-off and the LoRA
    files to 1e-2 relative; a bf16-LoRA run stopped at step 10 and resumed ends bit-identical to a straight run."""
    fp32 = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "fp32", "fp32", 20)), progress=False)
    bf16 = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "bf16", "compute", 20)), progress=False)
    a, b = np.array(fp32["losses"]), np.array(bf16["losses"])
    assert len(a) == 20 and not np.array_equal(a, b)  # a different compute path, not the same numbers
    np.testing.assert_allclose(b, a, rtol=2e-2)  # bf16 round-off of the LoRA GEMMs
    la, lb = load_file(str(tmp_path / "fp32" / "lora.safetensors")), load_file(str(tmp_path / "bf16" /
                                                                                      "lora.safetensors"))
    assert set(la) == set(lb)
    assert all(v.dtype == torch.float32 for v in lb.values())  # the fp32 master is what is saved
    num = sum((la[k].double() - lb[k].double()).norm() ** 2 for k in la if "alpha" not in k) ** 0.5
    den = sum(la[k].double().norm() ** 2 for k in la if "alpha" not in k) ** 0.5
    print(f"bf16 vs fp32 LoRA: losses max rel {np.max(np.abs(b - a) / a):.2e}, LoRA rel {float(num / den):.2e}")
    assert num / den < 1e-2, float(num / den)
    moved = sum((lb[k].double() - 0).norm() for k in lb if "lora_up" in k)
    assert moved > 0  # B left zero: the LoRA trained
    half = _toml(tmp_path, tiny_dev_dir, sk_images, "half", "compute", 10)
    first = train(load_train_config(half), progress=False)
    rest = train(load_train_config(half, ["train.steps=20"]), resume="latest", progress=False)
    assert first["losses"] + rest["losses"] == bf16["losses"]
    assert same_tensors(tmp_path / "half" / "lora.safetensors", tmp_path / "bf16" / "lora.safetensors")
    state = sorted(Path(tmp_path / "half" / "state").iterdir())[-1]
    tensors = {k: v for f in state.glob("rank-*.safetensors") for k, v in load_file(str(f)).items()}
    assert tensors and all(v.dtype == torch.float32 for k, v in tensors.items() if k.startswith(("model/", "optim/")))
