"""GPU training-step bench (issue 20's protocol): full-size FLUX.1 transformer (random weights built on the GPU,
nothing downloaded), rank-16 LoRA on all linear layers, batch 1, 512 text tokens, at 1024^2 (2 warm-up + 5 timed
steps) and 512^2 (2 + 8). One run, whichever card is lent; compare rows only within the run.

Rows, in order: the baseline (plain diffusers + peft step, bf16 LoRA, checkpointing, as
``train_dreambooth_lora_flux.py``) | dev2pro as landed before issue 20 (fp32 LoRA) | bf16 LoRA over fp32 masters
(``train.precision``) | + no checkpointing where the plan says it fits (``model.gradient_checkpointing = "auto"``) |
+ fused RoPE (``train.fused_rope``; FLUX's RMSNorm is torch's fused kernel already) | + attention backend (the SDPA
backend the session's preflight found first) | fp8 storage before (fp32 LoRA) / after (bf16 LoRA) | the baseline
again (drift check) | + compile (``train.compile = "blocks"``; compile time and frames reported; run last, after the
end-of-run matmul peak, since its compile time is the least predictable part of the budget). The matmul peak is
measured at the start and the end; one
step of dev2pro's default and of fp8 at 1024^2 is profiled (top 30 kernels by GPU time, profile-*.txt).

Columns: median / min s per step, spread ((max - min) / median of the timed steps), host s per step (until the
step's work is queued, before the synchronize), peak allocated GB and the plan's estimate, ratio to the baseline,
TFLOP/s and its fraction of the measured matmul peak. FLOPs: forward + input-gradient backward of the frozen
network's linears at the tokens each sees (``activations.stream_tokens``: modulation linears once per sample) +
attention; LoRA and checkpoint recompute are not counted.

Every (row, size) runs in its own try block; the JSON and markdown are rewritten after every row, so a killed run
leaves its finished rows. ``--tiny`` (alias ``--smoke``): a tiny model (hidden 64, 2 + 4 blocks), 64^2/128^2 px,
8 text tokens, 1 + 1 steps -- the same code paths on any device, CPU included (compile too).

    python bench/gpu_train.py [--tiny] [--out DIR] [--budget SECONDS] [--rows SUBSTRINGS]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev2pro import activations as A
from dev2pro import plan as P  # noqa: E402
from dev2pro.flux.spec import FLUX_DEV, FluxSpec, build_transformer  # noqa: E402

DEFAULT_KEEP = ("norms", "biases", "embedders", "modulation", "final")


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Row:
    name: str
    storage: str = "bf16"  # bf16 | fp8 (default keep policy)
    checkpointing: object = True  # True | False | "auto" (the plan's choice for this card)
    lora: str = "bf16"  # bf16 (fp32 masters, train/precision.py) | fp32 (dev2pro before issue 20)
    style: str = "dev2pro"  # dev2pro | diffusers
    attention: bool = False  # the preflighted SDPA backend (DEV2PRO_BENCH_SDP) for this row
    fused: bool = False  # train.fused_rope: the rotary embedding as one complex product
    compile: bool = False
    profile: bool = False  # profile one 1024^2 (largest size) step
    skip: str = ""  # recorded, not run


def rows() -> list[Row]:
    return [Row("baseline: diffusers + peft (bf16 LoRA, ckpt)", style="diffusers"),
            Row("dev2pro as landed (fp32 LoRA, ckpt)", lora="fp32"),
            Row("bf16 LoRA (ckpt)"),
            Row("+ no ckpt where the plan fits (auto)", checkpointing="auto", profile=True),
            Row("+ fused RoPE", checkpointing="auto", fused=True),
            Row("+ attention backend", checkpointing="auto", fused=True, attention=True),
            Row("fp8 storage before (fp32 LoRA, ckpt)", "fp8", lora="fp32"),
            Row("fp8 storage after (bf16 LoRA, ckpt)", "fp8", profile=True),
            Row("baseline again (drift check)", style="diffusers"),
            # last: its compile time is the least predictable, and a kill at the time limit then costs only it
            Row("+ compile (blocks)", checkpointing="auto", fused=True, attention=True, compile=True)]


# ------------------------------------------------------------------------------------------------ model
def build_random(spec: FluxSpec, device, dtype) -> torch.nn.Module:
    """The transformer allocated directly in ``dtype`` on ``device`` (no fp32 copy), random Linear weights."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_transformer(spec, device="meta")
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
            elif type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
    if list(model.buffers()):
        raise RuntimeError("the transformer has buffers that to_empty left uninitialised")
    return model.eval().requires_grad_(False)


