"""The `dev2pro` command line itself: lazy parsers, --version, help text, BrokenPipe, parent folders, lora flags."""

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import dev2pro
from dev2pro.cli import build_parser, main

SRC = str(Path(dev2pro.__file__).parent.parent)
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _subparsers(parser):
    """(name, parser) of every subcommand, nested ones (lora info, ...) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for child, subsub in _subparsers(sub):
                    yield f"{name} {child}", subsub


def test_parsers_build_without_torch():
    """`dev2pro --help` and every `dev2pro CMD --help` must not import torch (it made --help take 2.5-5 s)."""
    code = """
import contextlib, io, sys
from dev2pro.cli import build_parser
names = []
def walk(p, prefix):
    import argparse
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, s in a.choices.items():
                names.append(prefix + [n]); walk(s, prefix + [n])
walk(build_parser(), [])
for argv in [[]] + names:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv + ["--help"])
        except SystemExit:
            pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "safetensors") if m in sys.modules)
print(len(names), heavy)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    count, heavy = r.stdout.split(" ", 1)
    assert int(count) >= 13  # 10 top-level commands + lora's 4
    assert heavy.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dev2pro {dev2pro.__version__}"


def test_every_argument_of_every_subcommand_has_help():
    missing = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # hidden backwards-compatible aliases
                continue
            if not (action.help or "").strip():
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_light_choices_match_the_library():
    """The parsers take their choices from the torch-free ``choices`` module, as the libraries do; importing the
    CLI (parsers and config schemas) loads no torch."""
    import subprocess
    import sys

    from dev2pro import sampling
    from dev2pro.cli_commands import LORA_LAYOUTS, SAMPLE_MODES
    from dev2pro.flux import checkpoint
    from dev2pro.lora import formats

    assert SAMPLE_MODES == tuple(sampling.MODES)
    assert LORA_LAYOUTS == tuple(formats.WRITABLE)
    assert checkpoint.LAYOUTS == ("bfl", "comfy", "diffusers")
    code = "import sys, dev2pro.cli, dev2pro.schemas; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--print-config"], ["inspect", "--json", "TINY"]])
