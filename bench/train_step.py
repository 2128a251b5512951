"""Benchmark the LoRA training step. Every figure is a ratio measured in this one run (machines here are noisy).

(a) overhead: steps/s of `dev2pro train` (data loading, caching done beforehand, progress, TensorBoard) against a
    bare forward+backward+AdamW loop on the same model and batch in the same process. Goal <= 1.03.
(b) parameter memory of the base with fp8 storage vs bf16: default keep policy (AdaLN modulation kept in bf16)
    and all-fp8 (modulation quantised too). Goal <= 0.55x. Full-width FLUX.1 blocks (1 double + 2 single).
(c) GPU only: a full-size FLUX.1 transformer with random weights, LoRA rank 16, batch 1 at 512^2 and 1024^2:
    s/step, peak VRAM, achieved TFLOP/s as a fraction of a bf16 matmul measured in the same run.

    python bench/train_step.py [--steps 30] [--skip-memory] [--gpu]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def overhead(steps: int, work: Path) -> None:
    from dev2pro.flux.spec import FluxSpec
    from dev2pro.flux.tiny import write_tiny_model
    from dev2pro.data.folders import DatasetFolder
    from dev2pro.data.loader import BucketBatchSampler, collate
    from dev2pro.data.prepare import FolderOptions, load_training_data
    from dev2pro.lora.targets import target_modules
    from dev2pro.objectives import draw, flow_objective
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config
    from dev2pro.train.model import add_lora, load_base

    # A small model whose step cost (not Python overhead) dominates, like a real run.
    spec = FluxSpec(hidden=256, num_heads=4, num_double=2, num_single=4, in_channels=64, context_dim=32,
                    pooled_dim=32, axes_dim=(8, 28, 28))
    model_dir = write_tiny_model(work / "model", spec=spec)
    import skimage

    imgs = work / "imgs"
    imgs.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, imgs / name)
    toml = work / "bench.toml"
    toml.write_text(f"""
