"""The `dev2pro` command: each subcommand parses its flags and calls one recipe.

User errors (bad files, bad config values, existing outputs) print one clear message and exit with status 2;
anything else is a bug and keeps its traceback. Output into a closed pipe (``dev2pro inspect --json | head``)
ends quietly with status 141, like any tool killed by SIGPIPE.

Adding a subcommand: write ``add_NAME(sub)`` in a module that imports neither torch nor a recipe at import time
(see ``cli_commands.py``: the parser is built eagerly, the recipe is imported inside the ``run`` function it
sets), then append one line ``"dev2pro.your_module:add_NAME"`` to ``COMMANDS``. ``tests/test_cli.py`` checks
that building every parser leaves torch unimported (``dev2pro --help`` must stay well under a second) and that
every argument has help text.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import UserError
from .noise import quiet_third_party

# "module:function" builders, in --help order; each adds one subcommand (see the module docstring)
COMMANDS = [
    "dev2pro.cli_commands:add_init_tiny",
    "dev2pro.cli_commands:add_inspect",
    "dev2pro.cli_commands:add_convert",
    "dev2pro.cli_commands:add_cache",
    "dev2pro.cli_commands:add_train",
    "dev2pro.cli_commands:add_dedistill",
    "dev2pro.cli_commands:add_sample",
    "dev2pro.cli_commands:add_compare",
    "dev2pro.cli_commands:add_calibrate",
    "dev2pro.cli_commands:add_lora",
    "dev2pro.cli_commands:add_demo",
    "dev2pro.cli_commands:add_plan",
    "dev2pro.recipes.caption:add_caption_parser",
    "dev2pro.recipes.caption:add_init_tiny_captioner_parser",
    "dev2pro.ui.command:add_ui_parser",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dev2pro", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dev2pro {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module, func = entry.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def _closed_pipe() -> int:
    # stdout's reader went away (`| head`): point stdout at /dev/null so the interpreter's final flush does not
    # raise again, and exit like a process killed by SIGPIPE
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13


def _leave_process_group() -> None:
    """Under torchrun every rank waits for the others, then closes the process group: a rank that exits while
    another still writes the final files can abort at exit (gloo: ``terminate called without an active
    exception``), and torchrun then kills the rank still writing."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close (and torch stays unimported)
    if dist is not None and dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # --help into a closed pipe
        return _closed_pipe()
    try:
        args.run(args)
        sys.stdout.flush()
        _leave_process_group()
    except UserError as e:
        print(f"dev2pro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print(f"dev2pro {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
