"""``python tests/kill_after_step.py K dev2pro-args...``: the dev2pro CLI, killed (``os._exit(17)``, no cleanup,
like ``kill -9``) right after training step K -- through the loop's one injection point, ``train.loop.after_step``.
The resume tests run it as a subprocess (also under torchrun / accelerate launch: a script path works there)."""

import os
import sys

from dev2pro.cli import main
from dev2pro.train import loop


def _die_after(k: int):
    def hook(done: int) -> None:
        if done == k:
            os._exit(17)
    return hook


if __name__ == "__main__":
    loop.after_step = _die_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