def to_fp8(model, dtype) -> None:
    from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage

    enable_fp8_storage(model, Fp8Policy.from_names(DEFAULT_KEEP), compute_dtype=dtype)


def add_lora(model, row: Row, spec: FluxSpec, rank: int):
    """(params, masters): dev2pro's own ``add_lora`` (+ bf16 compute over fp32 masters), or the diffusers script's
    bf16 LoRA."""
    from peft import LoraConfig

    from dev2pro.lora.targets import target_modules
    from dev2pro.train.model import add_lora as dev2pro_add_lora
    from dev2pro.train.precision import lora_in_compute_dtype

    names = target_modules("all_linear", spec.num_double, spec.num_single, guidance=spec.guidance_embeds)
    if row.style == "dev2pro":
        params = dev2pro_add_lora(model, names, rank, float(rank))
        dtype = next(p for n, p in model.named_parameters() if "lora_" not in n).dtype
        return params, lora_in_compute_dtype(model, params, "compute" if row.lora == "bf16" else "fp32", dtype)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=names),
                      adapter_name="default")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, None


# ------------------------------------------------------------------------------------------------ steps
def synthetic_batch(spec: FluxSpec, size: int, txt: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, size // 8, size // 8, generator=g),
            "prompt_embeds": torch.randn(1, txt, spec.context_dim, generator=g),
            "pooled": torch.randn(1, spec.pooled_dim, generator=g)}


def dev2pro_step(model, batch, gen, device, dtype):
    from dev2pro.objectives import draw, flow_objective

    noised = draw(batch, gen, dropout_p=0.0, empty={}, timestep_sampling="sigmoid", sigmoid_scale=1.0,
                  shift=3.0).to(device)  # as train/loop.step_loss: on the device before the forward
    return flow_objective(model, noised, 1.0, device, dtype)[0]


def diffusers_step(model, batch, gen, device, dtype):
    """The loss as train_dreambooth_lora_flux.py computes it (logit-normal t, packed latents, plain MSE)."""
    from diffusers import FluxPipeline

    x0 = batch["latents"].to(device, dtype)
    b, c, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
    sigmas = torch.sigmoid(torch.randn(b, generator=gen)).to(device, dtype)
    noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
    guidance = torch.full((b,), 1.0, device=device, dtype=dtype) if model.config.guidance_embeds else None
    pred = model(hidden_states=packed, timestep=sigmas, guidance=guidance,
                 pooled_projections=batch["pooled"].to(device, dtype),
                 encoder_hidden_states=batch["prompt_embeds"].to(device, dtype), txt_ids=txt_ids, img_ids=img_ids,
                 return_dict=False)[0]
    target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
    return torch.mean((pred.float() - target.float()) ** 2)


def step_flops(model, spec: FluxSpec, img: int, txt: int) -> float:
    """Forward + input-gradient backward FLOPs of the frozen network (see the module docstring)."""
    fwd = 0.0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in name:  # peft's wrappers are not nn.Linear
            fwd += 2.0 * m.in_features * m.out_features * A.stream_tokens(name.replace(".base_layer", ""), img, txt)
    attn = 4.0 * (img + txt) ** 2 * spec.hidden * (spec.num_double + spec.num_single)
    return 2 * fwd + 3 * attn


