"""`python bench/klein_plan.py`: the README's FLUX.2 [klein] ``--vram`` table, produced by `dev2pro plan` (its
``run_plan``) on `configs/train-klein.toml` for 8-48 GB cards and both sizes -- without the checkpoints.

Base and distilled transformers are *sparse* safetensors files (``flux2_dev_plan.write_sparse_dev``: real headers
of klein 4B / 9B, holes for the weights); the Qwen3 text encoders are absent, so the plan uses their published
parameter counts. Each row is the shipped config with ``model.vram`` = the card (the computed preset), once as
shipped -- samples on the distilled model, which joins Base on the card while sampling -- and once without
``model.inference_base``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARDS = (8, 12, 16, 24, 48)


def row(config: Path, card: int, sets: list[str]) -> str:
    """The preset's choices and the plan's verdict for one card."""
    from dev2pro.recipes.plan import run_plan
    from dev2pro.schemas import load_train_config

    with contextlib.redirect_stdout(io.StringIO()):
        m = load_train_config(config, sets + [f"model.vram={card}"]).model
        r = run_plan(str(config), card, sets + [f"model.vram={card}"])
    swap = f", swap {m.blocks_to_swap}" if m.blocks_to_swap else ""
    tiles = ", VAE tiles" if m.vae_tiling else ""
    return (f"{'fp8' if m.fp8_storage else 'bf16'}{swap}, Qwen3 {m.text_encoder.upper()} {m.text_encoder_dtype}"
            f"{tiles}: {r['peak_gb'] + 0.8:.1f} GB{'' if r['fits'] else ' (does not fit)'}")


def main() -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from flux2_dev_plan import write_sparse_dev

    from dev2pro.families.flux2.spec import KLEIN_4B, KLEIN_9B

    config = ROOT / "configs" / "train-klein.toml"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        models = {}
        for size, spec in (("4B", KLEIN_4B), ("9B", KLEIN_9B)):
            for kind, distilled in (("base", False), ("distilled", True)):
                folder = Path(tmp) / f"klein-{size}-{kind}"
                write_sparse_dev(folder, spec, {"_class_name": "Flux2KleinPipeline", "is_distilled": distilled})
                models[size, kind] = folder
        print("| card | klein 4B, samples on distilled 4B (as shipped) | klein 4B, samples on Base | "
              "klein 9B, samples on distilled 9B | klein 9B, samples on Base |")
        print("|---|---|---|---|---|")
        for card in CARDS:
            cells = []
            for size in ("4B", "9B"):
                sets = [f'model.path="{models[size, "base"]}"', f'data.folders=[{{path="{data}"}}]']
                shipped = sets + [f'model.inference_base="{models[size, "distilled"] / "transformer"}"']
                cells += [row(config, card, shipped), row(config, card, sets + ['model.inference_base=""'])]
            print(f"| {card} GB | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
