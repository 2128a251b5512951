"""What `dev2pro train` tells the user and how it ends: the start-up summary, save messages, the final save (state
first, then the LoRA files, then samples), Ctrl-C, and the hints printed when a run stops.

The loop itself stays in ``train_lora.train``; these functions are its lifecycle steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..train.lossplot import save_loss_plot
from ..train.run import write_error_message, write_errors
from ..train.state import latest_state

log = logging.getLogger(__name__)


def startup_lines(cfg, data, n_params: int, variant: str, start: int, out: Path) -> list[str]:
    """The run at a glance: data and buckets, steps and epochs, LoRA size, guidance, bases, outputs."""
    ds, tc, sc = data.dataset, cfg.train, cfg.sample
    buckets = Counter(ds.buckets())  # latent (h, w) per sample, repeats included
    n_images = len(getattr(ds, "entries", None) or ds)
    per_epoch = max(1, len(data.sampler))  # batches per epoch
    epochs = tc.steps * tc.grad_accum / per_epoch
    source = cfg.data.shards or ", ".join(f.path for f in cfg.data.folders)
    base = cfg.model.transformer or cfg.model.path
    lines = [
        f"dev2pro train -> {out}",
        f"  data: {n_images} images ({len(ds)} samples per epoch with repeats) from {source}",
        f"  buckets: {len(buckets)} bucket(s): " + ", ".join(f"{w * 8}x{h * 8} ({n})" for (h, w), n in
                                                         sorted(buckets.items(), key=lambda kv: -kv[1])),
        f"  steps {tc.steps}" + (f" (resuming at {start})" if start else "") + f", batch {cfg.data.batch_size} x "
        f"grad_accum {tc.grad_accum}, {per_epoch} batches per epoch = {epochs:.1f} epochs",
        f"  LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {cfg.lora.targets}, {n_params:,} trainable "
        f"parameters; lr {tc.lr:g} ({tc.optimizer}, {tc.schedule})",
        f"  guidance {tc.guidance} in training (base: {base}, {variant})",
    ]
    if sc.prompts:
        lines.append(f"  samples: {len(sc.prompts)} prompt(s) x {len(sc.seeds)} seed(s) at guidance {sc.guidance} "
                     f"on {cfg.model.inference_base or 'the training base'}, "
                     + (f"every {sc.every} steps and " if sc.every else "") + f"at the end -> {out / 'samples'}")
    lines += [f"  saves: " + (f"every {cfg.save.every} steps and " if cfg.save.every else "") +
              f"at the end -> {out / cfg.save.name}.safetensors ({', '.join(cfg.save.formats)}), resumable state "
              f"in {out / 'state'}",
              f"  TensorBoard: tensorboard --logdir {out / 'logs'}"]
    return lines


def resume_hint(out: Path) -> str:
    return f"dev2pro train {out / 'config.toml'} --resume"


def stop_hint(state_dir: Path, out: Path) -> str:
    """Appended to a non-finite stop: where the last good state is and what to change."""
    fix = ("lower train.lr, check the base model and the data for NaN/inf values, or set train.nan_policy = "
           "\"skip\"")
    last = latest_state(state_dir)
    if last is None:
        return f"No state was saved before it; fix the cause ({fix}) and start again."
    return f"The last good state is {last}: fix the cause ({fix}) and continue with `{resume_hint(out)}`."


def grad_norm(accelerator, params, max_norm: float) -> float:
    """The total gradient norm (clipped to ``max_norm`` when > 0); non-finite when any gradient is."""
    import torch

    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def plot_losses(history: list, out: Path) -> None:
    """Redraw ``loss.png``; a failure (full disk) is a warning, never the end of a run."""
    try:
        save_loss_plot(history, out / "loss.png", title=out.name)
    except write_errors() as e:
        log.warning("loss.png not updated: %s", write_error_message(e, out / "loss.png", "write"))


def save_periodic(save_lora: Callable[[str], list], save_state: Callable[[int], Path], done: int, history: list,
                  out: Path, say) -> None:
    """LoRA files and state of step ``done``; a failed write stops the run with one line naming the last state."""
    state_dir = out / "state"
    last = latest_state(state_dir)
    try:
        files = save_lora(f"-step{done:06d}")
        state = save_state(done)
    except write_errors() as e:
        where = (f"the last saved state is {last}: free space and run `{resume_hint(out)}`" if last else
                 "no state was saved yet: free space and start again")
        raise UserError(f"{write_error_message(e, out, f'save step {done} in')}; {where}") from None
    plot_losses(history, out)
    say(f"saved step {done}: {', '.join(str(f) for f in files)} (state {state})")


def save_on_interrupt(save_state: Callable[[int], Path], done: int, out: Path, say) -> None:
    state = save_state(done)
    say(f"interrupted at step {done}: state saved in {state}; resume with: {resume_hint(out)}")


def finish(save_lora: Callable[[str], list], save_state: Callable[[int], Path] | None, done: int, history: list,
           out: Path, state_dir: Path, first_file: Path, say) -> list[Path]:
    """The final resumable state (unless ``save_state`` is None: it exists), then the final LoRA files.

    The state goes first: if the disk fills up while the LoRA is written, the run can still be finished with
    ``--resume`` (which writes the LoRA from that state) instead of being lost.
    """
    state, state_error = None, None
    if save_state is not None:
        try:
            state = save_state(done)
        except write_errors() as e:
            state_error = write_error_message(e, state_dir, "save the final training state in")
    else:
        state = latest_state(state_dir)
    try:
        files = save_lora("")
    except write_errors() as e:
        why = write_error_message(e, first_file, "write the final LoRA")
        kept = state if state is not None and state_error is None else latest_state(state_dir)
        if kept is None:
            raise UserError(f"{why}; no training state could be kept either ({state_error}): free space and "
                            f"train again") from None
        raise UserError(f"{why}; the training state {kept} is kept: free space and run `{resume_hint(out)}` to "
                        f"write the LoRA" + ("" if kept == state else " (that state is older: the steps after it "
                                             "will be trained again)")) from None
    plot_losses(history, out)
    say(f"saved the final LoRA at step {done}: {', '.join(str(f) for f in files)}"
        + (f" (state {state})" if state is not None and state_error is None else "")
        + (f"; loss curve: {out / 'loss.png'}" if (out / "loss.png").exists() else ""))
    if state_error is not None:
        say(f"warning: the final training state could not be saved ({state_error}); the LoRA files are complete, "
            f"but extending this run with --resume would restart from an earlier state")
    return files


def final_samples(sample: Callable[[], Path], n_images: int, steps: int, files: list[Path], say) -> Path:
    """Render the final grid with a message before and after (it can take a while at full size)."""
    say(f"rendering final samples ({n_images} image(s), {steps} sampling steps each)...")
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


def already_finished(cfg, out: Path, step: int, say) -> dict | None:
    """A resumed run already at its last step with every final LoRA file present: say so and return a summary."""
    files = [out / f"{cfg.save.name}{'' if f == 'kohya' else '.' + f}.safetensors" for f in cfg.save.formats]
    if not all(f.exists() for f in files):
        return None
    say(f"already finished at step {step}: {', '.join(str(f) for f in files)}; to train further, raise "
        f"train.steps (e.g. --set train.steps={2 * step} --resume)")
    return {"losses": [], "files": [str(f) for f in files], "steps": step, "seconds": 0.0, "steps_per_second": 0.0,
            "skipped_steps": []}
