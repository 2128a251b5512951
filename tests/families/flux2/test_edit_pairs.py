"""Edit pairs on FLUX.2 (``[[data.folders]] controls``): each training image has a reference image the model sees
as clean tokens after the noisy ones, at time coordinate 10 -- what ``Flux2KleinPipeline`` builds for ``image=`` --
and learns to produce the training image from. Checked against diffusers' own pipeline, through the cache, the
loop, and the one-line refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dev2pro import objectives
from dev2pro.data.cache import CONTROL_NAME, LATENT_NAME, load_cached
from dev2pro.errors import UserError
from dev2pro.families import get
from dev2pro.families.flux2.latents import encode_images, load_vae
from dev2pro.flux.latents import pack
from dev2pro.recipes.compare import run_compare
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_compare_config, load_train_config


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, sk_images):
    """Three photos as targets, their mirrored greyscale versions as references (two of another suffix)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "after").mkdir()
    (root / "before").mkdir()
    for i, name in enumerate(("astronaut.png", "coffee.png", "chelsea.png")):
        shutil.copy(sk_images / name, root / "after" / name)
        with Image.open(sk_images / name) as im:
            ref = ImageOps.mirror(ImageOps.grayscale(im).convert("RGB"))
        ref.save(root / "before" / (name if i == 0 else name.replace(".png", ".jpg")))
    return root


def _config(tmp_path, model_dir, pairs, controls=True, steps=2, extra=""):
    path = tmp_path / "edit.toml"
    path.write_text(f"""
[model]
path = "{model_dir}"
dtype = "fp32"
gradient_checkpointing = false

[[data.folders]]
path = "{pairs / 'after'}"
{f'controls = "{pairs / "before"}"' if controls else ''}
{extra}
[data]
default_caption = "make it a colour photo"
resolution = 64
bucket_step = 64
cache_dir = "{tmp_path / 'cache'}"

[lora]
rank = 4

[train]
steps = {steps}
seed = 3

[save]
output_dir = "{tmp_path / 'run'}"
formats = ["diffusers"]
""")
    return load_train_config(path)


def test_reference_tokens_are_what_the_klein_pipeline_builds(klein_base_dir, sk_images):
    """Our stored latents of the reference, packed, with ids at t = 10, after the noisy tokens: token for token and
    id for id what Flux2KleinPipeline.prepare_image_latents + its denoising loop give the transformer."""
    from diffusers import Flux2KleinPipeline

    from dev2pro.data.buckets import load_and_fit

    vae = load_vae(klein_base_dir)
    pixels = load_and_fit(sk_images / "coffee.png", (64, 64))[None]  # (1, 3, 64, 64) in [-1, 1]
    ours = pack(encode_images(vae, pixels))
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    theirs, their_ids = pipe.prepare_image_latents([pixels], 1, None, "cpu", torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    noisy = torch.randn(1, ours.shape[1], 128)
    kw = get("flux2").model_inputs(noisy, torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 5, 96)}, 8, 8,
                                   None, "cpu", torch.float32, reference=ours)
    latent_ids = pipe._prepare_latent_ids(torch.zeros(1, 128, 4, 4))
    assert torch.equal(kw["hidden_states"], torch.cat([noisy, theirs], 1))
    assert torch.equal(kw["img_ids"], torch.cat([latent_ids, their_ids], 1))
    assert set(kw["img_ids"][0, 16:, 0].tolist()) == {10}


