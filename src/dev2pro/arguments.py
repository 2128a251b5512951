"""Parsers of strings users type (torch-free, so the config schemas and the CLI can use them eagerly): LoRA
arguments with a scale (``file.safetensors:0.8``), seed lists, prompt files, render sizes, file-name slugs, and the
short names of models that records and messages carry."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .errors import UserError


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``"file.safetensors:0.8"`` -> (path, 0.8); no scale -> 1.0. Windows paths (``C:\\x.safetensors``) work.

    The last ':' starts a scale unless the whole argument is an existing file or the suffix holds a path
    separator (a drive letter); a suffix that is not a finite number is an error, never silently part of the path.
    """
    if ":" not in arg or Path(arg).is_file():
        return arg, 1.0
    path, suffix = arg.rsplit(":", 1)
    if "/" in suffix or "\\" in suffix:  # "C:\loras\x.safetensors": the colon belongs to the drive
        return arg, 1.0
    try:
        scale = float(suffix)
    except ValueError:
        scale = None
    if scale is None or not math.isfinite(scale) or not path:
        raise UserError(f"LoRA argument {arg!r}: the scale after the last ':' must be a finite number "
                        f"(e.g. {path or 'lora.safetensors'}:0.8), got {suffix!r}")
    return path, scale


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("give at least one seed")
    return seeds


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with '#' are skipped. Any readable
    file will do, not only a regular one (``<(printf ...)``, a named pipe, /dev/stdin)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompts file {path} does not exist")
    if path.is_dir():
        raise UserError(f"prompts file {path} is a folder: give a text file, one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"prompts file {path} cannot be read ({e.strerror or e}): check its permissions") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts (one per line; '#' lines are comments)")
    return prompts


SIZE_MULTIPLE = 16  # 8x VAE downsampling times 2x2 latent packing: pipelines silently round other sides down


def check_size(width: int, height: int, flag: str = "--size") -> tuple[int, int]:
    """(width, height) when both are multiples of 16, else a UserError naming ``flag`` and the nearest sizes
    that are (the pipelines would render a smaller image than asked and the PNGs would record the wrong size)."""
    m = SIZE_MULTIPLE
    if width % m == 0 and height % m == 0:
        return width, height
    down = (width // m * m, height // m * m)
    up = (-(-width // m) * m, -(-height // m) * m)
    valid = [f"{w}x{h}" for w, h in (down, up) if w and h]
    raise UserError(f"{flag} {width}x{height}: width and height must be multiples of {m}; use "
                    + " or ".join(valid))


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt or arm name."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "x"


def model_name(path: str | os.PathLike) -> str:
    """A model's short name for records: a diffusers folder's ``transformer`` subfolder is named with its model
    folder (``FLUX.2-klein-4B/transformer``: a 4B and a 9B record must not both say ``transformer``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "transformer" else p.name
