"""Is the dataset a ``--resume`` continues on the one the state was saved with? (torch-free)

A training state records the dataset's fingerprint (``CachedDataset.fingerprint``: per item, in order, the
content keys of its cached latents -- a hash of the image, its bucket and the encoder -- and of its caption's
text, its repeats and loss weight). A resume compares it with the dataset now: the same one replays the saved
batch order exactly; a changed one (items added or removed, captions edited, another order) is refused with what
changed, unless the run is told to continue on it (``--resume-changed-data``): then the sampler starts a fresh
epoch order at the resumed step, and the weights, optimizer, step and learning-rate schedule carry on. States of
older versions record no fingerprint: their item count is compared (a shard dataset's too: it has none).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FLAG = "--resume-changed-data"


@dataclass
class DataCheck:
    """The dataset a run trains on, for its states and a resume: ``fingerprint`` (None: not known, e.g. shards),
    ``changed_ok`` (continue on a changed dataset), ``grad_accum`` (batches per step)."""

    fingerprint: list[str] | None = None
    changed_ok: bool = False
    grad_accum: int = 1

    @classmethod
    def of(cls, dataset, changed_ok: bool = False, grad_accum: int = 1) -> "DataCheck":
        fingerprint = getattr(dataset, "fingerprint", None)
        return cls(fingerprint() if callable(fingerprint) else None, changed_ok, grad_accum)


def describe_change(was: list[str], now: list[str]) -> str:
    """What differs between two fingerprints ("" when nothing): items added / removed (by cached image), captions
    changed, repeats or loss weights changed, or the same items in another order."""
    def split(fp):
        return [tuple(item.split(":", 1)) if ":" in item else (item, "") for item in fp]

    a, b = split(was), split(now)
    images_a, images_b = Counter(i for i, _ in a), Counter(i for i, _ in b)
    added, removed = sum((images_b - images_a).values()), sum((images_a - images_b).values())
    rest_a, rest_b = {}, {}
    for i, rest in a:
        rest_a.setdefault(i, []).append(rest)
    for i, rest in b:
        rest_b.setdefault(i, []).append(rest)
    captions = others = 0
    for image in images_a.keys() & images_b.keys():
        for x, y in zip(sorted(rest_a[image]), sorted(rest_b[image])):
            if x.split(":")[0] != y.split(":")[0]:
                captions += 1
            elif x != y:
                others += 1
    parts = [f"{added} added" if added else "", f"{removed} removed" if removed else "",
             f"{captions} caption(s) changed" if captions else "",
             f"{others} with other repeats or loss weight" if others else ""]
    if not any(parts) and was != now:
        parts = ["the same items in another order (files renamed or moved?)"]
    return ", ".join(p for p in parts if p)


def resume_sampler(folder: Path, progress: dict, sampler, data: DataCheck | None, step: int) -> str:
    """Put ``sampler`` where the state in ``folder`` left it (``progress``: its saved progress), after checking the
    dataset; returns a note for the resume line ("" when the dataset is the saved one)."""
    state, saved = progress["sampler"], progress.get("data")
    data = data or DataCheck()
    if saved is not None and data.fingerprint is not None:
        change = describe_change(list(saved), data.fingerprint)
    elif state["num_indices"] != sampler.num_indices:
        change = "its item count differs"
    else:
        change = ""
    if not change:
        sampler.load_state_dict(state)
        return ""
    counts = f"{state['num_indices']} items with repeats then, {sampler.num_indices} now"
    if not data.changed_ok:
        raise UserError(f"the dataset changed since the checkpoint {folder} ({change}; {counts}), so the run cannot "
                        f"continue with the same batches: restore the dataset, pass {FLAG} (with --resume) to "
                        f"continue on the new one from step {step} (a new epoch order; weights, optimizer, step and "
                        "learning-rate schedule kept), or start a new run")
    sampler.restart(state, state.get("batches", step * data.grad_accum))
    return f"; the dataset changed ({change}; {counts}): {FLAG}, a new epoch order from step {step}"
