"""A demo run's folder: made fresh, resumed when the same demo is asked for again, never taken over otherwise.

The demo's stages (bases, adapters, LoRA arms) each write a run folder; a stage whose ``summary.json`` exists is
finished and is reused, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from ..outputs import check_output, write_json

MARKER = "demo.json"  # the settings the folder was made with
# what `dev2pro demo` writes at the top of its folder (recipes/demo.py, lab/report.py)
DEMO_ENTRIES = (MARKER, "models", "data", "shards", "prompts.safetensors", "runs", "adapters", "arms",
                "grids", "results.json", "report.md", "report.html")


def pick_profile(profiles: dict, profile: str, seeds: int | None, advice: str = "3 or more for confidence "
                 "intervals"):
    """The demo profile named ``profile`` (``seeds``, if given, replacing its seed count); UserError for an unknown
    name or fewer than one seed (``advice``: how many make the report's intervals)."""
    if profile not in profiles:
        raise UserError(f"unknown demo profile {profile!r}: use one of {', '.join(profiles)}")
    p = profiles[profile] if seeds is None else replace(profiles[profile], seeds=seeds)
    if p.seeds < 1:
        raise UserError(f"--seeds must be >= 1 ({advice})")
    return p


def prepare_run_folder(root: Path, stamp: dict, overwrite: bool) -> bool:
    """A new folder, or the same demo's folder (equal ``stamp``) to resume (returns True then); anything else needs
    ``overwrite``, which deletes it first."""
    marker, resumed = root / MARKER, False
    if root.exists() and any(root.iterdir()):
        same = marker.is_file() and json.loads(marker.read_text()) == stamp
        if overwrite:  # only a demo's own entries are deleted: a folder holding anything else is refused
            check_output(root, True, "demo folder", folder=True, owned=DEMO_ENTRIES)
            shutil.rmtree(root)
        elif not same:
            raise UserError(f"{root} holds something else (another demo profile or other files); pass --overwrite "
                            f"to replace it or --out to pick another folder")
        else:
            print(f"resuming the demo in {root}: finished stages are reused")
            resumed = True
    root.mkdir(parents=True, exist_ok=True)
    write_json(marker, stamp)
    return resumed


def finished_stage(run: Path) -> dict | None:
    """The summary of the stage written to ``run``, or None when it has not finished."""
    f = Path(run) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None
