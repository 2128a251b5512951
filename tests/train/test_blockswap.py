"""Block swap: training and sampling with swapped blocks equal the unswapped run bit for bit; residency is bounded."""

import pytest
import torch

from dev2pro.flux.latents import image_ids
from dev2pro.flux.spec import FLUX_DEV, TINY, build_transformer
from dev2pro.train.blockswap import BlockSwap, enable_block_swap, flux_blocks, swap_positions
from tiny_run import model_and_data


def _inputs(spec, img=16, txt=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = int(img ** 0.5)
    ids = image_ids(2 * side, 2 * side)
    return dict(hidden_states=torch.randn(1, img, spec.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, txt, spec.context_dim, generator=g),
                pooled_projections=torch.randn(1, spec.pooled_dim, generator=g),
                timestep=torch.tensor([0.4]), guidance=torch.tensor([1.0]) if spec.guidance_embeds else None,
                img_ids=ids, txt_ids=torch.zeros(txt, 3), return_dict=False), torch.randn(1, img, spec.in_channels,
                                                                                           generator=g)


def _lora_model(spec, fp8=False, checkpointing=True):
    from peft import LoraConfig

    from dev2pro.lora.targets import target_modules

    model = build_transformer(spec, dtype=torch.float32, seed=0)
    if fp8:
        from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage

        enable_fp8_storage(model, Fp8Policy(), compute_dtype=torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.requires_grad_(False)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=target_modules("all_linear", spec.num_double, spec.num_single,
                                                               guidance=spec.guidance_embeds)))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return model, params


def _train(spec, n, steps=5, fp8=False, checkpointing=True, img=16):
    model, params = _lora_model(spec, fp8, checkpointing)
    swap = BlockSwap(model, n, "cpu", record=True).place() if n else None
    opt = torch.optim.AdamW(params, lr=1e-2)
    kw, target = _inputs(spec, img=img)
    losses = []
    for _ in range(steps):
        loss = (model(**kw)[0] - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    return losses, lora, swap, model


def _assert_equal_runs(a, b):
    assert a[0] == b[0]  # losses, exactly
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_swap_training_equals_plain_on_tiny():
    plain = _train(TINY, 0)
    swapped = _train(TINY, 4)
    _assert_equal_runs(plain, swapped)
    assert plain[0][0] != plain[0][-1]  # the LoRA did train


def test_swap_residency_is_bounded_in_forward_and_backward():
    n_blocks = TINY.num_double + TINY.num_single
    n = 4
    _, _, swap, model = _train(TINY, n, steps=2)
    swapped = {0, 1, 4, 5}  # both double blocks (the largest), then the last single blocks
    assert set(swap.slots) == swapped and swap_positions(2, 4, 3) == [0, 1, 5]
    # one forward (0..5) and one checkpointed backward (5..0) per step, each block's hook in order
    per_step = [("forward", p) for p in range(n_blocks)] + [("backward", p) for p in reversed(range(n_blocks))]
    assert [(d, p) for d, p, _ in swap.trace] == per_step * 2
    for direction, p, resident in swap.trace:
        assert resident <= swapped and len(resident) <= swap.window
        if p in swapped:
            assert p in resident  # the block that runs is on the device
        total = (n_blocks - n) + len(resident)
        assert total <= (n_blocks - n) + swap.window
    # forward prefetches the next swapped block; backward the previous one
    assert ("forward", 0, frozenset({0, 1})) in swap.trace and ("forward", 2, frozenset({4})) in swap.trace
    assert ("backward", 4, frozenset({4, 1})) in swap.trace and ("backward", 2, frozenset({1})) in swap.trace
    assert swap.max_resident == 2
    # outside the window the swapped blocks hold exactly their host masters; LoRA weights are not swapped
    blocks = flux_blocks(model)
    for p in swapped - swap.resident:
        for e in swap.slots[p].entries:
            assert e.module._parameters.get(e.name, e.module._buffers.get(e.name)) is e.host
            assert "lora_" not in e.name
    lora_in_swapped = [prm for p in swapped for name, prm in blocks[p].named_parameters() if "lora_" in name]
    assert lora_in_swapped and all(prm.requires_grad for prm in lora_in_swapped)


def test_window_one_keeps_a_single_swapped_block():
    model, _ = _lora_model(TINY)
    swap = BlockSwap(model, 6, "cpu", window=1, record=True).place()
    kw, _ = _inputs(TINY)
    with torch.no_grad():
        ref = model(**kw)[0]
    assert all(len(r) <= 1 for _, _, r in swap.trace)
    swap.remove()
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], ref)


def test_swap_without_checkpointing_is_still_exact():
    _assert_equal_runs(_train(TINY, 0, steps=3, checkpointing=False), _train(TINY, 5, steps=3, checkpointing=False))


def test_swap_count_is_checked():
    from dev2pro.errors import UserError

    model, _ = _lora_model(TINY)
    with pytest.raises(UserError, match="blocks_to_swap"):
        BlockSwap(model, 7, "cpu")
    assert enable_block_swap(model, 0, "cpu") is None


