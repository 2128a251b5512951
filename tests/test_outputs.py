"""The output layer (issue 10): destination guard, recognisable temps cleaned by the next run, strict JSON, and
disk-full / read-only errors as one line with exit 2 and existing files intact -- simulated everywhere (a
monkeypatched write) and real on a small tmpfs where the platform lets us mount one."""

import errno
import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro import outputs
from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora
from tiny_run import model_and_data


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BFL base (2.4 MB fp32) and a kohya LoRA for it."""
    d = tmp_path_factory.mktemp("inputs")
    model = build_transformer(TINY, seed=0)
    base = d / "base.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}, str(base))
    g = torch.Generator().manual_seed(0)
    lw = LoraWeights({n: LoraModule(torch.randn(4, 64, generator=g) * 0.05, torch.randn(64, 4, generator=g) * 0.05,
                                    4.0) for n in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v")})
    lora = save_lora(lw, d / "lora.safetensors", "kohya")
    return base, lora


def _no_temps(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.startswith(outputs.TMP_PREFIX)]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # tqdm remnants are not errors
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    return lines[0]


@pytest.fixture
def full_disk(monkeypatch):
    """Simulated ENOSPC: every write through ``outputs`` and safetensors' own writer (diffusers/transformers
    save_pretrained) fails like a full disk."""
    import safetensors.torch

    def write(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_file_full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(outputs, "write_bytes", write)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file_full)


def _mount_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs here (the simulated-ENOSPC tests still run)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'}); the simulated-ENOSPC "
                    f"tests still run")


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    _mount_tmpfs(mnt, "2m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system but ``leave`` bytes."""
    free = shutil.disk_usage(folder).free - leave
    if free > 0:
        (folder / "filler.bin").write_bytes(b"\0" * free)


# ------------------------------------------------------------------------------------------------ guard
def test_guard_refuses_what_the_writer_does_not_own(tmp_path):
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="model folder"):
        outputs.check_output(model, overwrite=True)  # a generic writer never replaces a model folder
    with pytest.raises(UserError, match="a file cannot replace it"):
        outputs.check_output(model, overwrite=True, folder=False)
    with pytest.raises(UserError, match="vae.*does not write"):
        outputs.check_output(model, overwrite=True, folder=True, owned=["model_index.json"])
    outputs.check_output(model, overwrite=True, folder=True, owned=["model_index.json", "vae"])
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is the input"):
        outputs.check_output(f, overwrite=True, sources=[f])
    with pytest.raises(UserError, match="holds the input"):
        outputs.check_output(tmp_path, overwrite=True, sources=[f])
    with pytest.raises(UserError, match="is a file but this output is a folder"):
        outputs.check_output(f, overwrite=True, folder=True)
    with pytest.raises(UserError, match="--overwrite"):
        outputs.check_output(f, overwrite=False)
    with outputs.atomic_path(tmp_path / "b.txt") as tmp:
        assert tmp.name.startswith(".dev2pro-tmp-b.txt-") and tmp.parent == tmp_path
        tmp.write_text("ok")
    assert (tmp_path / "b.txt").read_text() == "ok" and _no_temps(tmp_path)


