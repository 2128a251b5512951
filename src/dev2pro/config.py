"""Typed config schemas, TOML loading, ``--set section.key=value`` overrides, errors that name the field.

A schema is a tree of dataclasses; each field's type and default are the documentation (``--print-config``
renders them as TOML with the help text from ``field(metadata={"help": ...})``). Loading checks every key
against the schema (typos get a "did you mean"), converts and validates types, and runs each section's
``validate()`` for cross-field rules. Fields marked ``path=True`` are made absolute relative to the config file's
folder, or to the cwd when typed with --set (one resolver for every schema). A section may list keys it no longer
has in ``RENAMED`` (key -> what to do), so an older config gets that message instead of "unknown key". Only recipes
see these objects; library functions get plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .config_hints import unknown_key_hint
from .errors import ConfigError

INT_LIMIT = 2**31 - 1  # no count, size or seed in a config needs more; 2^63-1 steps is a typo, not a plan


def opt(default, help: str = "", choices: tuple | None = None, *, path=False, model_default: bool | str = False):
    """A config field with help text (and optional allowed values) for --print-config and validation.

    ``path=True``: a file or folder; the loader resolves a relative value against the config file's folder.
    ``model_default=True``: an absent key gets the model's own value from the loader (a base's sampling guidance);
    --print-config shows it commented out, so a config made from that output keeps the model's default; a string
    names what else picks it (``model.vram``'s preset)."""
    kw = {"metadata": {"help": help, "choices": choices, "path": path, "model_default": model_default}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), **kw)
    return field(default=default, **kw)


def section(cls, help: str = ""):
    return field(default_factory=cls, metadata={"help": help, "choices": None})


def ordered(*names: str):
    """Class decorator (above ``@dataclass``) for a section that extends a base: list its fields in this order.
    A dataclass puts a base's fields first; the order is what ``--print-config``, a saved config.toml and the UI
    form show, so an extension places its fields beside the ones they belong with. ``names`` must list every
    field once (checked at import). Only the listing order changes; construction is by keyword everywhere."""
    def apply(cls):
        real = [f.name for f in dataclasses.fields(cls)]  # __dataclass_fields__ also holds ClassVar entries
        if sorted(names) != sorted(real):
            raise TypeError(f"ordered({cls.__name__}): missing {sorted(set(real) - set(names))}, unknown "
                            f"{sorted(set(names) - set(real))}")
        every = cls.__dataclass_fields__
        cls.__dataclass_fields__ = {**{n: every[n] for n in names}, **{k: v for k, v in every.items()
                                                                         if k not in names}}
        return cls
    return apply


# ------------------------------------------------------------------------------------------------ loading
def load_config(schema: type, path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None):
    """Build ``schema`` from a TOML file and/or a dict, then apply ``section.key=value`` overrides. Errors name
    where the bad value came from: ``--set train.lr=abc: 'train.lr' must be a number``, or the file."""
    raw: dict = {}
    source = _Source("config")
    if path is not None:
        path = Path(path)
        source = _Source(str(path))
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if data:
        raw = _merge(raw, data)
    for item in overrides or []:
        raw = _merge(raw, parse_override(item))
        source.overrides[item.split("=", 1)[0].strip()] = item
    _check_renamed(schema, raw, source)
    cfg = _build(schema, raw, source, "")
    _validate_tree(cfg, source, "")
    # relative paths in a config are relative to the config file; typed on the command line (--set), to the cwd
    resolve_paths(cfg, path.parent if path is not None else Path("."), typed=set(source.overrides))
    return cfg


def resolve_paths(cfg, base: Path, typed: set[str] = frozenset(), prefix: str = "") -> None:
    """Make every non-empty relative ``path=True`` field in the tree (lists of tables included) absolute, against
    ``base``; the ``section.key`` values in ``typed`` (--set overrides) against the current directory."""
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), prefix + f.name
        here = Path.cwd() if key in typed else base
        if dataclasses.is_dataclass(v):
            resolve_paths(v, here, typed, key + ".")
        elif f.metadata.get("path") and isinstance(v, list):  # several paths (e.g. controls = ["a", "b"])
            setattr(cfg, f.name, [str((Path(here) / x).resolve()) if isinstance(x, str) and x and
                                  not Path(x).is_absolute() else x for x in v])
        elif isinstance(v, list):
            for item in v:
                if dataclasses.is_dataclass(item):
                    resolve_paths(item, here, typed, key + "[].")
        elif f.metadata.get("path") and isinstance(v, str) and v and not Path(v).is_absolute():
            setattr(cfg, f.name, str((Path(here) / v).resolve()))


