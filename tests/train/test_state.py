"""train.state: the one training-state format (train and dedistill), its pieces, and exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.data.loader import BucketBatchSampler
from dev2pro.errors import UserError
from dev2pro.train.ema import EMA
from dev2pro.train.optim import build_optimizer, build_scheduler
from dev2pro.train.state import (STATE_FORMAT, check_same_lora, configured_rank, latest_state, list_states,
                                 load_sharded_tensors, restore_training_state, save_training_state)


class Tiny(torch.nn.Module):
    """Two trained weights and a frozen one (a LoRA beside its base)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(6, 4, generator=g))
        self.b = torch.nn.Parameter(torch.randn(4, generator=g))
        self.frozen = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)

    def forward(self, x):
        return (x @ self.a.T).tanh().sum(-1) + self.b.sum() + self.frozen.sum()


def _run(model, steps, optimizer, scheduler, ema, gen, sampler, start=0, losses=None):
    """A small loop drawing from the generator and the sampler, like the recipes' loops."""
    losses = [] if losses is None else losses
    batches = iter(sampler)
    for _ in range(start, steps):
        try:
            idx = next(batches)
        except StopIteration:
            batches = iter(sampler)
            idx = next(batches)
        x = torch.randn(len(idx), 4, generator=gen) + torch.tensor(idx, dtype=torch.float32)[:, None]
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        losses.append(loss.item())
    return losses


def _setup(seed=0, with_ema=True):
    model = Tiny(0)  # the same frozen base in every process; ``seed`` changes the trained weights' start
    with torch.no_grad():
        for p in (model.a, model.b):
            p.add_(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, "adamw", 1e-2, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, 2, 10, "cosine")
    ema = EMA(trainable, 0.9) if with_ema else None
    return model, optimizer, scheduler, ema, torch.Generator().manual_seed(7), BucketBatchSampler([(1, 1)] * 5, 2,
                                                                                                   seed=3)


@pytest.mark.parametrize("with_ema", [True, False])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, with_ema):
    ref = _setup(with_ema=with_ema)
    ref_losses = _run(ref[0], 10, *ref[1:])
    model, optimizer, scheduler, ema, gen, sampler = _setup(with_ema=with_ema)
    losses = _run(model, 4, optimizer, scheduler, ema, gen, sampler)
    state = save_training_state(tmp_path / "state", 4, model, optimizer, scheduler, gen, sampler, smoothed=0.5,
                                grad_accum=1, keep_last=2, losses=losses, ema=ema)
    assert state == latest_state(tmp_path / "state") and state.name == "step-000004"
    # a fresh process: other initial weights, fresh optimizer, generator and sampler
    model2, optimizer2, scheduler2, ema2, gen2, sampler2 = _setup(seed=99, with_ema=with_ema)
    r = restore_training_state("latest", tmp_path / "state", model2, optimizer2, scheduler2, gen2, sampler2, ema2)
    assert (r.step, r.smoothed, r.folder, r.losses) == (4, 0.5, state, losses)
    assert not any(k.startswith("model/frozen") for k in load_file(str(state / "rank-00000-of-00001.safetensors")))
    rest = _run(model2, 10, optimizer2, scheduler2, ema2, gen2, sampler2, start=4)
    assert losses + rest == ref_losses
    assert torch.equal(model2.a, ref[0].a) and torch.equal(model2.b, ref[0].b)
    if with_ema:
        assert all(torch.equal(x, y) for x, y in zip(ema2.shadow, ref[3].shadow))


