"""`dev2pro calibrate` recovers a planted strength difference between two FLUX.2 models (issue 19 acceptance:
within 5%).

The plant: model B is model A reparametrised so that it computes exactly the same function, but a LoRA on the
double blocks' MLP output projections acts c times as strongly on B. SwiGLU's output is linear in its value half,
so scaling the value rows of ``ff.linear_in`` by c and dividing ``ff.linear_out`` by c leaves B = A, while a LoRA
on ``linear_out`` now reads an input c times larger: B + s * LoRA == A + (c * s) * LoRA. The strength on B that
matches strength 1.0 on A is therefore 1 / c.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dev2pro.cli import main

C = 1 / 1.5  # B needs strength 1.5, as klein 9B users report for Base-trained LoRAs on the distilled model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, klein_base_dir):
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from dev2pro.train.export import save_lora_files

    root = tmp_path_factory.mktemp("planted")
    a = Flux2Transformer2DModel.from_pretrained(str(klein_base_dir / "transformer"))
    b = Flux2Transformer2DModel.from_pretrained(str(klein_base_dir / "transformer"))
    with torch.no_grad():
        for block in b.transformer_blocks:
            for ff in (block.ff, block.ff_context):
                half = ff.linear_in.weight.shape[0] // 2
                ff.linear_in.weight[half:] *= C  # the value half of SwiGLU's input projection
                ff.linear_out.weight /= C
    b.save_pretrained(str(root / "b"))
    targets = [f"transformer_blocks.{i}.{m}" for i in range(len(a.transformer_blocks))
               for m in ("ff.linear_out", "ff_context.linear_out")]
    a.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():  # a clearly visible LoRA: larger B than peft's random init
        g = torch.Generator().manual_seed(0)
        for name, p in a.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    files = save_lora_files(a, root, "planted", ["diffusers"], {"dev2pro.note": "planted"})
    return {"b": root / "b", "lora": files[0], "root": root}


def test_calibrate_recovers_the_planted_strength(planted, klein_base_dir, capsys):
    report = planted["root"] / "calibration.json"
    args = ["calibrate", str(planted["lora"]), "--model", str(klein_base_dir), "--target", str(planted["b"]),
            "--prompt", "a red cat", "--prompt", "a house", "--seeds", "0,1", "--size", "64x64",
            "--reference-steps", "3", "--reference-cfg", "2", "--steps", "3", "--cfg", "2", "--report", str(report),
            "--write"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(report.read_text())
    assert result["recommended_strength"] == pytest.approx(1 / C, rel=0.05)
    with safe_open(str(planted["lora"]), "pt") as f:
        meta = json.loads(f.metadata()["dev2pro.recommended_strength"])
    assert meta["strength"] == pytest.approx(1 / C, rel=0.05) and meta["target"] == "b"
    out = capsys.readouterr().out
    assert "recommended strength on the target: 1.5" in out


def test_write_records_the_strength_in_every_layout_of_the_same_save(planted, tmp_path, klein_base_dir):
    """--write puts the recommendation into the kohya, comfy and diffusers files of one training save, not into a
    file of another save that happens to share the name stem."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from dev2pro.recipes.calibrate import _write_metadata
    from dev2pro.train.export import save_lora_files

    model = Flux2Transformer2DModel.from_pretrained(str(klein_base_dir / "transformer"))
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["transformer_blocks.0.ff.linear_out"]))
    meta = {"modelspec.date": "2026-12-07T10:00:00", "ss_network_dim": "4"}
    files = save_lora_files(model, tmp_path, "lora", ["kohya", "comfy", "diffusers"], meta)
    other = save_lora_files(model, tmp_path / "x", "lora", ["comfy"], {**meta, "modelspec.date": "2026-01-01T00:00:00"})
    other[0].replace(files[1])  # lora.comfy.safetensors now comes from another save (another date)
    result = {"recommended_strength": 1.23456, "target": str(tmp_path / "klein-distilled"),
              "target_sampling": {"variant": "klein-distilled"}, "reference": "base", "reference_effect": 0.5}
    _write_metadata(files[2], result)  # the diffusers file given; its kohya sibling follows
    for f, written in zip(files, (True, False, True)):
        with safe_open(str(f), "pt") as sf:
            meta_now = sf.metadata()
        assert ("dev2pro.recommended_strength" in meta_now) == written, f
        if written:
            assert json.loads(meta_now["dev2pro.recommended_strength"])["strength"] == 1.2346


