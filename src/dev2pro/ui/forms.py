"""Config schema -> browser form, and browser form -> a config validated exactly as the CLI validates it.

The Train page is generated from the dataclass tree that ``dev2pro train --print-config`` renders (field types,
defaults, help text, choices), so a field added to the schema appears in the UI with no UI change. Submitted
values go back through the CLI's own loader (``load_config``/``load_train_config``): type errors, choices, typos
and cross-field rules produce the same messages as on the command line. Which string fields are file paths the
schema says (``opt(..., path=True)``; ``config.path_fields``, the fields the loader resolves relative to a config
file); those must resolve inside the workspace before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError


def _unwrap(tp) -> tuple[Any, bool]:
    """(type without None, whether None is allowed); ``int | list[int]`` stays a union (kind ``int_or_list``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def field_specs(schema: type, prefix: str = "") -> list[dict]:
    """One dict per leaf field, in schema order: key (dotted), kind, default, help, choices, optional.

    kind is bool | int | float | str | choice | list | int_or_list | str_or_list | tables; ``tables`` (a list of
    sub-tables such as ``[[data.folders]]``) carries ``fields``, the specs of one item with keys relative to the item.
    """
    hints = typing.get_type_hints(schema)
    default = schema()
    out: list[dict] = []
    for f in dataclasses.fields(schema):
        tp, optional = _unwrap(hints[f.name])
        key = prefix + f.name
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(tp):
            out.append({"key": key, "kind": "section", "help": f.metadata.get("help", "")})
            out.extend(field_specs(tp, key + "."))
            continue
        spec = {"key": key, "help": f.metadata.get("help", ""), "optional": optional,
                "choices": list(f.metadata.get("choices") or []) or None}
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):
            spec.update(kind="tables", fields=field_specs(item), default=[dataclasses.asdict(v) for v in value])
        elif spec["choices"]:
            spec.update(kind="choice", default=value)
        elif typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp):
            spec.update(kind="str_or_list", default=value)  # str | list[str]: one line per path, one line = a str
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):  # int | list[int]: "512" or "512, 768"
            spec.update(kind="int_or_list", default=value)
        elif tp in (bool, int, float, str):
            spec.update(kind=tp.__name__, default=value)
        elif tp is list or typing.get_origin(tp) is list:
            spec.update(kind="list", item=getattr(item, "__name__", None), default=list(value))
        else:
            spec.update(kind="str", default=value)
        out.append(spec)
    return out


def _parse_item(text: str, item: str | None):
    """One line of a list field: TOML-parsed (numbers, booleans) unless the list holds strings."""
    if item == "str":
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _value(spec: dict, raw):
    """A browser value (string, bool or list of strings) -> the Python value the loader checks."""
    kind = spec["kind"]
    if kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1", "on", "yes")
    if kind == "list":
        lines = raw if isinstance(raw, list) else str(raw).splitlines()
        return [_parse_item(s.strip(), spec.get("item")) if isinstance(s, str) else s
                for s in lines if str(s).strip()]
    if kind == "str_or_list":  # one line: that string; several: the list (e.g. several controls folders)
        lines = [str(s).strip() for s in (raw if isinstance(raw, list) else str(raw).splitlines()) if str(s).strip()]
        return lines if len(lines) > 1 else (lines[0] if lines else "")
    if isinstance(raw, str) and kind == "int_or_list" and "," in raw and "[" not in raw:
        raw = f"[{raw}]"  # "512, 768" as typed into the text box
    if isinstance(raw, str) and kind in ("int", "float", "choice", "int_or_list"):
        text = raw.strip()
        if kind == "choice" and text.lower() in ("true", "false") and True in spec["choices"]:
            return text.lower() == "true"  # a switch with named modes (model.gradient_checkpointing: auto)
        if spec["optional"] and text == "":
            return None
        try:  # numbers typed into a text box; anything unparsable goes to the loader, which names the field
            return tomllib.loads(f"v = {text}")["v"] if kind != "choice" or text[:1].isdigit() else text
        except tomllib.TOMLDecodeError:
            return text
    if kind == "str" and spec["optional"] and raw == "":
        return None
    return raw


