"""`dev2pro plan CONFIG.toml [--vram GB]`: GPU memory and host RAM of a `dev2pro train` config before running it.

The plan itself is ``dev2pro.plan`` (``report``); ``schemas.plan_inputs`` reads a config into its inputs (the
transformer's spec comes from the checkpoint header, nothing is loaded). The ``--vram`` presets are applied by the
config loader (``schemas.load_train_config``). The parser lives with the others in ``cli_commands``.
"""

from __future__ import annotations

from ..plan import report
from ..schemas import load_train_config, plan_inputs


def run_plan(config: str, vram: float | None = None, overrides: list[str] | None = None) -> dict:
    """Print the plan of a train config (against a ``vram`` GB card, or the GPU seen); returns it as a dict."""
    return report(plan_inputs(load_train_config(config, overrides)), vram)
