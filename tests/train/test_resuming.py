"""The torch-free parts of a resume: which settings changed, what changed in the dataset, a copied run's hint."""

from pathlib import Path

import pytest

from dev2pro.errors import UserError
from dev2pro.train.datacheck import DataCheck, describe_change, resume_sampler
from dev2pro.train.resuming import config_changes, copied_run_hint, keep_final_lora


def test_config_changes_lists_flattened_keys_and_ignores_path_spelling(tmp_path):
    old = f'[train]\nlr = 0.001\nsteps = 20\n[save]\noutput_dir = "{tmp_path}/runs/x"\noverwrite = false\n' \
          f'[[data.folders]]\npath = "{tmp_path}/data"\n'
    new = f'[train]\nlr = 0.01\nsteps = 20\nschedule = "cosine"\n[save]\noutput_dir = "{tmp_path}/runs/../runs/x"\n' \
          f'overwrite = true\n[[data.folders]]\npath = "{tmp_path}/data2"\n'
    assert config_changes(old, new) == [f'data.folders[0].path "{tmp_path}/data" -> "{tmp_path}/data2"',
                                        'train.lr 0.001 -> 0.01', 'train.schedule (unset) -> "cosine"']


def test_describe_change_counts_added_removed_captions_and_order():
    was = ["a:t1:1:1", "b:t2:1:1", "c:t3:1:1"]
    assert describe_change(was, was) == ""
    assert describe_change(was, ["a:t1:1:1", "b:tX:1:1", "d:t4:1:1", "e:t5:1:1"]) == \
        "2 added, 1 removed, 1 caption(s) changed"
    assert describe_change(was, ["a:t1:2:1", "b:t2:1:1", "c:t3:1:1"]) == "1 with other repeats or loss weight"
    assert describe_change(was, list(reversed(was))) == "the same items in another order (files renamed or moved?)"


class _Sampler:
    num_indices = 5

    def load_state_dict(self, state):
        self.loaded = state


def test_an_old_state_without_a_fingerprint_keeps_the_count_check(tmp_path):
    progress = {"sampler": {"num_indices": 5, "epoch": 0, "position": 1, "seed": 0}}
    sampler = _Sampler()
    assert resume_sampler(tmp_path, progress, sampler, DataCheck(["a:b:1:1"]), 3) == ""
    assert sampler.loaded is progress["sampler"]
    progress["sampler"]["num_indices"] = 4
    with pytest.raises(UserError, match="its item count differs; 4 items with repeats then, 5 now.*"
                                        "--resume-changed-data"):
        resume_sampler(tmp_path, progress, sampler, DataCheck(["a:b:1:1"]), 3)


def test_keep_final_lora_keeps_only_a_final_of_another_step(tmp_path):
    import json
    import struct

    def lora(path: Path, steps: int):
        header = json.dumps({"__metadata__": {"ss_steps": str(steps)}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header)

    lora(tmp_path / "x.safetensors", 20)
    lora(tmp_path / "x.comfy.safetensors", 20)
    said = []
    assert keep_final_lora(tmp_path, "x", 20, said.append) == [] and not said  # same step: a rerun of it
    kept = keep_final_lora(tmp_path, "x", 30, said.append)
    assert kept == [tmp_path / "x-step000020.safetensors", tmp_path / "x-step000020.comfy.safetensors"]
    assert kept[0].read_bytes() == (tmp_path / "x.safetensors").read_bytes() and len(said) == 1
    assert keep_final_lora(tmp_path, "x", 40, said.append) == []  # kept already: never replaced


def test_copied_run_hint_only_for_a_config_inside_another_run_with_states(tmp_path):
    copy = tmp_path / "copy"
    (copy / "state" / "step-000004").mkdir(parents=True)
    (copy / "config.toml").write_text("")
    msg = f"nothing to resume: {tmp_path / 'orig'} holds no run; run the same command without --resume to start it"
    assert copied_run_hint(msg, str(copy / "config.toml"), "train") == msg  # no complete state in it
    (copy / "state" / "step-000004" / "common.json").write_text("{}")
    hinted = copied_run_hint(msg, str(copy / "config.toml"), "train")
    assert hinted.startswith(msg) and f"pass --resume {copy}" in hinted and "save.output_dir" in hinted
    assert copied_run_hint("other error", str(copy / "config.toml"), "train") == "other error"
    own = f"nothing to resume: {copy} holds no run"
    assert copied_run_hint(own, str(copy / "config.toml"), "train") == own
