"""`dev2pro demo`: the Dev2Pro workflow end to end on the built-in tiny model family, on CPU, in about a minute.

This is the smoke path every part of the toolkit runs through (it is not yet the measured pro -> dev -> dev2pro
experiment; that needs trained toy bases):
  1. init-tiny: a tiny FLUX.1-dev-layout folder (the "dev" base, guidance embedding present);
  2. convert: the base to a ComfyUI-layout scaled-fp8 single file -- the form users train from (here the tiny dev
     transformer stands in for a de-distilled dev2pro file);
  3. train: a LoRA on the fp8 file (fp8 storage) at guidance 1.0 on real photos (scikit-image's data folder), with
     samples rendered on the *dev* base at guidance 3.5 (`model.inference_base`), kohya + diffusers files out;
  4. inspect the files and write a summary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..outputs import write_json

DEMO_IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "motorcycle_left.png")


def _images(dst: Path) -> Path:
    try:
        import skimage
    except ImportError:
        raise UserError("the demo uses photos shipped with scikit-image: pip install scikit-image") from None
    src = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in DEMO_IMAGES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    (dst / "astronaut.txt").write_text("sks style, an astronaut in a white suit")
    return dst


def run_demo(out: str = "demo-out", quick: bool = False, overwrite: bool = False) -> dict:
    from ..flux.checkpoint import convert, describe, open_checkpoint
    from ..flux.tiny import write_tiny_model
    from .train_lora import load_train_config, quiet_libraries, train

    quiet_libraries()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"{root} exists; pass --overwrite to replace it or --out to pick another folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("[1/4] tiny dev model folder")
    dev = write_tiny_model(root / "models" / "tiny-dev", variant="dev", seed=0)
    print("[2/4] dev2pro base: the dev transformer as a ComfyUI scaled-fp8 file (what users train from)")
    fp8 = convert(dev, root / "models" / "tiny-dev2pro-fp8.safetensors", layout="comfy", dtype="fp8-scaled")
    images = _images(root / "data")
    steps = 8 if quick else 40
    print(f"[3/4] LoRA on the fp8 base at guidance 1.0, {steps} steps; samples on dev at guidance 3.5")
    cfg = load_train_config(None, data={
        "model": {"path": str(dev), "transformer": str(fp8), "inference_base": str(dev), "dtype": "fp32",
                  "fp8_storage": True, "gradient_checkpointing": False, "t5_max_length": 128},
        "data": {"folders": [{"path": str(images)}], "default_caption": "sks style, a photo", "resolution": 64,
                 "bucket_step": 64},
        "lora": {"rank": 8, "alpha": 8},
        "train": {"steps": steps, "lr": 5e-3, "seed": 0},
        "sample": {"every": steps // 2, "prompts": ["sks style, an astronaut", "sks style, a cat"], "seeds": [0, 1],
                   "steps": 4, "width": 64, "height": 64},
        "save": {"output_dir": str(root / "lora-run"), "formats": ["kohya", "diffusers"]},
    })
    summary = train(cfg, progress=True)
    print("[4/4] inspect")
    info = describe(open_checkpoint(fp8))
    result = {
        "seconds": round(time.perf_counter() - t0, 1),
        "base": {"path": str(fp8), "layout": info["layout"], "fp8": info["fp8"], "variant": info["variant"]},
        "lora_files": summary["files"],
        "loss_first": summary["losses"][0], "loss_last": summary["losses"][-1],
        "samples": sorted(str(p) for p in (root / "lora-run" / "samples").glob("*.png")),
    }
    write_json(root / "summary.json", result)
    print(json.dumps(result, indent=2))
    return result


def add_demo_parser(sub):
    p = sub.add_parser("demo", help="run the Dev2Pro workflow end to end on the built-in tiny models (CPU)")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=lambda a: run_demo(a.out, a.quick, a.overwrite))
