"""`dev2pro plan CONFIG.toml [--vram GB]`: GPU memory and host RAM of a `dev2pro train` config -- or of an adapter
`dev2pro dedistill` config (``train.adapter_rank``) -- before running it.

The plan itself is ``dev2pro.plan`` (``report``); ``recipe_inputs.plan_inputs`` / ``dedistill_plan_inputs`` read a
config into its inputs (the transformer's spec comes from the checkpoint header, nothing is loaded). The ``--vram``
presets are applied by the config loader (``schemas.load_train_config``). The plan is memory only: epoch settings
(``train.epochs``) need the dataset's batches per epoch, which only `train` counts, and change no figure here.
The parser lives with the others in ``cli_commands``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from ..choices import VRAM_CHOICES
from ..errors import UserError
from ..plan import report
from ..recipe_inputs import dedistill_plan_inputs
from ..schemas import load_dedistill_config, load_train_config, plan_inputs
from ..train.epochs import TARGETS as EPOCH_SETTINGS  # train.epochs, save.every_epochs, sample.every_epochs
from ..train.preflight import check_paths_exist


def is_dedistill_config(config: str) -> bool:
    """A dedistill config names an ``objective`` or has a ``[teacher]`` table; train configs have neither."""
    try:
        data = tomllib.loads(Path(config).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the train loader reports it
    return "objective" in data or "teacher" in data


def run_plan(config: str, vram: float | None = None, overrides: list[str] | None = None) -> dict:
    """Print the plan of a train or adapter-dedistill config (against a ``vram`` GB card, else the config's
    ``model.vram`` preset as train checks it, else the GPU seen); returns it as a dict. A train config's ``vram``
    that is a preset size also applies that preset, as `train --vram` does (its advice then means one thing)."""
    if is_dedistill_config(config):
        cfg = load_dedistill_config(config, overrides)
        return report(dedistill_plan_inputs(cfg), vram or getattr(cfg.model, "vram", 0) or None)
    cfg = None
    if vram and float(vram).is_integer() and int(vram) in VRAM_CHOICES:
        # as `train --vram GB`: that preset's settings (yours win), checked against a card of that size
        try:
            cfg = load_train_config(config, [*(overrides or []), f"model.vram={int(vram)}"])
        except UserError as e:
            if "model.vram" not in str(e):
                raise  # no preset of that size for this family (FLUX.1 has no 32 / 80): the card is checked only
    cfg = cfg or load_train_config(config, overrides)
    m = cfg.model  # a missing model: its named error, not open_checkpoint's bare one (no preset was applied)
    check_paths_exist(m.transformer or m.path, m.path or m.transformer, True, {})
    result = report(plan_inputs(cfg), vram or cfg.model.vram or None)
    set_ = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in EPOCH_SETTINGS}
    used = [f"{k} = {v:g}" for k, v in set_.items() if v]
    if used:  # the steps need the dataset's batches per epoch; memory does not depend on them
        print(f"  {', '.join(used)}: counted in steps when `dev2pro train` starts (from the dataset's batches per "
              f"epoch; the plan reads no images): this memory plan is the same for any step count")
    return result
