"""Tiny FLUX.2 [klein] folders, built once per session (random weights, real diffusers layout, offline)."""

import pytest


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