def test_klein_edit_lora_trains_with_the_reference_in_every_forward(tmp_path, klein_base_dir, pairs, monkeypatch,
                                                                     capsys):
    seen = []
    real = objectives.predict

    def spy(model, inputs, guidance, device, dtype):
        seen.append(None if inputs.reference is None else tuple(inputs.reference.shape))
        out = real(model, inputs, guidance, device, dtype)
        assert out.shape == inputs.x_t.shape  # the prediction is the noisy tokens' only
        return out

    monkeypatch.setattr(objectives, "predict", spy)
    summary = train(_config(tmp_path, klein_base_dir, pairs), progress=False)
    assert "; edit pairs: 1 reference(s) each\n" in capsys.readouterr().out
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert seen and all(s == (1, 16, 128) for s in seen)  # 64 px -> 4x4 tokens of 128 channels, every step
    cached = [load_cached(p) for p in (tmp_path / "cache" / "latents").glob("*.safetensors")]
    assert len(cached) == 3 and all(c[CONTROL_NAME].shape == c[LATENT_NAME].shape for c in cached)
    assert (tmp_path / "run" / "lora.diffusers.safetensors").is_file()

    plain = tmp_path / "plain"
    plain.mkdir()
    seen.clear()
    without = train(_config(plain, klein_base_dir, pairs, controls=False), progress=False)
    assert seen and all(s is None for s in seen)
    assert without["losses"] != summary["losses"]  # same seed and targets: the reference changed the prediction


def test_reference_latents_are_the_reference_fitted_to_the_bucket(tmp_path, klein_base_dir, pairs):
    from dev2pro.data.buckets import load_and_fit

    train(_config(tmp_path, klein_base_dir, pairs, steps=1), progress=False)
    vae = load_vae(klein_base_dir)
    want = encode_images(vae, load_and_fit(pairs / "before" / "coffee.jpg", (64, 64))[None])[0]
    got = [c for c in map(load_cached, (tmp_path / "cache" / "latents").glob("*.safetensors"))
           if torch.allclose(c[CONTROL_NAME], want, atol=1e-5)]
    assert len(got) == 1


def test_edit_pair_refusals_name_the_fix(tmp_path, klein_base_dir, tiny_dev_dir, pairs):
    (pairs / "after" / "rocket.png").write_bytes((pairs / "after" / "coffee.png").read_bytes())
    try:
        with pytest.raises(UserError, match=r"(?s)1 image\(s\) have no usable reference image.*rocket.png"):
            train(_config(tmp_path, klein_base_dir, pairs), progress=False)
    finally:
        (pairs / "after" / "rocket.png").unlink()
    with pytest.raises(UserError, match="need a FLUX.2 model"):
        train(_config(tmp_path, tiny_dev_dir, pairs), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pairs / "after" / "coffee.png", other / "c.png")
    mixed = f'[[data.folders]]\npath = "{other}"\n'
    with pytest.raises(UserError, match="some images have reference images and some do not.*other"):
        train(_config(tmp_path, klein_base_dir, pairs, extra=mixed), progress=False)
    with pytest.raises(UserError, match=r"data.folders\[0\].controls: .*nope does not exist"):  # before any write
        train(_config(tmp_path, klein_base_dir, _Paths(pairs / "after", tmp_path / "nope")), progress=False)


class _Paths:
    """``pairs / name`` for a given pair of folders (a missing controls folder)."""

    def __init__(self, after, before):
        self.map = {"after": after, "before": before}

    def __truediv__(self, name):
        return self.map[name]


# ------------------------------------------------------------------------------------------------ sampling
def _token_counts(monkeypatch):
    """The image-token count and the time coordinates of every transformer forward."""
    from diffusers import Flux2Transformer2DModel

    calls, real = [], Flux2Transformer2DModel.forward

    def spy(self, *args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[1], sorted(set(kwargs["img_ids"][0, :, 0].tolist()))))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Flux2Transformer2DModel, "forward", spy)
    return calls