def path_fields(schema: type, prefix: str = "") -> set[str]:
    """Dotted keys of the ``path=True`` fields of a schema; a list of tables' fields as ``key[].field``."""
    hints, out = typing.get_type_hints(schema), set()
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= path_fields(tp, f"{prefix}{f.name}.")
        elif _is_list_of_dataclass(tp):
            out |= path_fields(typing.get_args(tp)[0], f"{prefix}{f.name}[].")
        elif f.metadata.get("path"):
            out.add(prefix + f.name)
    return out


def _check_renamed(schema: type, raw: dict, source) -> None:
    """One error listing every key the schema renamed or removed (a section's ``RENAMED``) with what to do."""
    found: list[tuple[str, str]] = []

    def walk(tp, node, where):
        if not isinstance(node, dict):
            return
        hints = typing.get_type_hints(tp)
        renamed = getattr(tp, "RENAMED", {})
        for key, value in node.items():
            if key in renamed and key not in hints:
                found.append((where + key, renamed[key]))
            elif key in hints and dataclasses.is_dataclass(hints[key]):
                walk(hints[key], value, f"{where}{key}.")
            elif key in hints and _is_list_of_dataclass(hints[key]) and isinstance(value, list):
                for i, item in enumerate(value):
                    walk(typing.get_args(hints[key])[0], item, f"{where}{key}[{i}].")
    walk(schema, raw, "")
    if found:
        where = _of(source, found[0][0])
        hint = "" if where.startswith("--set") else (" (a config.toml saved in a run folder by an older dev2pro "
                                                      "lists every key: edit it the same way, then --resume "
                                                      "continues the run)")
        raise ConfigError(f"{where}: " + "; ".join(f"{k}: {m}" for k, m in found) + hint)


def explicit_keys(path, overrides, data) -> set[str]:
    """``section.key`` names the user set in the TOML file, the ``data`` dict or ``--set`` overrides (the
    settings a preset must leave alone)."""
    raw: list[dict] = []
    if path is not None and Path(path).exists():
        raw.append(tomllib.loads(Path(path).read_text()))
    if data:
        raw.append(data)
    raw += [parse_override(o) for o in overrides or []]
    keys = set()
    for r in raw:
        for sec, table in r.items():
            if isinstance(table, dict):
                keys |= {f"{sec}.{k}" for k in table}
            else:
                keys.add(sec)
    return keys


class _Source(str):
    """The config file's name (a str, so messages can use it as is) plus the ``--set`` items applied on top:
    ``source.of(message)`` prefixes a message with the override it is about, or else with the file."""

    def __new__(cls, name: str):
        obj = super().__new__(cls, name)
        obj.overrides = {}
        return obj

    def of(self, field: str) -> str:
        # the last override of this field or of one of its parent tables (``--set train={...}``) wins
        for key in reversed(list(self.overrides)):
            if field == key or field.startswith(key + ".") or field.startswith(key + "["):
                return f"--set {self.overrides[key]}"
        return str(self)


