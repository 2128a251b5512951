"""Weights & Biases as an optional second logger beside TensorBoard (``[logging] wandb = true``).

``wandb`` is an optional extra (``pip install 'dev2pro[wandb]'``), imported only when asked for. The default mode
is ``offline``: no account and no network; the run is written under ``<run folder>/wandb`` and can be uploaded
later with ``wandb sync``. ``Progress`` calls a sink's ``log`` / ``image`` / ``close`` beside its TensorBoard
writer, so W&B sees the same scalars (``loss/step``, ``val/loss``, ``val/sigma_0.3``, ...) at the same steps.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


class WandbSink:
    """One W&B run: scalars and images by step."""

    def __init__(self, run, wandb):
        self.run, self.wandb = run, wandb

    def log(self, values: dict, step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=int(step))

    def image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=int(step))

    def close(self) -> None:
        self.run.finish()


def open_wandb(project: str, mode: str, folder: Path, name: str, config: dict) -> WandbSink:
    """A W&B run named ``name`` in ``project`` writing under ``folder/wandb``; ``config``: the resolved config."""
    try:
        import wandb  # optional extra: only runs that ask for it import it
    except ImportError:
        raise UserError("logging.wandb = true needs the wandb package: pip install 'dev2pro[wandb]', or set "
                        "logging.wandb = false") from None
    folder.mkdir(parents=True, exist_ok=True)
    # console="off": W&B must not wrap stdout (our bar and console lines); no git or code capture of the cwd
    settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
    run = wandb.init(project=project, mode=mode, dir=str(folder), name=name, config=config, settings=settings)
    return WandbSink(run, wandb)