def test_train_samples_edit_the_sample_control_image(tmp_path, klein_base_dir, klein_distilled_dir, pairs,
                                                     monkeypatch):
    extra = f"""
[sample]
prompts = ["make it a colour photo"]
steps = 2
size = "96x64"
baseline = false
control = "{pairs / 'before' / 'astronaut.png'}"
"""
    cfg = _config(tmp_path, klein_base_dir, pairs, steps=1, extra=extra)
    cfg.model.inference_base = str(klein_distilled_dir / "transformer")
    calls = _token_counts(monkeypatch)
    train(cfg, progress=False)
    sampled = [c for c in calls if c[0] != 32]  # training forwards: 16 noisy + 16 reference tokens at 64x64
    assert sampled and all(c == (48, [0, 10]) for c in sampled)  # 96x64 -> 24 tokens, and the reference's 24
    for name in ("step000001.png", "step000001-base.png"):
        with Image.open(tmp_path / "run" / "samples" / name) as im:
            assert im.text["reference"] == str(pairs / "before" / "astronaut.png")


def test_sample_cli_image_is_the_pipelines_reference(tmp_path, klein_distilled_dir, pairs, monkeypatch, capsys):
    from dev2pro.cli import main

    calls = _token_counts(monkeypatch)
    args = ["sample", "--model", str(klein_distilled_dir), "--prompt", "colour", "--size", "64x64", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert calls and all(c == (16, [0]) for c in calls)
    calls.clear()
    ref = pairs / "before" / "coffee.jpg"
    assert main([*args, "--image", str(ref), "--out", str(tmp_path / "edit")]) == 0
    assert calls and all(c == (32, [0, 10]) for c in calls)
    with Image.open(tmp_path / "edit" / next(p.name for p in (tmp_path / "edit").glob("*.png"))) as im:
        edited = im.copy()
        assert str(ref) in im.text["dev2pro"]
    with Image.open(next((tmp_path / "plain").glob("*.png"))) as im:
        assert list(im.getdata()) != list(edited.getdata())  # same seed: the reference changed the image
    capsys.readouterr()
    assert main([*args, "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "x")]) == 2
    assert "--image" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compare_image_edits_it_in_every_arm_as_sample_does(tmp_path, klein_distilled_dir, pairs, monkeypatch):
    """compare's ``image``: every arm renders the reference edit -- pixel for pixel what `dev2pro sample --image`
    renders for the same base and seed -- and the report shows the reference; FLUX.1 and < 64 px are refused."""
    import json

    from dev2pro.cli import main

    ref = pairs / "before" / "coffee.jpg"
    calls = _token_counts(monkeypatch)
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{klein_distilled_dir}"\nprompts = ["colour"]\nseeds = [1]\nsize = "64x64"\n'
                      f'image = "{ref}"\n[[arms]]\nname = "a"\n[[arms]]\nname = "b"\nsteps = 2\n')
    assert main(["compare", str(config), "--out", str(tmp_path / "cmp")]) == 0
    assert calls and all(c == (32, [0, 10]) for c in calls)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["image"] == str(ref) and "reference image" in (tmp_path / "cmp" / "report.html").read_text()
    assert main(["sample", "--model", str(klein_distilled_dir), "--prompt", "colour", "--size", "64x64", "--seed",
                 "1", "--image", str(ref), "--out", str(tmp_path / "s")]) == 0
    with Image.open(next((tmp_path / "s").glob("*.png"))) as a, \
            Image.open(tmp_path / "cmp" / results["arms"][0]["images"][0]["file"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b)) and str(ref) in b.text["image"]
    with pytest.raises(UserError, match=r"image: FLUX.2's pipelines need a reference of >= 64 px"):
        run_compare(load_compare_config(str(config), ["size='32x64'"]), str(tmp_path / "c2"))


def test_sample_control_on_flux1_is_refused(tmp_path, tiny_dev_dir, pairs, capsys):
    from dev2pro.cli import main

    assert main(["sample", "--model", str(tiny_dev_dir), "--prompt", "p", "--size", "64x64", "--image",
                 str(pairs / "before" / "astronaut.png"), "--out", str(tmp_path / "x")]) == 2
    assert "no reference-image input" in capsys.readouterr().err
    extra = f'[sample]\nprompts = ["p"]\ncontrol = "{pairs / "before" / "astronaut.png"}"\n'
    with pytest.raises(UserError, match="FLUX.1 has no reference-image input"):
        train(_config(tmp_path, tiny_dev_dir, pairs, extra=extra), progress=False)
    with pytest.raises(UserError, match="sample.control: the samples would edit a reference, but no "
                                        r"\[\[data.folders\]\] entry has controls"):
        _config(tmp_path, tiny_dev_dir, pairs, controls=False, extra=extra)
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{tiny_dev_dir}"\nprompts = ["p"]\nsize = "64x64"\n'
                      f'image = "{pairs / "before" / "astronaut.png"}"\n[[arms]]\nname = "a"\n')
    with pytest.raises(UserError, match="image: FLUX.1 has no reference-image input"):
        run_compare(load_compare_config(str(config)), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_plan_counts_the_reference_tokens(tmp_path, klein_base_dir, pairs, capsys):
    """The reference's tokens go through every block beside the noisy ones: the memory plan sees twice the
    image tokens (64 px: 16 each), and says so (not a 90 px image)."""
    from dev2pro.plan import report
    from dev2pro.recipe_inputs import plan_inputs

    edit = plan_inputs(_config(tmp_path, klein_base_dir, pairs))
    assert edit.image_tokens == (32,)
    assert plan_inputs(_config(tmp_path, klein_base_dir, pairs, controls=False)).image_tokens == (16,)
    report(edit)
    assert "activations at 32 image tokens (~64px^2 + its reference)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ review fixes
def test_validation_loss_sees_the_reference_too(tmp_path, klein_base_dir, pairs, monkeypatch):
    """Held-out edit pairs are scored as they train: with their reference (it was a text-to-image loss)."""
    from dev2pro.train import validation

    seen, real = [], validation.predict

    def spy(model, inputs, guidance, device, dtype):
        seen.append(None if inputs.reference is None else tuple(inputs.reference.shape))
        return real(model, inputs, guidance, device, dtype)

    monkeypatch.setattr(validation, "predict", spy)
    train(_config(tmp_path, klein_base_dir, pairs, extra="[validation]\nfraction = 0.5\nevery = 1\n"),
          progress=False)
    assert seen and all(s is not None and s[1:] == (16, 128) for s in seen)


def test_kohya_parent_references_mirror_its_folders(tmp_path, pairs):
    """controls/10_cat/001.png (the path below the configured folder) first, then controls/001.png; one reference
    claimed by images of two kohya folders is refused; a controls folder inside the parent is not 'unused'."""
    import logging

    from dev2pro.data.folders import DatasetFolder, scan

    data, refs = tmp_path / "data", tmp_path / "data" / "controls"
    for sub in ("10_cat", "5_dog"):
        (data / sub).mkdir(parents=True)
        (refs / sub).mkdir(parents=True)
        shutil.copy(pairs / "after" / "coffee.png", data / sub / "001.png")
        shutil.copy(pairs / "before" / "astronaut.png", refs / sub / "001.png")
    found = {it.path.parent.name: it.controls for it in scan([DatasetFolder(data, controls=refs)]).items}
    assert found == {"10_cat": (refs / "10_cat" / "001.png",), "5_dog": (refs / "5_dog" / "001.png",)}
    for sub in ("10_cat", "5_dog"):
        shutil.rmtree(refs / sub)
    shutil.copy(pairs / "before" / "astronaut.png", refs / "001.png")
    logger = logging.getLogger("dev2pro.data.folders")
    with pytest.raises(UserError, match=r"(?s)controls/001.png is also .*10_cat/001.png's"):
        scan([DatasetFolder(data, controls=refs)])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        shutil.rmtree(data / "5_dog")
        assert scan([DatasetFolder(data, controls=refs)]).items[0].controls == (refs / "001.png",)
    finally:
        logger.removeHandler(handler)
    assert not any("not used" in r.getMessage() for r in records)


def test_a_reference_in_an_unsupported_format_is_named(tmp_path, pairs):
    """A .gif reference was reported as missing ('no before/coffee.png/.jpg/...'), which sends users looking."""
    from PIL import Image

    from dev2pro.data.folders import DatasetFolder, scan

    refs = tmp_path / "before"
    shutil.copytree(pairs / "before", refs)
    (refs / "coffee.jpg").unlink()
    Image.new("RGB", (64, 64)).save(refs / "coffee.gif")
    with pytest.raises(UserError, match=r"(?s)no usable reference.*coffee.gif is in a format we do not train on: "
                                        r"convert it to \.png"):
        scan([DatasetFolder(pairs / "after", controls=refs)], default_caption="edit")


def test_an_unreadable_reference_is_refused_before_any_model_loads(tmp_path, pairs):
    from dev2pro.data.folders import DatasetFolder, scan
    from dev2pro.families import get
    from dev2pro.train.preflight import check_reference

    refs = tmp_path / "before"
    shutil.copytree(pairs / "before", refs)
    cut = refs / "coffee.jpg"
    cut.write_bytes(cut.read_bytes()[:3000])  # a truncated JPEG: PIL's verify() alone passes it
    with pytest.raises(UserError, match=r"(?s)no usable reference.*coffee.jpg is unreadable"):
        scan([DatasetFolder(pairs / "after", controls=refs)], default_caption="edit")
    with pytest.raises(UserError, match=r"--image: .*coffee.jpg is not a usable image \(unreadable"):
        check_reference(str(cut), get("flux2"), "--image")


def test_a_reference_of_another_aspect_ratio_is_listed(tmp_path, pairs, caplog):
    from dev2pro.data.folders import DatasetFolder, scan

    refs = tmp_path / "before"
    shutil.copytree(pairs / "before", refs)
    Image.new("RGB", (400, 100)).save(refs / "astronaut.png")  # 4:1 for a square image
    with caplog.at_level("WARNING", logger="dev2pro.data.folders"):
        scan([DatasetFolder(pairs / "after", controls=refs)], default_caption="edit")
    assert "astronaut.png (400x100 px for a 512x512 image: 25% of it kept)" in caplog.text
    assert "coffee.jpg" not in caplog.text  # same shot, same aspect: nothing to say


# ------------------------------------------------------------------------------------------------ several references
@pytest.fixture(scope="module")
def two_refs(pairs):
    """A second reference folder beside ``before``: each target upside down (any second image works)."""
    second = pairs / "before2"
    if not second.exists():
        second.mkdir()
        for p in (pairs / "after").iterdir():
            with Image.open(p) as im:
                ImageOps.flip(im.convert("RGB")).save(second / p.name)
    return [pairs / "before", second]


def test_two_reference_tokens_are_what_the_klein_pipeline_builds(klein_base_dir, sk_images):
    """Two references: their tokens one after the other at t = 10 and 20, token for token and id for id what
    Flux2KleinPipeline.prepare_image_latents builds for image=[a, b]."""
    from diffusers import Flux2KleinPipeline

    from dev2pro.data.buckets import load_and_fit
    from dev2pro.flux.latents import pack_references

    vae = load_vae(klein_base_dir)
    pixels = [load_and_fit(sk_images / name, (64, 64))[None] for name in ("coffee.png", "astronaut.png")]
    ours = pack_references(torch.stack([encode_images(vae, p)[0] for p in pixels])[None])  # (1, 2, C, h, w)
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    theirs, their_ids = pipe.prepare_image_latents(pixels, 1, None, "cpu", torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    noisy = torch.randn(1, 16, 128)
    kw = get("flux2").model_inputs(noisy, torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 5, 96)}, 8, 8,
                                   None, "cpu", torch.float32, reference=ours)
    assert torch.equal(kw["img_ids"][:, 16:], their_ids) and kw["hidden_states"].shape == (1, 48, 128)
    assert [sorted(set(kw["img_ids"][0, i:i + 16, 0].tolist())) for i in (0, 16, 32)] == [[0], [10], [20]]


def test_an_edit_lora_trains_and_samples_with_two_references(tmp_path, klein_base_dir, pairs, two_refs,
                                                             monkeypatch, capsys):
    """controls = [a, b]: every forward sees both references' tokens (48 for a 64 px image), the cache holds both
    fitted latents in order, the plan counts three token sets, and the samples edit both sample.control images."""
    from dev2pro.data.buckets import load_and_fit
    from dev2pro.plan import report
    from dev2pro.recipe_inputs import plan_inputs

    seen, real = [], objectives.predict
    monkeypatch.setattr(objectives, "predict", lambda m, i, g, d, t: (seen.append(tuple(i.reference.shape)),
                                                                      real(m, i, g, d, t))[1])
    calls = _token_counts(monkeypatch)
    refs = [two_refs[0] / "coffee.jpg", two_refs[1] / "coffee.png"]
    extra = (f'controls = ["{two_refs[0]}", "{two_refs[1]}"]\n[sample]\nprompts = ["edit"]\nsteps = 2\nwidth = 64\n'
             f'height = 64\ncontrol = ["{refs[0]}", "{refs[1]}"]\n')
    cfg = _config(tmp_path, klein_base_dir, pairs, controls=False, extra=extra)
    summary = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(summary["losses"]))) and seen and all(s == (1, 32, 128) for s in seen)
    assert calls and all(c == (48, [0, 10, 20]) for c in calls)  # the sample grids: both references, in order
    vae = load_vae(klein_base_dir)
    want = [encode_images(vae, load_and_fit(p, (64, 64))[None])[0] for p in (pairs / "before" / "coffee.jpg",
                                                                            two_refs[1] / "coffee.png")]
    got = [c for c in map(load_cached, (tmp_path / "cache" / "latents").glob("*.safetensors"))
           if torch.allclose(c[CONTROL_NAME], want[0], atol=1e-5)]
    assert len(got) == 1 and torch.allclose(got[0]["control_1"], want[1], atol=1e-5)
    plan = plan_inputs(cfg)
    assert plan.image_tokens == (48,)
    report(plan)
    assert "(~64px^2 + its 2 references)" in capsys.readouterr().out