def form_to_data(specs: list[dict], values: dict, drop_defaults: bool = False) -> dict:
    """Flat browser values {"train.steps": "20", "data.folders": [{"path": ...}]} -> the nested config dict.

    ``drop_defaults``: leave out values equal to the schema default, so the loader sees only what the user set
    (as in a hand-written TOML), and settings that fill unset keys (e.g. a VRAM preset) still apply.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"form values must be an object of setting: value, not {type(values).__name__}")
    known = [s["key"] for s in specs if s["kind"] != "section"]
    unknown = sorted(set(values) - set(known))
    if unknown:  # the CLI refuses an unknown key; so does the form (nothing is silently dropped)
        near = difflib.get_close_matches(str(unknown[0]), known, n=1)
        raise ConfigError(f"unknown setting {unknown[0]!r}" + (f" (did you mean '{near[0]}'?)" if near else "")
                          + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    data: dict = {}
    for spec in specs:
        if spec["kind"] == "section" or spec["key"] not in values:
            continue
        raw = values[spec["key"]]
        if spec["kind"] == "tables":
            if not isinstance(raw, list):
                raise ConfigError(f"'{spec['key']}' must be a list of tables")
            value = [form_to_data(spec["fields"], item if isinstance(item, dict) else {}) for item in raw]
        else:
            value = _value(spec, raw)
        if drop_defaults and value == spec["default"] and isinstance(value, bool) == isinstance(spec["default"], bool):
            continue
        node = data
        *parents, last = spec["key"].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


# string settings that become file names inside a path setting: {name field: folder field}
NAME_FIELDS = {"save.name": "save.output_dir"}


MUST_EXIST = {"model.path", "model.transformer", "model.inference_base", "model.adapter"}  # read, never written


def build_config(specs: list[dict], values: dict, loader: Callable, paths: set[str], resolve: Callable,
                 name: Callable | None = None):
    """Browser values -> a validated config; every path field goes through ``resolve`` (workspace-confined)
    first, and the result through the CLI's ``loader`` (same checks, same messages as the command line); every
    ``NAME_FIELDS`` value through ``name(folder, value, field)`` (a plain file name inside its folder)."""
    data = form_to_data(specs, values, drop_defaults=True)

    def fix(node: dict, parts: list[str], key: str):
        head, rest = parts[0], parts[1:]
        if head.endswith("[]"):
            for item in node.get(head[:-2]) or []:
                if isinstance(item, dict):
                    fix(item, rest, key)
        elif rest:
            if isinstance(node.get(head), dict):
                fix(node[head], rest, key)
        elif isinstance(node.get(head), str) and node[head].strip():
            node[head] = confined(node[head], key)
        elif isinstance(node.get(head), list):  # a field of several paths: each one confined
            node[head] = [confined(v, key) if isinstance(v, str) and v.strip() else v for v in node[head]]

    def confined(value: str, key: str) -> str:
        try:
            if key in MUST_EXIST:  # a model that is not there: named at its field, before the loader reads it
                return str(resolve(value, must_exist=True))
            return str(resolve(value))
        except ConfigError:
            raise
        except Exception as e:  # PathRefused and friends: name the field like the loader does
            raise ConfigError(f"'{key}': {e}") from None

    for key in sorted(paths):
        fix(data, key.replace("[].", "[]\0").replace(".", "\0").split("\0"), key)
    cfg = loader(None, data=data)
    _check_other_paths(cfg, "", resolve)
    for key, folder_key in NAME_FIELDS.items() if name else ():
        value, folder = _get(cfg, key), _get(cfg, folder_key)
        if isinstance(value, str) and folder:
            try:
                name(Path(folder), value, key)
            except ConfigError:
                raise
            except Exception as e:  # PathRefused: name the field like the loader does
                raise ConfigError(f"'{key}': {e}") from None
    return cfg


def path_values(cfg, keys) -> list[tuple[str, str]]:
    """(key, value) of every non-empty path setting of ``cfg``; ``keys`` as ``config.path_fields`` gives them
    (``data.folders[].path``: one pair per table item)."""
    out = []

    def walk(node, parts, key):
        if node is None:
            return
        head, rest = parts[0], parts[1:]
        if head.endswith("[]"):
            for item in getattr(node, head[:-2], None) or []:
                walk(item, rest, key)
        elif rest:
            walk(getattr(node, head, None), rest, key)
        elif isinstance(getattr(node, head, None), str) and getattr(node, head):
            out.append((key, getattr(node, head)))
        elif isinstance(getattr(node, head, None), list):  # a field of several paths: every one is confined
            out.extend((key, str(v)) for v in getattr(node, head) if v)
    for key in sorted(keys):
        walk(cfg, key.replace("[].", "[]\0").replace(".", "\0").split("\0"), key)
    return out


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _check_other_paths(cfg, prefix: str, resolve: Callable):
    """A safety net behind the path marks: any other string setting that names an absolute filesystem location
    (an existing path, or one whose folder exists) must be inside the workspace too."""
    root = resolve("")
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _check_other_paths(v, key + ".", resolve)
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            for item in v:
                _check_other_paths(item, key + "[].", resolve)
        else:
            for text in (v if isinstance(v, list) else [v]):  # a string, or each string of a list
                if isinstance(text, str) and _names_outside(text, str(root)):
                    raise ConfigError(f"'{key}': {text} is outside the workspace; use a path inside it")


def _names_outside(v: str, root: str) -> bool:
    """Whether ``v`` is an absolute location (existing, or in an existing folder) outside ``root``."""
    try:
        if not os.path.isabs(v) or not (os.path.exists(v) or os.path.isdir(os.path.dirname(v))):
            return False
        real = os.path.realpath(v)
    except (OSError, ValueError):  # too long, NUL: not a usable path either way
        return False
    return real != root and not real.startswith(root + os.sep)
