"""The train and dedistill schemas: renamed/removed keys say what to do, one resolver makes every path field
absolute against the config's folder, dedistill data runs the bucket checks, --print-config output reloads."""

import dataclasses
from pathlib import Path

import pytest

from dev2pro.config import path_fields, render_toml
from dev2pro.errors import ConfigError
from dev2pro.schemas import (DedistillConfig, TrainConfig, load_dedistill_config, load_train_config)

DEDISTILL = """
[model]
path = "models/dev"
teacher = "teachers/dev.safetensors"
[[data.folders]]
path = "imgs"
[save]
output_dir = "runs/d"
"""
TRAIN = DEDISTILL.replace('teacher = "teachers/dev.safetensors"\n', "")


def _write(tmp_path, text, name="c.toml"):
    (tmp_path / "cfgs").mkdir(exist_ok=True)
    p = tmp_path / "cfgs" / name
    p.write_text(text)
    return p


def test_dedistill_sample_guidance_says_it_is_now_cfg(tmp_path):
    p = _write(tmp_path, DEDISTILL + "[sample]\nguidance = 4.0\n")
    with pytest.raises(ConfigError) as e:
        load_dedistill_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: sample.guidance: in dedistill configs this is now sample.cfg (the true-CFG scale")
    assert "rename the key to cfg" in msg and "--resume" in msg
    with pytest.raises(ConfigError, match=r"^--set sample\.guidance=4: sample\.guidance: .*now sample\.cfg"):
        load_dedistill_config(_write(tmp_path, DEDISTILL), ["sample.guidance=4"])
    renamed = _write(tmp_path, DEDISTILL + "[sample]\ncfg = 4.0\n", "renamed.toml")
    cfg = load_dedistill_config(renamed)
    assert cfg.sample.cfg == 4.0 and not hasattr(cfg.sample, "guidance")
    with pytest.raises(ConfigError, match=r"^--set sample\.cfg=0\.5: sample\.cfg: the true-CFG scale must be >= 1"):
        load_dedistill_config(renamed, ["sample.cfg=0.5"])


def test_removed_dedistill_train_keys_are_all_named_in_one_message(tmp_path):
    """A run folder's config.toml from before the split holds every old key: one error lists them all."""
    p = _write(tmp_path, DEDISTILL + '[train]\nsteps = 3\nguidance = 1.0\noptimizer = "adamw"\ncompile = false\n'
                                     'attention_backend = ""\n[sample]\nguidance = 3.5\n')
    with pytest.raises(ConfigError) as e:
        load_dedistill_config(p)
    msg = str(e.value)
    assert "train.guidance: dedistill always trains at guidance 1.0 (the Dev2Pro recipe); delete the line" in msg
    for key in ("train.optimizer", "train.compile", "train.attention_backend", "sample.guidance"):
        assert f"{key}: " in msg, key
    assert "unknown key" not in msg
    names = {f.name for f in dataclasses.fields(DedistillConfig().train)}
    assert not names & {"guidance", "optimizer", "compile", "attention_backend"}
    # the train recipe keeps them: there they mean something
    assert {"guidance", "optimizer", "compile", "attention_backend"} <= {f.name for f in
                                                                        dataclasses.fields(TrainConfig().train)}


def test_a_typo_is_still_an_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stpes'; did you mean 'train\.steps'"):
        load_dedistill_config(_write(tmp_path, DEDISTILL), ["train.stpes=3"])


def test_every_path_field_resolves_against_the_config_folder(tmp_path):
    absolute = str(tmp_path / "elsewhere" / "base.safetensors")
    p = _write(tmp_path, f"""
[model]
path = "models/dev"
transformer = "{absolute}"
inference_base = "../dev.safetensors"
adapter = "adapters/a.safetensors"
[[data.folders]]
path = "imgs/one"
[[data.folders]]
path = "imgs/two"
[data]
cache_dir = "cache"
[save]
output_dir = "runs/r"
""")
    cfg = load_train_config(p)
    here = (tmp_path / "cfgs").resolve()
    assert cfg.model.path == str(here / "models/dev") and cfg.model.transformer == absolute
    assert cfg.model.inference_base == str(tmp_path.resolve() / "dev.safetensors")
    assert cfg.model.adapter == str(here / "adapters/a.safetensors")
    assert [f.path for f in cfg.data.folders] == [str(here / "imgs/one"), str(here / "imgs/two")]
    assert cfg.data.cache_dir == str(here / "cache") and cfg.save.output_dir == str(here / "runs/r")
    assert cfg.data.shards == "" and cfg.sample.size == "" and cfg.data.trigger == ""  # empty / not paths: as written

    d = load_dedistill_config(_write(tmp_path, DEDISTILL + '[data]\nshards = "cache/index.json"\n', "d.toml"))
    assert d.model.teacher == str(here / "teachers/dev.safetensors") and d.model.path == str(here / "models/dev")
    assert d.data.shards == str(here / "cache/index.json") and d.save.output_dir == str(here / "runs/d")
    assert d.data.folders[0].path == str(here / "imgs")


def test_the_marked_path_fields_are_exactly_the_old_hand_written_lists():
    """Plus the edit pairs' reference images (data.folders[].controls, sample.control): the web app confines every
    one of these to the workspace."""
    assert path_fields(TrainConfig) == {"model.path", "model.transformer", "model.inference_base", "model.adapter",
                                        "data.folders[].path", "data.folders[].masks", "data.folders[].controls",
                                        "data.shards", "data.cache_dir", "save.output_dir", "validation.folder",
                                        "sample.control"}
    assert path_fields(DedistillConfig) == {"model.path", "model.transformer", "model.teacher",
                                            "data.folders[].path", "data.folders[].masks", "data.folders[].controls",
                                            "data.shards", "data.cache_dir", "save.output_dir"}


def test_without_a_file_paths_resolve_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_dedistill_config(None, data={"model": {"path": "m"}, "data": {"shards": "s/index.json"},
                                            "save": {"output_dir": "o"}})
    assert cfg.model.path == str(tmp_path.resolve() / "m") and cfg.save.output_dir == str(tmp_path.resolve() / "o")


@pytest.mark.parametrize("override,message", [
    ("data.bucket_step=20", "data.bucket_step must be a multiple of 16"),
    ("data.resolution=32", "data.resolution must be >= bucket_step"),
])
def test_dedistill_data_runs_the_bucket_checks(tmp_path, override, message):
    p = _write(tmp_path, DEDISTILL)
    with pytest.raises(ConfigError, match=rf"^--set {override}: {message}"):
        load_dedistill_config(p, [override])
    with pytest.raises(ConfigError, match=rf"^--set {override}: {message}"):
        load_train_config(_write(tmp_path, TRAIN, "t.toml"), [override])


def test_dedistill_keeps_its_own_defaults_and_help(tmp_path):
    d, t = DedistillConfig(), TrainConfig()
    assert (d.train.lr, d.train.schedule, d.train.warmup_steps, d.train.mixed_precision) == (1e-5, "cosine", 100,
                                                                                             "bf16")
    assert (t.train.lr, t.train.schedule, t.train.warmup_steps, t.train.mixed_precision) == (1e-4, "constant", 0,
                                                                                             "no")
    assert (d.save.name, d.save.formats, t.save.name, t.save.formats) == ("dev2pro", ["bfl"], "lora", ["kohya"])
    with pytest.raises(ConfigError, match=r"save\.formats: unknown export 'kohya' \(bfl\|diffusers\|fp8\)"):
        load_dedistill_config(_write(tmp_path, DEDISTILL), ['save.formats=["kohya"]'])
    with pytest.raises(ConfigError, match=r"save\.formats: unknown layout 'bfl' \(kohya\|diffusers\|comfy\)"):
        load_train_config(_write(tmp_path, TRAIN, "t.toml"), ['save.formats=["bfl"]'])


@pytest.mark.parametrize("command,loader", [("train", load_train_config), ("dedistill", load_dedistill_config)])
def test_print_config_renders_and_reloads(tmp_path, capsys, command, loader):
    """--print-config's output, filled with the required values, loads back to the config it rendered."""
    from dev2pro.cli import main

    assert main([command, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "folders = []" in text and "cfg = 3.5" in text
    filled = text.replace('path = ""', f'path = "{tmp_path / "m"}"', 1).replace(
        'output_dir = ""', f'output_dir = "{tmp_path / "o"}"').replace(
        'shards = ""', f'shards = "{tmp_path / "s.json"}"')
    cfg = loader(_write(tmp_path, filled))
    again = loader(_write(tmp_path, render_toml(cfg), "again.toml"))
    assert again == cfg and render_toml(again) == render_toml(cfg)
    default = (TrainConfig if command == "train" else DedistillConfig)()
    assert dataclasses.replace(cfg, model=default.model, data=default.data, save=default.save) == \
        dataclasses.replace(default)  # nothing but the three filled values differs from the defaults
    assert Path(cfg.model.path) == tmp_path / "m"


def test_print_config_leaves_model_dependent_defaults_to_the_model(tmp_path, capsys, flux2_dev_dir,
                                                                   klein_base_dir):
    """sample.guidance / sample.cfg default to the base's own (FLUX.2 dev 4.0, klein Base true CFG 4.0) when a
    config does not set them; --print-config printed them as 'guidance = 3.5', so a config made from it pinned
    FLUX.1's 3.5 on FLUX.2. They are commented out now; uncommented, they pin as any written key does."""
    from dev2pro.cli import main

    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "\n# guidance = 3.5  (unset: the model's own" in text and "\n# cfg = 3.5  (unset" in text
    assert "\nguidance = 3.5" not in text and "\ncfg = 3.5" not in text
    assert "\nguidance = 1.0" in text  # train.guidance is the recipe's (Dev2Pro trains at 1.0), not the model's

    def filled(model, text=text):
        return _write(tmp_path, text.replace('path = ""', f'path = "{model}"', 1).replace(
            'output_dir = ""', f'output_dir = "{tmp_path / "o"}"').replace(
            'shards = ""', f'shards = "{tmp_path / "s.json"}"'), f"{Path(model).name}.toml")

    dev = load_train_config(filled(flux2_dev_dir))
    assert dev.sample.guidance == 4.0 and dev.sample.cfg == 3.5  # dev: embedded 4.0 (Flux2Pipeline's)
    assert load_train_config(filled(klein_base_dir)).sample.cfg == 4.0  # klein Base: true CFG 4.0
    pinned = text.replace("# guidance = 3.5  (unset", "guidance = 3.5  # (unset")
    assert load_train_config(filled(flux2_dev_dir, pinned)).sample.guidance == 3.5
    assert "\nguidance = 4.0\n" in render_toml(dev)  # a run's saved config.toml keeps the value it used


def test_dedistill_cfg_grid_defaults_to_the_base_scale(tmp_path, flux2_dev_dir, tiny_dev_dir):
    """A de-distillation's true-CFG grid renders the student as `dev2pro sample` renders the export: at the base's
    own scale (FLUX.2 dev 4.0, not FLUX.1's 3.5) unless the config writes sample.cfg."""
    def conf(model, extra=""):
        return _write(tmp_path, f'[model]\npath = "{model}"\n[data]\nshards = "{tmp_path / "s.json"}"\n'
                                f'[save]\noutput_dir = "{tmp_path / "o"}"\n[sample]\n{extra}',
                      f"{Path(model).name}{len(extra)}.toml")

    assert load_dedistill_config(conf(flux2_dev_dir)).sample.cfg == 4.0
    assert load_dedistill_config(conf(flux2_dev_dir, "cfg = 3.0\n")).sample.cfg == 3.0
    assert load_dedistill_config(conf(flux2_dev_dir), ["sample.cfg=5"]).sample.cfg == 5.0
    assert load_dedistill_config(conf(tiny_dev_dir)).sample.cfg == 3.5  # FLUX.1: no per-variant table


def test_print_config_leaves_the_vram_preset_keys_to_the_preset(tmp_path, capsys, tiny_dev_dir):
    """Every key a model.vram preset picks prints commented out, so setting model.vram in a config made from
    --print-config applies the preset (written keys win: the preset only 'kept your ...' ones before)."""
    from dev2pro.cli import main
    from dev2pro.config import explicit_keys
    from dev2pro.plan import VRAM_PRESETS

    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    keys = {f"{sec}.{k}" for preset in VRAM_PRESETS.values() for sec, values in preset.items() for k in values}
    for key in keys:
        name = key.split(".")[1]
        assert f"\n# {name} = " in text and "(unset: model.vram's preset when set, else" in text, key
    filled = _write(tmp_path, text.replace('path = ""', f'path = "{tiny_dev_dir}"', 1).replace(
        'output_dir = ""', f'output_dir = "{tmp_path / "o"}"').replace(
        'shards = ""', f'shards = "{tmp_path / "s.json"}"').replace("vram = 0", "vram = 24"))
    assert not keys & explicit_keys(filled, [], None)  # none of them is written
    cfg = load_train_config(filled)
    assert cfg.model.vram == 24 and cfg.model.fp8_storage is True  # the 24 GB preset, not the printed default


def test_the_example_configs_load():
    root = (Path(__file__).parents[1] / "configs").resolve()
    d = load_dedistill_config(root / "dedistill.toml")
    assert d.sample.cfg == 3.5 and d.save.formats == ["bfl", "fp8"]
    assert d.model.path == str(root.parent / "models/FLUX.1-dev")
    assert d.save.output_dir == str(root.parent / "runs/dev2pro")
    t = load_train_config(root / "train_lora.toml")
    assert t.data.folders[0].path == str(root.parent / "data/my-style")


@pytest.mark.parametrize("override,message", [
    ("data.resolution=100000", "data.resolution must be a multiple of 16 in 64..4096 (512 or 1024 for FLUX.1), got "
                               "100000"),
    ("data.resolution=520", "data.resolution must be a multiple of 16 in 64..4096 (512 or 1024 for FLUX.1), got 520"),
    ("data.batch_size=0", "data.batch_size must be in 1..1024, got 0"),
    ("data.batch_size=100000", "data.batch_size must be in 1..1024, got 100000"),
    ("lora.rank=100000", "lora.rank must be in 1..6144, got 100000"),
    ("train.guidance=0", "train.guidance must be > 0 and <= 100, got 0.0"),
    ("train.guidance=-3.5", "train.guidance must be > 0 and <= 100, got -3.5"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
    ("train.shift=0", "train.shift must be > 0, got 0.0"),
    ("train.lr=0", "train.lr must be a finite number > 0, got 0.0"),
    ("train.steps=0", "train.steps must be > 0"),
    ("sample.guidance=nan", "'sample.guidance' must be a finite number"),
    ("sample.guidance=0", "sample.guidance must be > 0 and <= 100, got 0.0"),
    ("sample.cfg=0.5", "sample.cfg must be in 1..100, got 0.5"),
    ("sample.width=8192", "sample.width must be in 16..4096, got 8192"),
    ("sample.steps=100000", "sample.steps must be in 1..1000, got 100000"),
    ("sample.seeds=[-1]", "sample.seeds must be integers >= 0, got [-1]"),
    ("save.every=-1", "save.every must be >= 0, got -1"),
    ("save.keep_last=-3", "save.keep_last must be >= 0, got -3"),
])
def test_numeric_options_have_ranges_checked_at_load(tmp_path, override, message):
    """Issue 18.8: absurd values (data.resolution = 100000, lora.rank = 100000) were accepted."""
    with pytest.raises(ConfigError) as e:
        load_train_config(_write(tmp_path, TRAIN), [override])
    assert str(e.value).startswith(f"--set {override}: {message}"), str(e.value)


def test_ranges_hold_for_dedistill_and_compare_too(tmp_path):
    from dev2pro.schemas import load_compare_config

    with pytest.raises(ConfigError, match=r"^--set data\.resolution=100000: data\.resolution must be a multiple"):
        load_dedistill_config(_write(tmp_path, DEDISTILL), ["data.resolution=100000"])
    arms = _write(tmp_path, 'model = "m"\nprompts = ["p"]\n[[arms]]\nname = "a"\nguidance = -1.0\n', "cmp.toml")
    with pytest.raises(ConfigError, match=r"arms\[0\]\.guidance must be > 0 and <= 100, got -1.0"):
        load_compare_config(arms)


def test_a_rank_wider_than_the_layers_is_refused_once_the_checkpoint_is_known(tmp_path, tiny_dev_dir):
    text = TRAIN.replace('path = "models/dev"', f'path = "{tiny_dev_dir}"')
    assert load_train_config(_write(tmp_path, text), ["lora.rank=64"]).lora.rank == 64
    with pytest.raises(ConfigError) as e:
        load_train_config(_write(tmp_path, text), ["lora.rank=65"])
    assert str(e.value) == ("lora.rank = 65 is larger than the narrowest layer it trains "
                            "(transformer_blocks.0.attn.to_q: 64 in, 64 out): use at most 64 (4..128 is typical)")
    # a model that is not there yet is checked when it is loaded, not here
    assert load_train_config(_write(tmp_path, TRAIN), ["lora.rank=65"]).lora.rank == 65


def test_attention_backends_are_diffusers_local_ones_and_hub_downloads_are_refused(tmp_path):
    """train.attention_backend offers diffusers' dispatcher backends that run from installed packages; a "*_hub"
    backend (it downloads a kernel at run time) is a config error naming the local spelling."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from dev2pro.choices import ATTENTION_BACKENDS
    local = {b.value for b in AttentionBackendName if not b.value.endswith("_hub")}
    assert set(ATTENTION_BACKENDS) - {"", "auto"} == local  # "auto": dev2pro's probe (train/attention.py)
    path = _write(tmp_path, TRAIN)
    assert load_train_config(path, ["train.attention_backend=_native_flash"]).train.attention_backend == "_native_flash"
    with pytest.raises(ConfigError, match=r"'train\.attention_backend' = 'flash_hub' is not one of .*did you mean "
                                          r"'flash"):
        load_train_config(path, ["train.attention_backend=flash_hub"])


def test_print_config_with_a_config_prints_what_the_run_would_use(tmp_path, capsys, tiny_dev_dir):
    """`train CONFIG --print-config` printed the defaults (rank 16) and ignored CONFIG and --set; now it prints the
    resolved config -- the file, --set and the model's defaults applied -- which loads back to the same values."""
    from dev2pro.cli import main

    cfg = _write(tmp_path, f'[model]\npath = "{tiny_dev_dir}"\n[lora]\nrank = 4\n[data]\nshards = "s.json"\n'
                           f'[save]\noutput_dir = "runs/x"\n')
    assert main(["train", str(cfg), "--print-config", "--set", "train.lr=2e-4"]) == 0
    text = capsys.readouterr().out
    assert "\nrank = 4\n" in text and "\nlr = 0.0002\n" in text and "\nrank = 16\n" not in text
    assert f'\noutput_dir = "{tmp_path / "cfgs" / "runs" / "x"}"\n' in text
    again = load_train_config(_write(tmp_path, text, "again.toml"))
    assert again == load_train_config(cfg, ["train.lr=2e-4"])


def test_a_sample_size_off_the_16_grid_names_the_nearest_sizes(tmp_path):
    base = [f'model.path="{tmp_path}"', 'save.output_dir="o"', f'data.folders=[{{path="{tmp_path}"}}]']
    for key in ('sample.size="70x70"', "sample.width=70"):
        with pytest.raises(ConfigError, match=r"sample\.width/height 70x(70|512): width and height must be multiples "
                                              r"of 16; use 64x(64|512) or 80x(80|512)"):
            load_train_config(None, base + [key])


def test_another_trainers_key_names_ours(tmp_path):
    """kohya / diffusers / ai-toolkit names people bring: the unknown-key error names dev2pro's key; a typo still
    gets "did you mean"."""
    base = [f'model.path="{tmp_path}"', 'save.output_dir="o"', f'data.folders=[{{path="{tmp_path}"}}]']
    for key, ours in [("train.learning_rate=1e-4", "train.lr"), ("lora.network_dim=16", "lora.rank"),
                      ("lora.linear_alpha=16", "lora.alpha"), ("save.save_every_n_epochs=2", "save.every_epochs"),
                      ("save.max_step_saves_to_keep=3", "save.keep_loras"), ("data.train_batch_size=2",
                                                                              "data.batch_size"),
                      ("sample.guidance_scale=4", "sample.cfg on FLUX.2 klein"), ("train.max_train_epochs=8",
                                                                                  "train.epochs")]:
        with pytest.raises(ConfigError, match=rf"unknown key '{key.split('=')[0]}'; that is another trainer's name: "
                                              rf"dev2pro's is {ours}"):
            load_train_config(None, base + [key])
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnak'; did you mean 'lora.rank'\?"):
        load_train_config(None, base + ["lora.rnak=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'; that is another trainer's name"):
        load_dedistill_config(None, base + ["train.learning_rate=1e-4"])
