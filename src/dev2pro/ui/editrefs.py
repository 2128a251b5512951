"""Reference images of the Results page's sample and compare jobs: an edit LoRA (``dev2pro.references`` > 0 in its
file) edits the reference(s) the page gives (workspace paths, one per line) or, by default, the run's
``sample.control``. A job for an edit LoRA with none, or with another count than it was trained on, is refused
before it is queued, naming the fix (`dev2pro sample` only notes the count; a job the page starts would otherwise
render text-to-image and say so in its log alone). A text-to-image LoRA given references renders them as `dev2pro
sample --image` does: the edit is asked for, and the job checks the base can take references.
"""

from __future__ import annotations

from pathlib import Path

from ..choices import MAX_REFERENCES
from ..config import as_list
from ..errors import UserError
from .handlers import text


def lora_references(path: Path) -> int:
    """Reference images per edit the LoRA file says it was trained with (0: text-to-image); its header only."""
    from ..lora.formats import file_edit_references  # lazy: imports torch (loaded at start-up by planview)

    return file_edit_references(path)


def run_controls(ui, s: dict) -> list[str]:
    """The run's ``sample.control`` reference image(s), each confined to the workspace like any path."""
    refs = as_list(s.get("control"))
    if not all(isinstance(p, str) and p.strip() for p in refs):
        raise UserError("sample.control in the run's config is not a path or a list of paths")
    return [str(ui.ws.resolve(ui.ws.rel(Path(p)), must_exist=True)) for p in refs]


def given(ui, b: dict) -> list[str]:
    """The page's ``references`` (workspace paths, one per line; blank lines ignored), each an image file
    confined to the workspace."""
    lines = [x.strip() for x in text(b, "references", "", max_len=20_000).splitlines() if x.strip()]
    if len(lines) > MAX_REFERENCES:
        raise UserError(f"{len(lines)} reference images; an edit takes at most {MAX_REFERENCES}")
    out = []
    for line in lines:
        path = ui.ws.resolve(line, must_exist=True)
        if not path.is_file():
            raise UserError(f"reference image {line} is not a file; give an image file, one per line")
        out.append(str(path))
    return out


def references(ui, b: dict, s: dict, loras: list[Path], run_rel: str) -> list[str]:
    """The reference images the job edits: the page's, else the run's ``sample.control``; UserError where a LoRA
    of ``loras`` is an edit LoRA and the count is not its own (none given included)."""
    refs = given(ui, b)
    source = "given"
    if not refs:
        refs, source = run_controls(ui, s), f"the run's sample.control ({run_rel}/config.toml)"
    for lora in loras:
        n = lora_references(lora)
        if not n or n == len(refs):
            continue
        trained = f"{lora.name} is an edit LoRA: trained on edit pairs with {n} reference image(s) per edit"
        if not refs:
            raise UserError(f"{trained}, and no reference image is given or set in the run's config; give {n} "
                            f"reference image(s) (workspace paths, one per line) or set sample.control in "
                            f"{run_rel}/config.toml")
        raise UserError(f"{trained}; {len(refs)} {source}; give {n} reference image(s) (workspace paths, one per "
                        f"line)" + (" or fix sample.control" if source != "given" else ""))
    return refs
