"""Fixtures for the LoRA tests: merging goes through the one streaming merge (``lora.merge.merge_loras``)."""

import itertools

import pytest
from safetensors.torch import load_file, save_file

from dev2pro.lora.formats import save_lora
from dev2pro.lora.merge import merge_loras


@pytest.fixture
def merged_sd(tmp_path):
    """``merged_sd(state_dict, [(lora, scale), ...])``: the state dict ``merge_loras`` writes when the base is saved
    as a diffusers-named safetensors file and each LoRA as a diffusers-layout file (tiny models: a few MB)."""
    calls = itertools.count()

    def merge(sd, lws_and_scales):
        d = tmp_path / f"merge{next(calls)}"
        d.mkdir()
        base = d / "base.safetensors"
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(base))
        loras = [(str(save_lora(lw, d / f"lora{i}.safetensors", "diffusers")), scale)
                 for i, (lw, scale) in enumerate(lws_and_scales)]
        return load_file(str(merge_loras(base, loras, d / "merged.safetensors")))
    return merge
