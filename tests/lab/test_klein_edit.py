"""`dev2pro demo --family flux2-klein-edit`: the pixel codec on both sides of an edit pair (fast), the pairs, the
judges' table and verdict from numbers (fast); the quick profile end to end is in tests/recipes/test_demo_klein.py
(it reuses that demo's Base)."""


import numpy as np
import pytest
import torch

from dev2pro.lab import klein
from dev2pro.lab import klein_edit as ke
from dev2pro.lab.world import load_digits_world, plain, styled, to_pil


@pytest.fixture(scope="module")
def world():
    return load_digits_world(seed=0)


def test_codec_vae_encodes_training_images_and_pipeline_references_as_the_codec():
    from diffusers import Flux2KleinPipeline

    from dev2pro.families.flux2.latents import encode_images
    from dev2pro.families.flux2.tiny import tiny_vae
    from dev2pro.flux.latents import pack

    rgb = np.round(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)) * 255).astype(np.float32) / 255  # 8-bit
    vae = klein.pixel_codec_vae(tiny_vae())  # non-trivial batch-norm statistics
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3) * 2 - 1
    torch.testing.assert_close(encode_images(vae, pixels), klein.encode(rgb), rtol=0, atol=1e-5)  # the cache's
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    image = pipe.image_processor.preprocess(to_pil(rgb[0], scale=8), height=64, width=64, resize_mode="crop")
    tokens, ids = pipe.prepare_image_latents([image], 1, None, "cpu", torch.float32)  # what image=[ref] feeds
    torch.testing.assert_close(tokens, pack(klein.encode(rgb[:1])), rtol=0, atol=1e-5)
    assert set(ids[0, :, 0].tolist()) == {10}


def test_codec_vae_loaded_patches_flux2s_loader_only_inside(klein_base_dir):
    from dev2pro.families import get

    fam = get("flux2")
    with klein.codec_vae_loaded():
        assert fam.load_vae(klein_base_dir).pixel_codec == klein.CODEC
    assert not hasattr(fam.load_vae(klein_base_dir), "pixel_codec")


def test_pairs_share_names_and_only_the_after_images_have_the_instruction(tmp_path, world):
    from PIL import Image

    after, before = ke.write_pairs(tmp_path / "pairs", world, per_class=2, seed=1)
    names = sorted(f.name for f in after.glob("*.png"))
    assert len(names) == 20 and names == sorted(f.name for f in before.glob("*.png"))
    assert not list(before.glob("*.txt"))
    assert {f.read_text() for f in after.glob("*.txt")} == {ke.INSTRUCTION} and "digit" not in ke.INSTRUCTION
    with Image.open(after / names[3]) as a, Image.open(before / names[3]) as b:
        a8, b8 = (np.asarray(im.convert("RGB").resize((8, 8), Image.BOX), np.float32) / 255 for im in (a, b))
    gray = b8[..., 0]
    np.testing.assert_allclose(b8, plain(gray[None])[0], atol=1e-6)
    np.testing.assert_allclose(a8, styled(gray[None])[0], atol=1 / 255)  # the same digit, restyled
    refs, labels = ke.eval_refs(world, per_class=3, seed=0)
    assert refs.shape == (30, 8, 8) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    again, _ = ke.eval_refs(world, per_class=3, seed=0)
    other, _ = ke.eval_refs(world, per_class=3, seed=1)
    assert np.array_equal(refs, again) and not np.array_equal(refs, other)


def _fake_results(tmp_path, world, seeds, per_class, e_copies: bool):
    """Samples files as the arms would write them: E = the perfect edit (or T's images), T = styled digits of the
    wrong class, B = those digits plain."""
    results = []
    for s in range(seeds):
        refs, labels = ke.eval_refs(world, per_class, s)
        wrong = np.stack([world.holdout_images[np.flatnonzero(world.holdout_labels == (y + 1) % 10)[0]]
                          for y in labels])
        arms = {"T": styled(wrong), "B": plain(wrong)}
        arms["E"] = styled(refs) if e_copies else arms["T"]
        for a, rgb in arms.items():
            f = tmp_path / f"{a}-{s}-{e_copies}.npz"
            klein.save_samples(f, {"edits": rgb})
            results.append({"arm": a, "seed": s, "samples": str(f)})
    return results


def test_table_and_verdict_follow_the_numbers(tmp_path, world):
    from dev2pro.lab.judges import fit_judges

    judges = fit_judges(world, seed=0)
    table = ke.evaluate(_fake_results(tmp_path, world, 2, 3, True), judges, world, seeds=2, per_class=3)
    rows, e_t = table["rows"], table["paired"]["E-T"]
    assert rows["E"]["pix"]["mean"] == 0 and rows["E"]["digits"]["mean"] > 0.9 and rows["T"]["digits"]["mean"] < 0.2
    assert rows["B"]["style"]["mean"] == 0 and len(rows["E"]["digits"]["values"]) == 2
    assert rows[ke.COPY]["digits"]["mean"] > 0.8 and rows[ke.COPY]["style"]["mean"] == 0  # the judge reads plain
    assert e_t["digits"]["clear_images"] == 1 and e_t["pix"]["clear_images"] == 1  # lower distance is better
    assert e_t["digits"]["seeds"]["n"] == 2 and e_t["digits"]["images"]["n"] == 60
    assert table["verdict"].startswith("The edit LoRA uses its reference, which the Base alone does not: on 60 "
                                       "held-out references")
    same = ke.evaluate(_fake_results(tmp_path, world, 1, 3, False), judges, world, seeds=1, per_class=3)
    assert same["paired"]["E-T"]["digits"]["clear_images"] == 0  # identical images: no difference
    assert same["paired"]["E-T"]["digits"]["seeds"] is None
    assert same["verdict"].startswith("No clear evidence that the edit LoRA uses its reference")


def test_cli_picks_the_edit_demo(monkeypatch, tmp_path):
    from dev2pro.cli import main
    from dev2pro.recipes import demo_edit

    calls = []
    monkeypatch.setattr(demo_edit, "run_demo_edit", lambda *a: calls.append(a))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--family", "flux2-klein-edit", "--quick", "--no-progress"]) == 0
    assert calls == [("demo-klein-edit-out", "quick", None, False, False, 2)]
