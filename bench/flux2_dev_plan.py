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


def write_sparse_dev(folder: Path) -> Path:
    """A FLUX.2 dev diffusers folder whose transformer file has the real header and a hole for its 64 GB."""
    from dev2pro.families.flux2.spec import DEV, build_transformer

    header, offset = {}, 0
    for key, t in build_transformer(DEV, device="meta").state_dict().items():
        n = t.numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
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
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