def parse_override(item: str) -> dict:
    """``train.lr=1e-4`` -> {"train": {"lr": 1e-4}}; the value is parsed as TOML, else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=100")
    key, value = item.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = parsed
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(schema: type, raw: dict, source: str, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{_of(source, where.rstrip('.'))}: [{where.rstrip('.')}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            hint = unknown_key_hint(schema, key, where, fields)  # another trainer's name, a typo, or the keys
            raise ConfigError(f"{_of(source, where + key)}: unknown key '{where}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], source, f"{where}{name}.")
        elif _is_list_of_dataclass(tp):
            item_tp = typing.get_args(tp)[0]
            if not isinstance(raw[name], list):
                raise ConfigError(f"{_of(source, where + name)}: '{where}{name}' must be a list of tables "
                                  f"([[{where}{name}]])")
            kwargs[name] = [_build(item_tp, r, source, f"{where}{name}[{i}].") for i, r in enumerate(raw[name])]
        else:
            kwargs[name] = _coerce(raw[name], tp, f.metadata.get("choices"), source, where + name)
    return schema(**kwargs)


def _of(source, field: str) -> str:
    return source.of(field) if isinstance(source, _Source) else str(source)


def _is_list_of_dataclass(tp) -> bool:
    return typing.get_origin(tp) is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0])


def _coerce(value: Any, tp, choices, source: str, name: str):
    listed = any(typing.get_origin(a) is list for a in typing.get_args(tp))  # int | list[int]: say both forms

    def fail(expected: str):
        also = " or a list of them (in brackets: [a, b])" if listed and not isinstance(value, list) else ""
        raise ConfigError(f"{_of(source, name)}: '{name}' must be {expected}{also}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")) and type(None) in \
                typing.get_args(tp):
            return None
        lists = [a for a in args if typing.get_origin(a) is list]  # int | list[int]: a list takes the list arm
        tp = lists[0] if isinstance(value, list) and lists else \
            next((a for a in args if type(value) is a), args[0])  # bool | str: a switch with named modes
        origin = typing.get_origin(tp)
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_of(source, name)}: '{name}' = {value!r} is not one of {', '.join(map(str, choices))}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            fail("an integer")
        if abs(value) > INT_LIMIT:
            raise ConfigError(f"{_of(source, name)}: '{name}' = {value} is too large; the largest allowed is "
                              f"{INT_LIMIT} (2^31 - 1)")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail("a number")
        if not math.isfinite(value):
            fail("a finite number")  # inf/nan train to an all-NaN result without any other error
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        fail("a string")
    if origin is list or tp is list:
        (item,) = typing.get_args(tp) or (Any,)
        scalar = {str: (str,), int: (int,), float: (int, float)}.get(item, ())
        if isinstance(value, scalar) and not isinstance(value, bool):
            value = [value]  # one prompt / seed / layout: a list of one (not its characters, not a crash)
        if not isinstance(value, list):
            fail("a list")
        return [v if item is Any else _coerce(v, item, None, source, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def _validate_tree(cfg, source: str, where: str):
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            _validate_tree(v, source, f"{where}{f.name}.")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    _validate_tree(item, source, f"{where}{f.name}[{i}].")
    check = getattr(cfg, "validate", None)
    if check:
        try:
            check()
        except ConfigError as e:
            # messages start with the field they are about ("steps must be > 0"): blame its override if any
            field = re.match(r"[\w.\[\]]*", f"{where}{e}").group(0).rstrip(".")
            raise ConfigError(f"{_of(source, field)}: {where}{e}") from None


def require(ok: bool, message: str):
    """Raise a ConfigError (field name first) unless ``ok``; used in ``validate()`` methods."""
    if not ok:
        raise ConfigError(message)


def require_range(name: str, value, low, high=None, *, above: bool = False) -> None:
    """``require`` for a number: ``low <= value <= high`` (``low < value`` with ``above``; no ``high``: no upper
    bound), with the allowed range in the message."""
    ok = (value > low if above else value >= low) and (high is None or value <= high)
    if not ok:
        if high is None:
            allowed = f"{'>' if above else '>='} {low}"
        else:
            allowed = f"in {low}..{high}" if not above else f"> {low} and <= {high}"
        raise ConfigError(f"{name} must be {allowed}, got {value}")


def as_list(value) -> list:
    """A ``str | list[str]`` setting (one path, or several) as a list; "" and None: []."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def require_path_list(name: str, value, most: int) -> None:
    """``require`` for a ``str | list[str]`` path setting: a list holds 1..``most`` distinct non-empty paths."""
    if isinstance(value, list):
        require(0 < len(value) <= most and all(isinstance(v, str) and v.strip() for v in value)
                and len(set(value)) == len(value),
                f"{name}: give one path, or a list of 1..{most} distinct paths, got {value}")


