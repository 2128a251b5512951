"""train.export: what a run leaves (LoRA files, exported models) and the weights that go into them."""

import torch

from dev2pro.flux.checkpoint import load_transformer
from dev2pro.train.ema import EMA
from dev2pro.train.export import final_weights


def test_export_holds_the_ema_weights(tiny_dev_dir):
    """The gathered export state is a copy: swapping the raw weights back must not change it (it once aliased them,
    so single-process runs exported the raw weights instead of the EMA)."""
    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    ema = EMA(model.requires_grad_(True).parameters(), 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    state = final_weights(model, ema, torch.float32, rank=0)
    names = [n for n, _ in model.named_parameters()]
    assert all(torch.equal(state[n], s) for n, s in zip(names, ema.shadow))
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())  # the raw weights are back