def test_sample_notes_the_calibrated_strength_on_its_target(planted, tmp_path, klein_distilled_dir, capsys):
    """A LoRA calibrated for klein-distilled and rendered there at another strength: `sample` says which strength
    the file recommends; at that strength, or on a model of another variant, it says nothing."""
    import shutil

    from dev2pro.recipes.calibrate import _write_metadata
    from dev2pro.strength import strength_note

    lora = tmp_path / "lora.safetensors"
    shutil.copy(planted["lora"], lora)
    result = {"recommended_strength": 1.5, "target": str(klein_distilled_dir), "reference": "base",
              "target_sampling": {"variant": "klein-distilled"}, "reference_effect": 0.25}
    _write_metadata(lora, result)
    assert strength_note(lora, 1.5, "klein-distilled") is None and strength_note(lora, 1.0, "klein-base") is None
    args = ["sample", "--model", str(klein_distilled_dir), "--lora", f"{lora}:1.0", "--prompt", "a cat", "--size",
            "32x32", "--out", str(tmp_path / "s")]
    assert main(args) == 0, capsys.readouterr().err
    assert "carries a calibrated strength 1.5 for klein-distilled models" in capsys.readouterr().out
    assert main(args[:4] + [f"{lora}:1.5"] + args[5:-1] + [str(tmp_path / "s2")]) == 0
    assert "calibrated strength" not in capsys.readouterr().out


def test_a_backwards_pair_is_refused_and_an_edit_lora_is_noted(planted, tmp_path, klein_base_dir,
                                                               klein_distilled_dir, capsys):
    """The LoRA's file says it was trained on klein Base: calibrating it from distilled *to* Base is the pair
    backwards (refused before a model loads, naming the fix); an edit LoRA's text-to-image measurement is noted."""
    from dev2pro.errors import UserError
    from dev2pro.recipes import calibrate
    src = load_file(str(planted["lora"]))
    meta = {"dev2pro.train_base_variant": "klein-base"}
    lora = tmp_path / "base-trained.safetensors"
    save_file(src, str(lora), metadata=meta)
    with pytest.raises(UserError, match=r"trained on klein-base, the --target here.*swap them"):
        calibrate.run_calibrate(str(klein_distilled_dir), str(lora), str(klein_base_dir / "transformer"), ["a cat"],
                                size="64x64")
    edit = tmp_path / "edit.safetensors"
    save_file(src, str(edit), metadata={**meta, "dev2pro.references": "1"})
    calibrate._check_direction(str(edit), "klein-base", "klein-distilled")  # the right way round: no refusal
    assert "is an edit LoRA (1 reference image(s) per edit)" in capsys.readouterr().out
    calibrate._check_direction(str(lora), "klein-base", "klein-distilled")
    assert "edit LoRA" not in capsys.readouterr().out


def test_an_uncalibrated_base_lora_on_distilled_points_to_calibrate(planted, tmp_path):
    """A klein Base LoRA without a calibrated strength, rendered on distilled: the note names `dev2pro calibrate`;
    once calibrated for distilled (or rendered on Base, or not a klein pair) that note is gone."""
    from dev2pro.recipes.calibrate import _write_metadata
    from dev2pro.strength import strength_note

    src = load_file(str(planted["lora"]))
    lora = tmp_path / "base.safetensors"
    save_file(src, str(lora), metadata={"dev2pro.train_base_variant": "klein-base"})
    note = strength_note(lora, 1.0, "klein-distilled")
    assert note.startswith("note: base.safetensors was trained on klein-base and renders on klein-distilled at 1")
    assert f"dev2pro calibrate {lora} --model <the klein-base folder>" in note
    assert strength_note(lora, 1.0, "klein-base") is None and strength_note(lora, 1.0, "dev") is None
    _write_metadata(lora, {"recommended_strength": 1.5, "target": "d", "reference": "b", "reference_effect": 0.2,
                           "target_sampling": {"variant": "klein-distilled"}})
    assert "calibrated strength 1.5" in strength_note(lora, 1.0, "klein-distilled")
    assert strength_note(lora, 1.5, "klein-distilled") is None
