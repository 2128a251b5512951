"""Multi-resolution training: every image bucketed at every listed resolution, the counts printed at start-up,
the config (an int or a list, per folder too), the plan at the largest, the Train form, and resume."""

from collections import Counter
from pathlib import Path

import pytest

from dev2pro.data.buckets import assign_bucket, make_buckets
from dev2pro.data.folders import Item
from dev2pro.data.mixing import bucket_counts, bucketed, largest_resolution, resolution_list
from dev2pro.errors import ConfigError, UserError
from dev2pro.schemas import TrainConfig, load_train_config, plan_inputs
from dev2pro.ui import forms


def _item(name, size, res=()):
    return Item(Path(name), "x", 2, size, resolutions=res)


def test_each_image_is_bucketed_once_per_resolution():
    items = [_item("a", (640, 427)), _item("b", (300, 600)), _item("c", (512, 512), res=(256,))]
    plan = bucketed(items, [512, 768], 64)
    assert [(it.path.name, res) for it, res, _ in plan] == [("a", 512), ("a", 768), ("b", 512), ("b", 768),
                                                            ("c", 256)]  # c: its folder's own resolution
    for it, res, bucket in plan:
        assert bucket == assign_bucket(*it.size, make_buckets(res * res, step=64))
        assert bucket[0] * bucket[1] <= res * res
    assert resolution_list(512) == (512,) and resolution_list([768, 512, 768]) == (768, 512)
    assert largest_resolution([512, 768]) == 768 and largest_resolution(512) == 512


def test_resolution_is_an_int_or_a_list_in_configs(tmp_path):
    base = {"model": {"path": "m"}, "data": {"folders": [{"path": "d"}]}, "save": {"output_dir": "o"}}

    def load(**data):
        return load_train_config(None, data={**base, "data": {**base["data"], **data}})

    assert load(resolution=512).data.resolution == 512
    assert load(resolution=[512, 768, 1024]).data.resolution == [512, 768, 1024]
    assert load(folders=[{"path": "d", "resolution": [256, 512]}]).data.folders[0].resolution == [256, 512]
    for bad, msg in (([512, 512], "distinct"), ([], "distinct"), ([512, 100], "multiple of 16"),
                     ([512, "x"], "integer"), (32, "bucket_step")):
        with pytest.raises(ConfigError, match=msg):
            load(resolution=bad)
    with pytest.raises(ConfigError, match=r"data\.folders\[0\]\.resolution must be a multiple of 16"):
        load(folders=[{"path": "d", "resolution": 100}])
    again = load_train_config(None, ["data.resolution=[64, 128]"], data=base)
    assert again.data.resolution == [64, 128]


def test_the_plan_prices_the_largest_resolution(tiny_dev_dir):
    base = {"model": {"path": str(tiny_dev_dir)}, "save": {"output_dir": "o"}}
    cfg = load_train_config(None, data={**base, "data": {"resolution": [256, 512], "folders": [{"path": "d"}]}})
    assert plan_inputs(cfg).image_tokens == ((512 // 16) ** 2,)
    cfg = load_train_config(None, data={**base, "data": {"resolution": 256, "folders": [
        {"path": "d"}, {"path": "e", "resolution": [128, 768]}]}})
    assert plan_inputs(cfg).image_tokens == ((768 // 16) ** 2,)


def test_the_train_form_takes_one_resolution_or_several():
    specs = forms.field_specs(TrainConfig)
    spec = next(s for s in specs if s["key"] == "data.resolution")
    assert spec["kind"] == "int_or_list" and spec["default"] == 512 and not spec["optional"]
    folder = next(s for s in specs if s["key"] == "data.folders")["fields"]
    assert {f["key"]: f["kind"] for f in folder}["resolution"] == "int_or_list"
    for typed, want in (("768", 768), ("512, 768", [512, 768]), ("[512, 1024]", [512, 1024])):
        assert forms.form_to_data(specs, {"data.resolution": typed}) == {"data": {"resolution": want}}
    values = {"model.path": "m", "data.folders": [{"path": "d", "resolution": "256, 512"}],
              "save.output_dir": "o", "data.resolution": "512, 768"}
    cfg = load_train_config(None, data=forms.form_to_data(specs, values, drop_defaults=True))
    assert cfg.data.resolution == [512, 768] and cfg.data.folders[0].resolution == [256, 512]
    with pytest.raises(ConfigError, match="resolution"):
        load_train_config(None, data=forms.form_to_data(specs, {**values, "data.resolution": "512, abc"}))


def _toml(tmp_path, model_dir, images, out, steps=10):
    from tiny_run import lora_run_toml

    return lora_run_toml(tmp_path, model_dir, images, out, steps=steps, seed=11, data="batch_size = 1",
                         save="every = 4", resolution="[64, 128]")


def test_bucket_counts_per_resolution_are_printed_at_start(tmp_path, tiny_dev_dir, sk_images, capsys):
    from PIL import Image

    from dev2pro.recipes.train_lora import train

    summary = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "run", steps=2)), progress=False)
    out = capsys.readouterr().out
    sizes = {}
    for p in sorted(sk_images.glob("*.*")):
        if p.suffix != ".txt":
            with Image.open(p) as im:
                sizes[p.name] = im.size
    assert "data: 5 images (10 samples per epoch with repeats)" in out  # each image at 64 and at 128
    assert "multi-resolution: each of 5 images once per resolution per epoch" in out
    for res in (64, 128):
        counts = Counter(assign_bucket(*s, make_buckets(res * res, step=64)) for s in sizes.values())
        line = next(li for li in out.splitlines() if li.startswith(f"  buckets at {res}px:"))
        assert line == f"  buckets at {res}px: {len(counts)} bucket(s): " + ", ".join(
            f"{w}x{h} ({n})" for (w, h), n in counts.most_common())
    assert len(summary["losses"]) == 2
    # the same numbers from the library function the line is made of
    assert bucket_counts([type("E", (), dict(resolution=64, bucket=(64, 64), repeats=3))()]) == {
        64: Counter({(64, 64): 3})}


@pytest.mark.slow
def test_resumed_multi_resolution_run_is_bit_identical(tmp_path, tiny_dev_dir, sk_images):
    from dev2pro.recipes.train_lora import train
    from tiny_run import run_killed, same_tensors

    full = train(load_train_config(_toml(tmp_path, tiny_dev_dir, sk_images, "full")), progress=False)
    cfg_path = _toml(tmp_path, tiny_dev_dir, sk_images, "killed")
    run_killed(cfg_path, 6)  # state saved at step 4
    with pytest.raises(UserError, match="--resume"):
        train(load_train_config(cfg_path), progress=False)
    resumed = train(load_train_config(cfg_path), resume="latest", progress=False)
    assert same_tensors(tmp_path / "full" / "lora.safetensors", tmp_path / "killed" / "lora.safetensors")
    assert resumed["losses"] == full["losses"][4:]
