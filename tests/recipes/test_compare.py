"""`dev2pro compare`: arms side by side -> compare.png, self-contained report.html, results.json, metrics."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.errors import ConfigError, UserError
from dev2pro.lab import metrics as M
from dev2pro.cli_commands import add_compare
from dev2pro.recipes.compare import BLOCK_PAD

HOOK = '''
def count(images, prompts):
    assert len(images) == len(prompts)
    return {"n_images": len(images), "n_prompts": len(set(prompts))}
'''


def cli(*argv):
    parser = argparse.ArgumentParser(prog="dev2pro")
    add_compare(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *map(str, argv)])
    return args.run(args)


def write_config(path, model, arms: str, extra: str = "") -> str:
    path.write_text(f'model = "{model}"\nprompts = ["a red cat", "a blue dog"]\nseeds = [0, 1]\nsteps = 2\n'
                    f'size = "64x64"\nout = "{path.parent / "default-out"}"\n{extra}\n{arms}')
    return str(path)


@pytest.fixture
def lora_file(tiny_dev_dir, tmp_path):
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

    model, _ = load_transformer(tiny_dev_dir, torch.float32)
    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({n: LoraModule(torch.randn(4, m.in_features, generator=g) * 0.3,
                                    torch.randn(m.out_features, 4, generator=g) * 0.3, 4.0)
                      for n, m in model.named_modules() if n.endswith(("attn.to_q", "attn.to_v", "proj_mlp"))})
    return save_lora(lw, tmp_path / "lora.safetensors", "kohya")


def test_compare_four_arms(tiny_dev_dir, tiny_pro_dir, lora_file, tmp_path, capsys):
    (tmp_path / "hook.py").write_text(HOOK)
    arms = f'''
[[arms]]
name = "dev"
[[arms]]
name = "dev + LoRA"
loras = ["{lora_file}:0.8"]
[[arms]]
name = "pro (true CFG)"
transformer = "{tiny_pro_dir}"
[[arms]]
name = "dev again"
'''
    config = write_config(tmp_path / "c.toml", tiny_dev_dir, arms, f'metric_hook = "{tmp_path / "hook.py"}:count"')
    out = tmp_path / "cmp"
    cli(config, "--out", out)
    assert f"to {out}" in capsys.readouterr().out
    assert not (tmp_path / "default-out").exists()  # --out wins over the config's out

    results = json.loads((out / "results.json").read_text())
    names = [a["name"] for a in results["arms"]]
    assert names == ["dev", "dev + LoRA", "pro (true CFG)", "dev again"]
    assert results["prompts"] == ["a red cat", "a blue dog"] and results["seeds"] == [0, 1]
    arms = {a["name"]: a for a in results["arms"]}
    assert arms["dev"]["guidance"] == {"mode": "embedded", "embedded": 3.5, "cfg": 1.0}
    assert arms["pro (true CFG)"]["guidance"] == {"mode": "true_cfg", "embedded": None, "cfg": 3.5}
    assert arms["dev + LoRA"]["loras"] == [[str(lora_file), 0.8]]
    for a in results["arms"]:
        m = a["metrics"]
        assert set(m) == {"mean", "std", "mean_r", "mean_g", "mean_b", "hf_energy", "diversity",
                          "hook.n_images", "hook.n_prompts"}
        assert 0 < m["mean"] < 1 and m["std"] > 0 and m["hf_energy"] > 0 and m["diversity"] > 0
        assert m["hook.n_images"] == 4 and m["hook.n_prompts"] == 2
        assert len(a["images"]) == 4
        for item in a["images"]:
            png = Image.open(out / item["file"])
            assert png.size == (64, 64) and png.text["prompt"] == item["prompt"]
            assert png.text["seed"] == str(item["seed"])
    d = results["distances"]
    assert d["dev"]["dev again"] == 0.0 and d["dev again"]["dev"] == 0.0
    assert all(d[n][n] == 0.0 for n in names)
    assert d["dev"]["dev + LoRA"] > 0.001 and d["dev"]["pro (true CFG)"] > 0.001
    assert all(d[a][b] == d[b][a] for a in names for b in names)
    assert arms["dev"]["metrics"] == {**arms["dev again"]["metrics"]}

    grid = Image.open(out / "compare.png")
    width = 4 * (2 * 64) + 3 * BLOCK_PAD  # 4 arm blocks of 2 seeds, padded
    assert grid.size[0] == width and grid.size[1] > 2 * 64  # 2 prompt rows plus a label band
    band = grid.size[1] - 2 * 64
    # The first block's top-left cell is arm "dev", prompt 0, seed 0.
    first = Image.open(out / arms["dev"]["images"][0]["file"]).convert("RGB")
    assert np.array_equal(np.asarray(grid.crop((0, band, 64, band + 64))), np.asarray(first))

    report = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', report)) == 1 + 4 * 4  # grid + every image
    assert not re.search(r'src="(?!data:)', report)  # self-contained: no external sources
    for n in names:
        assert n in report.replace("&amp;", "&")
    assert "hf_energy" in report and "hook.n_images" in report and "Mean absolute pixel distance" in report


def test_output_folder_from_the_config_gets_its_parents(tiny_dev_dir, tmp_path):
    config = tmp_path / "one.toml"
    config.write_text(f'model = "{tiny_dev_dir}"\nprompts = ["a cat"]\nseeds = [0]\nsteps = 1\nsize = "32x32"\n'
                      f'out = "{tmp_path / "compares" / "2026" / "one"}"\n[[arms]]\nname = "dev"\n')
    cli(config)
    results = json.loads((tmp_path / "compares" / "2026" / "one" / "results.json").read_text())
    assert (results["width"], results["height"]) == (32, 32)


def test_compare_errors(tiny_dev_dir, tmp_path):
    one_arm = '[[arms]]\nname = "dev"\n'
    ok = write_config(tmp_path / "ok.toml", tiny_dev_dir, one_arm)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        cli(ok, "--out", tmp_path / "exists")
    with pytest.raises(ConfigError, match="names must be unique"):
        cli(write_config(tmp_path / "dup.toml", tiny_dev_dir, one_arm * 2))
    with pytest.raises(ConfigError, match="unknown key 'arms\\[0\\].lora'; did you mean 'arms\\[0\\].loras'"):
        cli(write_config(tmp_path / "typo.toml", tiny_dev_dir, one_arm + 'lora = ["x"]\n'))
    with pytest.raises(ConfigError, match="loras: .*finite number"):
        cli(write_config(tmp_path / "scale.toml", tiny_dev_dir, one_arm + 'loras = ["x.safetensors:big"]\n'))
    with pytest.raises(UserError, match="LoRA file .*missing.safetensors does not exist"):
        cli(write_config(tmp_path / "nolora.toml", tiny_dev_dir, one_arm + 'loras = ["missing.safetensors"]\n'))
    with pytest.raises(ConfigError, match="arms: add at least one"):
        cli(write_config(tmp_path / "noarms.toml", tiny_dev_dir, ""))
    with pytest.raises(UserError, match="size 100x72: width and height must be multiples of 16; use 96x64 or "
                                        "112x80"):  # the pipeline would render 96x64 and record 100x72
        cli(write_config(tmp_path / "size.toml", tiny_dev_dir, one_arm), "--set", "size=100x72")
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        cli(write_config(tmp_path / "hook.toml", tiny_dev_dir, one_arm, 'metric_hook = "no_such_module_xyz:fn"'))
    with pytest.raises(UserError, match="has no function 'nope'"):
        cli(write_config(tmp_path / "hook2.toml", tiny_dev_dir, one_arm, 'metric_hook = "json:nope"'))
    assert not (tmp_path / "default-out").exists()


def test_example_config_parses():
    from pathlib import Path

    from dev2pro.config import load_config
    from dev2pro.schemas import CompareConfig

    path = Path(__file__).parents[2] / "configs" / "compare.toml"
    assert "dev2pro compare configs/compare.toml" in path.read_text()
    cfg = load_config(CompareConfig, path)
    assert len(cfg.arms) >= 2 and all(a.guidance == 3.5 for a in cfg.arms)


def test_metrics_on_known_images():
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    assert M.mean_abs_distance(black, white) == 1.0 and M.mean_abs_distance(red, red) == 0.0
    stats = M.pixel_stats([red])
    assert stats["mean_r"] == 1.0 and stats["mean_g"] == 0.0 and stats["hf_energy"] == pytest.approx(0.0, abs=1e-12)
    checker = Image.fromarray((np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert M.pixel_stats([checker])["hf_energy"] == pytest.approx(16.0)  # |4*1 - 0| or |0 - 4*1| everywhere
    assert M.diversity([black, white, red], ["p", "p", "q"]) == 1.0  # only the "p" pair counts
    assert M.diversity([black, white], ["p", "q"]) is None
    d = M.pairwise_distances({"a": [black, red], "b": [white, red]})
    assert d["a"]["b"] == pytest.approx(0.5) and d["a"]["a"] == 0.0


def test_strengths_expand_each_lora_arm_and_keep_the_bases(tmp_path, tiny_dev_dir):
    """`compare --strengths 1,1.5`: one arm per strength for arms with LoRAs (each LoRA's own scale times the
    strength), bases once -- the strength-transfer grid."""
    from dev2pro.recipes.compare import with_strengths
    from dev2pro.schemas import load_compare_config

    (tmp_path / "s.safetensors").write_bytes(b"")
    arms = ('[[arms]]\nname = "base"\n\n[[arms]]\nname = "style"\nloras = ["' + str(tmp_path / "s.safetensors")
            + ':0.8"]\nsteps = 4\n')
    cfg = with_strengths(load_compare_config(write_config(tmp_path / "c.toml", tiny_dev_dir, arms)), [1.0, 1.5])
    assert [a.name for a in cfg.arms] == ["base", "style @1", "style @1.5"]
    assert cfg.arms[2].loras == [f"{tmp_path / 's.safetensors'}:1.2"] and cfg.arms[2].steps == 4


def test_klein_arms_render_distilled_as_it_is_used(tmp_path, klein_base_dir, klein_distilled_dir):
    """A klein distilled arm without its own steps renders at its 4 steps without CFG (the compare's steps and an
    arm's guidance 3.5 were applied and recorded, while diffusers ignored the CFG); Base keeps them."""
    config = write_config(tmp_path / "k.toml", klein_base_dir, f'''
[[arms]]
name = "distilled"
transformer = "{klein_distilled_dir / 'transformer'}"
[[arms]]
name = "base"
cfg = 4.0
''')
    cli(config, "--out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert results["steps"] == [2, 4]  # what the arms rendered at, not the config's default alone
    assert "<td>2 / 4 (per arm)</td>" in (tmp_path / "out" / "report.html").read_text()
    assert arms["distilled"]["steps"] == 4 and arms["distilled"]["guidance"]["cfg"] == 1.0
    assert arms["base"]["steps"] == 2 and arms["base"]["guidance"] == {"mode": "true_cfg", "embedded": None,
                                                                         "cfg": 4.0}


def test_an_arm_without_guidance_gets_its_bases_own(tmp_path, klein_base_dir):
    """No guidance in an arm: the base's own scale -- klein Base's true CFG 4 (Flux2KleinPipeline's default), not
    FLUX.1's 3.5; a written value is kept."""
    config = write_config(tmp_path / "k.toml", klein_base_dir, '''
[[arms]]
name = "own"
[[arms]]
name = "written"
guidance = 2.5
''')
    cli(config, "--out", tmp_path / "out")
    arms = {a["name"]: a for a in json.loads((tmp_path / "out" / "results.json").read_text())["arms"]}
    assert arms["own"]["guidance"]["cfg"] == 4.0 and arms["written"]["guidance"]["cfg"] == 2.5