def test_swap_inference_equals_plain_with_fp8_storage():
    model, _ = _lora_model(TINY, fp8=True)
    kw, _ = _inputs(TINY)
    with torch.no_grad():
        ref = [model(**kw)[0] for _ in range(2)]
        swap = enable_block_swap(model, 6, "cpu")
        out = [model(**kw)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert swap.swapped_bytes() > 0 and swap.loads >= 12


@pytest.mark.slow
def test_swap_training_equals_plain_full_width_fp8():
    spec = FLUX_DEV.with_(num_double=1, num_single=1)
    # two steps: the second forward already runs on LoRA weights the optimizer changed (full width costs ~8 s/step)
    plain = _train(spec, 0, steps=2, fp8=True, img=4)
    swapped = _train(spec, 2, steps=2, fp8=True, img=4)
    _assert_equal_runs(plain, swapped)


# ------------------------------------------------------------------------------------------------ recipes
def _train_toml(tmp_path, model_dir, images, name, extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(model_and_data(model_dir, images, tmp_path / "cache", True, 'dtype = "fp32"\n' + extra) + f"""

[lora]
rank = 4
alpha = 4

[train]
steps = 5
lr = 1e-2
seed = 3

[sample]
prompts = ["a red cat"]
steps = 2
width = 32
height = 32

[save]
output_dir = "{tmp_path / name}"
""")
    return path


def test_dev2pro_train_with_swap_equals_without(tmp_path, tiny_dev_dir, sk_images):
    """The recipe: 5 steps with blocks_to_swap = 3 give the same losses, LoRA file and sample grid."""
    from safetensors.torch import load_file

    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    runs = {}
    for name, extra in (("plain", ""), ("swap", "blocks_to_swap = 3")):
        cfg = load_train_config(_train_toml(tmp_path, tiny_dev_dir, sk_images, name, extra))
        runs[name] = (train(cfg, progress=False)["losses"], load_file(str(tmp_path / name / "lora.safetensors")),
                      (tmp_path / name / "samples" / "step000005.png").read_bytes())
    (l0, w0, s0), (l1, w1, s1) = runs["plain"], runs["swap"]
    assert l0 == l1 and len(l0) == 5
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert s0 == s1  # samples during training, rendered through the swap hooks
    assert "blocks_to_swap = 3" in (tmp_path / "swap" / "config.toml").read_text()


def test_dev2pro_sample_with_swap_equals_without(tmp_path, tiny_dev_dir):
    import numpy as np
    from PIL import Image

    from dev2pro.recipes.sample import run_sample

    kw = dict(seeds=[1, 2], steps=2, size=(64, 64))
    a = run_sample(tiny_dev_dir, ["a red cat"], tmp_path / "a", **kw)
    b = run_sample(tiny_dev_dir, ["a red cat"], tmp_path / "b", blocks_to_swap=5, **kw)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))


def test_place_base_speed_switches(tmp_path):
    """train.attention_backend goes to diffusers' dispatcher (a bad name is a UserError); train.compile compiles
    the repeated blocks regionally (lazily: nothing is compiled until the first forward) and is skipped with swap."""
    from dev2pro.errors import UserError
    from dev2pro.train.model import place_base

    model, _ = _lora_model(TINY)
    assert place_base(model, "cpu", attention_backend="native") is None
    backend = str(model.transformer_blocks[0].attn.processor._attention_backend)
    assert backend in ("native", "AttentionBackendName.NATIVE")
    with pytest.raises(UserError, match="attention_backend"):
        place_base(model, "cpu", attention_backend="no-such-kernel")
    place_base(model, "cpu", compile=True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in flux_blocks(model))
    other, _ = _lora_model(TINY)
    swap = place_base(other, "cpu", blocks_to_swap=2, compile=True)
    assert swap is not None and all(getattr(b, "_compiled_call_impl", None) is None for b in flux_blocks(other))


@pytest.mark.slow
def test_samples_on_a_swapped_inference_base_equal_unswapped(tmp_path, tiny_dev_dir, sk_images):
    """With model.inference_base the second transformer is swapped too: placed for sampling, back to host after."""
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    grids = {}
    for name, extra in (("plain", ""), ("swap", "blocks_to_swap = 4")):
        toml = _train_toml(tmp_path, tiny_dev_dir, sk_images, name, f'inference_base = "{tiny_dev_dir}"\n{extra}')
        train(load_train_config(toml, ["train.steps=2"]), progress=False)
        grids[name] = (tmp_path / name / "samples" / "step000002.png").read_bytes()
    assert grids["plain"] == grids["swap"]


def test_too_many_swapped_blocks_is_refused_before_data_caching(tmp_path, tiny_dev_dir, sk_images):
    """blocks_to_swap above the checkpoint's blocks: one error naming the range, and no latent was cached."""
    from dev2pro.errors import UserError
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    cfg = load_train_config(_train_toml(tmp_path, tiny_dev_dir, sk_images, "too-many", "blocks_to_swap = 999"))
    with pytest.raises(UserError, match=r"blocks_to_swap = 999 \(model.blocks_to_swap, or sample's --blocks-to-swap\): "
                                        r"this model has \d+ blocks; use 0\.\.\d+"):
        train(cfg, progress=False)
    cache = tmp_path / "cache"  # this test's own cache folder
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
