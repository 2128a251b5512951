"""The config tables every tiny end-to-end run shares (tests only): the model folder and one image folder."""


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