def test_clean_stale_temps_removes_only_dead_local_writers(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".dev2pro-tmp-x.safetensors-{dead.pid}@{host}-0a1b2c3d",
             tmp_path / f".dev2pro-tmp-run-{dead.pid}@{host}-0a1b2c3e-old"]
    stale[0].write_bytes(b"x")
    (stale[1] / "inner").mkdir(parents=True)
    kept = [tmp_path / f".dev2pro-tmp-y-{os.getpid()}@{host}-0a1b2c3d",  # this live process
            tmp_path / f".dev2pro-tmp-y-{dead.pid}@other-host-0a1b2c3d",  # another host (shared file system)
            tmp_path / ".dev2pro-tmp-not-ours", tmp_path / "x.safetensors"]
    for p in kept:
        p.write_bytes(b"x")
    assert sorted(outputs.clean_stale_temps(tmp_path, force=True)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_summary_json_never_holds_bare_nan(tmp_path):
    path = outputs.write_json(tmp_path / "summary.json", {"losses": [0.5, float("nan"), float("inf")],
                                                          "final": {"loss": -math.inf}, "steps": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def strict(c):
        raise ValueError(c)
    data = json.loads(text, parse_constant=strict)
    assert data["losses"] == [0.5, None, None] and data["final"]["loss"] is None and data["steps"] == 3
    assert data["nonfinite"] == ["losses[1]=nan", "losses[2]=inf", "final.loss=-inf"]


# ------------------------------------------------------------------------------------------------ simulated ENOSPC
def test_simulated_full_disk_every_writer_one_line_exit_2(tmp_path, files, full_disk, capsys):
    base, lora = files
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"an earlier output")
    commands = [
        ["convert", str(base), str(old), "--dtype", "bf16", "--overwrite"],
        ["convert", str(base), str(tmp_path / "folder"), "--layout", "diffusers"],
        ["lora", "convert", str(lora), str(old), "--to", "comfy", "--overwrite"],
        ["lora", "merge", "--base", str(base), "--lora", str(lora), str(old), "--overwrite"],
        ["lora", "extract", "--from", str(base), "--to", str(base), str(old), "--rank", "2", "--overwrite"],
        ["init-tiny", str(tmp_path / "tiny")],
    ]
    for args in commands:
        assert main(args) == 2, args
        line = _one_line_error(capsys)
        if args[:2] != ["lora", "extract"]:  # identical inputs: extract stops before writing (nothing to extract)
            assert "no space left on the device" in line and "needed" in line, line
        assert old.read_bytes() == b"an earlier output", args
        assert not (tmp_path / "folder").exists() and not (tmp_path / "tiny").exists()
        assert _no_temps(tmp_path), args


def test_simulated_full_disk_cache_and_train_writers(tmp_path, tiny_dev_dir, sk_images, full_disk, capsys):
    from dev2pro.data.cache import _write_atomic
    from dev2pro.train.state import save_sharded_state

    assert main(["cache", str(sk_images), "--model", str(tiny_dev_dir), "--out", str(tmp_path / "shards"),
                 "--resolution", "64", "--default-caption", "a photo"]) == 2
    assert "no space left" in _one_line_error(capsys)
    with pytest.raises(UserError, match="cannot write cache file .*no space left"):
        _write_atomic({"latents": torch.zeros(4, 2, 2)}, tmp_path / "k.safetensors", {"key": "k"})
    lw = LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)})
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write LoRA .*lora.safetensors: no space left"):
        save_lora(lw, run / "lora.safetensors", "kohya")
    with pytest.raises(UserError, match="cannot write training state .*no space left"):
        save_sharded_state(run / "state", 4, {"w": torch.ones(3)}, {}, rank=0, world=1, barrier=lambda: None)
    assert _no_temps(tmp_path) and not (run / "lora.safetensors").exists()


def test_disk_errors_are_recognised_from_every_writer():
    import safetensors

    assert outputs.disk_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert outputs.disk_errno(safetensors.SafetensorError(
        'Error while serializing: I/O error: Read-only file system (os error 30) at path "/x"')) == errno.EROFS
    assert outputs.disk_errno(OSError(errno.ENOENT, "missing")) is None
    assert outputs.disk_errno(UserError("os error 28 in a message")) is None
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota")
    assert outputs.disk_errno(wrapped) == errno.EDQUOT


