"""What the tiny end-to-end runs share (tests only): their config tables, and comparing their output files."""

import torch
from safetensors.torch import load_file


def model_and_data(model_dir, images, cache_dir, checkpointing: bool = False, model: str = "", data: str = "") -> str:
    """``[model]`` + ``[[data.folders]]`` + ``[data]`` TOML for a tiny model folder and an image folder at 64 px;
    ``model`` / ``data`` are extra lines for those tables (e.g. ``dtype = "fp32"``, ``batch_size = 2``)."""
    return f"""
[model]
path = "{model_dir}"
gradient_checkpointing = {str(checkpointing).lower()}
{model}

[[data.folders]]
path = "{images}"

[data]
default_caption = "a photo"
resolution = 64
bucket_step = 64
cache_dir = "{cache_dir}"
{data}
"""


def same_tensors(a_path, b_path) -> bool:
    """Two safetensors files hold the same keys with bitwise-equal tensors (resumed vs uninterrupted runs)."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
