"""How a training run tells the user where it is and how it ends: save messages, the final save (state first,
then the LoRA files, then samples), Ctrl-C, loss.png, the step LoRA files ``save.keep_loras`` prunes, and the
hints printed when a run stops.

The loop is `train/loop.py`, shared by `train` and `dedistill`; these are the steps around it. Every function names
the run's files through its ``RunFolder``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UserError
from ..outputs import write_error_message, write_errors
from .lossplot import save_loss_plot
from .folder import STATE_DIR
from .run import RunFolder, check_no_foreign, folder_status, os_error_message
from .state import latest_state, state_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)


PREVIOUS = ".previous-run"  # an overwritten run's own files, until the new run saves a state (or finishes)
_COMPLETE = ".set-aside.json"  # in PREVIOUS, written last: the save.name(s) of the two runs (a kill before: undone)
WANDB_DIR = "wandb"  # the W&B run folder the recipes open in the run folder (``watch.open_sinks``)


def prepare_output_dir(run: RunFolder, resume: str | None, overwrite: bool, say: Callable[[str], None] = print,
                       names: Sequence[str] = ()) -> Path:
    """Check the (locked) run folder for this start; returns its state folder. ``names``: this run's save.name.

    A folder a failed start left behind (config, caches, logs: no state, no LoRA) is reused by a plain rerun; a run
    that saved needs ``--resume`` (or ``save.overwrite``); a folder holding anything else is never reused silently.
    Starting over (``save.overwrite``) sets the previous run's own files aside (``own_entries``: states, config,
    summary, LoRA files and exports, samples, logs, ...) in ``PREVIOUS``: they are dropped once this run saves its
    first state (or finishes) and put back if it ends before that (``release``), so a start refused by a later
    check leaves the previous run as it was, resumable. ``--resume RUN_FOLDER`` of this folder is ``--resume``.
    """
    settle_previous(run, say)  # a start killed before its first save: the run it replaced is back first
    out, status, resumable = run.root, folder_status(run.root), latest_state(run.state) is not None
    if resume not in (None, "latest") and _same_folder(Path(resume), out):
        resume = "latest"  # this run's own folder (or its state/): its newest state, with the same checks
    if resume == "latest" and not resumable:  # one path: no usable state is never "a run to resume"
        raise UserError(f"nothing to resume: {out} " + {
            "started": "was started but never saved a usable training state (a failed start, a first save that "
                       "failed, e.g. on a full disk, or a run stopped before its first save)",
            "saved": "holds a finished run but no usable training state"}.get(status, "holds no run")
            + "; run the same command without --resume to start it" + (" again with --overwrite" if status ==
                                                                          "saved" else ""))
    elsewhere = resume not in (None, "latest") and not _inside(Path(resume), out)  # another run's state, into out
    if resume not in (None, "latest"):
        state_folder(resume, run.state)  # a path that is not there, or holds no state: said before any write
    fresh = resume is None or elsewhere  # this folder's own run starts here: what it holds must allow that
    if fresh and status == "foreign" and not overwrite:
        raise UserError(f"output folder {out} already holds other files; choose a new or empty save.output_dir")
    if elsewhere and status == "saved" and not overwrite:
        raise UserError(f"output folder {out} already holds a run, and --resume {resume} continues another run's "
                        "state in it (their LoRA files, samples and logs would mix): choose a new or empty "
                        "save.output_dir, or set save.overwrite = true (--overwrite) to set its run aside")
    if resume is None and status == "saved" and not overwrite:
        raise UserError(f"output folder {out} already holds a run" + ("; pass --resume to continue it," if resumable
                        else ";") + " set save.overwrite = true (--overwrite) to start over in it, or choose "
                        "another save.output_dir")
    if fresh and overwrite:
        check_no_foreign(out)  # save.overwrite replaces a run, never a folder's other files
    if resume is None and status == "started" and not overwrite:
        say(f"reusing {out}: an earlier start never saved a usable state (cached latents and text are reused when "
            f"valid)")
    if fresh and overwrite and _set_aside(run, names):
        say(f"save.overwrite: starting over in {out} (the previous run's files -- states, LoRA files, samples, logs "
            f"-- are set aside in {PREVIOUS} and removed when this run saves its first state; a start that stops "
            f"before that puts them back; cached latents and text are reused when valid)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(os_error_message(e, out, "create the run folder")) from None
    return run.state


def own_entries(run: RunFolder, names: Sequence[str]) -> list[Path]:
    """What `train` or `dedistill` wrote in ``run`` -- what ``save.overwrite`` sets aside: state/, config.toml (and
    config.step-NNNNNN.toml), summary.json, loss.png, samples/, logs/, wandb/, and the files of each save.name in
    ``names``: LoRA files ``NAME[-stepNNNNNN][.diffusers|.comfy].safetensors`` (``export.lora_paths``), dedistill's
    exports ``NAME.safetensors``, ``NAME-fp8.safetensors``, ``NAME-diffusers/``, ``NAME-adapter[.diffusers]
    .safetensors``. Not the data cache (content-keyed: what is still valid is reused), the lock or temps, nor
    anything else: files the run does not write are never touched."""
    fixed = [run.state, run.config, run.summary, run.loss_plot, run.samples, run.logs, run.root / WANDB_DIR]
    found = [p for p in fixed if p.exists() or p.is_symlink()] + sorted(run.root.glob("config.step-*.toml"))
    own = own_files(names)
    if own is not None and run.root.is_dir():
        found += sorted(p for p in run.root.iterdir() if own.match(p.name))
    return found


def own_files(names: Sequence[str]) -> re.Pattern | None:
    """The file names a run writes for each save.name in ``names`` (None: no name): LoRA files
    ``NAME[-stepNNNNNN][.diffusers|.comfy].safetensors`` (a step file's step is the group ``step``), dedistill's
    ``NAME-fp8.safetensors``, ``NAME-adapter[.diffusers].safetensors`` and ``NAME-diffusers``."""
    names = [re.escape(n) for n in dict.fromkeys(names) if n]
    if not names:
        return None
    return re.compile(rf"^(?:{'|'.join(names)})(?:(?:-step(?P<step>\d{{6}}))?(?:\.diffusers|\.comfy)?\.safetensors|"
                      rf"-fp8\.safetensors|-adapter(?:\.diffusers)?\.safetensors|-diffusers)$")


def prune_step_loras(root: Path, name: str, keep: int, say: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the step LoRA files ``NAME-stepNNNNNN[.layout].safetensors`` of all but the newest ``keep`` steps (the
    layouts of one step count as one; 0 keeps all); the final ``NAME.safetensors`` files and any other name's files
    are never touched. Returns the files removed (``say``: named in a line); one that cannot be removed is a
    warning, not the end of a run."""
    own = own_files([name])
    if keep <= 0 or own is None:
        return []
    by_step: dict[int, list[Path]] = {}
    for p in root.iterdir():
        m = own.match(p.name)
        if m and m["step"] and p.is_file():
            by_step.setdefault(int(m["step"]), []).append(p)
    removed = []
    for step in sorted(by_step)[:-keep]:
        for p in sorted(by_step[step]):
            try:
                p.unlink()
                removed.append(p)
            except OSError as e:
                log.warning("save.keep_loras: %s", os_error_message(e, p, "remove"))
    if removed and say is not None:
        say(f"save.keep_loras = {keep}: removed {', '.join(p.name for p in removed)}")
    return removed


def _set_aside(run: RunFolder, names: Sequence[str]) -> bool:
    """Move the previous run's own entries (its save.name read from its config.toml, and ``names``) into
    ``PREVIOUS``; False when there were none."""
    names = list(dict.fromkeys([_saved_name(run.config), *names]))
    entries = own_entries(run, names)
    if not entries:
        return False
    aside = run.root / PREVIOUS
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    (aside / _COMPLETE).write_text(json.dumps({"names": names}))  # last: without it a killed start is undone
    return True


def _saved_name(config: Path) -> str:
    """The save.name in a run's config.toml ("" when there is none to read)."""
    try:
        return str(tomllib.loads(config.read_text()).get("save", {}).get("name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _inside(path: Path, out: Path) -> bool:
    """``path`` is in the run folder ``out`` (one of its own states)."""
    return os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)


def _same_folder(path: Path, out: Path) -> bool:
    """``path`` is the run folder ``out`` or its state folder."""
    return path.exists() and os.path.realpath(path) in (os.path.realpath(out), os.path.realpath(out / STATE_DIR))


def settle_previous(run: RunFolder, say: Callable[[str], None] = print) -> None:
    """The run an overwrite set aside: removed once this folder holds a usable state or a finished run again (a
    dedistill without save.every saves no state but writes its exports and summary), else put back over what the
    start that replaced it wrote (it was refused, failed or was killed before its first save)."""
    aside = run.root / PREVIOUS
    if not aside.is_dir():
        return
    try:
        names = json.loads((aside / _COMPLETE).read_text())["names"]
    except (OSError, ValueError, KeyError, TypeError):
        names = None  # killed while setting aside: the new start wrote nothing yet
    if names is not None and (latest_state(run.state) is not None or run.summary.exists()):
        shutil.rmtree(aside)
        return
    for entry in own_entries(run, names) if names is not None else []:
        _remove(entry)  # the refused start's own files: the folder is the previous run's again
    for entry in aside.iterdir():
        if entry.name != _COMPLETE:
            _remove(run.root / entry.name)
            entry.replace(run.root / entry.name)
    shutil.rmtree(aside)
    say(f"save.overwrite: this start saved no state, so the previous run in {run.root} is back as it was")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def release(run: RunFolder, lock, say: Callable[[str], None] = print) -> None:
    """The end of a start that held the run folder's lock: settle what an overwrite set aside, then unlock; a
    folder this start created and left empty (it was refused before writing anything) goes too."""
    try:
        settle_previous(run, say)
    finally:
        lock.release()
        if getattr(lock, "created", False):
            with contextlib.suppress(OSError):
                run.root.rmdir()  # only when empty


def any_rank(flag: bool, accelerator) -> bool:
    """True on every rank when ``flag`` is set on any (a Ctrl-C may reach only some processes)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item() > 0)


def stop_hint(run: RunFolder) -> str:
    """Appended to a non-finite stop: where the last good state is and what to change."""
    fix = ("lower train.lr, check the base model and the data for NaN/inf values, or set train.nan_policy = "
           "\"skip\"")
    last = latest_state(run.state)
    if last is None:
        return f"No state was saved before it; fix the cause ({fix}) and start again."
    return f"The last good state is {last}: fix the cause ({fix}) and continue with `{run.resume_hint()}`."


def plot_losses(history: list, run: RunFolder) -> None:
    """Redraw ``loss.png``; a failure (full disk) is a warning, never the end of a run."""
    try:
        save_loss_plot(history, run.loss_plot, title=run.root.name)
    except write_errors() as e:
        log.warning("loss.png not updated: %s", write_error_message(e, run.loss_plot, "write"))


def save_periodic(save_lora: Callable[[str], list], save_state: Callable[[int], Path], done: int, history: list,
                  run: RunFolder, say, name: str = "", keep_loras: int = 0) -> None:
    """LoRA files and state of step ``done``; a failed write stops the run with one line naming the last state.
    ``keep_loras`` > 0: then only the newest that many steps' LoRA files of save.name ``name`` stay."""
    last = latest_state(run.state)
    try:
        files = save_lora(f"-step{done:06d}")
        state = save_state(done)
        settle_previous(run)  # an overwritten run's states go once this one has its own
    except write_errors() as e:
        where = (f"the last saved state is {last}: free space and run `{run.resume_hint()}`" if last else
                 "no state was saved yet: free space and start again")
        raise UserError(f"{write_error_message(e, run.root, f'save step {done} in')}; {where}") from None
    plot_losses(history, run)
    removed = prune_step_loras(run.root, name, keep_loras)
    say(f"saved step {done}: {', '.join(str(f) for f in files)} (state {state})" + (
        f"; save.keep_loras = {keep_loras}: removed {', '.join(p.name for p in removed)}" if removed else ""))


def save_on_interrupt(save_state: Callable[[int], Path], done: int, run: RunFolder, say) -> None:
    """Ctrl-C: the state of the step just finished, and the command that continues from it."""
    state = save_state(done)
    settle_previous(run)
    say(f"interrupted at step {done}: state saved in {state}; resume with: {run.resume_hint()}")


def finish(save_lora: Callable[[str], list], save_state: Callable[[int], Path] | None, done: int, history: list,
           run: RunFolder, first_file: Path, say) -> list[Path]:
    """The final resumable state (unless ``save_state`` is None: it exists), then the final LoRA files.

    The state goes first: if the disk fills up while the LoRA is written, the run can still be finished with
    ``--resume`` (which writes the LoRA from that state) instead of being lost.
    """
    state, state_error = None, None
    if save_state is not None:
        try:
            state = save_state(done)
            settle_previous(run)
        except write_errors() as e:
            state_error = write_error_message(e, run.state, "save the final training state in")
    else:
        state = latest_state(run.state)
    try:
        files = save_lora("")
    except write_errors() as e:
        why = write_error_message(e, first_file, "write the final LoRA")
        kept = state if state is not None and state_error is None else latest_state(run.state)
        if kept is None:
            raise UserError(f"{why}; no training state could be kept either ({state_error}): free space and "
                            f"train again") from None
        raise UserError(f"{why}; the training state {kept} is kept: free space and run `{run.resume_hint()}` to "
                        f"write the LoRA" + ("" if kept == state else " (that state is older: the steps after it "
                                             "will be trained again)")) from None
    plot_losses(history, run)
    say(f"saved the final LoRA at step {done}: {', '.join(str(f) for f in files)}"
        + (f" (state {state})" if state is not None and state_error is None else "")
        + (f"; loss curve: {run.loss_plot}" if run.loss_plot.exists() else ""))
    if state_error is not None:
        say(f"warning: the final training state could not be saved ({state_error}); the LoRA files are complete, "
            f"but extending this run with --resume would restart from an earlier state")
    return files


def final_samples(sample: Callable[[], Path], what: str, files: list[Path], say) -> Path:
    """Render the final grid with a message before and after (it can take a while at full size); ``what``: the
    images it renders (``LoraSampler.describe``)."""
    say(f"rendering final samples ({what})...")
    t0 = time.perf_counter()
    try:
        path = sample()
    except BaseException:
        say(f"final samples failed; the trained LoRA is saved: {', '.join(str(f) for f in files)}")
        raise
    say(f"samples: {path} ({time.perf_counter() - t0:.1f} s)")
    return path


def finite_or_none(values: list) -> list:
    return [v if v is not None and math.isfinite(v) else None for v in values]


def already_finished(files: list[Path], step: int, say, further: str | None = None) -> dict | None:
    """A resumed run already at its last step with every final LoRA file present: say so (``further``: how to train
    on, where raising train.steps is not it) and return a summary."""
    if not all(f.exists() for f in files):
        return None
    say(f"already finished at step {step}: {', '.join(str(f) for f in files)}; to train further, " +
        (further or f"raise train.steps (e.g. --set train.steps={2 * step} --resume)"))
    return {"losses": [], "files": [str(f) for f in files], "steps": step, "seconds": 0.0, "steps_per_second": 0.0,
            "skipped_steps": []}
