"""References above 1 MP: FLUX.2's pipelines shrink such a reference to 1 MP before encoding it, so training fits
an edit pair's reference to the same capped size (``buckets.reference_size``) and sampling hands the pipeline a
reference it passes on unchanged. Checked against diffusers' own resize, ids and pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro import objectives
from dev2pro.data import buckets
from dev2pro.data.buckets import fitted_references, load_and_fit, reference_size
from dev2pro.data.cache import CONTROL_NAME, LATENT_NAME, cache_latents, latent_key, load_cached
from dev2pro.families import get
from dev2pro.families.flux2.latents import encode_images, load_vae
from dev2pro.flux.latents import pack
from dev2pro.plan import PlanInputs

from .test_edit_pairs import _config, pairs  # noqa: F401 (a fixture)


@pytest.mark.parametrize("size", [(1024, 1024), (512, 768), (1536, 1536), (1536, 1024), (832, 1664), (2048, 512),
                                  (1040, 1024)])
def test_reference_size_is_the_pipelines_shrink(size):
    """Up to 1 MP the bucket itself; above, the size Flux2KleinPipeline gives a reference of that size
    (``_resize_to_target_area`` to 1024^2, then sides floored to 16 px)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    w, h = size
    if w * h > 1024 * 1024:
        theirs = Flux2ImageProcessor._resize_to_target_area(Image.new("RGB", size), 1024 * 1024).size
        theirs = (theirs[0] // 16 * 16, theirs[1] // 16 * 16)
    else:
        theirs = size
    assert reference_size(size) == theirs
    rw, rh = reference_size(size)
    assert rw * rh <= 1024 * 1024 and rw % 16 == 0 and rh % 16 == 0


def test_sampled_references_pass_the_pipeline_unchanged(sk_images):
    """What sample / compare / training samples hand the pipeline for a 1536 x 1024 render is already at most
    1 MP and a multiple of 16, so the pipeline encodes exactly the pixels training encoded."""
    ref = fitted_references(str(sk_images / "coffee.png"), (1536, 1024))
    assert ref.size == (1248, 832) == reference_size((1536, 1024))
    trained = load_and_fit(sk_images / "coffee.png", reference_size((1536, 1024)))  # what the cache encodes
    assert torch.equal(trained, torch.from_numpy(np.array(ref, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    assert fitted_references(str(sk_images / "coffee.png"), (512, 512)).size == (512, 512)


def test_a_smaller_reference_gets_the_pipelines_ids(klein_base_dir, sk_images):
    """A reference of another size than the image: its tokens and ids are what Flux2KleinPipeline builds for it
    (rows and columns of its own grid at t = 10); without its size the token count is refused, not misread."""
    from diffusers import Flux2KleinPipeline

    vae = load_vae(klein_base_dir)
    pixels = load_and_fit(sk_images / "coffee.png", (48, 32))[None]  # (1, 3, 32, 48): a (4, 6) latent
    ours = pack(encode_images(vae, pixels))  # (1, 6, 128)
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    theirs, their_ids = pipe.prepare_image_latents([pixels], 1, None, "cpu", torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    noisy = torch.randn(1, 16, 128)  # a 64 x 64 image: an 8 x 8 latent
    kw = get("flux2").model_inputs(noisy, torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 5, 96)}, 8, 8,
                                   None, "cpu", torch.float32, reference=ours, reference_hw=(4, 6))
    assert kw["hidden_states"].shape == (1, 22, 128)
    assert torch.equal(kw["img_ids"][:, 16:], their_ids)
    with pytest.raises(ValueError, match="reference_hw"):
        get("flux2").model_inputs(noisy, torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 5, 96)}, 8, 8,
                                  None, "cpu", torch.float32, reference=ours)


def _pool(pixels):  # a stand-in VAE: /8 average pooling, 4 channels
    return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]


def test_the_cache_stores_references_above_1_mp_at_1_mp(tmp_path, sk_images):
    """At a 1536^2 bucket the image's latents are 192^2 and its reference's 128^2 (1024^2 px); at 1024^2 both are
    128^2 and the key is what it always was (existing caches stay valid); the 1536 key names the reference size."""
    img, ref = sk_images / "astronaut.png", sk_images / "coffee.png"
    paths = cache_latents([(img, (1536, 1536), None, ref), (img, (1024, 1024), None, ref)], _pool, "pool",
                          tmp_path)
    big, small = load_cached(paths[0]), load_cached(paths[1])
    assert big[LATENT_NAME].shape == (4, 192, 192) and big[CONTROL_NAME].shape == (4, 128, 128)
    assert small[LATENT_NAME].shape == small[CONTROL_NAME].shape == (4, 128, 128)
    torch.testing.assert_close(big[CONTROL_NAME], small[CONTROL_NAME])  # the same 1 MP fit of the same image
    from dev2pro.data.cache import PREPROCESS_VERSION, _key
    old = dict(kind="latents", image="i", encoder="e", settings={}, preprocess=PREPROCESS_VERSION, control="c")
    assert latent_key("i", (1024, 1024), "e", control_sha256="c") == _key({**old, "size": [1024, 1024]})
    assert latent_key("i", (1536, 1536), "e", control_sha256="c") != _key({**old, "size": [1536, 1536]})


def test_the_plan_prices_references_at_1_mp():
    """A 1536^2 image with two references: 9216 + 2 x 4096 tokens; the plan's line names the image's side."""
    from dev2pro.families.flux2.spec import KLEIN_4B_BASE
    from dev2pro.plan import estimate, render

    inp = PlanInputs(KLEIN_4B_BASE, "bf16", image_tokens=(9216 + 2 * 4096,), images_per_sample=3,
                     reference_tokens=4096)
    assert inp.target_tokens(9216 + 2 * 4096) == 9216
    assert "17408 image tokens (~1536px^2 + its 2 references)" in render(estimate(inp))
    assert PlanInputs(KLEIN_4B_BASE, "bf16", image_tokens=(3 * 4096,), images_per_sample=3).target_tokens(
        3 * 4096) == 4096  # without reference_tokens: references as large as the image, as before


def test_training_feeds_the_capped_reference(tmp_path, klein_base_dir, pairs, monkeypatch):  # noqa: F811
    """End to end with the cap lowered to 48^2 px so a 64 px bucket is above it: every forward sees 16 image
    tokens and 9 reference tokens (a 6 x 6 latent), the cache holds the 48 px fit, and the loss is finite."""
    monkeypatch.setattr(buckets, "MAX_REFERENCE_PIXELS", 48 * 48)
    seen = []
    real = objectives.predict

    def spy(model, inputs, guidance, device, dtype):
        seen.append((tuple(inputs.reference.shape), inputs.reference_hw))
        return real(model, inputs, guidance, device, dtype)

    monkeypatch.setattr(objectives, "predict", spy)
    from dev2pro.recipes.train_lora import train

    summary = train(_config(tmp_path, klein_base_dir, pairs), progress=False)
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert seen and all(s == ((1, 9, 128), (6, 6)) for s in seen)
    vae = load_vae(klein_base_dir)
    want = encode_images(vae, load_and_fit(pairs / "before" / "coffee.jpg", (48, 48))[None])[0]
    cached = [load_cached(p) for p in (tmp_path / "cache" / "latents").glob("*.safetensors")]
    assert sum(torch.allclose(c[CONTROL_NAME], want, atol=1e-5) for c in cached) == 1
