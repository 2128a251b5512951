"""What an unknown config key is told: another trainer's name for one of ours (a section's ``FOREIGN``: kohya
sd-scripts, diffusers and ai-toolkit names people bring with them), else the closest key ("did you mean"), else
the section's keys. Kept apart from ``config`` (the loader) so each section's table of names lives with its schema."""

from __future__ import annotations

import difflib


def unknown_key_hint(schema: type, key: str, where: str, fields) -> str:
    """``; ...`` for the unknown key ``where + key`` of ``schema`` (its ``fields``: the valid key names)."""
    foreign = getattr(schema, "FOREIGN", {}).get(key)
    if foreign:
        return f"; that is another trainer's name: dev2pro's is {foreign}"
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
