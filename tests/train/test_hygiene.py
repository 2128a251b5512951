"""Host-side hygiene of the real step (train/loop.step_loss): one device read per step, the batch moved before the
forward, cache reads in a loader thread -- and the same numbers as reading everything in the training thread."""

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch

from dev2pro.data.loader import LoadedBatch, prefetch_batches
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.targets import target_modules
from dev2pro.objectives import draw
from dev2pro.train.loop import Draws, Objective, Optimization, step_loss
from dev2pro.train.model import add_lora


class _Accelerator:
    device = torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def backward(self, loss):
        loss.backward()

    def reduce(self, t, how):
        return t

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _items(n=6):
    g = torch.Generator().manual_seed(1)
    return [{"latents": torch.randn(16, 8, 8, generator=g), "prompt_embeds": torch.randn(5, 32, generator=g),
             "pooled": torch.randn(32, generator=g), "caption": f"c{i}"} for i in range(n)]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_transformer(TINY.with_(guidance_embeds=True), seed=0)
    params = add_lora(model, target_modules("attention", TINY.num_double, TINY.num_single), 4, 4.0)
    opt = torch.optim.AdamW(params, lr=1e-3)
    return Optimization(model, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), grad_accum=2,
                        max_grad_norm=1.0)


def _step(batches, items):
    opt = _setup()
    data = SimpleNamespace(dataset=items, empty={"prompt_embeds": torch.zeros(5, 32), "pooled": torch.zeros(32)})
    draws = Draws(caption_dropout=0.3, timestep_sampling="sigmoid", sigmoid_scale=1.0, shift=3.0)
    gen = torch.Generator().manual_seed(7)
    out = [step_loss(opt, Objective(), draws, data, batches, gen, _Accelerator(), torch.float32) for _ in range(2)]
    return out, [p.grad.clone() for p in opt.params]


def test_one_device_read_per_step_and_the_same_numbers_with_prefetch(monkeypatch):
    items = _items()
    order = [[0, 1], [2, 3], [4, 5], [1, 2]]
    ref, ref_grads = _step(iter(order), items)  # indices: items read in the training thread
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a per-value .item() sync in the step"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or real_tolist(self))
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("a float() sync") or real_float(self))
    got, grads = _step(prefetch_batches(iter(order), items, depth=2), items)
    # per step: 2 micro-batch losses + 2 x "loss/flow" + the grad norm, in one read (draw's caption-dropout
    # tolist is a CPU tensor, read before anything is on the device)
    assert reads.count(5) == 2
    assert got == ref and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    (loss, logged) = got[0]
    assert set(logged) == {"loss/flow", "grad_norm"} and logged["loss/flow"] == loss and loss > 0


def test_noised_to_moves_every_tensor_and_builds_the_target_there():
    batch = {k: torch.stack([it[k] for it in _items(2)]) for k in ("latents", "prompt_embeds", "pooled")}
    g = torch.Generator().manual_seed(0)
    noised = draw(batch, g, dropout_p=0.0, empty={}, timestep_sampling="sigmoid", sigmoid_scale=1.0, shift=3.0)
    noised.weights, noised.mask, noised.control = torch.ones(2), torch.ones(2, 1, 8, 8), torch.ones(2, 16, 8, 8)
    moved = noised.to(torch.device("meta"))  # a device that is not the CPU, without a GPU
    for f in dataclasses.fields(noised):  # every field, those added later included
        assert getattr(moved, f.name).device.type == "meta", f.name
    assert moved.target.device.type == "meta" and moved.x_t.shape == noised.x_t.shape


def test_prefetch_order_rank_slice_errors_and_close():
    loaded = []

    class Items:
        def __getitem__(self, i):
            loaded.append(i)
            if i == 99:
                raise OSError("cache file vanished")
            return i * 10

    got = prefetch_batches(iter([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 98]]), Items(), rank=1, world=2, depth=1)
    assert [next(got).items, next(got).items] == [[20, 30], [60, 70]]  # rank 1 keeps the second half, in order
    assert 0 not in loaded and 4 not in loaded  # other ranks' items are never read
    with pytest.raises(OSError, match="vanished"):
        next(got)
    endless = prefetch_batches(iter(lambda: [0], None), Items(), depth=1)
    assert isinstance(next(endless), LoadedBatch)
    endless.close()  # returns once the thread has ended: nothing is left to die at interpreter exit
    assert not endless.thread.is_alive()
    assert not any(t.name == "dev2pro-prefetch" for t in threading.enumerate())


def test_train_leaves_no_loader_thread(tmp_path, tiny_dev_dir, sk_images):
    """`train` joins its loader thread before it returns (or raises): a daemon thread caught inside a read at
    interpreter exit aborted a Ctrl-C'd run with "terminate called without an active exception" (exit -6)."""
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config
    from tiny_run import lora_run_toml

    train(load_train_config(lora_run_toml(tmp_path, tiny_dev_dir, sk_images, "run", steps=2, seed=0)), progress=False)
    assert not any(t.name == "dev2pro-prefetch" for t in threading.enumerate())

