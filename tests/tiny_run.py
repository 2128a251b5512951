"""What the tiny end-to-end runs share (tests only): their config tables, and comparing their output files."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SAMPLES = """
[sample]
every = 2
prompts = ["a photo"]
seeds = [1]
steps = 1
width = 32
height = 32
"""  # a one-prompt sample grid every 2 steps at 32 px: cheap, and every save step renders one


def model_and_data(model_dir, images, cache_dir, checkpointing: bool = False, model: str = "", data: str = "",
                   resolution="64", bucket_step: int = 64) -> str:
    """``[model]`` + ``[[data.folders]]`` + ``[data]`` TOML for a tiny model folder and an image folder at 64 px;
    ``model`` / ``data`` are extra lines for those tables (e.g. ``dtype = "fp32"``, ``batch_size = 2``)."""
    return f"""
[model]
path = "{model_dir}"
gradient_checkpointing = {str(checkpointing).lower()}
{model}

[[data.folders]]
path = "{images}"

[data]
default_caption = "a photo"
resolution = {resolution}
bucket_step = {bucket_step}
cache_dir = "{cache_dir}"
{data}
"""


def same_tensors(a_path, b_path) -> bool:
    """Two safetensors files hold the same keys with bitwise-equal tensors (resumed vs uninterrupted runs)."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def lora_run_toml(tmp, model_dir, images, out, *, steps, seed, lr="1e-2", rank=4, model='dtype = "fp32"', data="",
                  lora="", train="", save="", extra="", cache="cache", **data_table) -> Path:
    """A tiny `dev2pro train` config (LoRA rank = alpha = ``rank``, cache ``tmp/cache``, output ``tmp/out``)
    written to ``tmp/out.toml``; ``model`` .. ``save`` are extra lines for those tables, ``extra`` whole tables, ``data_table`` the
    resolution / bucket_step of `model_and_data`."""
    text = model_and_data(model_dir, images, tmp / cache, model=model, data=data, **data_table) + f"""
[lora]
rank = {rank}
alpha = {rank}
{lora}

[train]
steps = {steps}
lr = {lr}
seed = {seed}
{train}

[save]
output_dir = "{tmp / out}"
{save}

{extra}
"""
    path = tmp / f"{out}.toml"
    path.write_text(text)
    return path


def run_killed(cfg_path, after_step: int, command: str = "train") -> None:
    """`dev2pro COMMAND CFG --no-progress` in a subprocess that dies like kill -9 right after step ``after_step``
    (tests/kill_after_step.py); the resume tests then finish it in-process."""
    kill = Path(__file__).resolve().parent / "kill_after_step.py"
    proc = subprocess.run([sys.executable, str(kill), str(after_step), command, str(cfg_path), "--no-progress"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]


def run_signalled(cfg_path, sig, at_step: int = 3, command: str = "train") -> tuple[int, str]:
    """`dev2pro COMMAND CFG --no-progress` (no periodic saves, a line per step) in a subprocess sent ``sig`` once
    it has printed step ``at_step``; returns (exit code, its whole output)."""
    proc = subprocess.Popen([sys.executable, "-m", "dev2pro.cli", command, str(cfg_path), "--no-progress", "--set",
                             "save.every=0", "--set", "log_every=1"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"{command} step {at_step}/"):
            proc.send_signal(sig)
            break
    text = "".join(seen) + proc.communicate(timeout=300)[0]
    return proc.returncode, text


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what the allocator holds; views counted once)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def assert_fused_equals_merged(pipe, lora_out, ours, forward, what: str, capsys) -> None:
    """diffusers' pipeline with a LoRA loaded (its output ``lora_out``) vs ``ours``, dev2pro's merge of the same
    file: outputs to fp32 round-off, then diffusers' own fuse against our merged weights (same keys, < 1e-6)."""
    out_diff = float((forward(ours) - lora_out).abs().max())
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ref, got = pipe.transformer.state_dict(), ours.state_dict()
    assert set(ref) == set(got)
    weight_diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    with capsys.disabled():
        print(f"\n{what}: diffusers-loaded vs dev2pro-merged output max |diff| {out_diff:.3g} (scale "
              f"{float(lora_out.abs().max()):.3g}); fused vs merged weights max |diff| {weight_diff:.3g}")
    assert out_diff < 1e-5 * float(lora_out.abs().max())
    assert weight_diff < 1e-6
