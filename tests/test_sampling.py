"""sampling: guidance modes, determinism, pipelines without text encoders, LoRAs, grids, PNG metadata, arguments."""

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro import sampling as S
from dev2pro.config import parse_size
from dev2pro.errors import UserError


def _guidance(pipe, guidance=3.5, true_cfg=1.0, mode="auto"):
    """Resolved once for the pipeline's transformer, as every caller of render does."""
    return S.resolve_guidance(pipe.transformer.config.guidance_embeds, mode, guidance, true_cfg)


def _render(pipe, embeds, seeds, guidance=3.5, true_cfg=1.0, mode="auto", **kw):
    return S.render(pipe, embeds, seeds, _guidance(pipe, guidance, true_cfg, mode), **kw)


def _render_latents(pipe, embeds, seeds, guidance=3.5, true_cfg=1.0, mode="auto", **kw):
    return S.render_latents(pipe, embeds, seeds, _guidance(pipe, guidance, true_cfg, mode), **kw)


STEPS = 2
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def dev(tiny_dev_dir):
    """(pipeline with text encoders, prompt embeddings, negative embedding) for the tiny dev model."""
    components = S.load_components(tiny_dev_dir)
    base, _ = S.load_base(tiny_dev_dir)
    pipe = S.build_pipeline(components, base)
    embeds = S.encode_prompts(pipe, ["a red cat", "a blue dog"])
    return pipe, embeds


