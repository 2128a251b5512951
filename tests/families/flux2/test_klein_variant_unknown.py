"""A FLUX.2 klein file that does not say whether it is Base or distilled (a BFL / ComfyUI single file: the keys are
the same) is rendered as Base with a note naming the fix, never with FLUX.1's defaults; ``convert --variant``
records it; a weights file inside a diffusers folder's ``transformer/`` takes the folder's ``is_distilled``."""

import json

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.families.flux2.spec import KLEIN_UNKNOWN, VARIANT_METADATA_KEY
from dev2pro.flux.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def bare_distilled(klein_distilled_dir, tmp_path_factory):
    """The distilled klein as one BFL-layout file without dev2pro's variant record."""
    d = tmp_path_factory.mktemp("bare")
    assert main(["convert", str(klein_distilled_dir), str(d / "recorded.safetensors"), "--layout", "comfy",
                 "--no-progress"]) == 0
    with safe_open(str(d / "recorded.safetensors"), "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert meta.pop(VARIANT_METADATA_KEY) == "klein-distilled"
    save_file(sd, str(d / "bare.safetensors"), meta)
    return d / "bare.safetensors"


def _guidance(folder):
    with Image.open(next(folder.glob("*.png"))) as im:
        return json.loads(im.text["dev2pro"])


def test_unknown_klein_is_sampled_as_base_with_a_note(bare_distilled, klein_distilled_dir, tmp_path, capsys):
    assert open_checkpoint(bare_distilled).spec().variant == KLEIN_UNKNOWN
    assert main(["sample", "--model", str(klein_distilled_dir), "--transformer", str(bare_distilled), "--prompt",
                 "a cat", "--size", "64x64", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "does not say whether it is FLUX.2 klein Base or distilled" in out and "--variant klein-distilled" in out
    settings = _guidance(tmp_path / "s")
    assert settings["guidance"] == {"mode": "true_cfg", "embedded": None, "cfg": 4.0}  # Base's, not FLUX.1's 3.5


def test_convert_variant_records_it(bare_distilled, klein_distilled_dir, tiny_dev_dir, tmp_path, capsys):
    fixed = tmp_path / "fixed.safetensors"
    assert main(["convert", str(bare_distilled), str(fixed), "--variant", "klein-distilled", "--no-progress"]) == 0
    assert open_checkpoint(fixed).spec().variant == "klein-distilled"
    capsys.readouterr()
    assert main(["sample", "--model", str(klein_distilled_dir), "--transformer", str(fixed), "--prompt", "a cat",
                 "--size", "64x64", "--out", str(tmp_path / "s")]) == 0
    assert "note:" not in capsys.readouterr().out
    settings = _guidance(tmp_path / "s")
    assert settings["steps"] == 4 and settings["guidance"]["cfg"] == 1.0  # the distilled model as it is used
    assert main(["convert", str(tiny_dev_dir), str(tmp_path / "x.safetensors"), "--variant", "klein-base"]) == 2
    assert "--variant names a FLUX.2 klein" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_file_inside_a_folder_takes_its_variant(klein_distilled_dir, klein_base_dir):
    for folder, variant in ((klein_distilled_dir, "klein-distilled"), (klein_base_dir, "klein-base")):
        weights = next((folder / "transformer").glob("*.safetensors"))
        assert open_checkpoint(weights).spec().variant == variant


def test_explicit_cfg_1_turns_true_cfg_off_on_klein_base(klein_base_dir, tmp_path):
    """klein Base's default is true CFG 4; `--cfg 1` says no CFG (it used to be read as "not given")."""
    common = ["sample", "--model", str(klein_base_dir), "--prompt", "a cat", "--size", "64x64", "--steps", "1"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert _guidance(tmp_path / "default")["guidance"]["cfg"] == 4.0
    assert main([*common, "--cfg", "1", "--out", str(tmp_path / "off")]) == 0
    assert _guidance(tmp_path / "off")["guidance"]["cfg"] == 1.0
    assert main([*common, "--cfg", "2.5", "--out", str(tmp_path / "two")]) == 0
    assert _guidance(tmp_path / "two")["guidance"]["cfg"] == 2.5