def test_reference_counts_must_agree(tmp_path, klein_base_dir, klein_distilled_dir, pairs, two_refs, capsys):
    """sample.control with another count than the controls folders, folders with different counts: refused with
    the fix; `sample --image A --image B` renders both."""
    from dev2pro.cli import main

    one = (f'controls = ["{two_refs[0]}", "{two_refs[1]}"]\n[sample]\nprompts = ["e"]\n'
           f'control = "{pairs / "before" / "astronaut.png"}"\n')
    with pytest.raises(UserError, match=r"sample.control: 1 reference image\(s\), but the LoRA learns edits from 2"):
        _config(tmp_path, klein_base_dir, pairs, controls=False, extra=one)
    other, other_refs = tmp_path / "other", tmp_path / "other-refs"
    for d in (other, other_refs):
        d.mkdir()
        shutil.copy(pairs / "after" / "coffee.png", d / "x.png")
    mixed = f'[[data.folders]]\npath = "{other}"\ncontrols = "{other_refs}"\n'
    with pytest.raises(UserError, match=r"different numbers of reference images \(1: e.g. .*2: e.g. "):
        train(_config(tmp_path, klein_base_dir, pairs, controls=False,
                      extra=f'controls = ["{two_refs[0]}", "{two_refs[1]}"]\n' + mixed), progress=False)
    args = ["sample", "--model", str(klein_distilled_dir), "--prompt", "p", "--size", "64x64", "--image",
            str(two_refs[0] / "coffee.jpg"), "--image", str(two_refs[1] / "coffee.png"), "--out", str(tmp_path / "s")]
    assert main(args) == 0
    with Image.open(next((tmp_path / "s").glob("*.png"))) as im:
        assert str(two_refs[1] / "coffee.png") in im.text["dev2pro"]
    capsys.readouterr()
    assert main([*args[:7], "--image", "", "--out", str(tmp_path / "e")]) == 2  # "$REF" unset: not a plain render
    assert "--image: an empty path" in capsys.readouterr().err and not (tmp_path / "e").exists()
    twice = [*args[:7], "--image", str(two_refs[0] / "coffee.jpg"), "--image", str(two_refs[0] / "coffee.jpg")]
    assert main([*twice, "--out", str(tmp_path / "t")]) == 2
    assert "the same reference image is given twice" in capsys.readouterr().err


