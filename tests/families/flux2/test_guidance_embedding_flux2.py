"""FLUX.2 with and without a guidance embedding: ``load_transformer(guidance_embeds=False)`` (it raised: FLUX.2's spec
ties the variant to the embedding), ``with_guidance_embedding`` (it was FLUX.1-only), and `dedistill`'s
``guidance_distill`` over a CFG range growing FLUX.2 dev's embedding from an undistilled start."""

import pytest
import torch
from safetensors import safe_open

from dev2pro.errors import UserError
from dev2pro.families.flux2.family import model_inputs
from dev2pro.flux.checkpoint import load_transformer, open_checkpoint
from dev2pro.train.model import with_guidance_embedding


def _velocity(model, guidance):
    g = torch.Generator().manual_seed(0)
    b = 2
    kw = model_inputs(torch.randn(b, 16, 128, generator=g), torch.tensor([0.3, 0.8]),
                      {"prompt_embeds": torch.randn(b, 8, 96, generator=g)}, 8, 8,
                      None if guidance is None else torch.full((b,), guidance), "cpu", torch.float32)
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def test_load_flux2_dev_without_its_guidance_embedding(flux2_dev_dir, klein_base_dir):
    model, ckpt = load_transformer(flux2_dev_dir, dtype=torch.float32, guidance_embeds=False)
    assert ckpt.spec().guidance_embeds and not model.config.guidance_embeds
    assert not any("guidance_embedder" in k for k in model.state_dict())
    assert _velocity(model, None).shape == (2, 16, 128)
    with pytest.raises(UserError, match="no guidance embedding"):
        load_transformer(klein_base_dir, dtype=torch.float32, guidance_embeds=True)


def test_grown_flux2_guidance_embedding_adds_nothing(flux2_dev_dir):
    pro, _ = load_transformer(flux2_dev_dir, dtype=torch.float32, guidance_embeds=False)
    dev = with_guidance_embedding(pro)
    assert dev.config.guidance_embeds and type(dev).__name__ == "Flux2Transformer2DModel"
    ref = _velocity(pro, None)
    for w in (1.0, 4.0):
        assert torch.allclose(_velocity(dev, w), ref, atol=1e-6)


def test_guidance_distill_over_a_range_grows_flux2_devs_embedding(tmp_path, flux2_dev_dir):
    """From shards, as the demo trains: loading the Mistral3 stack beside a guidance-free transformer is refused by
    the text pairing check (it tells klein from dev by the guidance embedding)."""
    import numpy as np

    from dev2pro.lab.dataset import write_folder
    from dev2pro.lab.flux2_dev import load_text_encoder, write_pro_start, write_shards
    from dev2pro.lab.world import base_caption, plain
    from dev2pro.recipes.dedistill import dedistill
    from dev2pro.schemas import load_dedistill_config

    pro = write_pro_start(flux2_dev_dir, tmp_path / "pro.safetensors")
    assert open_checkpoint(pro).spec().variant == "klein-base"
    images = np.random.default_rng(0).uniform(size=(4, 8, 8)).astype(np.float32)
    folder = write_folder(tmp_path / "images", images, np.arange(4), base_caption, plain)
    shards = write_shards(folder, tmp_path / "shards", load_text_encoder(flux2_dev_dir))
    cfg = load_dedistill_config(None, data={
        "objective": "guidance_distill",
        "model": {"path": str(flux2_dev_dir), "transformer": str(pro), "teacher": str(pro),
                  "gradient_checkpointing": False, "t5_max_length": 40},
        "data": {"shards": str(shards), "batch_size": 2},
        "teacher": {"w_min": 1.0, "w_max": 5.0},
        "train": {"steps": 2, "mixed_precision": "no"},
        "save": {"output_dir": str(tmp_path / "run")}})
    summary = dedistill(cfg, progress=False)
    assert len(summary["losses"]) == 2 and all(x > 0 for x in summary["losses"])
    out = tmp_path / "run" / "dev2pro.safetensors"
    with safe_open(str(out), "pt") as f:
        assert any(k.startswith("guidance_in") for k in f.keys())  # FLUX.2 dev's form
    assert open_checkpoint(out).spec().variant == "dev"
