"""Shared fixtures: tiny Flux model folders built once per session (random weights, real key layouts)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # code must never fetch from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two torch threads on two busy cores run several times slower than one (and timings get erratic).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dev_dir(tmp_path_factory):
    """A complete tiny FLUX.1-dev-layout model folder (guidance embedding present)."""
    from dev2pro.flux.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-dev", variant="dev", seed=0)


@pytest.fixture(scope="session")
def tiny_pro_dir(tmp_path_factory):
    """A complete tiny model folder without guidance embedding (pro / de-distilled-without-guidance)."""
    from dev2pro.flux.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-pro", variant="pro", seed=1)


# Tiny FLUX.2 [klein] / dev folders (random weights, real diffusers layout, offline), built once per session.
@pytest.fixture(scope="session")
def klein_base_dir(tmp_path_factory):
    from dev2pro.families.flux2.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("flux2") / "klein-base", variant="klein-base", seed=0)


@pytest.fixture(scope="session")
def klein_distilled_dir(tmp_path_factory):
    from dev2pro.families.flux2.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("flux2") / "klein-distilled", variant="klein-distilled", seed=1)


@pytest.fixture(scope="session")
def flux2_dev_dir(tmp_path_factory):
    from dev2pro.families.flux2.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("flux2") / "dev", variant="dev", seed=2)


@pytest.fixture(scope="session")
def sk_images(tmp_path_factory):
    """Real photos shipped with scikit-image (no downloads), one with a caption file."""
    import shutil
    from pathlib import Path

    import skimage

    src = Path(skimage.__file__).parent / "data"
    d = tmp_path_factory.mktemp("sk-images")
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg"):
        shutil.copy(src / name, d / name)
    (d / "astronaut.txt").write_text("an astronaut in a white suit")
    return d
