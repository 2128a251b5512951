"""The Train form is the config schema: every field appears with its default, a field added to a schema appears
with no UI change, and values from the browser meet the CLI's own validation (same messages)."""

import dataclasses
from dataclasses import dataclass

import pytest

from dev2pro.config import load_config, opt, path_fields, section
from dev2pro.errors import ConfigError
from dev2pro.schemas import TrainConfig, load_train_config
from dev2pro.ui import forms
from dev2pro.ui.workspace import Workspace


def leaf_keys(schema, prefix=""):
    out = []
    for f in dataclasses.fields(schema):
        v = getattr(schema(), f.name)
        out += leaf_keys(type(v), f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


def test_every_train_option_is_a_form_field_with_its_default():
    specs = [s for s in forms.field_specs(TrainConfig) if s["kind"] != "section"]
    assert [s["key"] for s in specs] == leaf_keys(TrainConfig)
    cfg = TrainConfig()
    for s in specs:
        node = cfg
        for part in s["key"].split("."):
            node = getattr(node, part)
        assert s["default"] == (node if s["kind"] != "tables" else [dataclasses.asdict(i) for i in node]), s["key"]
    kinds = {s["key"]: s["kind"] for s in specs}
    assert kinds["train.steps"] == "int" and kinds["train.optimizer"] == "choice" and kinds["data.folders"] == "tables"
    assert kinds["model.fp8_storage"] == "bool" and kinds["sample.prompts"] == "list"


def test_a_new_schema_field_appears_without_ui_changes(tmp_path):
    @dataclass
    class Inner:
        folder: str = opt("", "a folder", path=True)
        level: int = opt(3, "a level")
        mode: str = opt("a", "a mode", ("a", "b"))

        def validate(self):
            if self.level > 9:
                raise ConfigError("level must be <= 9")

    @dataclass
    class Schema:
        inner: Inner = section(Inner, "an added section")
        extra: float = opt(0.5, "an added top-level field")

    def loader(path, overrides=None, data=None):  # the loader resolves path fields like load_train_config's
        return load_config(Schema, path, overrides, data)

    specs = forms.field_specs(Schema)
    assert [(s["key"], s["kind"]) for s in specs] == [("inner", "section"), ("inner.folder", "str"),
                                                      ("inner.level", "int"), ("inner.mode", "choice"),
                                                      ("extra", "float")]
    assert path_fields(Schema) == {"inner.folder"}
    ws = Workspace(tmp_path)
    cfg = forms.build_config(specs, {"inner.level": "7", "extra": "2", "inner.folder": "x"}, loader,
                             {"inner.folder"}, ws.resolve)
    assert cfg.inner.level == 7 and cfg.extra == 2.0 and cfg.inner.folder == str(tmp_path.resolve() / "x")
    with pytest.raises(ConfigError, match="level must be <= 9"):
        forms.build_config(specs, {"inner.level": "12"}, loader, set(), ws.resolve)


@pytest.mark.parametrize("key,value,override", [
    ("train.steps", "abc", "train.steps=abc"),
    ("train.optimizer", "adam", "train.optimizer='adam'"),
    ("lora.rank", "0", "lora.rank=0"),
    ("data.bucket_step", "20", "data.bucket_step=20"),
    ("lora.double_blocks", "0\n3", None),
])
def test_browser_values_get_the_cli_messages(tmp_path, key, value, override):
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    specs = forms.field_specs(TrainConfig)
    base = {"model.path": "m", "data.folders": [{"path": "d"}], "save.output_dir": "out"}
    ws = Workspace(tmp_path)
    paths = path_fields(TrainConfig)
    assert paths == {"model.path", "model.transformer", "model.inference_base", "model.adapter", "data.shards",
                     "data.cache_dir", "data.folders[].path", "data.folders[].masks", "data.folders[].controls",
                     "save.output_dir", "validation.folder", "sample.control"}
    if override is None:  # a valid list: parsed per line like TOML, a list of strings line for line
        cfg = forms.build_config(specs, {**base, key: value}, load_train_config, paths, ws.resolve)
        assert cfg.lora.double_blocks == [0, 3]
        cfg = forms.build_config(specs, {**base, "sample.prompts": "true\n3 cats, 1 dog"}, load_train_config, paths,
                                 ws.resolve)
        assert cfg.sample.prompts == ["true", "3 cats, 1 dog"]
        return
    with pytest.raises(ConfigError) as ui_err:
        forms.build_config(specs, {**base, key: value}, load_train_config, paths, ws.resolve)
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\npath = "m"\n[[data.folders]]\npath = "d"\n[save]\noutput_dir = "out"\n')
    with pytest.raises(ConfigError) as cli_err:
        load_train_config(toml, [override])
    strip = lambda e: str(e.value).split(": ", 1)[1]  # noqa: E731  (the source named first differs)
    assert strip(ui_err) == strip(cli_err)


def test_a_valid_form_equals_the_same_toml(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    specs = forms.field_specs(TrainConfig)
    values = {"model.path": "m", "data.folders": [{"path": "d", "repeats": "3", "caption": "x"}],
              "save.output_dir": "runs/a", "train.steps": "20", "train.lr": "1e-2", "model.fp8_storage": True,
              "sample.prompts": "a cat\n a dog ", "sample.seeds": "1\n2", "save.formats": "kohya\ndiffusers"}
    ui_cfg = forms.build_config(specs, values, load_train_config, path_fields(TrainConfig),
                                Workspace(tmp_path).resolve)
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\npath = "m"\nfp8_storage = true\n[[data.folders]]\npath = "d"\nrepeats = 3\n'
                    'caption = "x"\n[train]\nsteps = 20\nlr = 1e-2\n[sample]\nprompts = ["a cat", "a dog"]\n'
                    'seeds = [1, 2]\n[save]\noutput_dir = "runs/a"\nformats = ["kohya", "diffusers"]\n')
    assert ui_cfg == load_train_config(toml)


def test_only_values_that_differ_from_the_defaults_reach_the_loader(tmp_path):
    """A form shows every default; passing them all would make every key 'set by the user' and stop settings
    that fill unset keys (a VRAM preset) from applying. The loader sees what a hand-written TOML would hold."""
    seen = {}

    def loader(path, overrides=None, data=None):
        seen["data"] = data
        return load_train_config(path, overrides, data)

    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    specs = forms.field_specs(TrainConfig)
    values = {s["key"]: s["default"] for s in specs if s["kind"] not in ("section", "tables")}
    values.update({"model.path": "m", "data.folders": [{"path": "d"}], "save.output_dir": "o", "train.steps": "20",
                   "lora.alpha": "16", "lora.rank": 16, "model.gradient_checkpointing": "auto"})  # as the page sends
    forms.build_config(specs, values, loader, {"model.path", "save.output_dir", "data.folders[].path"},
                       Workspace(tmp_path).resolve)
    assert seen["data"] == {"model": {"path": str(tmp_path.resolve() / "m")},
                            "data": {"folders": [{"path": str(tmp_path.resolve() / "d")}]},
                            "train": {"steps": 20}, "save": {"output_dir": str(tmp_path.resolve() / "o")}}
    # a switch with named modes: the page's "true" / "false" strings are the booleans
    spec = next(s for s in specs if s["key"] == "model.gradient_checkpointing")
    assert spec["kind"] == "choice" and [forms._value(spec, v) for v in ("true", "False", "auto")] == [True, False,
                                                                                                     "auto"]


def test_absolute_paths_outside_the_workspace_are_refused_in_any_field(tmp_path):
    """Even a string field not marked as a path cannot point outside the workspace."""
    @dataclass
    class Schema:
        where: str = opt("", "a location checked by its own validator (not marked as a path)")

        def validate(self):
            if self.where and not self.where.startswith("/"):
                raise ConfigError(f"where: '{self.where}' must be absolute")

    loader = lambda path, overrides=None, data=None: load_config(Schema, path, overrides, data)  # noqa: E731
    specs = forms.field_specs(Schema)
    assert path_fields(Schema) == set()
    ws = Workspace(tmp_path)
    (tmp_path / "inside").mkdir()
    assert forms.build_config(specs, {"where": str(tmp_path / "inside")}, loader, set(), ws.resolve).where
    for outside in ["/etc/passwd", "/tmp", str(tmp_path.parent / "new-output")]:
        with pytest.raises(ConfigError, match="outside the workspace"):
            forms.build_config(specs, {"where": outside}, loader, set(), ws.resolve)


@pytest.mark.parametrize("values", [{"sample.control": "/etc/passwd"},
                                    {"sample.control": "ref.png\n/etc/passwd"},
                                    {"data.folders": [{"path": "d", "controls": "../outside"}]},
                                    {"data.folders": [{"path": "d", "controls": "before\n../outside"}]}])
def test_edit_pair_paths_are_confined_to_the_workspace(tmp_path, values):
    """The reference-image settings are path fields like the others: the web app resolves them in the workspace."""
    (tmp_path / "ws" / "m").mkdir(parents=True)
    (tmp_path / "ws" / "d").mkdir()
    (tmp_path / "outside").mkdir()
    base = {"model.path": "m", "data.folders": [{"path": "d"}], "save.output_dir": "out", "sample.prompts": "p"}
    with pytest.raises(ConfigError, match=r"'(sample.control|data.folders\[\].controls)': path .* (absolute|contains)"):
        forms.build_config(forms.field_specs(TrainConfig), {**base, **values}, load_train_config,
                           path_fields(TrainConfig), Workspace(tmp_path / "ws").resolve)


def test_several_reference_folders_are_one_per_line(tmp_path):
    """controls and sample.control take one path or a list: one line of the form is that path, several lines the
    list (each resolved in the workspace), as the same TOML would hold them; and path_values lists each one."""
    for d in ("m", "d", "before", "style"):
        (tmp_path / d).mkdir()
    specs = forms.field_specs(TrainConfig)
    kinds = {s["key"]: s for s in specs}
    assert kinds["sample.control"]["kind"] == "str_or_list"
    assert {f["key"]: f["kind"] for f in kinds["data.folders"]["fields"]}["controls"] == "str_or_list"
    values = {"model.path": "m", "save.output_dir": "out", "data.folders": [{"path": "d", "controls": "before\n style "}]}
    cfg = forms.build_config(specs, values, load_train_config, path_fields(TrainConfig), Workspace(tmp_path).resolve)
    root = tmp_path.resolve()
    assert cfg.data.folders[0].controls == [str(root / "before"), str(root / "style")]
    assert ("data.folders[].controls", str(root / "style")) in forms.path_values(cfg, path_fields(TrainConfig))
    one = forms.build_config(specs, {**values, "data.folders": [{"path": "d", "controls": "before\n"}]},
                             load_train_config, path_fields(TrainConfig), Workspace(tmp_path).resolve)
    assert one.data.folders[0].controls == str(root / "before")
