"""A diffusers folder whose transformer holds pickle weights (``diffusion_pytorch_model.bin``, or ``.bin`` shards with
``diffusion_pytorch_model.bin.index.json``): refused without --allow-pickle with both fixes named, read with it (the
shards merged) to the same weights as the safetensors folder -- through load_transformer, inspect, convert and a
training run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.cli import main
from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import checkpoint as C
from dev2pro.flux.weightfiles import holds_pickle
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_train_config
from tiny_run import lora_run_toml


def _pickled_copy(src, dst):
    """A copy of model folder ``src`` whose transformer weights are one ``torch.save``d .bin (no safetensors)."""
    shutil.copytree(src, dst)
    st = dst / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), dst / "transformer" / "diffusion_pytorch_model.bin")
    st.unlink()
    return dst


def _sharded_copy(src, dst):
    """A copy whose transformer diffusers itself re-saved as pickle shards (save_pretrained, safe_serialization off)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("transformer"))
    model, _ = C.load_transformer(src, dtype=torch.float32)
    model.save_pretrained(dst / "transformer", safe_serialization=False, max_shard_size="400KB")
    return dst


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_a_pickle_folder_is_refused_without_the_flag_naming_both_fixes(tmp_path, tiny_dev_dir):
    folder = _pickled_copy(tiny_dev_dir, tmp_path / "pickled")
    assert holds_pickle(folder) and holds_pickle(folder / "transformer") and not holds_pickle(tiny_dev_dir)
    for given in (folder, folder / "transformer"):  # the model folder or its transformer folder
        with pytest.raises(CheckpointError) as e:
            C.open_checkpoint(given)
        msg = str(e.value)
        assert msg.startswith(f"{folder / 'transformer'} holds its weights as pickle (diffusion_pytorch_model.bin), "
                              "which can run arbitrary code when loaded"), msg
        assert f"`dev2pro convert {given} OUT.safetensors --layout bfl --allow-pickle`) and use that file" in msg
        assert "or pass --allow-pickle (a config's model.allow_pickle = true)" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="holds its weights as pickle"):
        C.load_transformer(folder)


def test_a_pickle_folder_loads_with_allow_pickle_to_the_safetensors_weights(tmp_path, tiny_dev_dir):
    folder = _pickled_copy(tiny_dev_dir, tmp_path / "pickled")
    ckpt = C.open_checkpoint(folder, allow_pickle=True)
    ref = C.open_checkpoint(tiny_dev_dir)
    assert ckpt.layout == "diffusers-folder" and ckpt.config == ref.config and ckpt.shapes == ref.shapes
    assert set(ckpt.files.values()) == {folder / "transformer" / "diffusion_pytorch_model.bin"}
    assert ckpt.size_bytes() == (folder / "transformer" / "diffusion_pytorch_model.bin").stat().st_size
    model, _ = C.load_transformer(folder, dtype=torch.float32, allow_pickle=True)
    reference, _ = C.load_transformer(tiny_dev_dir, dtype=torch.float32)
    _same_weights(model, reference)


def test_pickle_shards_with_their_index_are_merged(tmp_path, klein_base_dir):
    folder = _sharded_copy(klein_base_dir, tmp_path / "sharded")
    tdir = folder / "transformer"
    index = json.loads((tdir / "diffusion_pytorch_model.bin.index.json").read_text())
    shards = sorted({tdir / f for f in index["weight_map"].values()})
    assert len(shards) >= 2 and not list(tdir.glob("*.safetensors"))
    with pytest.raises(CheckpointError, match=rf"holds its weights as pickle \({shards[0].name} \+ "
                                              rf"{len(shards) - 1} more\)"):
        C.open_checkpoint(folder)
    ckpt = C.open_checkpoint(folder, allow_pickle=True)
    assert ckpt.family.name == "flux2" and set(ckpt.files.values()) == set(shards)
    assert {ckpt.prefix + k: str(ckpt.files[ckpt.prefix + k].name) for k in ckpt.shapes} == index["weight_map"]
    model, _ = C.load_transformer(folder, dtype=torch.float32, allow_pickle=True)
    reference, _ = C.load_transformer(klein_base_dir, dtype=torch.float32)
    _same_weights(model, reference)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1].name} named in the index is missing"):
        C.open_checkpoint(folder, allow_pickle=True)


def test_inspect_and_convert_a_pickle_folder(tmp_path, tiny_dev_dir, capsys):
    folder = _pickled_copy(tiny_dev_dir, tmp_path / "pickled")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "holds its weights as pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    assert main(["inspect", str(folder), "--allow-pickle", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "diffusers-folder" and info["complete"] and info["variant"] == "dev"
    assert info["params"] == C.open_checkpoint(tiny_dev_dir).num_params()
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(folder), str(out), "--no-progress"]) == 2 and not out.exists()
    assert "OUT.safetensors --layout bfl --allow-pickle" in capsys.readouterr().err
    assert main(["convert", str(folder), str(out), "--layout", "bfl", "--allow-pickle", "--no-progress"]) == 0
    assert out.is_file() and C.open_checkpoint(out).layout == "bfl"  # the fix the refusal names: one safetensors file
    converted, _ = C.load_transformer(out, dtype=torch.float32)
    reference, _ = C.load_transformer(tiny_dev_dir, dtype=torch.float32)
    _same_weights(converted, reference)


def test_train_on_a_pickle_folder(tmp_path, tiny_dev_dir, sk_images):
    """model.allow_pickle = true trains on the .bin folder exactly as on the safetensors one (same LoRA bytes);
    without it the run is refused before its folder exists."""
    folder = _pickled_copy(tiny_dev_dir, tmp_path / "pickled")
    refused = lora_run_toml(tmp_path, folder, sk_images, "refused", steps=1, seed=3)
    with pytest.raises(UserError, match="holds its weights as pickle.*--allow-pickle"):
        train(load_train_config(refused), progress=False, quiet=True)
    assert not (tmp_path / "refused").exists()
    runs = {}
    for name, model_dir, extra in (("st", tiny_dev_dir, ""), ("pk", folder, "allow_pickle = true")):
        toml = lora_run_toml(tmp_path, model_dir, sk_images, name, steps=2, seed=3,
                             model=f'dtype = "fp32"\n{extra}', cache=f"cache-{name}")
        runs[name] = train(load_train_config(toml), progress=False, quiet=True)
    a, b = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("st", "pk"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["st"]["losses"] == runs["pk"]["losses"]
