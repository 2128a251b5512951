"""The plan's activation units, measured (``activations.measure_saved_bytes``) with this machine's real kernels.

On a GPU this checks what the CPU test can only emulate: that the q/k RMSNorm and attention kernels keep what
``Family.activation_units`` says. One 1+1-block model per family at the real head dim and FLUX.1's width, bf16,
LoRA rank 16 on every Linear, 1024^2 tokens (4096 image + 512 text); prints measured units (bytes / (tokens x
hidden x 2)) beside the family's constants, minus the rank-wide LoRA hiddens the plan adds on top, and the ratio
plan / measured; ``--out DIR`` also writes ``activations.json``. ``--tiny``: a narrow model and few tokens (CPU smoke).
On a CPU expect ~2 units more than the plan per block (4 in FLUX.2's single block, whose q/k are views of one fused
projection): PyTorch's composite RMSNorm keeps an fp32 copy of q and k where CUDA's fused kernel keeps the bf16
input (the unit test emulates the CUDA kernel instead).

    python bench/activations.py            # on the lent GPU (bench/gpu_session.sh runs it)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dev2pro import activations as A  # noqa: E402
from dev2pro import plan as P  # noqa: E402
from dev2pro.families.flux2.spec import KLEIN_4B  # noqa: E402
from dev2pro.flux.spec import FluxSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, img, txt = (256, 64, 16) if a.tiny else (3072, 4096, 512)
    specs = {"flux1": FluxSpec(hidden=hidden, num_heads=hidden // 128, num_double=1, num_single=1),
             "flux2": KLEIN_4B.with_(hidden=hidden, num_heads=hidden // 128, num_double=1, num_single=1)}
    rows = []
    for fam, spec in specs.items():
        for mode in ("compute", "fp32"):
            got = A.measure_saved_bytes(spec, mode, img, txt, device=device)
            inp = P.PlanInputs(spec, "bf16", lora_dtype=mode, rank=16, image_tokens=(img,), text_tokens=txt)
            planned = A.block_saved_bytes(inp, P.lora_layers(P._meta_model(spec), inp), img)
            unit = (img + txt) * spec.hidden * 2
            for kind, pos in (("double", 0), ("single", 1)):
                rows.append({"family": fam, "lora": mode, "block": kind, "measured_units": got[kind] / unit,
                             "planned_units": planned[pos] / unit, "plan_over_measured": planned[pos] / got[kind]})
                r = rows[-1]
                print(f"{fam} {mode:7s} {kind:6s}: measured {r['measured_units']:.2f} units, plan "
                      f"{r['planned_units']:.2f} ({r['plan_over_measured']:.3f}x)", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "hidden": hidden, "image_tokens": img, "text_tokens": txt}
        (Path(a.out) / "activations.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
