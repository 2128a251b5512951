"""What a ``--resume`` changes in a run folder, said and kept (torch-free: the CLI imports it):

- ``write_config``: the settings that differ from the saved run's config.toml, in one line (``old -> new``), and
  that config kept as ``config.step-NNNNNN.toml`` (NNNNNN: the step resumed from) before config.toml is rewritten,
  so the run's record still says how its first steps were trained.
- ``keep_final_lora``: a finished run extended to more steps would overwrite its final ``NAME.safetensors`` (and
  its other layouts); that LoRA is kept first as ``NAME-stepNNNNNN.*``, the step file of the step it was saved at.
- ``copied_run_hint``: ``--resume`` of a config.toml that lives in a copied or renamed run folder (its
  save.output_dir names the original) says how to continue the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, UserError
from ..flux.header import read_header
from .folder import STATE_DIR, STEP_RE, RunFolder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_STEP = re.compile(r"^config\.step-\d{6}\.toml$")  # a config kept by a resume that changed settings
_NOT_SETTINGS = {"save.overwrite"}  # how this start treats the folder, not how the run trains
_LAYOUT_TAGS = ("", ".diffusers", ".comfy")  # export.LORA_SUFFIXES' file tags


# ------------------------------------------------------------------------------------------------ settings
def flat_settings(text: str) -> dict[str, object]:
    """A config.toml as ``section.key`` -> value (tables flattened, lists of tables by index)."""
    flat: dict[str, object] = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(tomllib.loads(text), "")
    return flat


def _same(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.sep in a + b:  # one path spelled two ways
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return False


def config_changes(old: str, new: str) -> list[str]:
    """``key old -> new`` for every setting that differs between two config.toml texts (a key only one of them has
    shows as ``(unset)``); paths spelled differently but naming the same place are the same."""
    was, now = flat_settings(old), flat_settings(new)
    unset = "(unset)"
    return [f"{k} {_show(was.get(k, unset))} -> {_show(now.get(k, unset))}" for k in sorted(was.keys() | now.keys())
            if k not in _NOT_SETTINGS and not _same(was.get(k, unset), now.get(k, unset))]


def _show(v) -> str:
    return v if v == "(unset)" else json.dumps(v) if isinstance(v, str) else repr(v).replace("True", "true") \
        .replace("False", "false")


def saved_step(folder: Path) -> int | None:
    """The step of a training state folder (its common.json, else its name)."""
    try:
        return int(json.loads((folder / "common.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = STEP_RE.match(folder.name)
        return int(m.group(1)) if m else None


def write_config(run: RunFolder, resume: str | None, text: str, say: Callable[[str], None]) -> Path:
    """Write this start's resolved config ``text`` as ``run.config``. On ``--resume``: the settings that differ from
    the saved run's config (the config.toml of the run that saved the resumed state), in one line, and that
    config kept first as ``config.step-NNNNNN.toml`` (unless one is there: the first record of that step wins)."""
    from ..outputs import write_text  # torch: only when a recipe runs
    if resume is not None:
        from .state import state_folder

        folder, _ = state_folder(resume, run.state)
        saved = folder.parent.parent / "config.toml" if folder.parent.name == STATE_DIR else run.config
        step = saved_step(folder)
        try:
            old = saved.read_text()
            changes = config_changes(old, text)
        except (OSError, ValueError):
            changes = []  # no readable record to compare with
        if changes and step is not None:
            kept = run.root / f"config.step-{step:06d}.toml"
            if not kept.exists():
                write_text(kept, old)
            say(f"settings changed since step {step} ({kept.name} keeps the earlier ones): " + "; ".join(changes))
    return write_text(run.config, text)


def announce(resumed, run: RunFolder, steps: int, say: Callable[[str], None], lora_name: str | None = None,
             further: str | None = None, config: tuple[str, str] | None = None) -> None:
    """After ``resumed`` (``state.Resumed``) is restored: a state past ``steps`` is refused first (a "resumed from"
    line before the refusal reads as a contradiction; ``further``: how to train on instead of raising
    train.steps), then ``config`` (``--resume`` value, the run's config text; the main process) is written
    (``write_config``: a refused resume leaves the run's config.toml as it was), then the resumed line;
    ``lora_name`` (`train`, the main process): the previous final LoRA is kept before this run can replace it
    (``keep_final_lora``)."""
    if resumed.step > steps:
        raise UserError(f"{run.root} is at step {resumed.step}, past train.steps = {steps}: " +
                        (further or f"set train.steps above {resumed.step} to train further"))
    if config is not None and config[1] is not None:
        write_config(run, config[0], config[1], say)
    say(resumed.line())
    if lora_name and resumed.step < steps:
        keep_final_lora(run.root, lora_name, steps, say)


# ------------------------------------------------------------------------------------------------ the final LoRA
def lora_step(path: Path) -> int | None:
    """The step a final LoRA file was saved at: its ``ss_steps`` (a run's final step), read from the header."""
    try:
        return int(read_header(path).get("__metadata__", {})["ss_steps"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return None


def keep_final_lora(root: Path, name: str, steps: int, say: Callable[[str], None]) -> list[Path]:
    """Before a resumed run that ends at ``steps`` replaces the final LoRA files ``NAME[.layout].safetensors``, keep
    those saved at another step as that step's files ``NAME-stepNNNNNN[.layout].safetensors`` (a hard link, or a
    copy where links are not possible), unless such a file exists. Returns the files kept (said in one line)."""
    final = root / f"{name}.safetensors"
    step = lora_step(final) if final.is_file() else None
    if step is None:  # kohya layout absent: the first other layout that is there tells
        step = next((s for t in _LAYOUT_TAGS[1:] if (s := lora_step(root / f"{name}{t}.safetensors")) is not None),
                    None)
    if step is None or step == steps:
        return []
    from ..outputs import temp_path
    kept = []
    for tag in _LAYOUT_TAGS:
        src, dst = root / f"{name}{tag}.safetensors", root / f"{name}-step{step:06d}{tag}.safetensors"
        if src.is_file() and not dst.exists():
            try:
                os.link(src, dst)  # the new final is written to a temp and renamed over src: dst keeps these bytes
            except OSError:
                tmp = temp_path(dst)
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            kept.append(dst)
    if kept:
        say(f"kept the previous final LoRA (step {step}) as {', '.join(str(p) for p in kept)} before this run "
            f"writes its final LoRA at step {steps}")
    return kept


# ------------------------------------------------------------------------------------------------ a copied run
def copied_run_hint(message: str, config: str | None, command: str) -> str:
    """``message`` ("nothing to resume: OUT ...") with a hint when ``config`` lives in another run folder that holds
    saved states (a run folder copied or renamed: its config.toml still names the original save.output_dir)."""
    if not config or not message.startswith("nothing to resume: "):
        return message
    here = Path(config).resolve().parent
    states = here / STATE_DIR
    saved = states.is_dir() and any((s / "common.json").is_file() for s in states.iterdir() if STEP_RE.match(s.name))
    if not saved or message.startswith(f"nothing to resume: {here} "):
        return message
    return (f"{message}. Note: this config.toml lives in {here} (a run folder with saved states); pass --resume "
            f"{here} (dev2pro {command} {config} --resume {here}), or set save.output_dir = \"{here}\"")