def test_closed_pipe_is_quiet(argv, request):
    """`dev2pro inspect --json | head` must not end in a BrokenPipeError traceback."""
    if "TINY" in argv:
        argv = [str(request.getfixturevalue("tiny_dev_dir")) if a == "TINY" else a for a in argv]
    p = subprocess.Popen([sys.executable, "-m", "dev2pro.cli", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()  # the reader is gone before the command writes anything (as `head` is after its lines)
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    p.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode == (0 if argv == ["--help"] else 141)  # argparse drops the error itself; we exit as SIGPIPE


def test_size_flag_validated_at_parse_time(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--out", "o", "--size", "big"])
    assert e.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    a = build_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--out", "o", "--size", "768x512"])
    assert a.size == (768, 512)
    with pytest.raises(SystemExit):  # calibrate renders too: the pipelines would round 100x72 down to 96x64
        build_parser().parse_args(["calibrate", "l", "--model", "m", "--target", "t", "--prompt", "p",
                                   "--size", "100x72"])
    assert "size 100x72: width and height must be multiples of 16; use 96x64 or 112x80" in capsys.readouterr().err


def test_huge_integers_are_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--out", "o",
                                   "--steps", str(2**63 - 1)])
    assert "at most" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance", "nan", "argument --guidance: nan is out of range: a finite number > 0"),
    ("--guidance", "inf", "argument --guidance: inf is out of range: a finite number > 0"),
    ("--guidance", "-1", "argument --guidance: -1 is out of range: a finite number > 0"),
    ("--guidance", "0", "argument --guidance: 0 is out of range: a finite number > 0"),
    ("--cfg", "nan", "argument --cfg: nan is out of range: a finite number >= 1"),
    ("--cfg", "0.5", "argument --cfg: 0.5 is out of range: a finite number >= 1"),
    ("--blocks-to-swap", "-2", "argument --blocks-to-swap: -2 is out of range: at least 0, at most 1000"),
])
def test_sample_guidance_nan_inf_and_negative_are_refused_at_parse_time(flag, value, message, capsys):
    """Issue 18.7: `sample --guidance nan` wrote a black PNG with exit 0."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--out", "o", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert build_parser().parse_args(["sample", "--model", "m", "--prompt", "p", "--out", "o",
                                      "--guidance", "1e-3"]).guidance == 1e-3


def test_guidance_is_checked_where_it_is_resolved_too():
    from dev2pro.errors import UserError
    from dev2pro.sampling import resolve_guidance

    for bad in (float("nan"), float("inf"), -3.5, 0.0):
        with pytest.raises(UserError, match=f"guidance {bad} must be a finite number > 0"):
            resolve_guidance(True, "auto", bad)
    with pytest.raises(UserError, match="true CFG scale nan must be a finite number >= 1"):
        resolve_guidance(True, "auto", 3.5, float("nan"))


def test_lora_flags_are_consistent():
    p = build_parser()
    a = p.parse_args(["lora", "convert", "a", "b", "--layout", "diffusers"])
    assert a.layout == "diffusers"
    a = p.parse_args(["lora", "convert", "a", "b", "--to", "diffusers"])  # old spelling still works
    assert a.layout == "diffusers"
    a = p.parse_args(["lora", "extract", "--base", "dev", "--tuned", "pro", "out", "--rank", "4"])
    assert (a.base, a.tuned) == ("dev", "pro")
    a = p.parse_args(["lora", "extract", "--from", "dev", "--to", "pro", "out", "--rank", "4"])
    assert (a.base, a.tuned) == ("dev", "pro")


@pytest.mark.parametrize("argv, usage, missing", [
    (["lora", "convert", "a", "b"], "usage: dev2pro lora convert [-h] --layout {kohya,comfy,diffusers}", "--layout"),
    (["lora", "extract", "out", "--rank", "4"], "usage: dev2pro lora extract [-h] --base BASE --tuned TUNED ",
     "--base, --tuned"),
])
def test_required_flags_show_as_required_in_usage(argv, usage, missing, capsys):
    """Usage showed `[--layout ...]` / `[--base BASE]` and then called them required; the old spellings (--to,
    --from) stay out of usage and help and still satisfy the requirement."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage), err
    assert err.rstrip().endswith(f"error: the following arguments are required: {missing}")
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv[:2] + ["--help"])
    help_text = capsys.readouterr().out
    assert "--to" not in help_text and "--from" not in help_text


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({f"transformer_blocks.0.attn.to_{n}": LoraModule(torch.randn(4, 32, generator=g),
                                                                       torch.randn(32, 4, generator=g), 4.0)
                      for n in "qkv"})
    return save_lora(lw, tmp_path_factory.mktemp("lora") / "l.safetensors", "kohya")


