"""objectives: the three losses against hand computations, and ``draw`` (one order of random draws, rank slices)."""

import pytest
import torch

from dev2pro.flux.checkpoint import load_transformer
from dev2pro.flux.latents import pack
from dev2pro.objectives import (Noised, cfg_teacher_objective, draw, flow_objective, guidance_distill_objective,
                                objective_loss)
from dev2pro.train.model import with_guidance_embedding


def _fixed_batch():
    """(x0, noise, sigmas, w, text, empty) for the hand computations: batch 2, 8x8 latents, 8 text tokens."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sig, ws = torch.tensor([0.3, 0.8]), torch.tensor([1.5, 3.5])
    text = {"prompt_embeds": torch.randn(2, 8, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    empty = {"prompt_embeds": torch.randn(8, 32, generator=g), "pooled": torch.randn(32, generator=g)}
    return x0, noise, sig, ws, text, empty


def _run(model, x0, noise, sig, pe, pooled, guidance):
    """The transformer on the flow-matching input at ``sig``, written out without ``objectives.predict``."""
    from dev2pro.flux.latents import image_ids, pack, text_ids

    s = sig.view(-1, 1, 1, 1)
    return model(hidden_states=pack((1 - s) * x0 + s * noise), timestep=sig, guidance=guidance,
                 pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=text_ids(pe.shape[1]),
                 img_ids=image_ids(*x0.shape[-2:]), return_dict=False)[0]


def test_cfg_teacher_loss_matches_hand_computation(tiny_dev_dir):
    student, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    teacher, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    with torch.no_grad():  # make student and teacher differ
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x0, noise, sig, ws, text, empty = _fixed_batch()
    b = 2
    batch = Noised(x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
    loss, parts = cfg_teacher_objective(student, teacher, batch, empty, 0.5, "cpu", torch.float32, torch.float32)

    with torch.no_grad():
        c = _run(student, x0, noise, sig, text["prompt_embeds"], text["pooled"], torch.ones(b))
        u = _run(student, x0, noise, sig, empty["prompt_embeds"].expand(b, 8, 32), empty["pooled"].expand(b, 32),
                 torch.ones(b))
        t = _run(teacher, x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
    guided = u + ws.view(b, 1, 1) * (c - u)
    distill = ((guided - t) ** 2).mean()
    flow = ((c - pack(noise - x0)) ** 2).mean()
    assert parts["loss/distill"].item() == pytest.approx(distill.item(), rel=1e-5)
    assert loss.item() == pytest.approx((distill + 0.5 * flow).item(), rel=1e-5)


def test_guidance_distill_loss_matches_hand_computation(tiny_pro_dir):
    """Meng et al. Alg. 1: the student at guidance w regresses onto the teacher's u + w (c - u)."""
    teacher, _ = load_transformer(tiny_pro_dir, dtype=torch.float32)
    student = with_guidance_embedding(teacher)
    x0, noise, sig, ws, text, empty = _fixed_batch()
    b = 2

    with torch.no_grad():
        c = _run(teacher, x0, noise, sig, text["prompt_embeds"], text["pooled"], None)
        u = _run(teacher, x0, noise, sig, empty["prompt_embeds"].expand(b, 8, 32), empty["pooled"].expand(b, 32),
                 None)
        # the grown embedding adds nothing yet: the student equals the teacher at any guidance
        s = _run(student, x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
        assert torch.allclose(s, c, atol=1e-6)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        s = _run(student, x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
    batch = Noised(x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
    loss, parts = guidance_distill_objective(student, teacher, batch, empty, "cpu", torch.float32, torch.float32)
    expected = ((s - (u + ws.view(b, 1, 1) * (c - u))) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["loss/distill"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_flow_objective_is_the_flow_matching_mse_at_the_given_guidance(tiny_dev_dir):
    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    x0, noise, sig, ws, text, _ = _fixed_batch()
    batch = Noised(x0, noise, sig, text["prompt_embeds"], text["pooled"], ws)
    for g in (1.0, 3.5):
        loss, parts = flow_objective(model, batch, g, "cpu", torch.float32)
        with torch.no_grad():
            v = _run(model, x0, noise, sig, text["prompt_embeds"], text["pooled"], torch.full((2,), g))
        assert loss.item() == pytest.approx(((v - pack(noise - x0)) ** 2).mean().item(), rel=1e-6)
        assert parts["loss/flow"].item() == loss.item()
    one, _ = objective_loss("flow", model, None, batch, {}, "cpu", torch.float32)
    three, _ = flow_objective(model, batch, 3.5, "cpu", torch.float32)
    assert one.item() != three.item()  # the guidance input reaches the model
    with pytest.raises(ValueError, match="unknown objective"):
        objective_loss("nope", model, None, batch, {}, "cpu", torch.float32)


def _items(n: int) -> dict:
    """A collated batch whose rows are recognisable: row i holds the value i + 1 everywhere."""
    v = torch.arange(1, n + 1, dtype=torch.float32)
    return {"latents": v.view(n, 1, 1, 1).expand(n, 16, 4, 6).clone(),
            "prompt_embeds": v.view(n, 1, 1).expand(n, 5, 8).clone(), "pooled": v.view(n, 1).expand(n, 3).clone()}


DRAW = dict(timestep_sampling="sigmoid", sigmoid_scale=1.0, shift=3.0)
EMPTY = {"prompt_embeds": torch.zeros(5, 8), "pooled": torch.zeros(3)}


def test_caption_dropout_is_deterministic_and_at_the_right_rate():
    g = torch.Generator().manual_seed(5)
    batch = _items(64)
    outs = [draw(batch, g, dropout_p=0.25, empty=EMPTY, **DRAW) for _ in range(20)]
    dropped = torch.stack([o.pooled[:, 0] == 0 for o in outs])
    assert 0.2 < dropped.float().mean().item() < 0.3
    again = draw(batch, torch.Generator().manual_seed(5), dropout_p=0.25, empty=EMPTY, **DRAW)
    assert torch.equal(again.pooled, outs[0].pooled) and torch.equal(again.noise, outs[0].noise)
    o = outs[0]
    for i, d in enumerate(dropped[0].tolist()):
        assert o.pooled[i].eq(0.0 if d else i + 1).all() and o.prompt_embeds[i].eq(0.0 if d else i + 1).all()
        assert o.x0[i].eq(i + 1).all()  # latents are never dropped
    assert (draw(batch, g, dropout_p=0.999999, empty=EMPTY, **DRAW).pooled == 0).all()
    assert torch.equal(batch["pooled"][:, 0], torch.arange(1, 65, dtype=torch.float32))  # the input is not changed


def test_rank_slices_of_a_global_draw_are_the_one_process_draw():
    """Two ranks, each with its half of the global batch, draw what one process draws for the whole batch."""
    whole = draw(_items(4), torch.Generator().manual_seed(3), dropout_p=0.5, empty=EMPTY, w_range=(1.0, 5.0), **DRAW)
    full = _items(4)
    for rank in (0, 1):
        half = {k: v[2 * rank:2 * rank + 2] for k, v in full.items()}
        part = draw(half, torch.Generator().manual_seed(3), dropout_p=0.5, empty=EMPTY, w_range=(1.0, 5.0),
                    rank=rank, world=2, **DRAW)
        sl = slice(2 * rank, 2 * rank + 2)
        for name in ("x0", "noise", "sigmas", "prompt_embeds", "pooled", "w"):
            assert torch.equal(getattr(part, name), getattr(whole, name)[sl]), name
    assert ((whole.w >= 1.0) & (whole.w <= 5.0)).all() and whole.w.std() > 0
    plain = draw(_items(4), torch.Generator().manual_seed(3), dropout_p=0.0, empty=EMPTY, **DRAW)
    assert torch.equal(plain.w, torch.ones(4))
