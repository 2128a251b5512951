"""`dev2pro plan CONFIG.toml [--vram GB]`: GPU memory and host RAM of a `dev2pro train` config before running it.

The plan itself is ``dev2pro.plan`` (``report``); ``schemas.plan_inputs`` reads a config into its inputs (the
transformer's spec comes from the checkpoint header, nothing is loaded). The ``--vram`` presets are applied by the
config loader (``schemas.load_train_config``).
"""

from __future__ import annotations


def add_plan_parser(sub):
    from ..cli_commands import finite_float  # light: argparse only

    p = sub.add_parser("plan", help="estimate GPU memory and host RAM of a `dev2pro train` config before running it")
    p.add_argument("config", help="a train config TOML")
    p.add_argument("--vram", type=finite_float(0, above=True), metavar="GB",
                   help="check against a card of this size (default: the GPU seen)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")

    def run(a):
        # imported when the command runs: the CLI builds this parser for --help, which must not load torch
        from ..plan import report
        from ..schemas import load_train_config, plan_inputs

        report(plan_inputs(load_train_config(a.config, a.set)), a.vram)
    p.set_defaults(run=run)
    return p
