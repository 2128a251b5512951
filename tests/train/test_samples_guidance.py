"""The guidance `train`'s sample grids render with: a guidance-distilled base (FLUX.1 / FLUX.2 dev) gets its
embedded guidance alone, as users run it; ``sample.cfg`` is the true-CFG scale of bases without the embedding."""

import pytest

from dev2pro.train.samples import GridSpec, LoraSampler

SPEC = GridSpec(prompts=["a photo"], seeds=[0], embeds=[], negative=None, steps=4, width=64, height=64)


@pytest.mark.parametrize("embeds, want", [(True, ("embedded", 4.0, 1.0)), (False, ("true_cfg", None, 3.5))])
def test_sample_cfg_applies_only_to_bases_without_a_guidance_embedding(embeds, want):
    sampler = LoraSampler(SPEC, {}, "cpu", None, guidance=4.0, cfg=3.5, training_guidance_embeds=embeds)
    g = sampler.guidance
    assert (g.mode, g.embedded, g.cfg) == want  # dev: one forward per step, not guidance 4 plus CFG 3.5
    assert sampler.base_guidance == g