def test_cache_shards_hold_the_references_and_train_with_them(tmp_path, klein_base_dir, tiny_dev_dir, pairs, two_refs,
                                                               monkeypatch, capsys):
    """`dev2pro cache --controls A --controls B`: each shard sample holds its references' latents, bit for bit what
    train's folder cache stores; training from the shards sees both references; the plan counts them."""
    from dev2pro.cli import main
    from dev2pro.data.folders import DatasetFolder
    from dev2pro.data.prepare import FolderOptions, load_training_data
    from dev2pro.data.shards import ShardDataset
    from dev2pro.recipe_inputs import plan_inputs
    from dev2pro.recipes.cache import cache

    shards = tmp_path / "shards"
    caption = "make it a colour photo"
    assert main(["cache", str(pairs / "after"), "--model", str(klein_base_dir), "--out", str(shards), "--resolution",
                 "64", "--default-caption", caption, "--controls", str(two_refs[0]), "--controls",
                 str(two_refs[1])]) == 0
    assert json.loads((shards / "index.json").read_text())["references"] == 2
    ds = ShardDataset(shards / "index.json")
    folder = load_training_data(klein_base_dir, "cpu", folders=[DatasetFolder(pairs / "after", controls=two_refs)],
                                cache_dir=tmp_path / "cache", options=FolderOptions(caption, resolution=64,
                                                                                     bucket_step=64),
                                family=get("flux2")).dataset
    for i in range(len(ds)):
        s = ds[i]
        f = next(folder[k] for k in range(len(folder)) if torch.equal(folder[k]["latents"], s["latents"]))
        assert s["control"].shape == (2, 32, 8, 8) and torch.equal(s["control"], f["control"])
    seen, real = [], objectives.predict
    monkeypatch.setattr(objectives, "predict", lambda m, i, g, d, t: (seen.append(tuple(i.reference.shape)),
                                                                      real(m, i, g, d, t))[1])
    cfg = load_train_config(None, [f'model.path="{klein_base_dir}"', 'model.dtype="fp32"',
                                   "model.gradient_checkpointing=false", f'data.shards="{shards / "index.json"}"',
                                   "lora.rank=4", "train.steps=2", f'save.output_dir="{tmp_path / "run"}"',
                                   'sample.prompts=["p"]', "sample.steps=1", 'sample.size="32x32"'])
    capsys.readouterr()
    summary = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(summary["losses"]))) and seen and all(s == (1, 32, 128) for s in seen)
    # edit pairs from shards: the samples line says they render text-to-image without sample.control
    assert "text-to-image (for an edit LoRA set sample.control" in capsys.readouterr().out
    assert plan_inputs(cfg).image_tokens == (48,)
    with pytest.raises(UserError, match="--controls: FLUX.1 has no reference-image input"):
        cache([str(pairs / "after")], str(tiny_dev_dir), str(tmp_path / "s1"), controls=[str(two_refs[0])])
    tar = tmp_path / "x.tar"
    import tarfile
    with tarfile.open(tar, "w") as t:
        t.add(pairs / "after" / "coffee.png", "coffee.png")
    with pytest.raises(UserError, match=r"x.tar: --controls reads reference images from image folders"):
        cache([str(tar)], str(klein_base_dir), str(tmp_path / "s2"), controls=[str(two_refs[0])])