def test_states_are_pruned_and_json_holds_no_pickle(tmp_path):
    model, optimizer, scheduler, ema, gen, sampler = _setup()
    for step in (2, 4, 6):
        _run(model, 1, optimizer, scheduler, ema, gen, sampler)
        save_training_state(tmp_path, step, model, optimizer, scheduler, gen, sampler, smoothed=None, grad_accum=1,
                            keep_last=2)
    assert [p.name for p in list_states(tmp_path)] == ["step-000004", "step-000006"]
    folder = latest_state(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["common.json", "common.safetensors",
                                                         "rank-00000-of-00001.safetensors"]
    common = json.loads((folder / "common.json").read_text())
    assert common["format"] == STATE_FORMAT and common["step"] == 6
    assert common["state"]["__dict__"][0][0] == "optimizer"


def test_a_state_of_another_model_or_an_older_format_is_refused(tmp_path):
    model, optimizer, scheduler, ema, gen, sampler = _setup()
    _run(model, 1, optimizer, scheduler, ema, gen, sampler)
    save_training_state(tmp_path, 1, model, optimizer, scheduler, gen, sampler, smoothed=None, grad_accum=1,
                        keep_last=1)
    wide = Tiny(0)
    wide.a = torch.nn.Parameter(torch.zeros(7, 4))
    opt = build_optimizer([wide.a, wide.b], "adamw", 1e-2)
    with pytest.raises(UserError, match=r"model/a was saved with shape \[6, 4\]"):
        restore_training_state("latest", tmp_path, wide, opt, build_scheduler(opt, 0, 10, "constant"), gen, sampler)
    with pytest.raises(UserError, match="nothing to resume"):
        restore_training_state("latest", tmp_path / "none", model, optimizer, scheduler, gen, sampler)
    old = tmp_path / "old" / "step-000004"
    old.mkdir(parents=True)
    (old / "progress.json").write_text("{}")
    with pytest.raises(UserError, match="older dev2pro"):
        restore_training_state(str(old), tmp_path, model, optimizer, scheduler, gen, sampler)


def test_pieces_from_any_number_of_rank_files_fill_any_target(tmp_path):
    """Rows saved by two ranks ([0, 3) and [3, 5)) load into one whole tensor; a missing piece is named."""
    full = torch.arange(20, dtype=torch.float32).view(5, 4)
    for rank, (lo, hi) in enumerate([(0, 3), (3, 5)]):
        save_file({"model/w": full[lo:hi].contiguous()}, str(tmp_path / f"rank-{rank:05d}-of-00002.safetensors"),
                  {"format": STATE_FORMAT, "pieces": json.dumps({"model/w": [lo, [5, 4]]})})
    target = torch.zeros(5, 4)
    load_sharded_tensors(tmp_path, {"model/w": target})
    assert torch.equal(target, full)
    (tmp_path / "rank-00001-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"rows 0\.\.5 of model/w are not all saved"):
        load_sharded_tensors(tmp_path, {"model/w": torch.zeros(5, 4)})
    with pytest.raises(UserError, match="has no model/other"):
        load_sharded_tensors(tmp_path, {"model/other": torch.zeros(1)})


def test_resume_from_a_pruned_state_lists_the_saved_ones(tmp_path):
    """A state save.keep_last deleted: said so, with the run's newest states and --resume latest."""
    model, optimizer, scheduler, ema, gen, sampler = _setup()
    for step in (2, 4, 6, 8, 10):
        _run(model, 1, optimizer, scheduler, ema, gen, sampler)
        save_training_state(tmp_path, step, model, optimizer, scheduler, gen, sampler, smoothed=None, grad_accum=1,
                            keep_last=4)
    gone = tmp_path / "step-000002"
    with pytest.raises(UserError) as e:
        restore_training_state(str(gone), tmp_path, model, optimizer, scheduler, gen, sampler, ema)
    newest = ", ".join(str(tmp_path / f"step-{s:06d}") for s in (10, 8, 6))
    assert str(e.value) == (f"--resume {gone}: no such state (save.keep_last keeps only the newest ones); the saved "
                            f"states of this run, newest first: {newest} (and 1 older); pass one of them, or "
                            f"--resume latest for the newest")
    # the states listed are those beside the pruned one, whatever this run's state folder is
    with pytest.raises(UserError, match=r"no such state \(save.keep_last .*newest first: .*step-000010"):
        restore_training_state(str(gone), tmp_path / "empty", model, optimizer, scheduler, gen, sampler, ema)
    emptied = tmp_path / "run" / "state"
    (emptied / "step-000004").mkdir(parents=True)  # a save cut short: not usable
    with pytest.raises(UserError, match=f"no such state .*; {emptied} holds no usable state: run the same command "
                                        "without --resume"):
        restore_training_state(str(emptied / "step-000002"), tmp_path, model, optimizer, scheduler, gen, sampler,
                               ema)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="not a state folder"):
        restore_training_state(str(tmp_path / "a-file"), tmp_path, model, optimizer, scheduler, gen, sampler, ema)


def test_resume_of_a_path_that_does_not_exist_says_so(tmp_path):
    """Not a pruned state: no save.keep_last hint, just that it is not there and what --resume takes."""
    model, optimizer, scheduler, ema, gen, sampler = _setup()
    for missing in (tmp_path / "no-such-run", tmp_path / "no-such-run" / "state" / "step-000002",
                    tmp_path / "step-000002"):  # a step name in a folder that holds no states
        with pytest.raises(UserError) as e:
            restore_training_state(str(missing), tmp_path, model, optimizer, scheduler, gen, sampler, ema)
        assert str(e.value) == (f"--resume {missing}: does not exist; pass a run folder (its newest state is "
                                "resumed), one of its states (RUN/state/step-NNNNNN), or --resume alone for the "
                                "newest state in save.output_dir")


def test_resume_of_a_run_folder_takes_its_newest_complete_state(tmp_path):
    """A run folder (or its state/) resumes from its newest complete state and says so; a folder that is neither
    a state nor a run, or a run without a complete state, is one line; a broken state folder keeps its message."""
    model, optimizer, scheduler, ema, gen, sampler = _setup()
    run = tmp_path / "run"
    for step in (2, 4):
        _run(model, 1, optimizer, scheduler, ema, gen, sampler)
        save_training_state(run / "state", step, model, optimizer, scheduler, gen, sampler, smoothed=None,
                            grad_accum=1, keep_last=0, ema=ema)
    (run / "state" / "step-000006").mkdir()  # a save cut short: skipped
    for given in (run, run / "state"):
        r = restore_training_state(str(given), tmp_path / "elsewhere", model, optimizer, scheduler, gen, sampler,
                                   ema)
        assert r.step == 4 and r.folder == run / "state" / "step-000004"
        newest = run / "state" / "step-000004"
        assert r.line() == f"resumed from step 4 ({newest}, the newest complete state in {given})"
    plain = restore_training_state(str(run / "state" / "step-000002"), tmp_path, model, optimizer, scheduler, gen,
                                   sampler, ema)
    assert plain.line() == f"resumed from step 2 ({run / 'state' / 'step-000002'})"
    with pytest.raises(UserError, match=r"step-000006 is not a complete training state \(common.json/common."
                                        r"safetensors missing\); resume from another step"):
        restore_training_state(str(run / "state" / "step-000006"), tmp_path, model, optimizer, scheduler, gen,
                               sampler, ema)
    (tmp_path / "photos").mkdir()
    with pytest.raises(UserError, match=r"photos: neither a training state \(RUN/state/step-NNNNNN\) nor a run "
                                        r"folder \(it has no state/ folder\)"):
        restore_training_state(str(tmp_path / "photos"), tmp_path, model, optimizer, scheduler, gen, sampler, ema)
    (tmp_path / "started" / "state").mkdir(parents=True)
    with pytest.raises(UserError, match=r"started: .*started/state holds no complete training state"):
        restore_training_state(str(tmp_path / "started"), tmp_path, model, optimizer, scheduler, gen, sampler, ema)


def test_check_same_lora_reads_peft_lokr_and_loha_pieces(tmp_path):
    """LoKr / LoHa pieces carry the rank in their ``_b`` rows; a LoKr factored nowhere shows none, so the live
    adapter's configured rank is what is compared, and a saved rank no shape shows is reported as the factoring."""
    def live(shapes):
        return {n: torch.zeros(s) for n, s in shapes.items()}

    lokr4 = {"model/b.to_q.lokr_w1.default": [8, 8], "model/b.to_q.lokr_w2_a.default": [8, 4],
             "model/b.to_q.lokr_w2_b.default": [4, 8]}
    lokr16 = {"model/b.to_q.lokr_w1.default": [8, 8], "model/b.to_q.lokr_w2.default": [8, 8]}
    loha = {f"model/b.to_q.hada_w{i}_{ab}.default": ([8, 4] if ab == "a" else [4, 8]) for i in (1, 2) for ab in "ab"}
    check_same_lora(tmp_path, lokr4, live(lokr4), rank=4)  # the same: nothing to say
    with pytest.raises(UserError, match=r"rank differs from the saved run's \(rank 4 saved, 16 now\): keep "
                                        r"lora.rank = 4 to resume"):
        check_same_lora(tmp_path, lokr4, live(lokr16), rank=16)
    with pytest.raises(UserError, match=r"factoring differs from the saved run's \(b.to_q saved as lokr_w1 8x8 \+ "
                                        r"lokr_w2 8x8, now lokr_w1 8x8 \+ lokr_w2_a 8x4 \+ lokr_w2_b 4x8\): keep the "
                                        r"saved run's lora.rank, lora.lokr_factor and lora.lokr_decompose_both"):
        check_same_lora(tmp_path, lokr16, live(lokr4), rank=4)
    with pytest.raises(UserError, match=r"type differs from the saved run's \(loha saved, lokr now\): keep "
                                        r'lora.type = "loha"'):
        check_same_lora(tmp_path, loha, live(lokr4), rank=4)
    loha8 = {n: [s[0], 8] if s[0] == 8 else [8, s[1]] for n, s in loha.items()}
    with pytest.raises(UserError, match=r"\(rank 4 saved, 8 now\)"):
        check_same_lora(tmp_path, loha, live(loha8))  # no live rank: read off the hada_w*_b rows
    check_same_lora(tmp_path, {"model/x.weight": [4, 4]}, live({"model/x.weight": [4, 8]}))  # full fine-tune: later


def test_configured_rank_is_the_trained_peft_adapters(tmp_path):
    from dev2pro.flux.spec import TINY, build_transformer
    from dev2pro.train.model import add_lora

    model = build_transformer(TINY, seed=0)
    params = add_lora(model, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"], 16, 16.0,
                      kind="lokr")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(params) and all(".lokr_w" in n for n in names)
    assert configured_rank(model, names) == 16
    assert configured_rank(model, ["transformer_blocks.0.attn.to_q.weight"]) is None  # a full fine-tune's names