@pytest.fixture(scope="module")
def pro(tiny_pro_dir):
    components = S.load_components(tiny_pro_dir)
    base, _ = S.load_base(tiny_pro_dir)
    pipe = S.build_pipeline(components, base)
    return pipe, S.encode_prompts(pipe, ["a red cat"])


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class ForwardSpy:
    """Counts transformer forward calls and records the guidance each one got."""

    def __init__(self, transformer):
        self.guidance = []
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        g = kwargs.get("guidance")
        self.guidance.append(None if g is None else float(g.flatten()[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_guidance_mode_follows_the_weights(dev, pro):
    assert S.guidance_mode(dev[0].transformer) == "embedded"
    assert S.guidance_mode(pro[0].transformer) == "true_cfg"


def test_resolve_guidance_table():
    assert S.resolve_guidance(True) == S.Guidance("embedded", 3.5, 1.0)
    assert S.resolve_guidance(False) == S.Guidance("true_cfg", None, 3.5)
    assert S.resolve_guidance(True, "embedded", 3.5, 2.0) == S.Guidance("embedded", 3.5, 2.0)  # both combined
    assert S.resolve_guidance(True, "true_cfg", 4.0) == S.Guidance("true_cfg", 1.0, 4.0)  # dev2pro-like base
    assert S.resolve_guidance(False, "true_cfg", 3.5, 5.0) == S.Guidance("true_cfg", None, 5.0)  # --cfg wins
    with pytest.raises(UserError, match="guidance embedding"):
        S.resolve_guidance(False, "embedded")
    with pytest.raises(UserError, match=">= 1"):
        S.resolve_guidance(True, "auto", 3.5, 0.5)
    with pytest.raises(UserError, match="not one of"):
        S.resolve_guidance(True, "cfg")


def test_same_seed_same_pixels_other_seed_differs(dev):
    pipe, embeds = dev
    a, b = _render(pipe, embeds[:1], [7, 8], steps=STEPS, **SIZE)
    (again,) = _render(pipe, embeds[:1], [7], steps=STEPS, **SIZE)  # alone, not in a batch of seeds
    assert a.size == (64, 64)
    assert np.array_equal(pixels(a), pixels(again))
    assert np.abs(pixels(a) - pixels(b)).mean() > 1.0


def test_images_are_prompt_major(dev):
    pipe, embeds = dev
    images = _render(pipe, embeds, [0, 1], steps=STEPS, **SIZE)
    (p1s0,) = _render(pipe, embeds[1:], [0], steps=STEPS, **SIZE)
    assert len(images) == 4
    assert np.array_equal(pixels(images[2]), pixels(p1s0))


def test_dev_uses_embedded_guidance_one_forward_per_step(dev):
    pipe, embeds = dev
    with ForwardSpy(pipe.transformer) as spy:
        _render(pipe, embeds[:1], [0], guidance=3.5, steps=STEPS, **SIZE)
    assert spy.guidance == [3.5] * STEPS


def test_pro_uses_true_cfg_two_forwards_per_step(pro):
    pipe, embeds = pro
    with ForwardSpy(pipe.transformer) as spy:
        _render(pipe, embeds, [0], guidance=3.5, steps=STEPS, **SIZE)
    assert spy.guidance == [None] * (2 * STEPS)


def test_embedded_guidance_combines_with_true_cfg(dev):
    pipe, embeds = dev
    with ForwardSpy(pipe.transformer) as spy:
        plain = _render(pipe, embeds[:1], [0], guidance=3.5, steps=STEPS, **SIZE)[0]
        cfg = _render(pipe, embeds[:1], [0], guidance=3.5, true_cfg=3.0, steps=STEPS, **SIZE)[0]
    assert spy.guidance == [3.5] * STEPS + [3.5] * (2 * STEPS)
    assert not np.array_equal(pixels(plain), pixels(cfg))
    with ForwardSpy(pipe.transformer) as spy:  # forced true_cfg on a dev-like base: embedding at neutral 1.0
        _render(pipe, embeds[:1], [0], guidance=3.5, mode="true_cfg", steps=STEPS, **SIZE)
    assert spy.guidance == [1.0] * (2 * STEPS)


def test_pipeline_without_text_encoders_renders_from_embeddings(dev, tiny_dev_dir):
    pipe, embeds = dev
    components = S.load_components(tiny_dev_dir, text_encoders=False)
    assert components["text_encoder"] is None and components["vae"] is not None
    bare = S.build_pipeline(components, pipe.transformer)
    a = _render(bare, embeds[:1], [3], steps=STEPS, **SIZE)[0]
    b = _render(pipe, embeds[:1], [3], steps=STEPS, **SIZE)[0]
    assert np.array_equal(pixels(a), pixels(b))
    with pytest.raises(ValueError, match="negative"):  # true CFG needs a negative it cannot encode
        _render(bare, embeds[:1], [3], true_cfg=2.0, steps=STEPS, **SIZE)
    negative = S.encode_prompts(pipe, [""])[0]
    c = _render(bare, embeds[:1], [3], true_cfg=2.0, negative=negative, steps=STEPS, **SIZE)[0]
    d = _render(pipe, embeds[:1], [3], true_cfg=2.0, steps=STEPS, **SIZE)[0]  # default negative = ""
    assert np.array_equal(pixels(c), pixels(d))


def test_render_restores_training_mode(dev):
    pipe, embeds = dev
    pipe.transformer.train()
    try:
        _render(pipe, embeds[:1], [0], steps=1, **SIZE)
        assert pipe.transformer.training
    finally:
        pipe.transformer.eval()


def test_bad_size_is_a_user_error(dev):
    pipe, embeds = dev
    with pytest.raises(UserError, match="multiples of 16"):
        _render(pipe, embeds[:1], [0], steps=1, width=72, height=64)


def _random_lora(transformer, seed: int, path):
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

    g = torch.Generator().manual_seed(seed)
    lw = LoraWeights()
    for name, m in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v", "ff.net.2", "proj_mlp")):
            lw[name] = LoraModule(torch.randn(4, m.in_features, generator=g) * 0.3,
                                  torch.randn(m.out_features, 4, generator=g) * 0.3, alpha=4.0)
    return save_lora(lw, path, "kohya")


def test_lora_scale_changes_output_and_zero_is_no_lora(dev, tiny_dev_dir, tmp_path):
    pipe, embeds = dev
    a = _random_lora(pipe.transformer, 1, tmp_path / "a.safetensors")
    b = _random_lora(pipe.transformer, 2, tmp_path / "b.safetensors")

    def image(loras):
        base, _ = S.load_base(tiny_dev_dir, loras)
        return pixels(_render(S.build_pipeline({"vae": pipe.vae, "scheduler": pipe.scheduler}, base), embeds[:1],
                               [0], steps=STEPS, **SIZE)[0])

    plain, with_a, a_zero = image([]), image([(a, 1.0)]), image([(a, 0.0)])
    assert np.abs(with_a - plain).mean() > 0.5
    assert np.array_equal(a_zero, plain)
    # Several LoRAs stay active together; one at scale 0 contributes nothing.
    assert np.array_equal(image([(a, 1.0), (b, 0.0)]), with_a)
    assert not np.array_equal(image([(a, 1.0), (b, 1.0)]), with_a)


def test_make_grid_size_and_labels():
    ims = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(6)]
    grid = S.make_grid(ims, rows=3, cols=2)
    assert grid.size == (128, 144)
    assert grid.getpixel((64 + 5, 48 * 2 + 5)) == (200, 0, 0)  # row-major: cell (2, 1) is image 5
    labelled = S.make_grid(ims, rows=3, cols=2, labels=[f"im {i}" for i in range(6)], pad=4)
    assert labelled.size[0] == 2 * 64 + 4 and labelled.size[1] > 3 * 48 + 2 * 4
    with pytest.raises(ValueError, match="needs 6 images"):
        S.make_grid(ims[:5], rows=3, cols=2)


def test_save_png_text_chunks_atomic_no_overwrite(tmp_path):
    im = Image.new("RGB", (16, 16), "blue")
    path = S.save_png(im, tmp_path / "x.png", {"prompt": "a cat", "seed": "3", "settings": {"steps": 4}})
    loaded = Image.open(path)
    assert loaded.text["prompt"] == "a cat" and loaded.text["seed"] == "3"
    assert loaded.text["settings"] == '{"steps": 4}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temp files left
    with pytest.raises(UserError, match="already exists"):
        S.save_png(im, path, {})
    S.save_png(Image.new("RGB", (16, 16), "red"), path, {}, overwrite=True)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)


def test_parse_lora_arg(tmp_path):
    assert S.parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert S.parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert S.parse_lora_arg("dir/style.safetensors:-1e-1") == ("dir/style.safetensors", -0.1)
    assert S.parse_lora_arg(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert S.parse_lora_arg(r"C:\loras\style.safetensors:0.5") == (r"C:\loras\style.safetensors", 0.5)
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert S.parse_lora_arg(str(odd)) == (str(odd), 1.0)  # an existing file wins
    for bad in ("style.safetensors:strong", "style.safetensors:", "style.safetensors:nan", ":0.5"):
        with pytest.raises(UserError, match="scale"):
            S.parse_lora_arg(bad)


def test_parse_size_seeds_prompts(tmp_path):
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size("512") == (512, 512)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        parse_size("big")
    assert S.parse_seeds("1, 2,3") == [1, 2, 3]
    with pytest.raises(UserError, match="integers"):
        S.parse_seeds("1,two")
    f = tmp_path / "prompts.txt"
    f.write_text("# header\na cat\n\n  a dog  \n")
    assert S.read_prompts(f) == ["a cat", "a dog"]
    with pytest.raises(UserError, match="does not exist"):
        S.read_prompts(tmp_path / "none.txt")


def test_prompts_from_any_readable_file(tmp_path):
    """/dev/null, a named pipe, <(printf ...) are files too: read, not called missing (is_file() said they were)."""
    import os
    import threading

    with pytest.raises(UserError, match=r"^prompts file /dev/null holds no prompts \(one per line"):
        S.read_prompts("/dev/null")
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("a cat\n# note\na dog\n",))
    writer.start()
    assert S.read_prompts(fifo) == ["a cat", "a dog"]
    writer.join()
    with pytest.raises(UserError, match=f"prompts file {tmp_path} is a folder: give a text file"):
        S.read_prompts(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        S.read_prompts(tmp_path / "latin1.txt")


def test_load_components_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        S.load_components(tmp_path / "missing")
    (tmp_path / "vae").mkdir()
    with pytest.raises(UserError, match="lacks text_encoder"):
        S.load_components(tmp_path)


def test_render_latents_matches_render_and_ignores_batching(dev):
    """Batched latents == per-image latents; decoded they are render()'s image (same seed, same noise)."""
    from dev2pro.flux.latents import decode_latents

    pipe, embeds = dev
    items, seeds = [embeds[0], embeds[1], embeds[0]], [0, 1, 2]
    together = _render_latents(pipe, items, seeds, guidance=3.5, steps=STEPS, batch_size=3, **SIZE)
    alone = _render_latents(pipe, items, seeds, guidance=3.5, steps=STEPS, batch_size=1, **SIZE)
    assert together.shape == (3, 16, 8, 8)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[2], atol=1e-3)  # same prompt, other seed
    image = _render(pipe, embeds[1:2], [1], guidance=3.5, steps=STEPS, **SIZE)[0]
    decoded = ((decode_latents(pipe.vae, together[1:2])[0].clamp(-1, 1) + 1) * 127.5).round()
    ours = decoded.permute(1, 2, 0).to(torch.int16).numpy()
    assert np.abs(ours - pixels(image)).max() <= 1


def test_render_latents_true_cfg_needs_negative_and_aligned_lists(pro):
    pipe, embeds = pro
    with pytest.raises(ValueError, match="negative"):
        _render_latents(pipe, embeds, [0], guidance=3.5, steps=STEPS, **SIZE)
    with pytest.raises(ValueError, match="aligned"):
        _render_latents(pipe, embeds, [0, 1], guidance=3.5, steps=STEPS, **SIZE)
    neg = S.encode_prompts(pipe, [""])[0]
    with ForwardSpy(pipe.transformer) as spy:
        _render_latents(pipe, embeds, [0], guidance=3.5, negative=neg, steps=STEPS, **SIZE)
    assert len(spy.guidance) == 2 * STEPS


def test_bf16_transformer_beside_an_fp32_vae_renders(dev, tiny_dev_dir):
    """Training keeps the VAE it cached with (fp32) and samples with the bf16 base: decoding must use the VAE's
    dtype (the pipeline passed bf16 latents to the fp32 VAE and crashed)."""
    import copy

    pipe, embeds = dev
    components = S.load_components(tiny_dev_dir, text_encoders=False)
    bf16 = S.build_pipeline(components, copy.deepcopy(pipe.transformer).to(torch.bfloat16))
    assert bf16.vae.dtype == torch.float32
    img = _render(bf16, embeds[:1], [3], steps=STEPS, **SIZE)[0]
    ref = _render(pipe, embeds[:1], [3], steps=STEPS, **SIZE)[0]
    assert img.size == ref.size
    assert np.abs(pixels(img).astype(int) - pixels(ref).astype(int)).mean() < 8  # same picture, bf16 rounding


def test_default_guidance_states_the_base_scale_rule_once():
    """Given values win; a ``scale`` replaces the base's own one: as embedded guidance for dev, as true CFG at
    guidance 1 for a de-distillation export (what `calibrate --cfg` means for either)."""
    from types import SimpleNamespace

    from dev2pro.guidance_defaults import default_guidance

    flux1 = SimpleNamespace()  # FLUX.1: no per-variant sampling table (20 steps at 3.5)
    flux2_dev = SimpleNamespace(sampling=SimpleNamespace(steps=50, scale=4.0, guidance="embedded"))
    dd = {"dev2pro.recipe": "dedistill", "dev2pro.objective": "flow"}
    assert default_guidance(flux1, {}) == (3.5, 1.0)
    assert default_guidance(flux2_dev, {}) == (4.0, 1.0)
    assert default_guidance(flux1, {}, scale=2.0) == (2.0, 1.0)
    assert default_guidance(flux1, dd) == (1.0, 3.5)
    assert default_guidance(flux2_dev, dd, scale=6.0) == (1.0, 6.0)
    assert default_guidance(flux1, dd, cfg=5.0, scale=6.0) == (1.0, 5.0)
    assert default_guidance(flux1, dd, guidance=3.5) == (3.5, 1.0)  # rendered as dev, on request
