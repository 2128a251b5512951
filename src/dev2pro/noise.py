"""Third-party output that says nothing a dev2pro user can act on, silenced without importing the libraries.

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and the same
  for Siglip): diffusers' Flux pipeline module imports those image processors for IP-adapters, which dev2pro
  never uses, and transformers' lazy module warns on that access (``transformers/utils/import_utils.py``).
- diffusers' "There are modules in Flux2Transformer2DModel that should be kept in float32: []" on every
  ``model.to(dtype)``: FLUX.2's class declares an empty keep-in-fp32 list, so the warning names nothing (a non-empty
  list still shows).
- transformers' per-file "Loading weights" bars (huggingface_hub's ``HF_HUB_DISABLE_PROGRESS_BARS``, read when
  transformers is imported): our own progress output is the one to watch.
"""

from __future__ import annotations

import logging
import os

# logger name -> substrings of the messages to drop
NOISE = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_third_party() -> None:
    """Install the filters (idempotent); call before the libraries load models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub at run time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)  # the same object the library gets later with getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))


def quiet_libraries() -> None:
    """For commands that load models: the filters above, and no diffusers/transformers per-component loading bars
    (our progress bar is the one users watch). Imports both libraries: call it when a command runs, not at import."""
    quiet_third_party()  # also in processes that did not start from the CLI (demo workers, torchrun -m)
    import diffusers  # noqa: PLC0415 - heavy; this module is imported by the CLI's parser
    import transformers  # noqa: PLC0415

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
