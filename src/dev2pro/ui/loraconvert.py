"""Results' "Get as": a run's LoRA file in another layout (kohya, ComfyUI, diffusers), queued as the job
``dev2pro lora convert SRC DST --layout L`` -- the command a terminal user would type -- with DST the name training
gives that layout (``train.export.lora_paths``), so the new file is listed beside the run's own like one it wrote.

A run's config names its model; a FLUX.2 run's jobs pass ``--family flux2``, so an attention-only LoRA (whose names
and shapes fit FLUX.1 and klein 4B alike) is not written in FLUX.1's layouts. The handlers live in
``routes_train`` (they reuse its ``_lora_run``); this module reads files and builds the job.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..choices import FAMILIES, LORA_LAYOUTS
from ..errors import UserError
from ..lora.sniff import is_base_model, lora_layout
from .comparewith import run_model
from .jobs import ACTIVE

KIND = "lora-convert"
MAX_FILES = 200  # a run's files offered "Get as" (a keep-everything run has one per save, each in 1-3 layouts)


def layout_of(lora: Path) -> tuple[str, str]:
    """(NAME as ``export.lora_paths`` takes it, layout) of a LoRA file named as training names them: the layout
    tag (``.diffusers`` / ``.comfy``) before ``.safetensors`` says the layout, none is kohya."""
    from ..train.export import LORA_SUFFIXES  # lazy: imports torch (warm by the time a run has LoRAs)

    stem = lora.name.removesuffix(".safetensors")
    return next(((stem.removesuffix(tag), layout) for layout, tag in LORA_SUFFIXES.items()
                 if tag and stem.endswith(tag)), (stem, "kohya"))


def target(lora: Path, layout: str) -> Path:
    """The file training would have written for ``lora``'s weights in ``layout`` (``export.lora_paths``)."""
    from ..train.export import lora_paths

    return lora_paths(lora.parent, layout_of(lora)[0], [layout])[0]


def check_layout(b: dict) -> str:
    layout = b.get("layout")
    if layout not in LORA_LAYOUTS:
        what = "is missing" if layout is None else f"{str(layout)[:40]!r} is not a LoRA layout"
        raise UserError(f"'layout': {what}; choose one of {', '.join(LORA_LAYOUTS)}")
    return layout


@functools.lru_cache(maxsize=1024)
def _sniff(path: str, mtime: float) -> str | None:
    try:
        return lora_layout(path)
    except UserError:  # a damaged header: not offered (a convert of it says why)
        return None


def is_lora(path: Path) -> bool:
    """Whether ``path``'s safetensors header is a LoRA's (a de-distilled model in a run folder is not)."""
    return _sniff(os.path.realpath(path), path.stat().st_mtime) is not None


def run_family(ui, run: Path, cfg: dict) -> str | None:
    """The family of the model a run trained: its config's ``model.family`` when set, else the training base's
    keys (``flux.checkpoint``: a header read); None when neither tells."""
    named = cfg["model"].get("family")
    if named in FAMILIES:
        return named
    model = run_model(ui, run)
    if not model:
        return None
    from ..flux.checkpoint import open_checkpoint

    try:
        return open_checkpoint(model).family.name
    except Exception:  # noqa: BLE001 -- an unreadable base: the LoRA's own header tells the job
        return None


def offers(ui, run: Path) -> list[dict]:
    """Per LoRA file of ``run`` (base models left out): its layout and {layout: file} for each layout it is not
    yet in, workspace paths."""
    out = []
    for p in sorted(run.glob("*.safetensors"))[:MAX_FILES]:
        if not (ui.ws.inside(p) and p.is_file() and is_lora(p)):
            continue
        missing = {layout: target(p, layout) for layout in LORA_LAYOUTS}
        out.append({"lora": ui.ws.rel(p), "layout": layout_of(p)[1],
                    "offers": {k: ui.ws.rel(v) for k, v in missing.items() if not v.exists() and v != p}})
    return out


def queue(ui, lora: Path, run: Path, cfg: dict, layout: str) -> dict:
    """Queue ``dev2pro lora convert LORA DST --layout LAYOUT [--family flux2]``; 4xx for a base model, a target
    that exists or is being written by a queued job."""
    rel = ui.ws.rel
    if lora_layout(lora) is None:  # the header alone (lora.sniff), as the Models page's convert tells a LoRA
        what = "a base model (a FLUX transformer)" if is_base_model(lora) else "not a LoRA file"
        raise UserError(f"'lora': {rel(lora)} is {what}; Get as converts a run's LoRA files (base models: "
                        f"Convert on the Models page)")
    dst = ui.ws.confine(target(lora, layout), "the converted LoRA")
    if dst.exists() or dst.is_symlink():
        raise UserError(f"'layout': {rel(lora)} in the {layout} layout already exists: {rel(dst)}; download that "
                        f"file")
    busy = next((j for j in ui.jobs.list() if j["kind"] == KIND and j["out"] == rel(dst) and j["status"] in ACTIVE),
                None)
    if busy:
        raise UserError(f"'layout': {rel(dst)} is already being written (job {busy['id']}, {busy['status']})")
    args = ["lora", "convert", str(lora), str(dst), "--layout", layout]
    if run_family(ui, run, cfg) == "flux2":  # an attention-only LoRA fits FLUX.1 too: the run says which
        args += ["--family", "flux2"]
    return ui.jobs.submit(KIND, args, title=f"{lora.name} as {layout}", run_dir=rel(run), out=rel(dst))
