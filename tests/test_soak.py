"""kill -9 soak (issue 10): `convert`, a `dedistill` export and `train` are SIGKILLed at 5 random (seeded) moments
each; after every rerun (or `--resume latest`) the results equal an uninterrupted run's, bit for bit, and no temp
file is left anywhere under the destination.

Each run is a forked child of this (already warm) process, so a kill costs no interpreter start-up; the child is
killed with SIGKILL, like `kill -9`, at a moment drawn uniformly over the uninterrupted run's measured duration.
"""

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_run import model_and_data

pytestmark = pytest.mark.slow
KILLS = 5
SEED = 10


def _child(fn, args):
    torch.set_num_threads(1)
    code = 0
    try:
        fn(*args)
    except SystemExit as e:
        code = e.code or 0
    except BaseException:  # noqa: BLE001 -- the exit code tells the parent
        import traceback
        traceback.print_exc()
        code = 99
    os._exit(code)


def _run(fn, *args, kill_after: float | None = None, watch: Path | None = None):
    """Run ``fn(*args)`` in a forked child; SIGKILL it after ``kill_after`` s. Returns (exit code or None when
    killed, seconds, seconds until ``watch`` first existed or None)."""
    proc = mp.get_context("fork").Process(target=_child, args=(fn, args))
    t0 = time.perf_counter()
    proc.start()
    seen = None
    while proc.is_alive() and (kill_after is None or time.perf_counter() - t0 < kill_after):
        proc.join(0.005)
        if watch is not None and seen is None and watch.exists():
            seen = time.perf_counter() - t0
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()  # reaped: its pid is dead for the next run's temp cleaning
        return None, time.perf_counter() - t0, seen
    proc.join()
    return proc.exitcode, time.perf_counter() - t0, seen


def _temps(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".dev2pro-tmp-") or
            p.name.endswith((".export.safetensors", ".tmp"))]


def _bytes(folder: Path, names) -> dict:
    out = {}
    for n in names:
        p = folder / n
        out[n] = {q.relative_to(p).as_posix(): q.read_bytes() for q in sorted(p.rglob("*"))} if p.is_dir() \
            else p.read_bytes()
    return out


def _cli(*argv):
    from dev2pro.cli import main
    raise SystemExit(main(list(argv)))


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import what the runs use in this process, so forked children spend their time working, not importing."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    from dev2pro.cli import build_parser
    from dev2pro.recipes import checkpoint_tools, dedistill, train_lora  # noqa: F401
    build_parser()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random Flux file big enough (~27 MB fp32) that a convert takes a noticeable fraction of a second."""
    from dev2pro.flux.keys import diffusers_to_bfl
    from dev2pro.flux.spec import TINY, build_transformer, default_axes_dim

    spec = TINY.with_(hidden=256, num_heads=4, num_double=2, num_single=2, axes_dim=default_axes_dim(64))
    sd = diffusers_to_bfl(build_transformer(spec, seed=0).state_dict())
    path = tmp_path_factory.mktemp("soak-src") / "src.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_kill_convert(tmp_path, source):
    rng = random.Random(SEED)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    jobs = [("out.safetensors", ["--dtype", "fp8-scaled"]), ("out-diffusers", ["--layout", "diffusers",
                                                                              "--dtype", "bf16"])]
    ref, took = {}, {}
    for name, extra in jobs:
        code, took[name], _ = _run(_cli, "convert", str(source), str(ref_dir / name), *extra, "--overwrite")
        assert code == 0
        ref.update(_bytes(ref_dir, [name]))
    left = 0
    for i in range(KILLS):
        name, extra = jobs[i % 2]
        dst = run_dir / name
        _run(_cli, "convert", str(source), str(dst), *extra, "--overwrite",
             kill_after=rng.uniform(0.05, 1.0) * took[name])
        left += bool(_temps(run_dir))
        if dst.exists():  # a killed convert leaves the old output or the complete new one, never a part
            assert _bytes(run_dir, [name])[name] == ref[name]
        assert _run(_cli, "convert", str(source), str(dst), *extra, "--overwrite")[0] == 0
        assert _bytes(run_dir, [name])[name] == ref[name], f"kill {i}"
        assert _temps(run_dir) == [], f"kill {i}"
    print(f"convert: {left} of {KILLS} kills left temps behind (cleaned by the rerun)")
    assert left, "no kill landed while writing: the kill moments do not cover the writes"


def _export(state_path, out):
    from dev2pro.train.export import export_model

    state = load_file(str(state_path))
    export_model(state, Path(out), "m", ["bfl", "diffusers", "fp8"], "bf16", True, {"dev2pro.recipe": "dedistill"})


def test_kill_dedistill_export(tmp_path, source):
    from dev2pro.flux import checkpoint as C
    from dev2pro.flux.keys import bfl_to_diffusers

    state_path = tmp_path / "trained.safetensors"  # the trained weights a dedistill run hands to its export
    ck = C.open_checkpoint(source)
    save_file(bfl_to_diffusers({k: ck.get(k) for k in ck.shapes}), str(state_path))
    rng = random.Random(SEED + 1)
    names = ["m.safetensors", "m-diffusers", "m-fp8.safetensors"]
    (tmp_path / "ref").mkdir()
    code, took, _ = _run(_export, state_path, tmp_path / "ref")
    assert code == 0
    ref = _bytes(tmp_path / "ref", names)
    out = tmp_path / "run"
    out.mkdir()
    left = 0
    for i in range(KILLS):
        _run(_export, state_path, out, kill_after=rng.uniform(0.05, 1.0) * took)
        left += bool(_temps(out))
        assert _run(_export, state_path, out)[0] == 0
        assert _bytes(out, names) == ref, f"kill {i}"
        assert _temps(out) == [], f"kill {i}"
    print(f"dedistill export: {left} of {KILLS} kills left temps behind (cleaned by the rerun)")
    assert left, "no kill landed while writing: the kill moments do not cover the writes"


def test_kill_train(tmp_path, tiny_dev_dir, sk_images):
    from dev2pro.train.state import latest_state

    def toml(out):
        path = tmp_path / f"{out}.toml"
        path.write_text(model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache", model='dtype = "fp32"') + f"""
[lora]
rank = 4
[train]
steps = 8
lr = 1e-2
seed = 5
[save]
output_dir = "{tmp_path / out}"
every = 2
""")
        return str(path)
    code, took, first_save = _run(_cli, "train", toml("ref"), "--no-progress", watch=tmp_path / "ref" / "state")
    assert code == 0 and first_save is not None
    ref = load_file(str(tmp_path / "ref" / "lora.safetensors"))
    rng = random.Random(SEED + 2)
    loop = took - first_save  # most of a run is loading: draw the kills over the training loop (and a bit before)
    for i in range(KILLS):
        run, cfg = tmp_path / f"run{i}", toml(f"run{i}")
        at = first_save + rng.uniform(-0.3, 1.0) * loop
        killed = _run(_cli, "train", cfg, "--no-progress", kill_after=at)[0] is None
        state = latest_state(run / "state")
        print(f"train kill {i} at {at:.2f}s: {'killed' if killed else 'finished first'}, state {state and state.name}")
        if state is not None:
            code = _run(_cli, "train", cfg, "--no-progress", "--resume", "latest")[0]
        else:  # killed before its first save: start again
            code = _run(_cli, "train", cfg, "--no-progress", "--set", "save.overwrite=true")[0]
        assert code == 0, f"kill {i}"
        got = load_file(str(run / "lora.safetensors"))
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), f"kill {i}"
        assert _temps(run) == [] and _temps(tmp_path / "cache") == [], f"kill {i}"
