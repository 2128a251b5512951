"""GPU training-step benchmark: full-size FLUX.1 transformer (random weights built on the GPU, nothing downloaded),
rank-16 LoRA on all linear layers, batch 1, at 512^2 and 1024^2 (1024 / 4096 image tokens + 512 text tokens).

Rows: a diffusers-style baseline step (peft LoRA on a bf16 transformer with gradient checkpointing, LoRA in bf16,
no autocast, as ``train_dreambooth_lora_flux.py`` does with bf16 mixed precision), then dev2pro's own step
(``train.model.add_lora`` + ``objectives.flow_objective``, fp32 LoRA) for: bf16 without / with checkpointing,
fp8 storage + checkpointing, fp8 + block swap 16 and 28, and each ``--vram`` preset (``plan.VRAM_PRESETS``; a
preset whose settings equal a measured row reuses it). Columns: s/step (median of the timed steps after warm-up,
``torch.cuda.synchronize`` around each), peak allocated and reserved GB (``reset_peak_memory_stats`` per row),
the memory plan's estimate, s/step relative to the baseline, achieved TFLOP/s and its fraction of a bf16 matmul
measured in the same run. FLOPs counted: forward + backward of the frozen model (linears: 2*m*n*k forward, the
same again for the input gradient; attention: 4*T^2*hidden forward, twice that backward); LoRA and the
checkpointing recompute are not counted (so checkpointing shows as lower utilisation, as it should).

Every (row, size) runs in its own try block: an OOM or error is recorded and the bench goes on. The JSON and
markdown are rewritten after every row, so a killed run still leaves its finished rows. ``--smoke`` shrinks the
model (hidden 64, 2+4 blocks), sizes (64^2, 128^2 px, 8 text tokens) and steps (1 warm-up + 1 timed); nothing
else changes, so a CPU smoke run exercises every code path of the GPU run.

    python bench/gpu_train.py [--smoke] [--out DIR] [--budget SECONDS]
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev2pro import plan as P  # noqa: E402
from dev2pro.flux.spec import FLUX_DEV, FluxSpec, build_transformer  # noqa: E402

ALL_FP8 = ("norms", "biases", "embedders", "final")
DEFAULT_KEEP = ("norms", "biases", "embedders", "modulation", "final")


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Row:
    name: str
    storage: str = "bf16"  # bf16 | fp8 (default keep policy) | fp8all (modulation quantised too)
    checkpointing: bool = True
    swap: int = 0
    optimizer: str = "adamw"
    style: str = "dev2pro"  # dev2pro | diffusers

    def settings(self) -> tuple:
        return (self.storage, self.checkpointing, self.swap, self.optimizer, self.style)


def preset_row(gb: int) -> Row:
    m, t = P.VRAM_PRESETS[gb]["model"], P.VRAM_PRESETS[gb]["train"]
    storage = "bf16" if not m["fp8_storage"] else ("fp8all" if tuple(m.get("fp8_keep", DEFAULT_KEEP)) == ALL_FP8
                                                   else "fp8")
    return Row(f"preset --vram {gb}", storage, m["gradient_checkpointing"], m["blocks_to_swap"], t["optimizer"])


def rows() -> list[Row]:
    base = [Row("diffusers-style baseline (bf16 LoRA, ckpt)", style="diffusers"), Row("bf16 + ckpt"),
            Row("bf16, no ckpt", checkpointing=False), Row("fp8 + ckpt", "fp8"), Row("fp8 + swap 16", "fp8", swap=16),
            Row("fp8 + swap 28", "fp8", swap=28)]
    presets = [preset_row(gb) for gb in sorted(P.VRAM_PRESETS, reverse=True)]
    order = {"bf16": 0, "fp8": 1, "fp8all": 2}  # the base is converted in place: bf16 -> fp8 -> all-fp8
    return sorted(base + presets, key=lambda r: order[r.storage])


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


def to_storage(model, storage: str, dtype) -> None:
    from dev2pro.flux.fp8 import Fp8Policy, enable_fp8_storage

    if storage != "bf16":
        enable_fp8_storage(model, Fp8Policy.from_names(DEFAULT_KEEP if storage == "fp8" else ALL_FP8),
                           compute_dtype=dtype)


def add_lora(model, row: Row, spec: FluxSpec, rank: int):
    """LoRA params: dev2pro's own ``add_lora`` (fp32) or diffusers' script style (bf16, as the base)."""
    from peft import LoraConfig

    from dev2pro.lora.targets import target_modules
    from dev2pro.train.model import add_lora as dev2pro_add_lora

    names = target_modules("all_linear", spec.num_double, spec.num_single, guidance=spec.guidance_embeds)
    if row.style == "dev2pro":
        return dev2pro_add_lora(model, names, rank, float(rank))
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=names),
                      adapter_name="default")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def build_optimizer(params, name: str):
    from dev2pro.train.optim import build_optimizer as build

    try:
        return build(params, name, 1e-4), name
    except Exception as e:  # adamw8bit without bitsandbytes: measure adamw and say so
        log(f"    {name} unavailable ({str(e).splitlines()[0][:80]}): measuring adamw")
        return build(params, "adamw", 1e-4), f"adamw ({name} not installed)"


# ------------------------------------------------------------------------------------------------ steps
def synthetic_batch(spec: FluxSpec, size: int, txt: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, size // 8, size // 8, generator=g),
            "prompt_embeds": torch.randn(1, txt, spec.context_dim, generator=g),
            "pooled": torch.randn(1, spec.pooled_dim, generator=g)}


def dev2pro_step(model, batch, gen, device, dtype):
    from dev2pro.objectives import draw, flow_objective

    noised = draw(batch, gen, dropout_p=0.0, empty={}, timestep_sampling="sigmoid", sigmoid_scale=1.0, shift=3.0)
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
            fwd += 2.0 * m.in_features * m.out_features * P.stream_tokens(name.replace(".base_layer", ""), img, txt)
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


def plan_estimate(spec, row: Row, img: int, txt: int, rank: int, optimizer: str) -> float | None:
    if row.style != "dev2pro":
        return None
    inp = P.PlanInputs(spec, "bf16", fp8_storage=row.storage != "bf16",
                       fp8_keep=ALL_FP8 if row.storage == "fp8all" else DEFAULT_KEEP,
                       gradient_checkpointing=row.checkpointing,
                       blocks_to_swap=min(row.swap, spec.num_double + spec.num_single), rank=rank,
                       optimizer=optimizer, image_tokens=(img,), text_tokens=txt)
    try:
        return P.estimate(inp).train_peak(img) / P.GB
    except Exception as e:  # the plan must never cost a measurement
        log(f"    plan failed: {type(e).__name__}: {e}")
        return None


def measure(model, spec, row: Row, size: int, a, device, dtype, params, opt) -> dict:
    """Warm-up + timed steps at one size; returns the row's numbers."""
    cuda = torch.device(device).type == "cuda"
    free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = synthetic_batch(spec, size, a.txt)
    gen = torch.Generator().manual_seed(1)
    fn = dev2pro_step if row.style == "dev2pro" else diffusers_step
    times = []
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = fn(model, batch, gen, device, dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        log(f"    step {i + 1}/{a.warmup + a.steps}: {times[-1]:.3f}s loss {loss.item():.4f}")
    s = statistics.median(times[a.warmup:])
    img = (size // 16) ** 2
    flops = step_flops(model, spec, img, a.txt)
    return {"s_per_step": s, "times": times, "tflops": flops / s / 1e12,
            "peak_alloc_gb": torch.cuda.max_memory_allocated() / P.GB if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / P.GB if cuda else None,
            "loss": loss.item()}


def run_row(model, spec, row: Row, a, device, dtype, results: list, started: float, write) -> None:
    from dev2pro.train.blockswap import BlockSwap

    params = opt = swap = None
    n_blocks = spec.num_double + spec.num_single
    try:
        params = add_lora(model, row, spec, a.rank)
        opt, opt_name = build_optimizer(params, row.optimizer)
        if row.checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        if row.swap:
            swap = BlockSwap(model, min(row.swap, n_blocks), device).place()
        model.train()
        for size in a.sizes:
            rec = {"row": row.name, "size": size, **asdict(row), "optimizer_used": opt_name}
            if time.perf_counter() - started > a.budget:
                rec["skipped"] = f"time budget of {a.budget:.0f}s spent"
                log(f"  {row.name} @ {size}: skipped (time budget)")
            else:
                log(f"  {row.name} @ {size}px ...")
                try:
                    rec.update(measure(model, spec, row, size, a, device, dtype, params, opt))
                    rec["plan_gb"] = plan_estimate(spec, row, (size // 16) ** 2, a.txt, a.rank, row.optimizer
                                                   if opt_name == row.optimizer else "adamw")
                    log(f"  {row.name} @ {size}: {rec['s_per_step']:.3f} s/step, peak "
                        f"{rec['peak_alloc_gb'] or 0:.2f} GB (plan {rec['plan_gb'] or 0:.2f} GB)")
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
        if swap is not None:
            swap.remove()
            model.to(device)  # the swapped blocks' host masters come back for the next rows
        if "default" in getattr(model, "peft_config", {}):
            model.delete_adapters("default")
        del params, opt, swap
        free(device)


# ------------------------------------------------------------------------------------------------ output
def table(meta: dict, results: list) -> str:
    base = {r["size"]: r["s_per_step"] for r in results if r.get("style") == "diffusers" and "s_per_step" in r}
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; {meta['date']}; bf16 matmul "
             f"{meta['matmul_tflops']:.0f} TFLOP/s; FLUX.1 {meta['spec']}, LoRA rank {meta['rank']}, batch 1, "
             f"{meta['txt']} text tokens; {meta['warmup']} warm-up + {meta['steps']} timed steps",
             "", "| row | size | s/step | peak alloc GB | peak reserved GB | plan GB | vs baseline | TFLOP/s | "
                 "of matmul peak | note |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=".2f"):
        return "—" if v is None else format(v, spec)

    for r in results:
        if "s_per_step" in r:
            ratio = r["s_per_step"] / base[r["size"]] if r["size"] in base else None
            note = r.get("same_as", "") or (r["optimizer_used"] if r["optimizer_used"] != r["optimizer"] else "")
            lines.append(f"| {r['row']} | {r['size']}² | {r['s_per_step']:.3f} | {f(r['peak_alloc_gb'])} | "
                         f"{f(r['peak_reserved_gb'])} | {f(r.get('plan_gb'), '.3g')} | {f(ratio)}x | "
                         f"{r['tflops']:.0f} | {r['tflops'] * 1e12 / meta['matmul_flops']:.2f} | {note} |")
        else:
            size = f"{r['size']}²" if r["size"] else "—"
            lines.append(f"| {r['row']} | {size} | — | — | — | — | — | — | — | {r.get('error') or r.get('skipped')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes, 2 steps (any device, CPU ok)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="folder for gpu_train.json/.md")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds after which remaining rows are skipped")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only matching rows")
    ap.add_argument("--cudnn-sdp", action="store_true", help="keep PyTorch's cuDNN attention backend on")
    a = ap.parse_args(argv)
    started = time.perf_counter()
    if not a.cudnn_sdp:
        from dev2pro.train.cuda import avoid_cudnn_attention

        avoid_cudnn_attention()  # its backward raised an illegal memory access on H200 (see train/cuda.py)
    sdp = os.environ.get("DEV2PRO_BENCH_SDP", "")  # set by gpu_session.sh from its per-backend preflight
    if sdp and torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(getattr(SDPBackend, sdp)).__enter__()  # for the whole run
        log(f"SDPA backend: {sdp} only")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    if a.smoke:
        spec = FluxSpec(hidden=64, num_heads=4, num_double=2, num_single=4, context_dim=32, pooled_dim=32,
                        axes_dim=(4, 6, 6))
        a.sizes, a.txt, a.warmup, a.steps, n_mm = [64, 128], 8, 1, 1, 256
    else:
        spec, a.sizes, a.txt, a.warmup, a.steps, n_mm = FLUX_DEV, [512, 1024], 512, 1, 3, 8192
    a.rank = 16
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(device, n_mm)
    meta = {"gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "matmul_flops": peak, "matmul_tflops": peak / 1e12, "spec": "smoke" if a.smoke else "full-size",
            "rank": a.rank, "txt": a.txt, "warmup": a.warmup, "steps": a.steps, "smoke": a.smoke}
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
    t0 = time.perf_counter()
    model = build_random(spec, device, dtype)
    sync(device)
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params on {device} in "
        f"{time.perf_counter() - t0:.1f}s")
    storage, measured = "bf16", {}
    for row in wanted:
        if row.settings() in measured:  # a preset equal to a measured row: reuse its numbers
            for rec in [r for r in results if r["row"] == measured[row.settings()]]:
                results.append({**rec, "row": row.name, "same_as": f"same settings as '{rec['row']}'"})
            write()
            continue
        if row.storage != storage:
            try:
                t0 = time.perf_counter()
                to_storage(model, row.storage, dtype)
                storage = row.storage
                free(device)
                log(f"converted the base to {row.storage} in {time.perf_counter() - t0:.1f}s")
            except Exception as e:
                results.append({"row": row.name, "size": None, **asdict(row), "error": f"conversion: {e}"})
                write()
                continue
        log(f"row: {row.name} [{time.perf_counter() - started:.0f}s]")
        run_row(model, spec, row, a, device, dtype, results, started, write)
        measured[row.settings()] = row.name
    write()
    log("\n" + table(meta, results))
    log(f"\nwrote {out / 'gpu_train.json'} and {out / 'gpu_train.md'} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
