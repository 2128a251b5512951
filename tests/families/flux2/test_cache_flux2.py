"""`dev2pro cache` on FLUX.2 folders: the family comes from the folder, the shards hold what `train` caches from a
folder (the 32-channel VAE's latents, the stacked Qwen3/Mistral states, no pooled vector), and training reads them."""

import json
import shutil

import pytest
import torch

from dev2pro.cli import main
from dev2pro.data.folders import DatasetFolder
from dev2pro.data.prepare import FolderOptions, load_training_data
from dev2pro.data.shards import ShardDataset
from dev2pro.errors import UserError
from dev2pro.families import get, of_folder
from dev2pro.recipes.cache import cache

TEXT_LEN = 24


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_shards_hold_what_train_caches_from_the_folder(tmp_path, klein_base_dir, flux2_dev_dir, sk_images, variant):
    model = klein_base_dir if variant == "klein" else flux2_dev_dir
    r = cache([str(sk_images)], str(model), str(tmp_path / "shards"), per_shard=2, resolution=64, bucket_step=64,
              t5_max_length=TEXT_LEN, default_caption="a photo")
    assert r["family"] == "flux2" and r["samples"] == 5 and r["skipped"] == []
    settings = json.loads((tmp_path / "shards" / "index.json").read_text())["settings"]
    assert settings["family"] == "flux2" and settings["max_length"] == TEXT_LEN
    assert settings["pipeline"] == ("Flux2KleinPipeline" if variant == "klein" else "Flux2Pipeline")
    shards = ShardDataset(r["index"])
    assert set(shards.empty_text()) == {"prompt_embeds"}  # FLUX.2 has no pooled vector

    # `train`'s own folder cache of the same images and captions: the same tensors, bit for bit
    data = load_training_data(model, "cpu", folders=[DatasetFolder(sk_images)], cache_dir=tmp_path / "cache",
                              options=FolderOptions("a photo", resolution=64, bucket_step=64),
                              t5_max_length=TEXT_LEN, family=get("flux2"))
    folder = {data.dataset[i]["caption"]: data.dataset[i] for i in range(len(data.dataset))}
    seen = set()
    for i in range(len(shards)):
        s = shards[i]
        f = folder[s["caption"]] if s["caption"] != "a photo" else None
        assert s["latents"].shape == (32, 8, 8) and s["prompt_embeds"].shape[0] == TEXT_LEN
        if f is not None:  # the one captioned image (the others share "a photo": any order)
            seen.add(s["caption"])
            assert torch.equal(s["latents"], f["latents"]) and torch.equal(s["prompt_embeds"], f["prompt_embeds"])
    assert seen == {"an astronaut in a white suit"}
    def photos(ds):  # the four images captioned "a photo", in a fixed order
        return sorted((ds[i]["latents"] for i in range(len(ds)) if ds[i]["caption"] == "a photo"),
                      key=lambda t: t.sum().item())

    assert all(torch.equal(a, b) for a, b in zip(photos(shards), photos(data.dataset), strict=True))
    assert torch.equal(shards.empty_text()["prompt_embeds"], data.empty["prompt_embeds"])


def test_klein_lora_trains_from_its_shards(tmp_path, klein_base_dir, flux2_dev_dir, sk_images):
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    shards = tmp_path / "shards"
    assert main(["cache", str(sk_images), "--model", str(klein_base_dir), "--out", str(shards), "--resolution", "64",
                 "--default-caption", "a photo", "--t5-max-length", str(TEXT_LEN), "--text-encoder-dtype",
                 "bf16"]) == 0
    assert json.loads((shards / "index.json").read_text())["settings"]["text_encoder_dtype"] == "bf16"
    cfg = load_train_config(None, [f'model.path="{klein_base_dir}"', 'model.dtype="fp32"',
                                   "model.gradient_checkpointing=false", f"model.t5_max_length={TEXT_LEN}",
                                   f'data.shards="{shards / "index.json"}"', "lora.rank=4", "train.steps=3",
                                   f'save.output_dir="{tmp_path / "run"}"'])
    summary = train(cfg, progress=False)
    assert len(summary["losses"]) == 3 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    # the same shards for a FLUX.2 dev base: the tiny widths match, the recorded pipeline does not
    with pytest.raises(UserError, match=r"data.shards .* klein's Qwen3 text encoder \(Flux2KleinPipeline\), but "
                                        r"the training base is FLUX.2 dev"):
        train(load_train_config(None, [f'model.path="{flux2_dev_dir}"', f'data.shards="{shards / "index.json"}"',
                                       f'save.output_dir="{tmp_path / "run2"}"']), progress=False)


def test_the_folder_names_its_family_or_the_error_says_why(tmp_path, tiny_dev_dir, klein_base_dir, flux2_dev_dir,
                                                            sk_images):
    assert of_folder(tiny_dev_dir).name == "flux1"
    assert of_folder(klein_base_dir).name == of_folder(flux2_dev_dir).name == "flux2"
    assert of_folder(tmp_path, "flux2").name == "flux2"  # forced: taken as it is
    with pytest.raises(UserError, match=r"no model_index\.json\): point it at the whole downloaded model folder"):
        of_folder(tmp_path)
    odd = tmp_path / "sd"
    shutil.copytree(klein_base_dir, odd, ignore=shutil.ignore_patterns("transformer", "text_encoder", "vae"))
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match=r"names the pipeline 'StableDiffusionXLPipeline', which dev2pro does not "
                                        r"train \(FLUX\.1: FluxPipeline; FLUX\.2: Flux2KleinPipeline, Flux2Pipeline\)"):
        cache([str(sk_images)], str(odd), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(UserError, match=r"--text-encoder-dtype \"fp8\" is for FLUX\.2's text encoders; FLUX\.1's "
                                        r"T5 \+ CLIP take \"bf16\""):
        cache([str(sk_images)], str(tiny_dev_dir), str(tmp_path / "out"), text_dtype="fp8")
