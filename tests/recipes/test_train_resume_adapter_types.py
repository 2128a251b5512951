"""`dev2pro train --resume` of a LoKr / LoHa / DoRA run whose adapter is set up differently now (rank, type, LoKr's
factoring): the one line of ``state.check_same_lora`` naming the setting to keep -- not peft's first missing or
mis-shaped tensor (LoKr and LoHa pieces are ``lokr_w*`` / ``hada_w*``, not ``lora_A``) -- and the same settings
resume."""

import pytest

from dev2pro.errors import UserError
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from dev2pro.train.state import adapter_facts, saved_shapes
from tiny_run import lora_run_toml

TAIL = "to resume it, or start a new run (without --resume, in another save.output_dir)"


def _saved_run(tmp_path, tiny_dev_dir, sk_images, kind):
    """Two steps of a rank-4 ``kind`` run with a state at step 2; (config path, state folder)."""
    toml = lora_run_toml(tmp_path, tiny_dev_dir, sk_images, "run", steps=2, seed=3, rank=4, lora=f'type = "{kind}"',
                         save="every = 2")
    train(load_train_config(toml), progress=False, quiet=True)
    state = tmp_path / "run" / "state" / "step-000002"
    assert state.is_dir()
    return toml, state


def _refused(toml, overrides):
    with pytest.raises(UserError) as e:
        train(load_train_config(toml, ["train.steps=4", *overrides]), resume="latest", progress=False, quiet=True)
    return str(e.value)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_resume_with_another_rank_says_keep_the_rank(kind, tmp_path, tiny_dev_dir, sk_images):
    toml, state = _saved_run(tmp_path, tiny_dev_dir, sk_images, kind)
    kinds, ranks, _ = adapter_facts(saved_shapes(state))
    assert kinds == {kind} and ranks == {4}  # the saved pieces are peft's lokr_* / hada_*, rank read off them
    for other in (8, 2):  # rank 8: no LoKr side of the tiny model is factored any more (its rank is in no shape)
        assert _refused(toml, [f"lora.rank={other}", f"lora.alpha={other}"]) == (
            f"{state}: the LoRA's rank differs from the saved run's (rank 4 saved, {other} now): keep lora.rank = 4 "
            + TAIL)
    resumed = train(load_train_config(toml, ["train.steps=4"]), resume="latest", progress=False, quiet=True)
    assert resumed["steps"] == 4 and resumed["session_steps"] == 2


def test_resume_with_another_adapter_type_or_lokr_factoring_says_which(tmp_path, tiny_dev_dir, sk_images):
    toml, state = _saved_run(tmp_path, tiny_dev_dir, sk_images, "lokr")
    assert _refused(toml, ['lora.type="loha"']) == (
        f'{state}: the LoRA\'s type differs from the saved run\'s (lokr saved, loha now): keep lora.type = "lokr" '
        + TAIL)
    assert _refused(toml, ['lora.type="dora"']).startswith(
        f"{state}: the LoRA's type differs from the saved run's (lokr saved, dora now)")
    msg = _refused(toml, ["lora.lokr_decompose_both=true"])  # same rank, the other Kronecker factor factored too
    assert msg.startswith(f"{state}: the LoRA's factoring differs from the saved run's (")
    assert "saved as lokr_w1 " in msg and ", now lokr_w1_a " in msg, msg
    assert msg.endswith("keep the saved run's lora.rank, lora.lokr_factor and lora.lokr_decompose_both " + TAIL)
    assert "\n" not in msg


def test_resume_a_dora_run_as_plain_lora_says_the_type(tmp_path, tiny_dev_dir, sk_images):
    toml, state = _saved_run(tmp_path, tiny_dev_dir, sk_images, "dora")
    assert _refused(toml, ['lora.type="lora"']) == (
        f'{state}: the LoRA\'s type differs from the saved run\'s (dora saved, lora now): keep lora.type = "dora" '
        + TAIL)
    assert _refused(toml, ["lora.rank=8", "lora.alpha=8"]) == (
        f"{state}: the LoRA's rank differs from the saved run's (rank 4 saved, 8 now): keep lora.rank = 4 " + TAIL)