def test_the_shipped_edit_config_trains_on_the_tiny_folders(tmp_path, klein_base_dir, klein_distilled_dir, pairs):
    """configs/train-klein-edit.toml as a user runs it: only paths and sizes overridden."""
    from pathlib import Path

    shipped = Path(__file__).parents[3] / "configs" / "train-klein-edit.toml"
    cfg = load_train_config(shipped)
    assert cfg.data.folders[0].controls == str(shipped.parents[1] / "data" / "edit-before")
    sets = [f'model.path="{klein_base_dir}"', f'model.inference_base="{klein_distilled_dir / "transformer"}"',
            f'data.folders=[{{path="{pairs / "after"}", controls="{pairs / "before"}", caption="edit"}}]',
            "data.resolution=64", "data.bucket_step=64", f'data.cache_dir="{tmp_path / "cache"}"', "train.steps=2",
            "validation.fraction=0.34", "sample.every=0", "sample.steps=2", 'sample.size="64x64"',
            f'sample.control="{pairs / "before" / "astronaut.png"}"', "sample.baseline=false", "save.every=0",
            f'save.output_dir="{tmp_path / "run"}"']
    summary = train(load_train_config(shipped, sets), progress=False)
    assert len(summary["losses"]) == 2 and (tmp_path / "run" / "lora.comfy.safetensors").is_file()
    with Image.open(tmp_path / "run" / "samples" / "step000002.png") as im:
        assert str(pairs / "before" / "astronaut.png") in im.text["reference"]


