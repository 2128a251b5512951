"""``train.attention_backend = "auto"``: the fastest attention kernel that survives this model's own forward and
backward on this card, found by a probe and remembered.

Why a probe with the model, not a lone kernel call: on the lent H200 a standalone SDPA backward on contiguous
tensors passed on every backend while the model's step crashed with cuDNN (``train/cuda.py``); a kernel's failure
can depend on the layouts diffusers' attention processor hands it. So each candidate runs a one-double-block,
one-single-block model of the run's family at its real width and head count and the run's token count, forward and
backward to the input's gradient, in bf16 -- in a child process of its own, because an illegal
memory access poisons the CUDA context for good. A candidate passes when it finishes, its output and input
gradient are finite and match PyTorch's math kernel within bf16 tolerance; the fastest passing one (median of
timed steps) is chosen. A passing answer is kept per card, driver, library versions, family and shape in
``$XDG_CACHE_HOME/dev2pro/attention.json`` (``~/.cache``), so a run pays the probe (~10-20 s per candidate) once;
when nothing passes (possibly out of memory beside the loaded model) PyTorch SDPA is used and nothing is kept.

Candidates are diffusers' dispatcher backends that run from installed packages (never the ``*_hub`` ones, which
download kernels): the flash-attn 3 and 2 packages where importable, then PyTorch's flash and memory-efficient
SDPA. cuDNN SDPA is left out: it crashed in the model's backward on Hopper, and a two-block probe is no proof that a
57-block step would not. Without CUDA there is nothing to choose: PyTorch SDPA ("").
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import families, outputs

log = logging.getLogger(__name__)

REFERENCE = "_native_math"
TIMEOUT_S = 180.0


def candidates(device) -> list[str]:
    """The backends "auto" tries on ``device``, in order of expected speed (the probe's timing decides)."""
    if torch.device(device).type != "cuda":
        return []
    names = []
    if importlib.util.find_spec("flash_attn_interface"):
        names.append("_flash_3")
    if importlib.util.find_spec("flash_attn"):
        names.append("flash")
    return names + ["_native_flash", "_native_efficient"]


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "dev2pro" / "attention.json"


def model_config(model) -> dict:
    """The transformer's diffusers config with its class name (what a probe rebuilds it from)."""
    return {**dict(model.config), "_class_name": families.of_model(model).transformer_class}


def cache_key(config: dict, tokens: tuple[int, int], device) -> str:
    """What a probe's answer depends on: card, versions, the model's attention shape and the token count."""
    import diffusers

    card = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    shape = {k: config.get(k) for k in ("_class_name", "num_attention_heads", "attention_head_dim")}
    return json.dumps({"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                       "diffusers": diffusers.__version__, "model": shape, "tokens": list(tokens)}, sort_keys=True)


def probe_model(config: dict, device, seed: int = 0):
    """The run's family at its real width and heads, one double and one single block, in bf16, frozen (the
    backward still runs through every attention kernel to the input's gradient)."""
    config = {**config, "num_layers": 1, "num_single_layers": 1}
    fam = next(f for f in families.families().values() if f.transformer_class == config.get("_class_name"))
    spec = fam.spec_from_config(config)
    model = fam.build_transformer(spec, device=device, dtype=torch.bfloat16, seed=seed)
    return fam, spec, model.requires_grad_(False)


def _step(spec, model, tokens: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    kw = families.random_inputs(spec, *tokens, device, torch.bfloat16, seed=1)
    x = kw["hidden_states"].requires_grad_(True)  # the backward runs through attention to the input's gradient
    out = model(**kw, return_dict=False)[0]
    out.float().square().mean().backward()
    grad, x.grad = x.grad.detach().float(), None
    return out.detach().float(), grad


def probe(backend: str, config: dict, tokens: tuple[int, int], device: str, steps: int = 3) -> dict:
    """Run ``backend`` on the probe model: {"ok", "ms" (median per step), "error"}; in the caller's process."""
    from diffusers.models.attention_dispatch import attention_backend

    _, spec, model = probe_model(config, device)
    try:
        with attention_backend(REFERENCE):
            ref_out, ref_grad = _step(spec, model, tokens, device)
        times = []
        with attention_backend(backend):
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                out, grad = _step(spec, model, tokens, device)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
    except Exception as e:  # a kernel that refuses this shape/dtype, or a package that is not installed
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    finite = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
    err = max(float((out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-6)),
              float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12)))
    ok = finite and err < 0.05  # bf16 kernels differ by ~1e-2 at most from the math kernel
    return {"ok": ok, "ms": 1000 * statistics.median(times[1:]), "error": "" if ok else
            f"output differs from PyTorch's math kernel by {err:.3g} (relative)" if finite else "non-finite output"}


def probe_in_child(backend: str, config: dict, tokens: tuple[int, int], device: str,
                   probe_fn: str = "dev2pro.train.attention:probe", timeout: float = TIMEOUT_S) -> dict:
    """``probe`` in a fresh Python process (``python -m dev2pro.train.attention``; this process's import path): a
    crash (illegal memory access, abort) or a hang is a failed candidate, never this process's problem."""
    job = json.dumps({"probe": probe_fn, "backend": backend, "config": config, "tokens": list(tokens),
                      "device": str(device)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "dev2pro.train.attention"], input=job, env=env, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer within {timeout:.0f}s"}
    answer = next((line[len(_ANSWER):] for line in done.stdout.splitlines() if line.startswith(_ANSWER)), None)
    if done.returncode != 0 or answer is None:
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return {"ok": False, "error": f"the probe process died (exit code {done.returncode})" + (f": {last}" if last
                                                                                                 else "")}
    return json.loads(answer)


_ANSWER = "dev2pro-attention-probe: "


def probe_all(config: dict, tokens: tuple[int, int], device, names: list[str],
              probe_fn: str = "dev2pro.train.attention:probe") -> dict[str, dict]:
    """``probe_in_child`` for each of ``names``: name -> {"ok", "ms", "error"}."""
    results = {}
    for name in names:
        log.info("attention backend probe: %s ...", name)
        results[name] = probe_in_child(name, config, tokens, str(device), probe_fn)
        log.info("  %s: %s", name, f"ok, {results[name]['ms']:.1f} ms" if results[name]["ok"]
                 else results[name]["error"])
    return results


def fastest(results: dict[str, dict]) -> str:
    """The passing backend with the lowest time; "" (PyTorch SDPA) when none passed."""
    passed = sorted((r["ms"], n) for n, r in results.items() if r["ok"])
    return passed[0][1] if passed else ""


def _remembered(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError) as e:  # a damaged cache costs a probe, never the run
        log.warning("ignoring the attention backend cache %s (%s); probing again", cache, e)
        return {}


def choose(config: dict, tokens: tuple[int, int], device, names: list[str] | None = None,
           probe_fn: str = "dev2pro.train.attention:probe", cache: Path | None = None) -> str:
    """The backend "auto" uses for this model and token count on ``device`` ("" = PyTorch SDPA when none passes or
    there is nothing to choose from). A passing answer is remembered per cache key; when none passes nothing is
    remembered (the cause may be passing: memory held by the loaded model, a busy card) and the next run probes
    again."""
    names = candidates(device) if names is None else list(names)
    if not names:
        return ""
    cache = cache_path() if cache is None else cache
    key = cache_key(config, tokens, device)
    known = _remembered(cache).get(key)
    if known:
        log.info("attention backend (auto, remembered in %s): %s", cache, known["backend"])
        return known["backend"]
    results = probe_all(config, tokens, device, names, probe_fn)
    best = fastest(results)
    if not best:
        log.warning("attention backend (auto): no candidate passed its probe, using PyTorch SDPA: %s",
                    "; ".join(f"{n}: {r['error']}" for n, r in results.items()))
        return ""
    known = _remembered(cache)  # another run may have written meanwhile
    known[key] = {"backend": best, "probes": results, "date": time.strftime("%Y-%m-%d")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with outputs.atomic_path(cache, overwrite=True, what="attention backend cache") as tmp:
        Path(tmp).write_text(json.dumps(known, indent=1))
    log.info("attention backend (auto): %s", best)
    return best


if __name__ == "__main__":  # a probe process (probe_in_child): one job as JSON on stdin, the answer on stdout
    job = json.loads(sys.stdin.read())
    module, name = job["probe"].split(":")
    result = getattr(importlib.import_module(module), name)(job["backend"], job["config"], tuple(job["tokens"]),
                                                            job["device"])
    print(_ANSWER + json.dumps(result), flush=True)
