"""Which weight files a diffusers transformer folder holds -- safetensors (sharded or not) or, failing that, pickle
(``diffusion_pytorch_model.bin``, sharded with ``diffusion_pytorch_model.bin.index.json``: ``save_pretrained(...,
safe_serialization=False)``). Torch-free: the recipes' config checks ask whether a model is a pickle before they
import anything heavy."""

from __future__ import annotations

import json
from pathlib import Path

from ..choices import PICKLE_SUFFIXES
from ..errors import CheckpointError

SAFE_INDEX, SAFE_SINGLE = "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"
PICKLE_INDEX, PICKLE_SINGLE = "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin"


def transformer_folder(path: Path) -> Path:
    """A model folder's ``transformer/`` (``model_index.json`` beside it), or ``path`` itself (a transformer folder)."""
    return path / "transformer" if (path / "model_index.json").exists() else path


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle" | "", files) of a transformer folder; safetensors win when both are there (HF repos
    often carry both). Files named by an index are listed whether or not they exist (the caller names a missing
    shard)."""
    for kind, index, single, pattern in (("safetensors", SAFE_INDEX, SAFE_SINGLE, "*.safetensors"),
                                         ("pickle", PICKLE_INDEX, PICKLE_SINGLE, "*.bin")):
        if (folder / index).exists():
            return kind, _indexed(folder / index)
        if (folder / single).exists():
            return kind, [folder / single]
        if files := sorted(folder.glob(pattern)):
            return kind, files
    return "", []


def _indexed(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({index.parent / f for f in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: cannot read the shard index ({type(e).__name__}: {e}); download or convert "
                              "the model again") from None


def holds_pickle(path: str | Path) -> bool:
    """A pickle file (by suffix), or a folder whose transformer weights are pickle only."""
    path = Path(path)
    if path.is_dir():
        try:
            return weight_files(transformer_folder(path))[0] == "pickle"
        except CheckpointError:
            return False  # reported where the model is opened
    return path.suffix.lower() in PICKLE_SUFFIXES
