"""The parsers of the config-driven training commands, `dev2pro train` and `dev2pro dedistill` (torch-free, like
``cli_commands``: the recipe is imported when the command runs).

Besides ``config.add_config_command``'s arguments, both take ``--resume-changed-data`` (continue a run on a dataset
that changed since its state: ``train.datacheck``); a run stopped by SIGTERM (after saving its state, like Ctrl-C)
exits 143; a "nothing to resume" of a config.toml that lives in a copied run folder says how to resume the copy.
"""

from __future__ import annotations

import functools
import sys

from .config import add_config_command
from .errors import ConfigError, UserError
from .schemas import DedistillConfig, TrainConfig, load_dedistill_config, load_train_config  # torch-free

CHANGED_DATA_HELP = ("with --resume: continue on a dataset that changed since the saved state (images added or "
                     "removed, captions edited): a new epoch order from the resumed step; the weights, optimizer, "
                     "step and learning-rate schedule are kept")


def _train_target(flags: dict):
    from .recipes.train_lora import train  # the recipe (torch) only when the command runs
    return TrainConfig, load_train_config, functools.partial(train, changed_data=flags.get("changed_data", False))


def _dedistill_target(flags: dict):
    from .recipes.dedistill import dedistill
    return DedistillConfig, load_dedistill_config, functools.partial(dedistill,
                                                                     changed_data=flags.get("changed_data", False))


def _resume_options(p, name: str, flags: dict) -> None:
    """--resume-changed-data (into ``flags``, which the recipe's target reads), SIGTERM's exit status, and the hint
    for a copied run folder around the command's ``run``."""
    p.add_argument("--resume-changed-data", action="store_true", help=CHANGED_DATA_HELP)
    run = p.get_default("run")

    def run_resumable(a):
        if a.resume_changed_data and a.resume is None:
            raise ConfigError("--resume-changed-data continues a saved run: pass it with --resume")
        flags["changed_data"] = a.resume_changed_data
        try:
            run(a)
        except UserError as e:
            if a.resume is None:
                raise
            from .train.resuming import copied_run_hint
            hinted = copied_run_hint(str(e), a.config, name)
            if hinted == str(e):
                raise
            raise UserError(hinted) from None
        except KeyboardInterrupt as e:
            code = getattr(e, "exit_code", None)  # train.run.Terminated: SIGTERM, the state is saved
            if code is None:
                raise
            print(f"dev2pro {name}: terminated (SIGTERM)", file=sys.stderr)
            raise SystemExit(code) from None
    p.set_defaults(run=run_resumable)


def add_train(sub):
    flags: dict = {}
    p = add_config_command(sub, "train", "train a Flux LoRA (default: guidance 1.0 on a de-distilled base)",
                           target=lambda: _train_target(flags), overwrite=True)
    p.add_argument("--vram", type=int, choices=(8, 12, 16, 24, 48), metavar="GB",
                   help="GPU-size preset (8|12|16|24|48 GB), same as --set model.vram=GB")
    run = p.get_default("run")

    def run_with_vram(a):
        if a.vram:
            a.set = [*a.set, f"model.vram={a.vram}"]
        run(a)
    p.set_defaults(run=run_with_vram)
    _resume_options(p, "train", flags)


def add_dedistill(sub):
    flags: dict = {}
    p = add_config_command(sub, "dedistill", "de-distill FLUX.1 / FLUX.2 dev (make a dev2pro): a full "
                           "fine-tune (accelerate/torchrun, FSDP2 for several GPUs) or, with train.adapter_rank, a "
                           "LoRA adapter on one frozen (fp8) base", target=lambda: _dedistill_target(flags),
                           overwrite=True)
    _resume_options(p, "dedistill", flags)
