"""Issue 18: ``--overwrite`` replaces only what the command itself writes (or an earlier run of it recorded in its
manifest), never a folder's foreign files -- checked for every command of the CLI's table that has the flag."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dev2pro import owned
from dev2pro.cli import build_parser, main
from dev2pro.errors import UserError
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from tiny_run import model_and_data

FOREIGN = b"my holiday notes\n\x00\xff"


def commands_with_overwrite(parser=None, prefix=()):
    """Every (sub)command name (``lora merge``) whose parser has ``--overwrite``, read off argparse."""
    parser = parser or build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if "--overwrite" in sub._option_string_actions:
                    found.append(" ".join((*prefix, name)))
                found += commands_with_overwrite(sub, (*prefix, name))
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dev_dir, sk_images):
    d = tmp_path_factory.mktemp("overwrite-inputs")
    base = d / "base.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(build_transformer(TINY, seed=0).state_dict()).items()},
              str(base))
    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(torch.randn(4, 64, generator=g) * 0.05,
                                                                   torch.randn(64, 4, generator=g) * 0.05, 4.0)})
    tuned = d / "tuned.safetensors"
    state = {k: v.contiguous() for k, v in diffusers_to_bfl(build_transformer(TINY, seed=1).state_dict()).items()}
    save_file(state, str(tuned))
    lora = save_lora(lw, d / "lora.safetensors", "kohya")
    images = d / "images"
    images.mkdir()
    shutil.copy(sk_images / "coffee.png", images / "coffee.png")
    train = model_and_data(tiny_dev_dir, images, d / "cache") + '\n[train]\nsteps = 1\nmixed_precision = "no"\n'
    run_cfg, dd_cfg = d / "train.toml", d / "dedistill.toml"
    run_cfg.write_text(train)
    dd_cfg.write_text('objective = "flow"\n' + train)
    cmp_cfg = d / "compare.toml"
    cmp_cfg.write_text(f'model = "{tiny_dev_dir}"\nprompts = ["a cat"]\nseeds = [0]\nsteps = 1\nsize = "32x32"\n'
                       f'[[arms]]\nname = "dev"\n')
    return dict(base=base, tuned=tuned, lora=lora, images=images, train=run_cfg, dedistill=dd_cfg, compare=cmp_cfg,
                model=tiny_dev_dir)


def argv_for(command, out, i, tmp_path):
    """The command line of ``command`` with ``out`` as its output (a folder holding a foreign file)."""
    cases = {
        "init-tiny": ["init-tiny", out],
        "convert": ["convert", i["base"], out, "--layout", "diffusers"],
        "train": ["train", i["train"], "--set", f"save.output_dir={out}", "--no-progress"],
        "dedistill": ["dedistill", i["dedistill"], "--set", f"save.output_dir={out}", "--no-progress"],
        "sample": ["sample", "--model", i["model"], "--prompt", "a cat", "--steps", "1", "--size", "32x32",
                   "--out", out],
        "compare": ["compare", i["compare"], "--out", out],
        "lora convert": ["lora", "convert", i["lora"], out, "--layout", "comfy"],
        "lora merge": ["lora", "merge", "--base", i["base"], "--lora", i["lora"], out],
        "lora extract": ["lora", "extract", "--base", i["base"], "--tuned", i["tuned"], out, "--rank", "2"],
        "demo": ["demo", "--quick", "--out", out, "--no-progress"],
        "init-tiny-captioner": ["init-tiny-captioner", out, "--family", "blip"],
        # caption writes NAME.txt beside each image of its folder (its input): other files are never touched
        "caption": ["caption", out, "--model", tmp_path / "captioner", "--max-length", "4"],
    }
    assert command in cases, f"add a case for `dev2pro {command}`: it has --overwrite"
    return [str(a) for a in cases[command]] + ["--overwrite"]


@pytest.mark.parametrize("command", commands_with_overwrite())
def test_overwrite_never_deletes_a_foreign_file(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(FOREIGN)
    (out / "photos").mkdir()
    (out / "photos" / "me.jpg").write_bytes(FOREIGN)
    if command == "caption":
        from dev2pro.caption_tiny import write_tiny_captioner
        write_tiny_captioner(tmp_path / "captioner", "blip")
        shutil.copy(inputs["images"] / "coffee.png", out / "coffee.png")
    code = main(argv_for(command, out, inputs, tmp_path))
    err = capsys.readouterr().err
    assert (out / "notes.txt").read_bytes() == FOREIGN and (out / "photos" / "me.jpg").read_bytes() == FOREIGN
    if command == "caption":
        assert code == 0 and (out / "coffee.txt").read_text().strip(), err
        return
    assert code == 2 and "Traceback" not in err, err
    assert "notes.txt" in err or "is a folder, and a file cannot replace it" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"]


def test_the_table_is_read_off_the_parsers():
    found = commands_with_overwrite()
    assert {"sample", "compare", "convert", "lora merge", "train", "dedistill", "demo"} <= set(found), found


# ------------------------------------------------------------------------------------------------ the rule itself
def test_foreign_entries_are_listed_and_owned_folders_kept_whole(tmp_path):
    from dev2pro.outputs import foreign_entries

    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "000-x-s0.png").write_bytes(b"")
    (tmp_path / "images" / "mine.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "anything").write_bytes(b"")
    assert foreign_entries(tmp_path, ["images/a/000-x-s0.png", "vae"]) == ["empty/", "images/mine.png"]


def test_a_rerun_replaces_what_the_earlier_run_recorded(tmp_path):
    out = tmp_path / "out"
    with owned.owned_folder(out, False, "sample", ["000-a-s0.png"]) as tmp:
        (tmp / "000-a-s0.png").write_bytes(b"first")
    assert json.loads((out / owned.MANIFEST).read_text()) == {"command": "sample", "files": ["000-a-s0.png"]}
    # other prompts, other names: the earlier run's file is vouched for by the manifest
    with owned.owned_folder(out, True, "sample", ["000-b-s0.png"]) as tmp:
        (tmp / "000-b-s0.png").write_bytes(b"second")
    assert sorted(p.name for p in out.iterdir()) == [owned.MANIFEST, "000-b-s0.png"]
    # another command's manifest vouches for nothing
    with pytest.raises(UserError, match=r"would delete 000-b-s0.png, which this command does not write"):
        with owned.owned_folder(out, True, "compare", ["results.json"]) as tmp:
            pass
    # a file that appears while the command runs is foreign too: refused before the rename
    with pytest.raises(UserError, match="would delete late.txt"):
        with owned.owned_folder(out, True, "sample", ["000-b-s0.png"]) as tmp:
            (tmp / "000-b-s0.png").write_bytes(b"third")
            (out / "late.txt").write_bytes(FOREIGN)
    assert (out / "000-b-s0.png").read_bytes() == b"second" and (out / "late.txt").read_bytes() == FOREIGN


def test_a_damaged_manifest_vouches_for_nothing(tmp_path):
    (tmp_path / owned.MANIFEST).write_text("{not json")
    (tmp_path / "000-a-s0.png").write_bytes(b"x")
    assert owned.recorded(tmp_path, "sample") == []
    with pytest.raises(UserError, match="would delete 000-a-s0.png"):
        owned.check_owned_folder(tmp_path, True, "sample", ["grid.png"])


def test_reruns_with_overwrite_replace_the_commands_own_earlier_output(inputs, tmp_path, capsys):
    """Each folder writer, run twice with other settings: the second run replaces what the first wrote (its
    manifest vouches for it), and only that."""
    out = tmp_path / "samples"
    base = ["sample", "--model", str(inputs["model"]), "--steps", "1", "--size", "32x32", "--out", str(out)]
    assert main(base + ["--prompt", "a cat", "--seeds", "1,2"]) == 0
    assert main(base + ["--prompt", "a dog", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [owned.MANIFEST, "000-a-dog-s0.png"]
    cmp = tmp_path / "compare"
    assert main(["compare", str(inputs["compare"]), "--out", str(cmp)]) == 0
    assert main(["compare", str(inputs["compare"]), "--out", str(cmp), "--set", 'prompts=["a dog"]',
                 "--overwrite"]) == 0
    assert sorted(owned.files_under(cmp)) == ["compare.png", "images/dev/000-a-dog-s0.png", "report.html",
                                              "results.json"]
    cap = tmp_path / "captioner"
    assert main(["init-tiny-captioner", str(cap), "--family", "blip"]) == 0
    assert main(["init-tiny-captioner", str(cap), "--family", "blip", "--seed", "1", "--overwrite"]) == 0
    assert json.loads((cap / owned.MANIFEST).read_text())["command"] == "init-tiny-captioner"
    capsys.readouterr()
