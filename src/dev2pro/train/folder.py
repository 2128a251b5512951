"""A training run's folder as a named value (torch-free: the web app reads run folders through it too).

``RunFolder`` names the places `train` and `dedistill` write -- state/, samples/, logs/, config.toml, summary.json,
loss.png, the lock -- and the command that continues the run; the recipes, their lifecycle and the web app's
monitor all go through it instead of spelling paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".dev2pro.lock"
STATE_DIR = "state"
STEP_RE = re.compile(r"^step-(\d+)$")  # a state folder's name, step-NNNNNN (train.state writes them)


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder; ``command`` (``train`` | ``dedistill``) is what continues it."""

    root: Path
    command: str = "train"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def state(self) -> Path:
        """Resumable training states, one ``step-NNNNNN`` folder each."""
        return self.root / STATE_DIR

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        """TensorBoard event files."""
        return self.root / "logs"

    @property
    def config(self) -> Path:
        """The resolved config the run was started with (what ``--resume`` reads)."""
        return self.root / "config.toml"

    @property
    def summary(self) -> Path:
        """Written at the end: losses, files, speed (its presence means the run finished)."""
        return self.root / "summary.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    def resume_hint(self) -> str:
        """The command that continues this run (its saved config.toml)."""
        return f"dev2pro {self.command} {self.config} --resume"