def test_the_startup_line_says_what_the_samples_edit():
    """An edit run's samples without sample.control render text-to-image: the run says so at the start."""
    from dev2pro.sampling import no_cfg
    from dev2pro.schemas import SampleSection
    from dev2pro.train.samples import samples_line

    sc = SampleSection(prompts=["make it red"], seeds=[1])
    assert "text-to-image (for an edit LoRA set sample.control" in samples_line(sc, no_cfg(), "base", "out", True)
    assert "sample.control" not in samples_line(sc, no_cfg(), "base", "out", False)
    sc.control = ["a.png", "b.png"]
    assert samples_line(sc, no_cfg(), "base", "out", True).endswith("-> out; each edits a.png, b.png")


def test_an_edit_lora_says_so_in_its_file(tmp_path, klein_base_dir, klein_distilled_dir, pairs, two_refs, capsys):
    """The LoRA file records its references per edit (dev2pro.references); `lora info` says it is an edit LoRA,
    and `sample` without as many --image says what it renders; a text-to-image LoRA records 0 and gets no note."""
    from dev2pro.cli import main
    from dev2pro.lora.formats import file_edit_references

    extra = f'controls = ["{two_refs[0]}", "{two_refs[1]}"]\n'
    train(_config(tmp_path, klein_base_dir, pairs, controls=False, extra=extra, steps=1), progress=False)
    lora = tmp_path / "run" / "lora.diffusers.safetensors"
    assert file_edit_references(lora) == 2
    capsys.readouterr()
    assert main(["lora", "info", str(lora)]) == 0
    assert "trained on edit pairs, 2 reference image(s) per edit" in capsys.readouterr().out
    args = ["sample", "--model", str(klein_distilled_dir), "--lora", str(lora), "--prompt", "p", "--size", "64x64"]
    assert main([*args, "--image", str(two_refs[0] / "coffee.jpg"), "--out", str(tmp_path / "s1")]) == 0
    assert "pass as many --image to render its edit (1 given)" in capsys.readouterr().out
    assert main([*args, "--image", str(two_refs[0] / "coffee.jpg"), "--image", str(two_refs[1] / "coffee.png"),
                 "--out", str(tmp_path / "s2")]) == 0
    assert "--image to render its edit" not in capsys.readouterr().out
    plain = tmp_path / "plain"
    plain.mkdir()
    train(_config(plain, klein_base_dir, pairs, controls=False, steps=1), progress=False)
    assert file_edit_references(plain / "run" / "lora.diffusers.safetensors") == 0
