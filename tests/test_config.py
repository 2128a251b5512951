"""Config loading: errors name where a bad value came from (file or --set), integer bounds, finite floats."""

from dataclasses import dataclass

import pytest

from dev2pro.config import INT_LIMIT, load_config, opt, require, section
from dev2pro.errors import ConfigError


@dataclass
class Train:
    steps: int = opt(10, "steps")
    lr: float = opt(1e-4, "learning rate")

    def validate(self):
        require(self.steps > 0, "steps must be > 0")


@dataclass
class Cfg:
    train: Train = section(Train, "training")
    name: str = opt("x", "a name")


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[train]\nsteps = 5\n")
    return p


def test_set_type_error_names_the_override_not_the_file(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, cfg_file, ["train.lr=abc"])
    assert str(e.value) == "--set train.lr=abc: 'train.lr' must be a number, got 'abc'"


def test_set_unknown_key_and_validation_name_the_override(cfg_file):
    with pytest.raises(ConfigError, match=r"^--set train\.stpes=3: unknown key 'train\.stpes'; did you mean "
                                          r"'train\.steps'\?"):
        load_config(Cfg, cfg_file, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"^--set train\.steps=0: train\.steps must be > 0$"):
        load_config(Cfg, cfg_file, ["train.steps=0"])


def test_file_errors_still_name_the_file(cfg_file):
    cfg_file.write_text("[train]\nsteps = 0\n")
    with pytest.raises(ConfigError, match=rf"^{cfg_file}: train\.steps must be > 0$"):
        load_config(Cfg, cfg_file, ["train.lr=0.1"])
    cfg_file.write_text("[train]\nlr = \"fast\"\n")
    with pytest.raises(ConfigError, match=rf"^{cfg_file}: 'train\.lr' must be a number"):
        load_config(Cfg, cfg_file)


def test_huge_integers_are_refused_with_the_limit(cfg_file):
    with pytest.raises(ConfigError, match=rf"'train\.steps' = {2**63 - 1} is too large; the largest allowed is "
                                          rf"{INT_LIMIT}"):
        load_config(Cfg, cfg_file, [f"train.steps={2**63 - 1}"])
    assert load_config(Cfg, cfg_file, [f"train.steps={INT_LIMIT}"]).train.steps == INT_LIMIT


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_refused(cfg_file, value):
    with pytest.raises(ConfigError, match=rf"--set train\.lr={value}: 'train\.lr' must be a finite number"):
        load_config(Cfg, cfg_file, [f"train.lr={value}"])


def test_train_sample_size_is_one_string_with_width_height_still_accepted(tmp_path):
    from dev2pro.schemas import load_train_config

    p = tmp_path / "t.toml"
    p.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "o"\n'
                 '[sample]\nsize = "768x512"\n')
    cfg = load_train_config(str(p))
    assert (cfg.sample.width, cfg.sample.height) == (768, 512)
    cfg = load_train_config(str(p), ["sample.size=", "sample.width=320", "sample.height=256"])
    assert (cfg.sample.width, cfg.sample.height) == (320, 256)
    with pytest.raises(ConfigError, match=r"sample\.size.*WIDTHxHEIGHT"):
        load_train_config(str(p), ["sample.size=big"])
    with pytest.raises(ConfigError, match=r"sample\.size.*not both"):
        load_train_config(str(p), ["sample.width=320"])


@pytest.mark.parametrize("override, field, want", [
    ("sample.prompts=sks style, a cat", "sample.prompts", ["sks style, a cat"]),  # one prompt, not 16 characters
    ('sample.prompts="a lighthouse"', "sample.prompts", ["a lighthouse"]),
    ("sample.seeds=1", "sample.seeds", [1]),
    ("lora.double_blocks=0", "lora.double_blocks", [0]),
    ("lora.single_blocks=3", "lora.single_blocks", [3]),
    ("validation.sigmas=0.5", "validation.sigmas", [0.5]),
    ("validation.sigmas=1", "validation.sigmas", [1.0]),
    ("validation.seeds=7", "validation.seeds", [7]),
    ('save.formats="kohya"', "save.formats", ["kohya"]),
    ('lora.extra_targets="modulation"', "lora.extra_targets", ["modulation"]),
    ('model.fp8_keep="norms"', "model.fp8_keep", ["norms"]),
])
def test_a_single_value_of_a_list_field_is_a_list_of_one(tmp_path, override, field, want):
    """A list field given one value (what `--set sample.seeds=1` naturally types) holds that value: not its
    characters (prompts, formats, targets), not a TypeError traceback (seeds, block indices, sigmas)."""
    from dev2pro.schemas import load_train_config

    p = tmp_path / "t.toml"
    p.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "o"\n')
    cfg = load_train_config(str(p), [override])
    section_name, key = field.split(".")
    assert getattr(getattr(cfg, section_name), key) == want