def test_read_error_on_an_input_is_not_reported_as_a_write_error(tmp_path):
    src = tmp_path / "secret.bin"
    with pytest.raises(PermissionError):
        with outputs.atomic_path(tmp_path / "out.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
    assert _no_temps(tmp_path)


# ------------------------------------------------------------------------------------------------ real tmpfs
def test_real_full_tmpfs(tmpfs, files, capsys, monkeypatch):
    base, lora = files
    old = tmpfs / "out.safetensors"
    old.write_bytes(b"x" * 600_000)  # an earlier output; a 2.4 MB fp32 copy does not fit beside it
    assert main(["convert", str(base), str(old), "--overwrite"]) == 2
    line = _one_line_error(capsys)
    assert str(old) in line and "MiB free" in line and "about 2.4 MiB needed" in line, line
    assert old.read_bytes() == b"x" * 600_000 and _no_temps(tmpfs)

    monkeypatch.setattr(outputs, "check_free_space", lambda *a, **k: None)  # let the write itself hit ENOSPC
    for args in (["convert", str(base), str(old), "--overwrite"],
                 ["lora", "merge", "--base", str(base), "--lora", str(lora), str(old), "--overwrite"],
                 ["init-tiny", str(tmpfs / "tiny")]):
        assert main(args) == 2, args
        assert "no space left on the device" in _one_line_error(capsys)
        assert old.read_bytes() == b"x" * 600_000 and not (tmpfs / "tiny").exists() and _no_temps(tmpfs), args
    _fill(tmpfs, 4096)
    assert main(["lora", "convert", str(lora), str(old), "--to", "diffusers", "--overwrite"]) == 2
    assert "no space left" in _one_line_error(capsys)
    assert old.read_bytes() == b"x" * 600_000 and _no_temps(tmpfs)


def test_real_full_tmpfs_cache(tmpfs, tiny_dev_dir, sk_images, capsys):
    _fill(tmpfs, 64 * 1024)
    assert main(["cache", str(sk_images), "--model", str(tiny_dev_dir), "--out", str(tmpfs / "shards"),
                 "--resolution", "64", "--default-caption", "a photo", "--per-shard", "2"]) == 2
    assert "no space left" in _one_line_error(capsys)
    assert _no_temps(tmpfs)


def test_real_read_only_tmpfs(tmpfs, files, capsys):
    base, lora = files
    old = tmpfs / "out.safetensors"
    old.write_bytes(b"earlier")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for args in (["convert", str(base), str(old), "--overwrite"],
                 ["lora", "convert", str(lora), str(tmpfs / "l.safetensors"), "--to", "comfy"],
                 ["init-tiny", str(tmpfs / "tiny")]):
        assert main(args) == 2, args
        line = _one_line_error(capsys)
        assert "not writable" in line or "read-only" in line, line
    assert old.read_bytes() == b"earlier"


def test_real_full_tmpfs_train_final_save(tmpfs, tmp_path, tiny_dev_dir, sk_images, capsys):
    """`train` into a new run folder on a nearly full disk: the final LoRA save is one line, exit 2."""
    cfg = tmp_path / "train.toml"
    cfg.write_text(model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache", model='dtype = "fp32"') + f"""
[lora]
rank = 8
[train]
steps = 2
[save]
output_dir = "{tmpfs / 'run'}"
""")
    _fill(tmpfs, 48 * 1024)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "no space left on the device" in line and str(tmpfs / "run") in line, line
    assert _no_temps(tmpfs)


def test_train_on_a_nan_base_stops_at_load(tmp_path, tiny_dev_dir, sk_images, capsys):
    """A NaN block in the base used to train to an all-NaN LoRA with exit 0; now the load names the tensor."""
    sd = load_file(str(tiny_dev_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd["single_transformer_blocks.2.proj_out.weight"][0, :4] = float("nan")
    bad = tmp_path / "nan-base.safetensors"
    save_file(sd, str(bad))
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
[model]
path = "{tiny_dev_dir}"
transformer = "{bad}"
dtype = "fp32"
[[data.folders]]
path = "{sk_images}"
[data]
default_caption = "a photo"
resolution = 64
[train]
steps = 2
[save]
output_dir = "{tmp_path / 'run'}"
""")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "single_transformer_blocks.2.proj_out.weight holds 4 NaN/inf" in line, line
    assert not (tmp_path / "run" / "lora.safetensors").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_cache_on_a_read_only_disk_is_one_line_naming_the_path(tmp_path, tiny_dev_dir, sk_images, capsys,
                                                              monkeypatch):
    """Issue 18.7: `dev2pro cache --out` on a read-only file system ended in a traceback from mkdir."""
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "shards"
    assert main(["cache", str(sk_images), "--model", str(tiny_dev_dir), "--out", str(out), "--resolution", "64",
                 "--default-caption", "a photo"]) == 2
    assert _one_line_error(capsys) == (f"dev2pro cache: error: cannot create the cache folder {out}: the file system "
                                       f"is read-only; choose a destination on a writable disk")


def test_real_read_only_tmpfs_cache(tmpfs, tiny_dev_dir, sk_images, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for out in (tmpfs, tmpfs / "new"):
        assert main(["cache", str(sk_images), "--model", str(tiny_dev_dir), "--out", str(out), "--resolution", "64",
                     "--default-caption", "a photo"]) == 2
        line = _one_line_error(capsys)
        assert str(out) in line and "the file system is read-only" in line, line
