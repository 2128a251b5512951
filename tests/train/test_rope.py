"""train.fused_rope (train/rope.py): the complex-product rotation equals diffusers' apply_rotary_emb, and a whole
tiny FLUX.1 / FLUX.2 forward + backward with it equals diffusers' own to fp32 round-off; install/remove is clean."""

import numpy as np
import pytest
import torch
from diffusers.models import embeddings
from diffusers.models.transformers import transformer_flux, transformer_flux2

from dev2pro import families
from dev2pro.families.flux2.spec import TINY_DEV
from dev2pro.flux.spec import TINY
from dev2pro.train.rope import rotate, use_fused_rope


@pytest.fixture
def fused():
    was = use_fused_rope(True)
    yield
    use_fused_rope(was)


def _angles(seq, dim, seed=0):
    """diffusers' (cos, sin) layout: (S, D), each frequency repeated for its (real, imaginary) pair."""
    theta = torch.rand(seq, dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    return (theta.cos().repeat_interleave(2, -1).float(), theta.sin().repeat_interleave(2, -1).float())


@pytest.mark.parametrize("sequence_dim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_diffusers(sequence_dim, dtype):
    cos, sin = _angles(24, 16)
    shape = (2, 24, 3, 16) if sequence_dim == 1 else (2, 3, 24, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = embeddings.apply_rotary_emb(x, (cos, sin), sequence_dim=sequence_dim)
    ours = rotate(x, cos, sin, sequence_dim)
    assert ours.dtype == dtype and ours.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    else:  # the same fp32 values, rounded once to bf16: at most a rare last-bit tie
        assert (ours.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
        assert (ours != ref).float().mean() < 0.01
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-contiguous input is rotated the same
    torch.testing.assert_close(rotate(xt, cos, sin, sequence_dim), ours, rtol=0, atol=0)


def _forward_backward(model, family, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, spec, channels, text", [("flux1", TINY, 64, 32), ("flux2", TINY_DEV, 128, 96)])
def test_whole_model_forward_and_grads_equal_diffusers(name, spec, channels, text):
    fam = families.get(name)
    model = families.build_transformer(spec, seed=0).float().requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    h = w = 8
    x = torch.randn(2, h * w // 4, channels, generator=g)
    record = {"prompt_embeds": torch.randn(2, 7, text, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    inputs = fam.model_inputs(x, torch.tensor([0.3, 0.8]), record, h, w, torch.tensor([3.5, 3.5]), "cpu",
                              torch.float32)
    ref_out, ref_grads = _forward_backward(model, fam, inputs)
    was = use_fused_rope(True)
    try:
        assert transformer_flux.apply_rotary_emb.dev2pro_fused and transformer_flux2.apply_rotary_emb.dev2pro_fused
        out, grads = _forward_backward(model, fam, inputs)
    finally:
        use_fused_rope(was)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_install_is_idempotent_and_removable():
    original = transformer_flux.apply_rotary_emb
    assert original is embeddings.apply_rotary_emb and not use_fused_rope(True)
    fused_fn = transformer_flux.apply_rotary_emb
    assert use_fused_rope(True) and transformer_flux.apply_rotary_emb is fused_fn  # no double wrapping
    assert use_fused_rope(False)
    assert transformer_flux.apply_rotary_emb is original and transformer_flux2.apply_rotary_emb is original
    assert not use_fused_rope(False)


def test_other_layouts_go_to_diffusers(fused):
    """A call the fused rotation does not cover (the half-split layout) gets diffusers' own result."""
    cos, sin = _angles(10, 8)
    x = torch.randn(1, 2, 10, 8)
    got = transformer_flux.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-2)
    torch.testing.assert_close(got, embeddings.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-2),
                               rtol=0, atol=0)


def test_train_with_fused_rope_equals_diffusers_and_resumes_bit_identical(tmp_path, tiny_dev_dir, sk_images,
                                                                           monkeypatch):
    """`train.fused_rope = true` on the tiny family: the same losses and LoRA as diffusers' rotation to fp32
    round-off (on this CPU the fp32 complex product is even bit-equal); a run stopped at step 3 and resumed ends
    bit-identical to the straight run."""
    from safetensors.torch import load_file

    from dev2pro.train import rope

    calls = []
    monkeypatch.setattr(rope, "rotate", lambda *a: calls.append(1) or rotate(*a))

    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config
    from tiny_run import lora_run_toml, same_tensors

    def run(out, fused, steps=6, resume=None):
        cfg = lora_run_toml(tmp_path, tiny_dev_dir, sk_images, out, steps=6, seed=3, lr="5e-3",
                            train=f"fused_rope = {str(fused).lower()}")
        return train(load_train_config(cfg, [f"train.steps={steps}"]), resume=resume, progress=False)

    try:
        plain = run("plain", False)
        assert not calls
        fused = run("fused", True)
        assert len(calls) >= 6 * 2 * 6  # q and k in each of the 6 blocks, every step (+ the checkpoint recompute)
        np.testing.assert_allclose(fused["losses"], plain["losses"], rtol=1e-5)
        a, b = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("plain", "fused"))
        diff = sum((b[k].double() - a[k].double()).norm() ** 2 for k in a) ** 0.5
        assert diff / sum(a[k].double().norm() ** 2 for k in a) ** 0.5 < 1e-5
        first = run("half", True, steps=3)
        rest = run("half", True, resume="latest")
        assert first["losses"] + rest["losses"] == fused["losses"]
        assert same_tensors(tmp_path / "half" / "lora.safetensors", tmp_path / "fused" / "lora.safetensors")
    finally:
        use_fused_rope(False)
    assert not use_fused_rope(False)