def test_lora_info_is_human_by_default_and_json_on_request(tiny_lora, capsys):
    assert main(["lora", "info", str(tiny_lora)]) == 0
    human = capsys.readouterr().out
    assert "layout:   kohya" in human and "modules:  3" in human and not human.lstrip().startswith("{")
    assert main(["lora", "info", "--json", str(tiny_lora)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == "kohya" and data["modules"] == 3 and data["params"] == 3 * (4 * 32 + 32 * 4)


def test_missing_parent_folders_are_created(tiny_lora, tmp_path):
    out = tmp_path / "new" / "deeper" / "d.safetensors"
    assert main(["lora", "convert", str(tiny_lora), str(out), "--layout", "diffusers"]) == 0
    assert out.is_file()


def test_sample_creates_missing_parents(tiny_dev_dir, tmp_path):
    out = tmp_path / "a" / "b" / "samples"
    assert main(["sample", "--model", str(tiny_dev_dir), "--prompt", "a cat", "--steps", "1", "--size", "32x32",
                 "--out", str(out)]) == 0
    assert (out / "000-s0.png").is_file() or any(out.glob("*.png"))


@pytest.mark.slow  # a fresh process must import diffusers (~20 s on a busy CPU)
def test_sample_prints_no_third_party_noise(tiny_dev_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dev2pro.cli", "sample", "--model", str(tiny_dev_dir), "--prompt",
                        "a cat", "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torchvision" not in r.stderr and "Loading weights" not in r.stderr, r.stderr


def test_train_output_dir_parents_are_created(tmp_path):
    from dev2pro.train.lifecycle import prepare_output_dir
    from dev2pro.train.run import RunFolder

    state = prepare_output_dir(RunFolder(tmp_path / "runs" / "2026" / "my-lora"), resume=None, overwrite=False)
    assert (tmp_path / "runs" / "2026" / "my-lora").is_dir() and state.name == "state"


def test_set_error_on_the_command_line_names_the_override(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "o"\n')
    assert main(["train", str(cfg), "--set", "train.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "dev2pro train: error: --set train.lr=abc: 'train.lr' must be a number" in err and str(cfg) not in err
    assert main(["train", str(cfg), "--set", f"train.steps={2**63 - 1}"]) == 2
    assert "the largest allowed is 2147483647" in capsys.readouterr().err


def test_torchvision_fallback_warning_is_filtered_and_others_are_not():
    """Fast in-process check of the filter (the slow test above checks a real `dev2pro sample`)."""
    import logging

    from dev2pro.noise import quiet_third_party

    quiet_third_party()
    quiet_third_party()  # idempotent
    logger = logging.getLogger("transformers.utils.import_utils")

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    noise = record("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert not logger.filter(noise)
    assert logger.filter(record("something that matters"))
    assert sum(type(f).__name__ == "_DropNoise" for f in logger.filters) == 1
    # diffusers' keep-in-fp32 warning naming no module (FLUX.2's empty list) is noise; one naming modules is not
    dl = logging.getLogger("diffusers.models.modeling_utils")
    empty = dl.makeRecord(dl.name, logging.WARNING, __file__, 1, "There are modules in Flux2Transformer2DModel that "
                          "should be kept in float32: []. Casting directly with `to()` ...", (), None)
    named = dl.makeRecord(dl.name, logging.WARNING, __file__, 1, "... should be kept in float32: ['x']. ...", (), None)
    assert not dl.filter(empty) and dl.filter(named)


def test_no_recipe_or_library_module_imports_the_cli():
    """The CLI imports recipes, never the reverse (a recipe is callable from code, torchrun -m dev2pro.cli, tests)."""
    import ast
    from pathlib import Path

    import dev2pro

    root = Path(dev2pro.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name in ("cli.py", "cli_commands.py", "__main__.py"):  # __main__: `python -m dev2pro` is the CLI
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] in ("cli",
                                                                                                  "cli_commands"):
                offenders.append(f"{path.relative_to(root)}: from {'.' * node.level}{node.module}")
    assert not offenders, offenders


def test_python_dash_m_dev2pro_is_the_cli():
    from dev2pro import __version__

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "dev2pro", *argv], capture_output=True, text=True, env=ENV,
                              timeout=120)
    r = run("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"dev2pro {__version__}"), r.stderr
    r = run("inspect", "no-such-checkpoint.safetensors")  # a UserError: one line, status 2, no traceback
    assert r.returncode == 2 and r.stderr.startswith("dev2pro inspect: error: ") and "Traceback" not in r.stderr


def test_ranks_leave_the_process_group_together(monkeypatch, tiny_lora):
    """Under torchrun each rank waits for the others, then closes the group (a rank exiting while another still
    writes its files aborted in gloo once, and torchrun killed the writer); a one-rank group is closed too."""
    import torch.distributed as dist

    from dev2pro import cli

    calls = []
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                                 barrier=lambda: calls.append("barrier"),
                                 destroy_process_group=lambda: calls.append("destroy"))
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    assert main(["lora", "info", str(tiny_lora)]) == 0
    assert calls == ["barrier", "destroy"]
    monkeypatch.setitem(sys.modules, "torch.distributed", dist)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as 1-process FSDP makes
    cli._leave_process_group()
    assert not dist.is_initialized()
    cli._leave_process_group()  # nothing left to close: no error