@pytest.mark.parametrize("override, message", [
    ('sample.prompts=["a", 3]', r"'sample\.prompts\[1\]' must be a string, got 3"),
    ("sample.seeds=[1, 1.5]", r"'sample\.seeds\[1\]' must be an integer"),
    ("sample.seeds={a=1}", r"'sample\.seeds' must be a list"),
    ("lora.double_blocks=true", r"'lora\.double_blocks' must be a list"),
    ('validation.sigmas=["x"]', r"'validation\.sigmas\[0\]' must be a number"),
])
def test_list_fields_check_their_items(tmp_path, override, message):
    from dev2pro.schemas import load_train_config

    p = tmp_path / "t.toml"
    p.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "o"\n')
    with pytest.raises(ConfigError, match=message):
        load_train_config(str(p), [override])


def test_sample_with_adapter_without_an_adapter_is_refused(tmp_path):
    from dev2pro.schemas import load_train_config

    p = tmp_path / "t.toml"
    p.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "o"\n')
    with pytest.raises(ConfigError, match=r"sample.with_adapter: there is no model.adapter to turn on; set "
                                          r"model.adapter"):
        load_train_config(str(p), ["sample.with_adapter=true"])
    assert load_train_config(str(p), ["sample.with_adapter=true", 'model.adapter="a.safetensors"']).sample.with_adapter


NASTY = 'ohwx\n"style"\t\x07 back\\slash é 🐈 \x7f\r\x1b[0m'


def test_toml_strings_escape_quotes_and_control_characters():
    from dev2pro.config import toml_string

    assert toml_string('a\n"b"\t\x07\\') == '"a\\n\\"b\\"\\t\\u0007\\\\"'
    assert toml_string("é 🐈") == '"é 🐈"'  # unicode is kept as it is


def test_a_run_config_with_newlines_and_control_characters_round_trips(tmp_path):
    """Issue 18.6: a newline in data.trigger or a sample prompt wrote a config.toml --resume could not read."""
    from dev2pro.config import render_toml, to_dict
    from dev2pro.schemas import load_train_config

    cfg = load_train_config(None, data={"model": {"path": str(tmp_path)},
                                        "data": {"folders": [{"path": str(tmp_path), "caption": NASTY}],
                                                 "trigger": NASTY, "default_caption": "a\tb"},
                                        "sample": {"prompts": [NASTY, "plain"], "negative": '"'},
                                        "save": {"output_dir": str(tmp_path / "run"), "name": "x\ny"}})
    saved = tmp_path / "config.toml"
    saved.write_text(render_toml(cfg), encoding="utf-8")
    again = load_train_config(saved)
    assert again.data.trigger == NASTY and again.sample.prompts == [NASTY, "plain"]
    assert again.data.folders[0].caption == NASTY and again.sample.negative == '"'
    assert to_dict(again) == to_dict(cfg)


def test_paths_in_the_file_are_relative_to_it_and_paths_typed_with_set_to_the_cwd(tmp_path, monkeypatch):
    """A kohya user typing ``--set save.output_dir=runs/x`` in a folder expects runs/x there, not beside the
    config file; paths written in the file stay relative to the file (also in a list of tables given with --set)."""
    from dev2pro.schemas import load_train_config

    cfgs, here = tmp_path / "configs", tmp_path / "work"
    cfgs.mkdir()
    here.mkdir()
    (cfgs / "c.toml").write_text('[model]\npath = "models/dev"\n[[data.folders]]\npath = "data/a"\n'
                                 '[save]\noutput_dir = "runs/file"\n')
    monkeypatch.chdir(here)
    cfg = load_train_config(cfgs / "c.toml")
    assert (cfg.model.path, cfg.save.output_dir) == (str(cfgs / "models/dev"), str(cfgs / "runs/file"))
    assert cfg.data.folders[0].path == str(cfgs / "data/a")
    cfg = load_train_config(cfgs / "c.toml", ["save.output_dir=runs/x", 'data.folders=[{path="imgs", masks="m"}]'])
    assert cfg.save.output_dir == str(here / "runs/x") and cfg.model.path == str(cfgs / "models/dev")
    assert (cfg.data.folders[0].path, cfg.data.folders[0].masks) == (str(here / "imgs"), str(here / "m"))


def test_a_setting_that_takes_one_value_or_a_list_says_both_forms():
    """``--set data.resolution=64,96`` (kohya's spelling) is not TOML: the message names the list form too."""
    from dev2pro.schemas import load_train_config

    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["data.resolution=64,96"])
    assert str(e.value) == ("--set data.resolution=64,96: 'data.resolution' must be an integer or a list of them (in "
                            "brackets: [a, b]), got '64,96'")