def matmul_peak(device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ a
    sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def plan_inputs(spec, row: Row, img: int, txt: int, rank: int) -> "P.PlanInputs":
    return P.PlanInputs(spec, "bf16", fp8_storage=row.storage != "bf16", fp8_keep=DEFAULT_KEEP,
                        gradient_checkpointing=row.checkpointing is not False, rank=rank,
                        lora_dtype="compute" if row.lora == "bf16" else "fp32", image_tokens=(img,), text_tokens=txt)


def checkpointing(row: Row, spec, a, device) -> bool:
    """The row's checkpointing; "auto": the plan's choice for this card at the largest size (the recipe's rule)."""
    if row.checkpointing != "auto":
        return bool(row.checkpointing)
    card = torch.cuda.get_device_properties(0).total_memory if torch.device(device).type == "cuda" else None
    if card is None and a.tiny:
        return False  # CPU smoke: exercise the no-checkpointing path
    return P.checkpointing_choice(plan_inputs(spec, row, (max(a.sizes) // 16) ** 2, a.txt, a.rank), card)


def one_step(fn, model, batch, gen, device, dtype, params, opt) -> tuple[float, float, float]:
    """(wall s, host s, loss) of one optimizer step."""
    sync(device)
    t0 = time.perf_counter()
    loss = fn(model, batch, gen, device, dtype)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    host = time.perf_counter() - t0
    sync(device)
    return time.perf_counter() - t0, host, loss.item()


def measure(model, spec, row: Row, size: int, a, device, dtype, params, opt) -> dict:
    """Warm-up + timed steps at one size; returns the row's numbers."""
    from dev2pro.train.compiled import CompileStats

    cuda = torch.device(device).type == "cuda"
    free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = synthetic_batch(spec, size, a.txt)
    gen = torch.Generator().manual_seed(1)
    fn = dev2pro_step if row.style == "dev2pro" else diffusers_step
    warmup, steps = a.schedule[size]
    before = CompileStats.now()
    times, hosts = [], []
    for i in range(warmup + steps):
        wall, host, loss = one_step(fn, model, batch, gen, device, dtype, params, opt)
        times.append(wall)
        hosts.append(host)
        log(f"    step {i + 1}/{warmup + steps}: {wall:.3f}s (host {host:.3f}s) loss {loss:.4f}")
    timed = times[warmup:]
    s = statistics.median(timed)
    img = (size // 16) ** 2
    rec = {"s_per_step": s, "min_s": min(timed), "spread": (max(timed) - min(timed)) / s,
           "host_s": statistics.median(hosts[warmup:]), "times": times,
           "tflops": step_flops(model, spec, img, a.txt) / s / 1e12,
           "peak_alloc_gb": torch.cuda.max_memory_allocated() / P.GB if cuda else None,
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / P.GB if cuda else None, "loss": loss}
    if row.compile:
        stats = CompileStats.now().since(before)
        rec["compile"] = {**stats.as_dict(), "first_step_s": times[0]}
    if row.profile and size == max(a.sizes):
        rec["profile_file"] = profile_step(row, fn, model, batch, gen, device, dtype, params, opt, a.out)
    return rec


def profile_step(row, fn, model, batch, gen, device, dtype, params, opt, out: Path) -> str:
    """One profiled step; the top 30 kernels by device time go to profile-<row>.txt."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        one_step(fn, model, batch, gen, device, dtype, params, opt)
    key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
    name = "profile-" + "".join(c if c.isalnum() else "-" for c in row.name.lower()).strip("-")[:40] + ".txt"
    (out / name).write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    return name


def run_row(model, spec, row: Row, a, device, dtype, results: list, started: float, write) -> None:
    from dev2pro.train.rope import use_fused_rope

    params = opt = masters = None
    use_fused_rope(row.fused)
    try:
        params, masters = add_lora(model, row, spec, a.rank)
        from dev2pro.train.optim import build_optimizer

        opt = build_optimizer(params, "adamw", 1e-4)
        ck = checkpointing(row, spec, a, device)
        model.enable_gradient_checkpointing() if ck else model.disable_gradient_checkpointing()
        if row.compile:
            from dev2pro.train.compiled import compile_blocks

            compile_blocks(model)
        model.train()
        for size in a.sizes:
            rec = {"row": row.name, "size": size, **asdict(row), "checkpointing_used": ck}
            if time.perf_counter() - started > a.budget:
                rec["skipped"] = f"time budget of {a.budget:.0f}s spent"
            else:
                log(f"  {row.name} @ {size}px (checkpointing {ck}) ...")
                try:
                    with attention(row, device):
                        rec.update(measure(model, spec, row, size, a, device, dtype, params, opt))
                    if row.style == "dev2pro":
                        rec["plan_gb"] = P.estimate(replace(plan_inputs(spec, row, (size // 16) ** 2, a.txt, a.rank),
                                                            gradient_checkpointing=ck)).train_peak() / P.GB
                    log(f"  {row.name} @ {size}: {rec['s_per_step']:.3f} s/step (host {rec['host_s']:.3f}), peak "
                        f"{rec['peak_alloc_gb'] or 0:.2f} GB (plan {rec.get('plan_gb') or 0:.2f} GB)")
                except Exception as e:  # OOM or anything else: record, free, carry on
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    log(f"  {row.name} @ {size}: FAILED {rec['error']}")
                    traceback.print_exc(limit=3)
                    opt.zero_grad(set_to_none=True)
            results.append(rec)
            write()
    except Exception as e:
        results.append({"row": row.name, "size": None, **asdict(row),
                        "error": f"setup: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
        log(f"  {row.name}: setup FAILED {results[-1]['error']}")
        traceback.print_exc(limit=3)
        write()
    finally:
        use_fused_rope(False)
        if masters is not None:
            masters.remove()
        if "default" in getattr(model, "peft_config", {}):
            model.delete_adapters("default")
        del params, opt, masters
        free(device)


def attention(row: Row, device):
    """For rows that ask for it: the backend the model-layout probe chose (gpu_session.sh sets DEV2PRO_BENCH_ATTN;
    diffusers' dispatcher), else the preflighted SDPA backend (DEV2PRO_BENCH_SDP)."""
    import contextlib

    chosen, sdp = os.environ.get("DEV2PRO_BENCH_ATTN", ""), os.environ.get("DEV2PRO_BENCH_SDP", "")
    if not (row.attention and (chosen or sdp) and torch.device(device).type == "cuda"):
        return contextlib.nullcontext()
    if chosen:
        from diffusers.models.attention_dispatch import attention_backend

        return attention_backend(chosen)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, sdp))


# ------------------------------------------------------------------------------------------------ output
def table(meta: dict, results: list) -> str:
    base: dict = {}  # the first baseline; "baseline again" only checks drift
    for r in results:
        if r.get("style") == "diffusers" and "s_per_step" in r:
            base.setdefault(r["size"], r["s_per_step"])
    peak = " -> ".join(f"{v:.0f}" for v in meta["matmul_tflops"])
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; {meta['date']}; bf16 matmul {peak} TFLOP/s (start -> "
             f"end); FLUX.1 {meta['spec']}, LoRA rank {meta['rank']}, batch 1, {meta['txt']} text tokens; warm-up + "
             f"timed steps per size {meta['schedule']}; SDPA preflight: {meta['sdp'] or 'not run'}; model-layout "
             f"attention probe: {meta.get('attention') or 'not run'}",
             "", "| row | size | median s | min s | spread | host s | ckpt | peak alloc GB | plan GB | vs baseline | "
                 "TFLOP/s | of matmul peak | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=".2f"):
        return "—" if v is None else format(v, spec)

    for r in results:
        if "s_per_step" in r:
            ratio = r["s_per_step"] / base[r["size"]] if r["size"] in base else None
            note = "; ".join(x for x in (
                f"compile {r['compile']['seconds']:.0f} s, {r['compile']['frames']} frames, first step "
                f"{r['compile']['first_step_s']:.1f} s" if r.get("compile") else "",
                r.get("profile_file", "")) if x)
            lines.append(f"| {r['row']} | {r['size']}² | {r['s_per_step']:.3f} | {r['min_s']:.3f} | "
                         f"{r['spread'] * 100:.1f}% | {r['host_s']:.3f} | {'on' if r['checkpointing_used'] else 'off'}"
                         f" | {f(r['peak_alloc_gb'])} | {f(r.get('plan_gb'), '.3g')} | {f(ratio)}x | "
                         f"{r['tflops']:.0f} | {r['tflops'] * 1e12 / meta['matmul_flops']:.2f} | {note} |")
        else:
            size = f"{r['size']}²" if r["size"] else "—"
            lines.append(f"| {r['row']} | {size} | — | — | — | — | — | — | — | — | — | — | "
                         f"{r.get('error') or r.get('skipped')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                    help="tiny model, tiny sizes, 1 + 1 steps (any device, CPU ok)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="folder for gpu_train.json/.md")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which remaining rows are skipped (default 360; --tiny: none)")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only matching rows")
    a = ap.parse_args(argv)
    a.tiny = a.tiny or os.environ.get("DEV2PRO_BENCH_TINY") == "1"
    a.budget = a.budget if a.budget is not None else (float("inf") if a.tiny else 360.0)
    started = time.perf_counter()
    from dev2pro.train.cuda import avoid_cudnn_attention

    avoid_cudnn_attention()  # its backward raised an illegal memory access on H200 (see train/cuda.py)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    if a.tiny:
        spec = FluxSpec(hidden=64, num_heads=4, num_double=2, num_single=4, context_dim=32, pooled_dim=32,
                        axes_dim=(4, 6, 6))
        a.sizes, a.txt, a.schedule, n_mm = [128, 64], 8, {128: (1, 1), 64: (1, 1)}, 256
    else:
        spec, a.sizes, a.txt, n_mm = FLUX_DEV, [1024, 512], 512, 8192
        a.schedule = {1024: (2, 5), 512: (2, 8)}
    a.rank = 16
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = a.out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(device, n_mm)
    meta = {"gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "matmul_flops": peak, "matmul_tflops": [peak / 1e12], "spec": "tiny" if a.tiny else "full-size",
            "rank": a.rank, "txt": a.txt, "schedule": {f"{k}²": v for k, v in a.schedule.items()}, "tiny": a.tiny,
            "sdp": os.environ.get("DEV2PRO_BENCH_SDP", ""), "attention": os.environ.get("DEV2PRO_BENCH_ATTN", "")}
    log(f"bench: {meta['gpu']}, bf16 matmul {peak / 1e12:.1f} TFLOP/s")
    results: list[dict] = []

    def write():
        md = table(meta, results)
        for name, text in (("gpu_train.json", json.dumps({"meta": meta, "rows": results}, indent=1)),
                           ("gpu_train.md", md + "\n")):
            tmp = out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out / name)

    wanted = [r for r in rows() if not a.rows or any(s.strip() in r.name for s in a.rows.split(","))]
    model, state = None, ""  # state: "bf16" | "compiled" | "fp8" -- what the model became (in place)
    for row in wanted:
        if row.skip:
            results.append({"row": row.name, "size": None, **asdict(row), "skipped": row.skip})
            write()
            continue
        need = row.storage
        if model is None or state == "compiled" or (state == "fp8") != (need == "fp8"):
            model = None
            free(device)
            t0 = time.perf_counter()
            model = build_random(spec, device, dtype)  # fresh: compile and fp8 conversion are in place
            if need == "fp8":
                to_fp8(model, dtype)
            state = need
            sync(device)
            log(f"built the base ({need}) in {time.perf_counter() - t0:.1f}s")
        if row.compile and len(meta["matmul_tflops"]) == 1:  # the end-of-run peak, before the open-ended row
            meta["matmul_tflops"].append(matmul_peak(device, n_mm) / 1e12)
        log(f"row: {row.name} [{time.perf_counter() - started:.0f}s]")
        run_row(model, spec, row, a, device, dtype, results, started, write)
        state = "compiled" if row.compile else state
    if len(meta["matmul_tflops"]) == 1:
        meta["matmul_tflops"].append(matmul_peak(device, n_mm) / 1e12)  # drift of the card itself
    write()
    log("\n" + table(meta, results))
    log(f"\nwrote {out / 'gpu_train.json'} and {out / 'gpu_train.md'} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
