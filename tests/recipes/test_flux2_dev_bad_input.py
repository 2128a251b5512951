"""Issue 21's bad input on tiny FLUX.2 dev: each is one line naming the fix, and nothing is written (the run folder
is never created): an adapter of the other FLUX.2 model, the Mistral encoder missing from the model folder, shards
encoded by another family's text encoders. The run's own cache is keyed by family and encoder, so it cannot mix."""

import shutil

import pytest
import torch

from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.flux.checkpoint import load_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config
from tiny_run import model_and_data


def _adapter(model_dir, path, metadata=None):
    """A rank-2 LoRA on every Linear of a tiny model folder's transformer, as a training adapter file (kohya)."""
    model, _ = load_transformer(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({n: LoraModule(torch.randn(2, m.in_features, generator=g) * 0.1,
                                    torch.randn(m.out_features, 2, generator=g) * 0.1, 2.0)
                      for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)},
                     metadata=metadata, family="flux2")
    return save_lora(lw, path, "kohya")


def _train_cfg(tmp_path, model_dir, images, model="", data=""):
    toml = tmp_path / "t.toml"
    toml.write_text(model_and_data(model_dir, images, tmp_path / "cache", model=model, data=data) + f"""
[train]
steps = 1
[save]
output_dir = "{tmp_path / 'run'}"
""")
    return load_train_config(toml)


def _refused(run, match, tmp_path):
    with pytest.raises(UserError, match=match) as e:
        run()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written
    return str(e.value)


def test_dev_adapter_with_a_klein_base_and_back(tmp_path, flux2_dev_dir, klein_base_dir, sk_images):
    dev_adapter = _adapter(flux2_dev_dir, tmp_path / "dev-adapter.safetensors")
    cfg = _train_cfg(tmp_path, klein_base_dir, sk_images, model=f'adapter = "{dev_adapter}"')
    msg = _refused(lambda: train(cfg, progress=False), r"made for a FLUX\.2 dev model 64 wide, not for the training "
                   r"base .*FLUX\.2 klein.*do not fit, e\.g\. time_guidance_embed", tmp_path)
    assert "dev2pro dedistill" in msg
    # a klein adapter has no module dev lacks (same tiny widths): what decides is the base it records
    klein_adapter = _adapter(klein_base_dir, tmp_path / "klein-adapter.safetensors",
                             {"dev2pro.base_guidance_embeds": "false"})
    cfg = _train_cfg(tmp_path, flux2_dev_dir, sk_images, model=f'adapter = "{klein_adapter}"')
    _refused(lambda: train(cfg, progress=False), r"made for a FLUX\.2 klein model 64 wide, not for the training base "
             r".*, a FLUX\.2 dev custom 64 wide: use", tmp_path)


def test_mistral_encoder_missing_from_the_model_folder(tmp_path, flux2_dev_dir, sk_images):
    folder = tmp_path / "dev-no-text"
    shutil.copytree(flux2_dev_dir, folder, ignore=shutil.ignore_patterns("text_encoder"))
    cfg = _train_cfg(tmp_path, folder, sk_images)
    _refused(lambda: train(cfg, progress=False), r"lacks text_encoder/ \(the Mistral3 \(Mistral-Small-3\.x 24B\) text "
             r"encoder .*download the whole black-forest-labs/FLUX\.2-dev repo", tmp_path)
    (tmp_path / "d.toml").write_text(model_and_data(folder, sk_images, tmp_path / "cache") + f"""
[save]
output_dir = "{tmp_path / 'run'}"
""")
    _refused(lambda: dedistill(load_dedistill_config(tmp_path / "d.toml"), progress=False), "lacks text_encoder/",
             tmp_path)


def test_flux1_shards_for_a_flux2_dev_run(tmp_path, tiny_dev_dir, flux2_dev_dir, sk_images):
    shards = tmp_path / "shards"
    assert main(["cache", str(sk_images), "--model", str(tiny_dev_dir), "--out", str(shards), "--resolution", "64",
                 "--default-caption", "a photo"]) == 0
    cfg = _train_cfg(tmp_path, flux2_dev_dir, sk_images, data=f'shards = "{shards / "index.json"}"')
    cfg.data.folders = []
    _refused(lambda: train(cfg, progress=False), r"data\.shards .* was encoded with FLUX\.1 text encoders \(T5 \+ "
             r"CLIP\), but the training base is FLUX\.2 dev .*encode the dataset again with `dev2pro cache --model` "
             r"this model.s folder", tmp_path)


def test_the_runs_cache_never_serves_another_familys_embeddings(tmp_path, klein_base_dir, flux2_dev_dir, sk_images):
    """One cache folder shared by a klein and a dev run: the dev run's embeddings are its Mistral's, not Qwen3's."""
    from dev2pro.data.folders import DatasetFolder
    from dev2pro.data.prepare import FolderOptions, load_training_data
    from dev2pro.families import get
    from dev2pro.families.flux2 import text

    fam, opts = get("flux2"), FolderOptions("a photo", resolution=64, bucket_step=64)
    kw = dict(folders=[DatasetFolder(sk_images)], cache_dir=tmp_path / "cache", options=opts, family=fam)
    klein = load_training_data(klein_base_dir, "cpu", **kw)
    dev = load_training_data(flux2_dev_dir, "cpu", **kw)
    n_text = len(list((tmp_path / "cache" / "text").iterdir()))
    assert n_text == 2 * len({"", "a photo", "an astronaut in a white suit"})  # per family: nothing shared
    want, _ = text.empty_prompt(text.load_text_encoder(flux2_dev_dir))
    torch.testing.assert_close(dev.empty["prompt_embeds"].float(), want[0].to(torch.bfloat16).float())
    assert not torch.equal(dev.empty["prompt_embeds"], klein.empty["prompt_embeds"])
