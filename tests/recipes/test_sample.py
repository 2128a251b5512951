"""`dev2pro sample`: prompt files -> PNGs + grid, determinism to the byte, LoRAs, fp8, clear errors."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.cli_commands import add_sample
from dev2pro.errors import UserError
from dev2pro.owned import MANIFEST
from dev2pro.recipes.sample import run_sample

FAST = ["--steps", "2", "--size", "64x64"]


def cli(*argv):
    """Parse and run like `dev2pro sample ...`."""
    parser = argparse.ArgumentParser(prog="dev2pro")
    add_sample(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sample", *map(str, argv)])
    return args.run(args)


def test_prompt_file_3x2_grid_text_chunks_and_byte_determinism(tiny_dev_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n# skipped\na blue dog\nthe number 3 in green\n")
    out = tmp_path / "out"
    cli("--model", tiny_dev_dir, "--prompts", prompts, "--seeds", "5,6", "--out", out, *FAST)
    pngs = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert len(pngs) == 7 and "grid.png" in pngs
    assert f"to {out}" in capsys.readouterr().out
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, 3 * 64)  # cols = seeds, rows = prompts
    one = Image.open(out / "001-a-blue-dog-s6.png")
    assert one.size == (64, 64)
    assert one.text["prompt"] == "a blue dog" and one.text["seed"] == "6"
    assert "Seed: 6" in one.text["parameters"] and '"embedded": 3.5' in one.text["dev2pro"]
    # The grid cell (row 1, col 1) is that image.
    assert np.array_equal(np.asarray(grid.crop((64, 64, 128, 128))), np.asarray(one.convert("RGB")))

    # Same prompt + seed alone, over an earlier sample folder (other prompts) with --overwrite: the same bytes.
    again = tmp_path / "again"
    cli("--model", tiny_dev_dir, "--prompt", "x", "--seeds", "1,2", "--out", again, *FAST)
    cli("--model", tiny_dev_dir, "--prompt", "a blue dog", "--seed", "6", "--out", again, "--overwrite", *FAST)
    assert sorted(p.name for p in again.iterdir()) == [MANIFEST, "000-a-blue-dog-s6.png"]  # no grid for one image
    a, b = Image.open(again / "000-a-blue-dog-s6.png"), Image.open(out / "001-a-blue-dog-s6.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (again / "000-a-blue-dog-s6.png").read_bytes() == (out / "001-a-blue-dog-s6.png").read_bytes()
    assert not np.array_equal(np.asarray(b), np.asarray(Image.open(out / "001-a-blue-dog-s5.png")))


def test_loras_with_scales_and_true_cfg_base(tiny_dev_dir, tiny_pro_dir, tmp_path):
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

    model, _ = load_transformer(tiny_dev_dir, torch.float32)
    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({n: LoraModule(torch.randn(4, m.in_features, generator=g) * 0.3,
                                    torch.randn(m.out_features, 4, generator=g) * 0.3, 4.0)
                      for n, m in model.named_modules() if n.endswith(("attn.to_q", "proj_mlp"))})
    lora = save_lora(lw, tmp_path / "lora.safetensors", "diffusers")
    common = dict(prompts=["a red cat"], steps=2, size="64x64", seeds=[0])
    plain = run_sample(str(tiny_dev_dir), out=str(tmp_path / "plain"), **common)[0]
    half = run_sample(str(tiny_dev_dir), out=str(tmp_path / "half"), loras=[f"{lora}:0.5"], **common)[0]
    zero = run_sample(str(tiny_dev_dir), out=str(tmp_path / "zero"), loras=[f"{lora}:0"], **common)[0]
    px = {k: np.asarray(Image.open(p), dtype=np.int16) for k, p in dict(plain=plain, half=half, zero=zero).items()}
    assert np.abs(px["half"] - px["plain"]).mean() > 0.5
    assert np.array_equal(px["zero"], px["plain"])
    assert f'"{lora}", 0.5' in Image.open(half).text["dev2pro"]
    # A base without guidance embedding samples with true CFG; the transformer may come from another folder.
    pro = run_sample(str(tiny_dev_dir), transformer=str(tiny_pro_dir), out=str(tmp_path / "pro"), **common)[0]
    assert '"mode": "true_cfg"' in Image.open(pro).text["dev2pro"]


def test_fp8_checkpoint_kept_in_fp8(tiny_dev_dir, tmp_path):
    from dev2pro.flux.convert import convert

    fp8 = convert(tiny_dev_dir, tmp_path / "dev-fp8.safetensors", layout="comfy", dtype="fp8-scaled")
    common = dict(prompts=["a red cat"], steps=2, size="64x64", seeds=[0])
    ref = run_sample(str(tiny_dev_dir), out=str(tmp_path / "ref"), **common)[0]
    got = run_sample(str(tiny_dev_dir), transformer=str(fp8), fp8=True, out=str(tmp_path / "fp8"), **common)[0]
    diff = np.abs(np.asarray(Image.open(ref), dtype=np.int16) - np.asarray(Image.open(got), dtype=np.int16))
    assert diff.mean() < 8  # fp8 weights: close to, not equal to, the fp32 image
    assert '"fp8": true' in Image.open(got).text["dev2pro"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/nowhere", "--prompt", "x", "--out", "{tmp}/o"], "model folder .* does not exist"),
    (["--model", "{dev}", "--lora", "{tmp}/missing.safetensors:0.5", "--prompt", "x", "--out", "{tmp}/o"],
     "LoRA file .*missing.safetensors does not exist"),
    (["--model", "{dev}", "--lora", "{tmp}/a.safetensors:strong", "--prompt", "x", "--out", "{tmp}/o"],
     "scale after the last ':' must be a finite number"),
    (["--model", "{dev}", "--prompt", "x", "--out", "{tmp}/exists"], "already exists; pass --overwrite"),
    (["--model", "{dev}", "--transformer", "{tmp}/t.safetensors", "--prompt", "x", "--out", "{tmp}/o"],
     "transformer checkpoint .* does not exist"),
    (["--model", "{dev}", "--prompt", "x", "--seeds", "1,b", "--out", "{tmp}/o"], "integers"),
    (["--model", "{pro}", "--mode", "embedded", "--prompt", "x", "--out", "{tmp}/o"], "guidance embedding"),
    (["--model", "{tmp}/lora.safetensors", "--prompt", "x", "--out", "{tmp}/o"],
     "model folder .*lora.safetensors is a LoRA: pass it with --lora"),
    (["--model", "{dev}/transformer/diffusion_pytorch_model.safetensors", "--prompt", "x", "--out", "{tmp}/o"],
     "is a file: pass the diffusers model folder .* and a transformer file with --transformer"),
    (["--model", "{dev}", "--lora", "{dev}/transformer/diffusion_pytorch_model.safetensors", "--prompt", "x", "--out",
      "{tmp}/o"], "is a base model .* not a LoRA: render it with --transformer"),
])
def test_clear_errors_before_any_loading(argv, message, tiny_dev_dir, tiny_pro_dir, tmp_path):
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "a.png").write_bytes(b"")
    save_lora(LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(torch.zeros(2, 32), torch.zeros(32, 2),
                                                                         2.0)}), tmp_path / "lora.safetensors", "kohya")
    argv = [a.format(tmp=tmp_path, dev=tiny_dev_dir, pro=tiny_pro_dir) for a in argv]
    with pytest.raises(UserError, match=message):
        cli(*argv, *FAST)
    assert not (tmp_path / "o").exists()


def _settings(png):
    import json

    with Image.open(png) as im:
        return json.loads(im.text["dev2pro"])


def test_each_flux2_variant_samples_as_it_is_used_unless_told(klein_base_dir, klein_distilled_dir, flux2_dev_dir,
                                                              tmp_path, capsys):
    """Without --steps/--guidance the base's own: klein distilled 4 steps without CFG (a CFG scale there was
    recorded while diffusers ignored it), klein Base true CFG 4 at 50 steps, FLUX.2 dev embedded 4 at 50."""
    size = ["--size", "32x32", "--prompt", "a red cat"]
    cli("--model", klein_distilled_dir, "--out", tmp_path / "d", *size)
    s = _settings(tmp_path / "d" / "000-a-red-cat-s0.png")
    assert s["steps"] == 4 and s["guidance"]["cfg"] == 1.0 and s["guidance"]["embedded"] is None
    cli("--model", klein_distilled_dir, "--out", tmp_path / "d5", "--guidance", "5", "--steps", "2", *size)
    s = _settings(tmp_path / "d5" / "000-a-red-cat-s0.png")
    assert s["steps"] == 2 and s["guidance"]["cfg"] == 1.0  # steps are the user's; CFG is not the model's
    assert "klein-distilled is sampled without CFG" in capsys.readouterr().out
    cli("--model", klein_base_dir, "--out", tmp_path / "b", *size)
    s = _settings(tmp_path / "b" / "000-a-red-cat-s0.png")
    assert s["steps"] == 50 and s["guidance"] == {"mode": "true_cfg", "embedded": None, "cfg": 4.0}
    cli("--model", flux2_dev_dir, "--out", tmp_path / "dev", "--steps", "3", *size)
    s = _settings(tmp_path / "dev" / "000-a-red-cat-s0.png")
    assert s["steps"] == 3 and s["guidance"]["mode"] == "embedded" and s["guidance"]["embedded"] == 4.0


def test_size_not_a_multiple_of_16_is_refused_and_pngs_record_the_rendered_size(tiny_dev_dir, tmp_path, capsys):
    """The pipelines round sides down to multiples of 16: 100x72 rendered 96x64 while the PNG said 100x72."""
    for size, hint in (("100x72", "use 96x64 or 112x80"), ("65", "use 64x64 or 80x80"), ("8x32", "use 16x32")):
        with pytest.raises(SystemExit):
            cli("--model", tiny_dev_dir, "--prompt", "x", "--out", tmp_path / "o", "--size", size)
        assert f"argument --size: size {size if 'x' in size else f'{size}x{size}'}: width and height must be " \
               f"multiples of 16; {hint}" in capsys.readouterr().err
    with pytest.raises(UserError, match="--size 100x72: width and height must be multiples of 16; use 96x64"):
        run_sample(str(tiny_dev_dir), ["x"], str(tmp_path / "o"), size="100x72")  # the Python API too
    assert not (tmp_path / "o").exists()
    png = run_sample(str(tiny_dev_dir), ["x"], str(tmp_path / "wide"), size="48x32", steps=1)[0]
    with Image.open(png) as im:
        assert im.size == (48, 32) and "Size: 48x32" in im.text["parameters"]
    assert (_settings(png)["width"], _settings(png)["height"]) == (48, 32)


def test_a_transformer_of_another_family_than_the_folder_is_named(klein_base_dir, tiny_dev_dir, tmp_path):
    """A FLUX.1 transformer with a FLUX.2 klein folder: the family mismatch, not the folder's missing FLUX.1 text
    encoders ("download the whole repo" sent users after files they did not need)."""
    dev = tiny_dev_dir / "transformer"
    with pytest.raises(UserError) as e:
        cli("--model", klein_base_dir, "--transformer", dev, "--prompt", "x", "--out", tmp_path / "o", *FAST)
    assert str(e.value) == (f"--transformer {dev} is FLUX.1, the model folder {klein_base_dir} is FLUX.2 klein: give "
                            "a transformer of the folder's family (FLUX.2) or the FLUX.1 model folder it belongs to")
    with pytest.raises(UserError, match=f"--transformer {klein_base_dir} is FLUX.2, the model folder {tiny_dev_dir} "
                                        "is FLUX.1: give a transformer of the folder's family"):
        cli("--model", tiny_dev_dir, "--transformer", klein_base_dir, "--prompt", "x", "--out", tmp_path / "o", *FAST)
    assert not (tmp_path / "o").exists()


def test_a_transformer_of_another_flux2_model_than_the_folder_is_refused(klein_base_dir, flux2_dev_dir, tmp_path,
                                                                       capsys):
    """`train`'s check: a FLUX.2 dev transformer on a klein folder rendered without complaint, a klein of another
    size ended in a raw "mat1 and mat2 shapes" RuntimeError; both are one line naming --transformer and --model."""
    from dev2pro import families
    from dev2pro.families.flux2.spec import TINY_KLEIN

    dev = flux2_dev_dir / "transformer"
    with pytest.raises(UserError) as e:
        cli("--model", klein_base_dir, "--transformer", dev, "--prompt", "x", "--out", tmp_path / "o", *FAST)
    assert str(e.value) == (f"--transformer {dev} is a FLUX.2 dev transformer, --model {klein_base_dir} is a FLUX.2 "
                            "klein folder (Flux2KleinPipeline), whose text encoder does not fit it: set --model to the "
                            "FLUX.2 dev model folder the transformer belongs to, or --transformer to a FLUX.2 klein "
                            "transformer")
    wide = TINY_KLEIN.with_(hidden=128, context_dim=192, axes_dim=(8, 8, 8, 8)).with_variant("klein-base")
    other = tmp_path / "klein-wide" / "transformer"
    families.build_transformer(wide, seed=0).save_pretrained(other)
    with pytest.raises(UserError) as e:
        cli("--model", klein_base_dir, "--transformer", other, "--prompt", "x", "--out", tmp_path / "o", *FAST)
    assert str(e.value).startswith(f"--transformer {other} is a FLUX.2 klein custom 128 wide transformer reading text "
                                   f"192 wide, --model {klein_base_dir} holds a FLUX.2 klein custom 64 wide model "
                                   "whose text encoder gives 96: set --model to the model folder of the transformer's "
                                   "size, or --transformer to a transformer of the folder's size")
    assert not (tmp_path / "o").exists() and "loaded in" not in capsys.readouterr().out  # refused before loading


def test_a_dedistilled_export_renders_with_true_cfg_at_guidance_1(tiny_dev_dir, flux2_dev_dir, tmp_path, capsys):
    """A dev2pro de-distillation (flow / cfg_teacher) was trained at guidance 1: by default it renders as its run's
    cfg grids (guidance 1 + true CFG at the base's scale), its provenance survives `convert`, and given values win;
    guidance_distill makes a dev-like model, rendered as dev."""
    from dev2pro import sampling as S
    from dev2pro.flux.checkpoint import open_checkpoint
    from dev2pro.flux.convert import convert

    flow = {"dev2pro.recipe": "dedistill", "dev2pro.objective": "flow", "dev2pro.steps": "7"}
    export = convert(tiny_dev_dir, tmp_path / "d2p.safetensors", layout="bfl", extra_metadata=flow)
    again = convert(export, tmp_path / "d2p-comfy.safetensors", layout="comfy", dtype="fp8-scaled")
    meta = open_checkpoint(again).metadata
    assert meta["dev2pro.objective"] == "flow" and meta["dev2pro.steps"] == "7"  # carried over
    assert meta["dev2pro.layout"] == "comfy" and meta["dev2pro.source"] == "d2p.safetensors"  # the new file's own
    size = ["--size", "32x32", "--prompt", "a red cat", "--steps", "2"]
    cli("--model", tiny_dev_dir, "--transformer", again, "--out", tmp_path / "a", *size)
    assert _settings(tmp_path / "a" / "000-a-red-cat-s0.png")["guidance"] == {"mode": "embedded", "embedded": 1.0,
                                                                               "cfg": 3.5}
    assert "is a dev2pro de-distillation (trained at guidance 1): rendered with true CFG 3.5" in capsys.readouterr().out
    cli("--model", tiny_dev_dir, "--transformer", export, "--out", tmp_path / "g", "--guidance", "3.5", *size)
    assert _settings(tmp_path / "g" / "000-a-red-cat-s0.png")["guidance"] == {"mode": "embedded", "embedded": 3.5,
                                                                               "cfg": 1.0}
    assert "de-distillation" not in capsys.readouterr().out
    cli("--model", tiny_dev_dir, "--transformer", export, "--out", tmp_path / "c", "--cfg", "5", *size)
    assert _settings(tmp_path / "c" / "000-a-red-cat-s0.png")["guidance"]["cfg"] == 5.0
    # the rule itself: FLUX.2 dev's scale is 4; guidance_distill and plain files keep the base's own
    spec2 = open_checkpoint(flux2_dev_dir).spec()
    assert S.default_guidance(spec2, flow) == (1.0, 4.0) and S.default_guidance(spec2, {}) == (4.0, 1.0)
    spec1 = open_checkpoint(tiny_dev_dir).spec()
    assert S.default_guidance(spec1, {**flow, "dev2pro.objective": "guidance_distill"}) == (3.5, 1.0)
    assert S.default_guidance(spec1, {**flow, "dev2pro.objective": "cfg_teacher"}, cfg=1.0) == (1.0, 1.0)
    # dev + a de-distillation adapter = dev2pro: rendered as dev2pro is used (as training's with_adapter grids)
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
    adapter = save_lora(LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(
        torch.full((2, 64), 0.01), torch.full((64, 2), 0.01), 2.0)}), tmp_path / "a.safetensors", "kohya",
        metadata={**flow, "dev2pro.kind": "training_adapter"})
    cli("--model", tiny_dev_dir, "--adapter", adapter, "--out", tmp_path / "ad", *size)
    assert _settings(tmp_path / "ad" / "000-a-red-cat-s0.png")["guidance"] == {"mode": "embedded", "embedded": 1.0,
                                                                                "cfg": 3.5}
    assert "+ adapter a.safetensors is a dev2pro de-distillation" in capsys.readouterr().out
    # calibrate: --reference-cfg / --cfg on a de-distilled export is its true CFG scale, at guidance 1
    from dev2pro.recipes.calibrate import _settings as calibrated
    assert calibrated(spec1, flow, None, None) == (20, 1.0, 3.5) and calibrated(spec1, flow, 8, 5.) == (8, 1.0, 5.0)
    assert calibrated(spec1, {}, None, 2.0) == (20, 2.0, 1.0) and calibrated(spec2, {}, None, None) == (50, 4.0, 1.0)


def test_a_pickled_transformer_samples_with_allow_pickle_only(tiny_dev_dir, tmp_path):
    """The refusal names --allow-pickle, so `sample` has it: with it the .pt transformer renders the same image."""
    from safetensors.torch import load_file

    pt = tmp_path / "dev.pt"
    torch.save(load_file(str(tiny_dev_dir / "transformer" / "diffusion_pytorch_model.safetensors")), pt)
    size = ["--size", "32x32", "--prompt", "a red cat", "--steps", "2"]
    with pytest.raises(UserError, match="pickle file.*--allow-pickle"):
        cli("--model", tiny_dev_dir, "--transformer", pt, "--out", tmp_path / "no", *size)
    cli("--model", tiny_dev_dir, "--transformer", pt, "--out", tmp_path / "pt", "--allow-pickle", *size)
    cli("--model", tiny_dev_dir, "--out", tmp_path / "st", *size)
    a, b = (np.asarray(Image.open(tmp_path / d / "000-a-red-cat-s0.png")) for d in ("pt", "st"))
    assert np.array_equal(a, b)