SIZE_HELP = 'image size "WIDTHxHEIGHT" (e.g. "768x512"; one number for a square)'


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` (or ``"512"`` for a square) -> (width, height): the one size syntax of every command."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) == 0 or int(m.group(2) or 1) == 0:
        raise ConfigError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 1024x1024")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def resolve_size(section, default: tuple[int, int] = (512, 512)):
    """Apply a section's ``size = "WxH"`` to its ``width``/``height`` (the older spelling, still accepted). Both may
    be present when they agree (a saved config.toml has all three); different values are an error."""
    if not section.size:
        return
    try:
        size = parse_size(section.size)
    except ConfigError as e:
        raise ConfigError(f"size: {e}") from None
    require((section.width, section.height) in (size, default),
            f"size: \"{section.size}\" disagrees with width/height {section.width}x{section.height}; set "
            "size or width/height, not both")
    section.width, section.height = size


# ------------------------------------------------------------------------------------------------ rendering
def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def render_toml(cfg, with_help: bool = True, template: bool = False) -> str:
    """The config as TOML, with each option's help as a comment (for --print-config and saved runs). ``template``
    (--print-config: a schema's defaults, not a run's values): ``model_default`` fields are commented out."""
    lines: list[str] = []
    _render(cfg, lines, "", with_help, template)
    return "\n".join(lines).strip() + "\n"


def _render(cfg, lines: list[str], prefix: str, with_help: bool, template: bool = False):
    scalars = [f for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))
               and not _is_table_list(getattr(cfg, f.name))]
    for f in scalars:
        v = getattr(cfg, f.name)
        if with_help and f.metadata.get("help"):
            lines.append(f"# {f.metadata['help']}" + (f" ({' | '.join(map(str, f.metadata['choices']))})"
                                                       if f.metadata.get("choices") else ""))
        line = f"{f.name} = {_toml_value(v)}" if v is not None else f"# {f.name} = (unset)"
        picked = f.metadata.get("model_default") if template and v is not None else None
        lines.append(line if not picked else
                     f"# {line}  (unset: the model's own; uncomment to use {_toml_value(v)} with every model)"
                     if picked is True else f"# {line}  (unset: {picked}, else {_toml_value(v)}; uncomment to pin it)")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines.append("")
            if with_help and f.metadata.get("help"):
                lines.append(f"# {f.metadata['help']}")
            lines.append(f"[{prefix}{f.name}]")
            _render(v, lines, f"{prefix}{f.name}.", with_help, template)
        elif _is_table_list(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{prefix}{f.name}]]")
                _render(item, lines, f"{prefix}{f.name}.", with_help, template)


def _is_table_list(v) -> bool:
    return isinstance(v, list) and v and all(dataclasses.is_dataclass(i) for i in v)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped (a raw newline or BEL in a
    trigger or prompt made a run's config.toml unreadable), other unicode kept as is."""
    return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7f else c)
                         for c in text) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return ("-" if v < 0 else "") + ("nan" if math.isnan(v) else "inf")  # TOML's spelling, not Python's
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    return repr(v)


def add_config_command(sub, name: str, help: str, schema: type | None = None, load=None, run=None, *,
                       target=None, overwrite: bool = False):
    """A subcommand for a config-driven recipe: CONFIG.toml, --set, --resume [DIR], --print-config, --no-progress.

    ``load(path, overrides)`` builds the config; ``run(cfg, resume, progress)`` returns a summary with ``steps``,
    ``losses`` and ``files``, which is printed. Pass ``target``, a function returning ``(schema, load, run)``,
    instead of the three to import the recipe (torch, diffusers) only when the command runs, not to parse or
    print --help. ``overwrite``: add ``--overwrite`` (the same as ``--set save.overwrite=true``).
    """
    if target is None:
        def target():
            return schema, load, run
    p = sub.add_parser(name, help=help)
    p.add_argument("config", nargs="?", help="TOML config (see --print-config)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable; a relative path given here "
                        "is relative to the current directory, one in the config file to the file's folder)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue from the latest state in output_dir, or from a given state folder")
    p.add_argument("--print-config", action="store_true", help="print every option with its default and exit (with "
                   "a CONFIG: the values the run would use, --set and presets applied)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an output folder holding an earlier run (= --set save.overwrite=true)")

    def main(a):
        schema_, load_, run_ = target()
        if getattr(a, "overwrite", False):
            a.set = [*a.set, "save.overwrite=true"]
        if a.print_config:  # with a config: what the run would use (its file, --set and presets applied)
            print(render_toml(load_(a.config, a.set) if a.config else schema_(), template=not a.config), end="")
            return
        if not a.config:
            raise ConfigError(f"pass a config file: dev2pro {name} CONFIG.toml (see --print-config)")
        summary = run_(load_(a.config, a.set), a.resume, not a.no_progress)
        if not summary["files"]:  # non-main ranks of a distributed run write nothing
            return
        print(f"done: {summary['steps']} steps, final loss {summary['losses'][-1]:.4f}" if summary["losses"]
              else "done: nothing to train (already finished)")
        for f in summary["files"]:
            print(f"  {f}")
    p.set_defaults(run=main)
    return p
