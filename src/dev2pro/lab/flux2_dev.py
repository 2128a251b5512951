"""The demo's toy world on FLUX.2 [dev]: a tiny ``Flux2Pipeline`` folder, its undistilled "pro" start, and sampling
of every arm -- FLUX.2 dev's pieces for ``lab/demo_families.py``.

FLUX.2 dev is guidance-distilled and BFL published no undistilled base, so the toy builds the whole line as the
FLUX.1 demo does: **pro** is a ``Flux2Transformer2DModel`` *without* guidance embedding (the architecture FLUX.2 calls
Base: true CFG) trained from scratch; **dev** is grown a guidance embedding and guidance-distilled from it
(``dedistill`` objective ``guidance_distill`` over a CFG range); **dev2pro** is de-distilled from dev. All share one
tiny dev folder: its Mistral3 text stack (hidden layers 10/20/30 stacked, BFL's system message in every prompt; token
embeddings scaled as klein's Qwen3 is, ``klein.write_model``), its VAE's batch-norm statistics and scheduler.

Reused from ``lab/klein.py`` through parameters, not copied: the 32-channel pixel codec in FLUX.2's stored latent
layout, shards and prompt files, the batched pipeline render (which gives dev its embedded guidance and pro true
CFG against the empty prompt). Samples files follow ``lab/arms``' format (one ``samples-<length>.npz`` per LoRA
length, one array per guidance under ``arms.sample_key``), so ``lab/report`` judges them as it judges FLUX.1's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..families.flux2.spec import TINY_DEV, VARIANT_METADATA_KEY
from . import klein
from .arms import sample_key
from .threads import one_thread

# 128 wide for 128-number tokens, as the klein toy (``demo_klein.KLEIN_SPEC``: at 64 the model cannot pass the
# noise of the codec's 116 unused token channels through and samples come out speckled).
DEV_SPEC = TINY_DEV.with_(hidden=128, num_heads=8)
TEXT_LEN = 40  # Mistral chat tokens: BFL's system message (~30 in the tiny BPE) + the longest caption (39 in all)
GUIDANCE = 4.0  # Flux2Pipeline's default guidance: what FLUX.2 dev is used at
PRO_INIT = "pro-init.safetensors"  # pro's random start: the folder's transformer without its guidance embedding


def write_model(models: Path, seed: int = 0) -> tuple[Path, str]:
    """``models/flux2-dev`` (a tiny ``Flux2Pipeline`` folder, Mistral3 embeddings scaled) and ``models/pro-init``
    (``write_pro_start``): (folder, pro start file). Reused when already written."""
    folder, pro = models / "flux2-dev", models / PRO_INIT
    if not (folder / "model_index.json").is_file():
        klein.write_model(folder, seed=seed, spec=DEV_SPEC, variant="dev")
    if not pro.is_file():
        write_pro_start(folder, pro)
    return folder, str(pro)


def write_pro_start(folder: Path, out: Path) -> Path:
    """The folder's transformer without its guidance embedding as a BFL-layout file recorded as undistilled
    (FLUX.2's "Base" variant: true CFG): the random start of pro, which has no guidance input to learn."""
    from safetensors.torch import save_file

    from ..families.flux2 import keys
    from ..flux.checkpoint import load_transformer
    from ..outputs import atomic_path

    model, _ = load_transformer(folder, dtype=torch.float32, guidance_embeds=False)
    bfl = keys.diffusers_to_bfl({k: v.contiguous() for k, v in model.state_dict().items()})
    with atomic_path(Path(out), overwrite=True, what="pro start file") as tmp:
        save_file(bfl, str(tmp), metadata={VARIANT_METADATA_KEY: "klein-base"})
    return Path(out)


def load_text_encoder(model_dir: Path) -> klein.TextEncoder:
    """Captions -> {"prompt_embeds" (B, TEXT_LEN, 96) bf16} through the folder's Mistral3 (hidden 10/20/30)."""
    return klein.load_text_encoder(model_dir, TEXT_LEN)


def write_shards(folder: Path, out: Path, encode_text: klein.TextEncoder) -> Path:
    return klein.write_shards(folder, out, encode_text, text_len=TEXT_LEN)


def prompt_embeds(prompts_file) -> tuple[torch.Tensor, None]:
    """(prompt_embeds (N, L, D), pooled) of a prompts file: FLUX.2 has no pooled vector."""
    return klein.load_prompts(prompts_file)["prompt_embeds"], None


def sample_arm(run: Path, target: str | Path, loras: Mapping[str, str | Path | None], prompts_file,
               model_dir, *, seed: int, per_class: int, steps: int, guidances: Sequence[float],
               size: int = klein.SIZE) -> dict[str, str]:
    """``lab.arms.sample_arm``'s contract on FLUX.2: ``target`` with each LoRA of ``loras`` (length -> file, None =
    bare) at each guidance -- embedded on dev (``Flux2Pipeline``), true CFG on pro (``Flux2KleinPipeline``, not
    distilled). Same prompts and noise seeds for every arm of a seed; finished files are reused."""
    embeds, seeds, empty = klein.eval_batch(prompts_file, seed, per_class)
    files = {}
    for length, lora in loras.items():
        out = Path(run) / f"samples-{length}.npz"
        if not out.is_file():
            pipe, stats = klein.load_klein(target, lora, model_dir, distilled=False)
            arrays = {}
            for g in guidances:
                with one_thread():
                    lat = klein.render(pipe, embeds, seeds, steps=steps, cfg=float(g), negative=empty)
                arrays[sample_key(g)] = klein.decode(klein.to_stored(lat, stats))
            klein.save_samples(out, arrays)
        files[length] = str(out)
    return files
