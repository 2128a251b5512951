"""`lora merge` keeps what a FLUX.2 klein's keys cannot tell: merged from a klein folder (its model_index.json says
Base or distilled), the merged model is inspected and sampled as that variant, not as an unknown klein (Base)."""

import json

import pytest
import torch
from PIL import Image

from dev2pro.cli import main
from dev2pro.families.flux2.spec import VARIANT_METADATA_KEY
from dev2pro.flux import checkpoint as C
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from dev2pro.recipes import lora_tools as T


def _lora(folder, path):
    """A small kohya FLUX.2 LoRA on one attention linear of the tiny klein in ``folder``."""
    w = C.open_checkpoint(folder).shapes["transformer_blocks.0.attn.to_q.weight"]
    g, lw = torch.Generator().manual_seed(0), LoraWeights(family="flux2")
    lw["transformer_blocks.0.attn.to_q"] = LoraModule(torch.randn(4, w[1], generator=g) * 0.1,
                                                      torch.randn(w[0], 4, generator=g) * 0.1, 4.0)
    return save_lora(lw, path, "kohya")


@pytest.mark.parametrize("which", ["distilled", "base"])
def test_merge_records_the_klein_variant(klein_distilled_dir, klein_base_dir, tmp_path, capsys, which):
    folder = {"distilled": klein_distilled_dir, "base": klein_base_dir}[which]
    out = tmp_path / "out.safetensors"
    assert main(["lora", "merge", "--base", str(folder), "--lora", f"{_lora(folder, tmp_path / 'l.safetensors')}:1.6",
                 str(out)]) == 0
    ck = C.open_checkpoint(out)
    assert ck.spec().variant == f"klein-{which}" and ck.metadata[VARIANT_METADATA_KEY] == f"klein-{which}"
    assert json.loads(ck.metadata["dev2pro.merged_loras"]) == [["l.safetensors", 1.6]]
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variant"] == f"klein-{which}"


def test_merged_distilled_klein_samples_as_distilled(klein_distilled_dir, tmp_path, capsys):
    """Merged into one BFL file (no folder beside it to ask) too: 4 steps, no CFG, and no unknown-variant note."""
    bfl = tmp_path / "base.safetensors"
    assert main(["convert", str(klein_distilled_dir), str(bfl), "--layout", "bfl", "--no-progress"]) == 0
    for base, out in ((klein_distilled_dir, tmp_path / "m-folder"), (bfl, tmp_path / "m.safetensors")):
        T.merge(str(base), [(str(_lora(klein_distilled_dir, tmp_path / f"{out.stem}.lora.safetensors")), 1.6)],
                str(out))
        capsys.readouterr()
        assert main(["sample", "--model", str(klein_distilled_dir), "--transformer", str(out), "--prompt", "a cat",
                     "--size", "64x64", "--out", str(tmp_path / f"s-{out.stem}")]) == 0
        assert "note:" not in capsys.readouterr().out
        with Image.open(next((tmp_path / f"s-{out.stem}").glob("*.png"))) as im:
            settings = json.loads(im.text["dev2pro"])
        assert settings["steps"] == 4 and settings["guidance"]["cfg"] == 1.0  # Base would be 50 steps, CFG 4
