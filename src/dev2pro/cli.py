"""The `dev2pro` command: each subcommand parses its flags and calls one recipe.

User errors (bad files, bad config values, existing outputs) print one clear message and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError


def _add_init_tiny(sub):
    p = sub.add_parser("init-tiny", help="write a tiny random-weight model folder in the FLUX.1-dev diffusers layout")
    p.add_argument("dir")
    p.add_argument("--variant", choices=["dev", "pro"], default="dev",
                   help="dev: with guidance embedding (guidance-distilled); pro: without (true CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    def run(a):
        from .recipes.checkpoint_tools import init_tiny
        init_tiny(a.dir, a.variant, a.seed, a.overwrite)
    p.set_defaults(run=run)


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="describe a Flux checkpoint: layout, variant, dtypes, blocks, size")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt files (can run code: trust the source)")

    def run(a):
        from .recipes.checkpoint_tools import inspect
        inspect(a.path, a.json, a.allow_pickle)
    p.set_defaults(run=run)


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a Flux checkpoint between layouts and dtypes (streaming)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--layout", choices=["bfl", "comfy", "diffusers"], help="output layout (default: as input)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8", "fp8-scaled"], help="default: as input")
    p.add_argument("--keep", metavar="GROUPS",
                   help="fp8 only: comma-separated groups kept in bf16 (default norms,biases,embedders,modulation,"
                        "final; pass '' to quantise every 2-D weight)")
    p.add_argument("--drop-guidance", action="store_true",
                   help="drop the guidance embedding (the output is sampled with true CFG)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")

    def run(a):
        from .recipes.checkpoint_tools import convert
        convert(a.src, a.dst, a.layout, a.dtype, a.keep, a.overwrite, a.allow_pickle, a.drop_guidance)
    p.set_defaults(run=run)


def _add_train(sub):
    from .recipes.train_lora import add_train_parser
    add_train_parser(sub)


def _add_demo(sub):
    from .recipes.demo import add_demo_parser
    add_demo_parser(sub)


def _add_sample(sub):
    from .recipes.sample import add_sample_parser
    add_sample_parser(sub)


def _add_compare(sub):
    from .recipes.compare import add_compare_parser
    add_compare_parser(sub)


def _add_lora(sub):
    from .recipes.lora_tools import add_lora_parser
    add_lora_parser(sub)


def _add_dedistill(sub):
    from .recipes.dedistill import add_dedistill_parser
    add_dedistill_parser(sub)


def _add_cache(sub):
    from .recipes.cache import add_cache_parser
    add_cache_parser(sub)


def _add_plan(sub):
    from .recipes.plan import add_plan_parser
    add_plan_parser(sub)


COMMANDS = [_add_init_tiny, _add_inspect, _add_convert, _add_cache, _add_train, _add_dedistill, _add_sample,
            _add_compare, _add_lora, _add_demo, _add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dev2pro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub at run time
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"dev2pro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dev2pro {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