[model]
path = "{model_dir}"
dtype = "fp32"
gradient_checkpointing = false
t5_max_length = 128
[[data.folders]]
path = "{imgs}"
[data]
default_caption = "a photo"
resolution = 128
bucket_step = 128
[lora]
rank = 16
alpha = 16
[train]
steps = {steps}
[save]
output_dir = "{work / 'run'}"
""")
    cfg = load_train_config(toml)
    train(cfg, progress=False)  # warm-up: caches latents/text, first-touch allocations

    def recipe_sps():
        shutil.rmtree(work / "run")
        return train(load_train_config(toml), progress=True)["steps_per_second"]

    # bare loop: same model, LoRA, batch shapes and loss function; no data loader, logging or progress
    out = work / "bare"
    out.mkdir()
    data = load_training_data(model_dir, "cpu", folders=[DatasetFolder(imgs)], cache_dir=out / "cache",
                              options=FolderOptions("a photo", resolution=128, bucket_step=128), t5_max_length=128)
    model, ckpt = load_base(str(model_dir), torch.float32, "cpu", gradient_checkpointing=False)
    params = add_lora(model, target_modules("all_linear", spec.num_double, spec.num_single,
                                            guidance=spec.guidance_embeds), 16, 16.0)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    sampler = BucketBatchSampler(data.dataset.buckets(), 1, seed=0)
    items = collate([data.dataset[i] for i in next(iter(sampler))])
    model.train()

    def bare_sps():
        for i in range(steps + 3):
            if i == 3:
                t0 = time.perf_counter()
            batch = draw(items, gen, dropout_p=0.0, empty=data.empty, timestep_sampling="sigmoid", sigmoid_scale=1.0,
                         shift=3.0)
            loss = flow_objective(model, batch, 1.0, "cpu", torch.float32)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return steps / (time.perf_counter() - t0)

    # alternate the two and keep each one's best, so a burst of load on this shared machine hits both alike
    runs = [(recipe_sps(), bare_sps()) for _ in range(3)]
    recipe_sps, bare_sps = max(r for r, _ in runs), max(b for _, b in runs)
    print(f"(a) dev2pro train: {recipe_sps:.2f} steps/s, bare loop: {bare_sps:.2f} steps/s, "
          f"overhead ratio (bare/recipe): {bare_sps / recipe_sps:.3f} (goal <= 1.03)")


def memory(work: Path) -> None:
    from safetensors.torch import save_file

    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.fp8 import Fp8Policy, param_bytes
    from dev2pro.flux.spec import FLUX_DEV, build_transformer

    spec = FLUX_DEV.with_(num_double=1, num_single=2)
    path = work / "full-width-bf16.safetensors"
    save_file(build_transformer(spec, dtype=torch.bfloat16, seed=0).state_dict(), str(path))
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 256, 64, generator=g).bfloat16(),
             encoder_hidden_states=torch.randn(1, 64, 4096, generator=g).bfloat16(),
             pooled_projections=torch.randn(1, 768, generator=g).bfloat16(), timestep=torch.tensor([0.5]).bfloat16(),
             guidance=torch.tensor([1.0]).bfloat16(), img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(64, 3),
             return_dict=False)

    def run(model):
        with torch.no_grad():
            return model(**x)[0].float()

    bf16, _ = load_transformer(path, dtype=torch.bfloat16)
    base, ref = param_bytes(bf16), run(bf16)
    del bf16
    rows = []
    for label, policy in (("modulation kept in bf16", Fp8Policy()),
                          ("modulation in fp8 too", Fp8Policy.from_names(["norms", "biases", "embedders", "final"]))):
        model, _ = load_transformer(path, dtype=torch.bfloat16, fp8_storage=True, policy=policy)
        err = float((run(model) - ref).norm() / ref.norm())
        rows.append(f"{label}: {param_bytes(model) / base:.3f}x memory, output rel. error {err:.4f}")
        del model
    print(f"(b) base parameter memory vs bf16 ({base / 1e9:.2f} GB, full-width blocks; goal <= 0.55x) and the forward "
          f"output error against bf16 (quality cost): " + "; ".join(rows))


def gpu(sizes=(512, 1024)) -> None:
    if not torch.cuda.is_available():
        print("(c) skipped: no CUDA device")
        return
    from peft import LoraConfig

    from dev2pro.flux.latents import image_ids, text_ids
    from dev2pro.flux.spec import FLUX_DEV, build_transformer
    from dev2pro.lora.targets import target_modules

    dev = "cuda"
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    peak = 20 * 2 * 8192**3 / (time.perf_counter() - t0)
    del a
    model = build_transformer(FLUX_DEV, device=dev, dtype=torch.bfloat16, seed=0)
    model.enable_gradient_checkpointing()
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=target_modules("all_linear", 19, 38)))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    for size in sizes:
        h = w = size // 16
        tokens = h * w
        x = torch.randn(1, tokens, 64, device=dev, dtype=torch.bfloat16)
        ctx = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
        kw = dict(encoder_hidden_states=ctx, pooled_projections=torch.randn(1, 768, device=dev, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
                  guidance=torch.tensor([1.0], device=dev, dtype=torch.bfloat16),
                  img_ids=image_ids(2 * h, 2 * w, device=dev), txt_ids=text_ids(512, device=dev), return_dict=False)
        torch.cuda.reset_peak_memory_stats()
        for i in range(8):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = model(hidden_states=x, **kw)[0]
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / 5
        # 2 * params * tokens (fwd) x 4 (fwd + recompute + 2x bwd) -- attention FLOPs added separately
        seq = tokens + 512
        flops = 4 * (2 * n_params * seq) + 4 * (4 * seq * seq * 3072 * 57)
        print(f"(c) {size}^2: {s:.3f} s/step, peak VRAM {torch.cuda.max_memory_allocated() / 1e9:.1f} GB, "
              f"{flops / s / 1e12:.0f} TFLOP/s = {flops / s / peak:.2f} of bf16 matmul ({peak / 1e12:.0f} TFLOP/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="run (c) (needs CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="dev2pro-bench-"))
    try:
        overhead(args.steps, work)
        if not args.skip_memory:
            memory(work)
        if args.gpu:
            gpu()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
