"""A kohya-layout FLUX.2 LoRA with modules diffusers' kohya reader skips (the shared modulations, the final adaLN,
dev's guidance embedder) says which, once; the modules it names are exactly those diffusers' own loader leaves out
of the model, so the note stays true (or this test fails) when diffusers changes."""

import logging

import pytest
import torch

from dev2pro.cli import main
from dev2pro.flux import checkpoint as C
from dev2pro.lora import flux2
from dev2pro.lora.formats import LoraModule, LoraWeights, load_lora, save_lora

pytest.importorskip("peft")
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin  # noqa: E402

KLEIN_SKIPPED = ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "norm_out.linear",
                 "single_stream_modulation.linear"]


def every_linear_lora(folder, blocks=True) -> LoraWeights:
    """A rank-2 LoRA on every top-level linear of the model in ``folder`` (modulations, embedders, final layer) and,
    with ``blocks``, on one linear of each block kind."""
    ck, g, lw = C.open_checkpoint(folder), torch.Generator().manual_seed(0), LoraWeights(family="flux2")
    for key, shape in ck.shapes.items():
        name = key.removesuffix(".weight")
        top = "blocks." not in key or blocks and name in ("transformer_blocks.0.attn.to_q",
                                                           "single_transformer_blocks.1.attn.to_out")
        if key.endswith(".weight") and len(shape) == 2 and top:
            lw[name] = LoraModule(torch.randn(2, shape[1], generator=g) * 0.1,
                                  torch.randn(shape[0], 2, generator=g) * 0.1, 2.0)
    return lw


def diffusers_loaded(folder, path) -> set[str]:
    """The modules of the model in ``folder`` that diffusers' loader gives a LoRA layer from the file ``path``."""
    model = Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    sd, md = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    Flux2LoraLoaderMixin.load_lora_into_transformer(sd, transformer=model, metadata=md, adapter_name="x")
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A}


@pytest.fixture(autouse=True)
def fresh():
    flux2._SAID.clear()  # the note is said once per process and set of modules


def test_kohya_note_names_what_diffusers_drops(klein_base_dir, tmp_path, caplog):
    lw = every_linear_lora(klein_base_dir)
    with caplog.at_level(logging.WARNING, logger="dev2pro.lora.flux2"):
        kohya = save_lora(lw, tmp_path / "l.safetensors", "kohya")
        save_lora(lw, tmp_path / "again.safetensors", "kohya")  # a training run's next save: said once
    notes = [r.getMessage() for r in caplog.records if "load_lora_weights skips" in r.getMessage()]
    assert len(notes) == 1 and "--layout diffusers" in notes[0]
    named = [n for n in sorted(lw) if n in notes[0]]
    assert named == KLEIN_SKIPPED == flux2.diffusers_kohya_skips(lw)
    assert sorted(set(lw) - diffusers_loaded(klein_base_dir, kohya)) == named  # what diffusers really leaves out
    full = save_lora(lw, tmp_path / "l.diffusers.safetensors", "diffusers")
    assert diffusers_loaded(klein_base_dir, full) == set(lw)  # the layout the note points to loads all of them


def test_guidance_embedder_of_dev_is_named(flux2_dev_dir, tmp_path, caplog):
    """dev's guidance embedder (a de-distillation adapter's embedders): diffusers' kohya reader skips it too; the
    note comes from `lora convert --layout kohya` as well."""
    lw = every_linear_lora(flux2_dev_dir, blocks=False)
    src = save_lora(lw, tmp_path / "l.diffusers.safetensors", "diffusers")
    with caplog.at_level(logging.WARNING, logger="dev2pro.lora.flux2"):
        assert main(["lora", "convert", str(src), str(tmp_path / "l.safetensors"), "--layout", "kohya"]) == 0
    err = caplog.text
    guidance = ["time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2"]
    assert [n for n in sorted(lw) if n in err] == sorted(KLEIN_SKIPPED + guidance)
    assert sorted(set(lw) - diffusers_loaded(flux2_dev_dir, tmp_path / "l.safetensors")) == sorted(
        KLEIN_SKIPPED + guidance)


def test_no_note_without_such_modules(klein_base_dir, tmp_path, caplog):
    lw = every_linear_lora(klein_base_dir)
    lw = LoraWeights({n: m for n, m in lw.items() if n not in KLEIN_SKIPPED}, family="flux2")
    with caplog.at_level(logging.WARNING, logger="dev2pro.lora.flux2"):
        kohya = save_lora(lw, tmp_path / "l.safetensors", "kohya")
        save_lora(every_linear_lora(klein_base_dir), tmp_path / "c.safetensors", "comfy")  # only kohya is noted
    assert not [r for r in caplog.records if "skips" in r.getMessage()] and flux2.diffusers_kohya_skips(lw) == []
    assert set(lw) <= diffusers_loaded(klein_base_dir, kohya) and load_lora(kohya).layout == "kohya"
