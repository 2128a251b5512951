"""`python bench/flux2_dev_plan.py`: the README's FLUX.2 [dev] plan table, produced by `dev2pro plan` (its
``run_plan``) on the two shipped configs for 24, 32, 48 and 80 GB cards -- without the 64 GB checkpoint.

The transformer is a *sparse* safetensors file: a real header with FLUX.2 dev's shapes (32.2B parameters, bf16) and
no data on disk (the plan reads headers only). The Mistral text encoder is not there either, so the plan uses its
published parameter count (``plan.FLUX2_TEXT_PARAMS``). LoRA rows: `configs/train-flux2-dev.toml` with
``model.vram`` = the card (the computed preset). Adapter de-distillation rows: `configs/dedistill-flux2-dev.toml`
with the fewest ``model.blocks_to_swap`` (steps of 4) that fit the card, for both objectives; the text encoder goes
to the CPU where caching would not fit.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARDS = (24, 32, 48, 80)


def write_sparse_dev(folder: Path, spec=None, index: dict | None = None) -> Path:
    """A FLUX.2 diffusers folder (dev unless ``spec`` / ``index`` say otherwise, e.g. a klein's
    ``{"_class_name": "Flux2KleinPipeline", "is_distilled": false}``) whose transformer file has the real header
    and a hole for its weights."""
    from dev2pro.families.flux2.spec import DEV, build_transformer

    header, offset = {}, 0
    for key, t in build_transformer(spec or DEV, device="meta").state_dict().items():
        n = t.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index or {"_class_name": "Flux2Pipeline"}))
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no bytes written
    return path


def plan(config: Path, card: int, overrides: list[str]) -> dict:
    from dev2pro.recipes.plan import run_plan

    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = run_plan(str(config), card, overrides)
    return {**result, "text": out.getvalue()}


def lora_rows(model: Path, data: Path) -> list[str]:
    rows = []
    for gb in CARDS:
        sets = [f'model.path="{model}"', 'model.adapter=""', f"model.vram={gb}", f'data.folders=[{{path="{data}"}}]']
        with contextlib.redirect_stdout(io.StringIO()) as said:
            from dev2pro.schemas import load_train_config

            cfg = load_train_config(ROOT / "configs" / "train-flux2-dev.toml", sets)
        r = plan(ROOT / "configs" / "train-flux2-dev.toml", gb, sets)
        m = cfg.model
        rows.append(f"| {gb} GB | LoRA r16 | {'fp8' if m.fp8_storage else 'bf16'} | {m.blocks_to_swap} | "
                    f"{m.text_encoder} {m.text_encoder_dtype} | {r['peak_gb'] + 0.8:.1f} | "
                    f"{r['host_ram_gb']:.1f} | {'yes' if r['fits'] else 'no'} |")
        del said
    return rows


def dedistill_rows(model: Path, data: Path, objective: str) -> list[str]:
    rows = []
    for gb in CARDS:
        base = [f'model.path="{model}"', f'objective="{objective}"', f'data.folders=[{{path="{data}"}}]']
        for swap in range(0, 57, 4):
            te = [] if gb >= 32 else ['model.text_encoder="cpu"']
            r = plan(ROOT / "configs" / "dedistill-flux2-dev.toml", gb, base + te + [f"model.blocks_to_swap={swap}"])
            if r["fits"]:
                break
        te_text = "cpu fp8" if gb < 32 else "gpu fp8"
        rows.append(f"| {gb} GB | adapter r32, {objective} | fp8 | {swap} | {te_text} | {r['peak_gb'] + 0.8:.1f} | "
                    f"{r['host_ram_gb']:.1f} | {'yes' if r['fits'] else 'no'} |")
    return rows


ACHIEVED_TFLOPS = 600  # bf16 on one H100, the low end of FLUX.1's 600-790 figure ("Measured", "Will it fit")
IMG, TXT = 4096, 512  # 1024^2 image tokens, Mistral tokens


def forward_tflop() -> float:
    """Matmul + attention FLOPs of one FLUX.2 dev forward at 1024^2, batch 1, from the module shapes: each Linear
    costs 2 x in x out per token it sees (image stream, text stream, both in single blocks, one per sample for the
    modulations and embedders of the timestep and guidance); attention 4 x tokens^2 x hidden per block."""
    import torch

    from dev2pro.families.flux2.spec import DEV, build_transformer

    model, flops = build_transformer(DEV, device="meta"), 0
    txt_parts = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "context_embedder")
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.startswith("single_transformer_blocks."):
            tokens = IMG + TXT
        elif any(k in name for k in txt_parts):
            tokens = TXT
        elif "modulation" in name or "time_guidance_embed" in name or name.startswith("norm_out"):
            tokens = 1
        else:
            tokens = IMG
        flops += 2 * m.in_features * m.out_features * tokens
    flops += (DEV.num_double + DEV.num_single) * 4 * (IMG + TXT) ** 2 * DEV.hidden
    return flops / 1e12


def cost_rows() -> list[str]:
    """Hours per 100k images (batch 1, 1024^2) at the planned step time. Forwards per image: a frozen base needs
    no weight gradients, so a checkpointed LoRA/adapter step is forward + recompute + input-gradient backward ~ 3
    forwards; a full fine-tune adds the weight gradients ~ 4. cfg_teacher: the teacher's forward + the student's
    step at a double batch (caption + empty prompt)."""
    f = forward_tflop()
    rows = []
    for what, forwards, gpus in (("adapter r32, flow", 3, 1), ("adapter r32, cfg_teacher", 1 + 2 * 3, 1),
                                 ("full fine-tune, flow", 4, 16), ("full fine-tune, cfg_teacher", 1 + 2 * 4, 32)):
        seconds = forwards * f / ACHIEVED_TFLOPS / gpus  # wall seconds per image on `gpus` GPUs
        rows.append(f"| {what} | {gpus} | {forwards * f / 1000:.2f} PFLOP | {seconds:.2f} s | "
                    f"{1e5 * seconds / 3600:.0f} h | {1e5 * seconds * gpus / 3600:.0f} |")
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model, data = Path(tmp) / "FLUX.2-dev", Path(tmp) / "data"
        data.mkdir()
        write_sparse_dev(model)
        print("| card | run | base | blocks_to_swap | text encoder (caching) | peak GPU GB (+0.8 context) | "
              "host RAM GB | fits |")
        print("|---|---|---|---|---|---|---|---|")
        for line in lora_rows(model, data) + dedistill_rows(model, data, "flow") + \
                dedistill_rows(model, data, "cfg_teacher"):
            print(line)
    print(f"\none forward at 1024^2: {forward_tflop():.0f} TFLOP; planned at {ACHIEVED_TFLOPS} TFLOP/s per GPU")
    print("| run | GPUs | per image | wall per image | hours per 100k images | GPU-hours |")
    print("|---|---|---|---|---|---|")
    for line in cost_rows():
        print(line)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
