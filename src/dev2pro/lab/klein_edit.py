"""Edit pairs on the klein toy world: pair folders, an edit LoRA through `dev2pro train`, sampling with references.

A pair is (before = a digit ``plain``, after = the same digit ``styled``), the after image captioned with the edit
instruction only (``INSTRUCTION``): no digit word, so the digit of an edit can only come from its reference.
Images and references are 64x64 PNGs of 8x8 blocks (``dataset.write_folder``), encoded by the pixel codec
(``klein.pixel_codec_vae``: the training cache through ``klein.codec_vae_loaded``, the pipeline's ``image=``
through ``klein.load_klein``'s VAE), so both sides see the stored latents the text-to-image demo's shards hold.

Samples files hold decoded RGB (N, 8, 8, 3) in the order of the seed's evaluation references (``eval_refs``);
every arm of a seed uses the same references and noise seeds, so arms compare image by image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.cache import LATENT_NAME, load_cached
from . import klein
from .cost import done_line
from .dataset import write_folder
from .world import TRIGGER, World, few_shot, plain, styled, to_pil

INSTRUCTION = TRIGGER  # every pair's caption: the edit, not its content
REF_SEED = 7_000  # evaluation references of LoRA seed s: drawn with rng(REF_SEED + s) from the holdout split


def write_pairs(root: Path, world: World, per_class: int, seed: int) -> tuple[Path, Path]:
    """``per_class`` train digits per class (``few_shot``, seed ``seed``) as pair folders under ``root``: after/
    (styled, captioned ``INSTRUCTION``) and before/ (plain, the same names). Written once, atomically (``root``
    appears complete or not at all); (after, before)."""
    from ..outputs import atomic_path

    if not root.is_dir():
        images, labels = few_shot(world, per_class, seed=seed)
        with atomic_path(root, folder=True) as tmp:
            write_folder(tmp / "before", images, labels, lambda y: "", plain)
            for f in (tmp / "before").glob("*.txt"):  # a reference has no caption
                f.unlink()
            write_folder(tmp / "after", images, labels, lambda y: INSTRUCTION, styled)
    return root / "after", root / "before"


def eval_refs(world: World, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` held-out digits per class (class-major), drawn by ``seed``: (images (N, 8, 8), labels (N,))."""
    rng = np.random.default_rng(REF_SEED + seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(world.holdout_labels == c), per_class, replace=False)
                          for c in range(10)])
    return world.holdout_images[idx], world.holdout_labels[idx]


def train_config(job: dict) -> dict:
    """`dev2pro train`'s config of one LoRA job: edit pairs (``job["controls"]`` set) or text-to-image on the same
    after images, cached through the codec into the run's cache."""
    folder = {"path": job["images"], **({"controls": job["controls"]} if job.get("controls") else {})}
    return {
        "model": {"path": job["model_dir"], "transformer": job["base"], "dtype": "fp32",
                  "gradient_checkpointing": False, "t5_max_length": klein.TEXT_LEN},
        "data": {"folders": [folder], "resolution": klein.SIZE, "bucket_step": klein.SIZE,
                 "cache_dir": str(Path(job["run"]) / "cache"), "batch_size": job["lora_batch"]},
        "lora": {"rank": job["rank"], "alpha": job["rank"]},
        "train": {"steps": job["steps"], "lr": job["lr"], "seed": job["seed"], "warmup_steps": 5},
        "save": {"output_dir": str(job["run"]), "formats": ["diffusers"], "overwrite": True},
        "log_every": 50,
    }


def check_codec_cache(cache_dir: Path, images: Path) -> None:
    """The run cached codec latents (not the random folder VAE's): one cached file's latents are ``klein.encode``
    of one of the images. A guard: were `train` ever to load its VAE elsewhere, the demo stops here instead of
    measuring LoRAs trained on noise."""
    from PIL import Image

    files = sorted((Path(cache_dir) / "latents").glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no cached latents in {cache_dir}")
    got = load_cached(files[0])[LATENT_NAME]
    for png in sorted(Path(images).glob("*.png")):
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB").resize((8, 8), Image.BOX), dtype=np.float32) / 255.0
        if torch.allclose(klein.encode(rgb[None])[0], got, atol=1e-4):
            return
    raise RuntimeError(f"{files[0]} holds no codec latent of {images}: `train` did not encode with the pixel codec")


@torch.no_grad()
def sample_edits(target: str | Path, lora: str | Path | None, references: np.ndarray, prompts_file, model_dir, *,
                 seeds: Sequence[int], steps: int, cfg: float, distilled: bool = False) -> np.ndarray:
    """``target`` (+ ``lora`` at 1.0) sampled on the prompts file's first prompt once per reference
    (``references`` (N, 8, 8) plain digits, or None: no reference) with noise seed ``seeds[i]``: decoded RGB
    (N, 8, 8, 3). One pipeline call per image: the pipeline shares its ``image`` across a call's batch."""
    pipe, stats = klein.load_klein(target, lora, model_dir, distilled)
    prompts = klein.load_prompts(prompts_file)
    embeds, empty = prompts["prompt_embeds"][:1], prompts["empty_embeds"]
    out = []
    for i, seed in enumerate(seeds):
        image = None if references is None else [to_pil(plain(references[i:i + 1])[0], scale=klein.SIZE // 8)]
        out.append(klein.render(pipe, embeds, [seed], steps=steps, cfg=cfg, negative=empty, image=image))
    return klein.decode(klein.to_stored(torch.cat(out), stats))


# ------------------------------------------------------------------------------------------------ judges
ARMS = {"E": "edit LoRA (`dev2pro train` on the pairs, `controls`), sampled with the reference",
        "T": "text-to-image LoRA on the same after images (no references), sampled without one",
        "B": "Base with the reference, no LoRA"}
TARGET = "target"  # styled(reference) itself: what a perfect edit draws, i.e. the judges' ceiling
COPY = "copy"  # the reference itself: what a model that copies it unchanged would score
REFERENCE_ROWS = {TARGET: "styled(reference): a perfect edit, judged the same way",
                  COPY: "the reference unchanged: a copy without the edit"}
# metric -> (label, direction: +1 higher is better, -1 lower)
METRICS = {"digits": ("digit agreement", +1), "style": ("style fidelity", +1), "pix": ("pixel RMS to target", -1)}
CHANCE = 0.1


def image_scores(judges, rgb: np.ndarray, refs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: ``digits`` 1 where the digit judge reads the reference's label (it reads plain digits too: the
    ``COPY`` row); ``style`` 1 where the style judge calls it in style; ``pix`` the RMS distance to
    ``styled(reference)``."""
    from .judges import digit_accuracy, style_fidelity

    rgb = np.asarray(rgb, dtype=np.float32)
    one = [slice(i, i + 1) for i in range(len(rgb))]
    return {"digits": np.array([digit_accuracy(judges, rgb[s], labels[s]) for s in one]),
            "style": np.array([style_fidelity(judges, rgb[s]) for s in one]),
            "pix": np.sqrt(np.mean((rgb - styled(refs)) ** 2, axis=(1, 2, 3)))}


def _summary(per_seed: list[dict[str, np.ndarray]]) -> dict:
    """{metric: mean_ci over seeds of the per-seed means (``values``), plus ``images``: mean_ci over every image}."""
    from .judges import mean_ci

    out = {}
    for m in METRICS:
        values = [float(s[m].mean()) for s in per_seed]
        out[m] = {**mean_ci(values), "values": values, "images": mean_ci(np.concatenate([s[m] for s in per_seed]))}
    return out


def _paired(x: list[dict], y: list[dict]) -> dict:
    """x - y per metric: ``images`` (every image against its twin: same reference and noise seed) and ``seeds``
    (per-seed means; None with one seed), each a mean_ci; ``clear``: the direction-signed claim (+1 x better, -1
    worse, 0 within noise) of the image-level interval, and of the seed-level one where it exists."""
    from .judges import mean_ci

    out = {}
    for m, (_, direction) in METRICS.items():
        images = mean_ci(np.concatenate([a[m] - b[m] for a, b in zip(x, y)]))
        seeds = mean_ci([float(a[m].mean() - b[m].mean()) for a, b in zip(x, y)]) if len(x) > 1 else None

        def claim(d):
            if d is None or not np.isfinite(d["half"]):
                return None
            return direction * (1 if d["lo"] > 0 else -1 if d["hi"] < 0 else 0)
        out[m] = {"images": images, "seeds": seeds, "clear_images": claim(images), "clear_seeds": claim(seeds)}
    return out


def evaluate(results: list[dict], judges, world: World, *, seeds: int, per_class: int) -> dict:
    """Every arm's per-image scores on its seed's evaluation references -> the table: rows (arms and the target),
    paired E - T and E - B, and the verdict."""
    scores: dict[str, list] = {a: [] for a in (*ARMS, *REFERENCE_ROWS)}
    by = {(r["arm"], r["seed"]): r for r in results}
    for s in range(seeds):
        refs, labels = eval_refs(world, per_class, s)
        for a in ARMS:
            scores[a].append(image_scores(judges, klein.load_samples(by[(a, s)]["samples"])["edits"], refs, labels))
        scores[TARGET].append(image_scores(judges, styled(refs), refs, labels))
        scores[COPY].append(image_scores(judges, plain(refs), refs, labels))
    table = {"rows": {a: _summary(v) for a, v in scores.items()},
             "paired": {f"E-{b}": _paired(scores["E"], scores[b]) for b in ("T", "B")},
             "images_per_seed": 10 * per_class, "seeds": seeds, "chance": CHANCE}
    table["verdict"] = verdict(table)
    return table


def _ci(d: dict | None, digits: int = 2) -> str:
    if d is None:
        return "—"
    return f"{d['mean']:.{digits}f}" + (f" [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]" if np.isfinite(d["half"])
                                        else "")


def verdict(table: dict) -> str:
    """The verdict in numbers, from the table: does E's output carry its reference's digit beyond T (no reference:
    the digit is unknowable) and chance, and is that the LoRA's doing, beyond B (the reference without it)?"""
    rows, paired = table["rows"], table["paired"]
    e = rows["E"]["digits"]["images"]
    words = []
    for b in ("T", "B"):
        p = paired[f"E-{b}"]["digits"]
        said = {1: "above", -1: "below", 0: "not clearly different from", None: "no interval for"}[p["clear_images"]]
        seeds = p["seeds"]
        words.append(f"{said} {b}'s {_ci(rows[b]['digits']['images'])} (E − {b} per image {_ci(p['images'])}"
                     + (f", per seed {_ci(seeds)}" if seeds else "") + ")")
    uses = paired["E-T"]["digits"]["clear_images"] == 1 and e["lo"] > CHANCE
    head = "The edit LoRA uses its reference" if uses else "No clear evidence that the edit LoRA uses its reference"
    if uses:
        head += (", which the Base alone does not" if paired["E-B"]["digits"]["clear_images"] == 1 else
                 " (but the Base alone is not clearly worse at it)")
    n = table["images_per_seed"] * table["seeds"]
    return (f"{head}: on {n} held-out references E's output shows the reference's digit in {_ci(e)} of the images "
            f"(chance {CHANCE:.2f}; a perfect edit, judged the same way: {_ci(rows[TARGET]['digits']['images'])}), "
            + "; ".join(words) + f". E's style fidelity {_ci(rows['E']['style']['images'])}.")


# ------------------------------------------------------------------------------------------------ report
def _arm_rows(table: dict) -> list[str]:
    lines = ["| arm | " + " | ".join(label for label, _ in METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for a, desc in (*ARMS.items(), *REFERENCE_ROWS.items()):
        cells = [_ci(table["rows"][a][m]["images"]) for m in METRICS]
        lines.append(f"| **{a}** {desc} | " + " | ".join(cells) + " |")
    return lines


def _paired_rows(table: dict) -> list[str]:
    lines = ["| pair | interval over | " + " | ".join(label for label, _ in METRICS.values()) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for pair, p in table["paired"].items():
        for level in ("images", "seeds"):
            cells = [_ci(p[m][level]) + (" *" if p[m][f"clear_{level}"] else "") for m in METRICS]
            lines.append(f"| {pair.replace('-', ' − ')} | {level} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    """report.md: the question, the setup, the verdict, the arms, the paired differences, losses, caveats."""
    t, p = summary["table"], summary["settings"]
    n = t["images_per_seed"]
    lines = ["# dev2pro demo: FLUX.2 [klein] edit pairs", "",
             "Does an edit LoRA trained by `dev2pro train` on (before, after) pairs (`[[data.folders]] controls`) "
             "learn to use its reference image?", "",
             f"**World.** Pairs: before = a digit white on black, after = the same digit in the orange-on-blue "
             f"\"sks style\"; {p['per_class']} pairs per digit per seed, every pair captioned \"{INSTRUCTION}\" only, "
             "so the digit of an edit can only come from its reference. **Base**: the tiny klein transformer (128 "
             f"wide) trained from scratch by `dedistill` on the text-to-image world ({p['base_steps']} steps); it "
             f"never saw a reference. **LoRAs**: `dev2pro train`, rank {p['rank']}, lr {p['lr']:g}, "
             f"{p['lora_steps']} steps of batch {p['lora_batch']}, the same shots and seed for E and T. "
             f"**Sampling**: {p['sample_steps']} steps, true CFG {summary['cfg']:g}, the reference through "
             f"`Flux2KleinPipeline(image=[ref])`; {n} held-out references per seed ({p['eval_per_class']} per "
             f"digit, digits the LoRAs never saw), one noise seed each, the same for every arm; {t['seeds']} LoRA "
             "seed(s) (shots, LoRA init, noise and references change with the seed).", "",
             f"**Verdict.** {t['verdict']}", "",
             "## Arms (mean [95% interval] over every image)", "", *_arm_rows(t), "",
             "Digit agreement: the demo's digit judge (a linear classifier fitted on styled train digits) reads the "
             f"reference's label (chance {CHANCE:.2f}); it reads plain digits too (the copy row), so a low score is "
             "no palette artefact. Style fidelity: the style judge (near misses, plain digits among them, are its "
             "negatives). Pixel RMS to target: distance to styled(reference), pixels in [0, 1]. Per-seed means "
             "are in results.json.", "",
             "## Paired differences (E minus the other arm, image against image: same reference and noise)", "",
             *_paired_rows(t), "",
             "\\* the 95% interval excludes 0. Image-level intervals treat a seed's images as independent given its "
             "LoRA; the seed-level ones (needs 2+ seeds) are the conservative test.", "",
             "## Training (mean loss, first -> last 10% of steps)", ""]
    lines += [f"- {k}: {v['first']:.3f} -> {v['last']:.3f} ({v['steps']} steps)" for k, v in summary["stages"].items()]
    lines += ["", "## Samples (seed 0, one held-out reference per digit)", "",
              "![samples](grids/edits-seed0.png)", "",
              "Rows: the reference (before), the target (styled reference), E, T, B.", "",
              "## Caveats", "",
              "- A toy: 8x8 digits (16 image + 16 reference tokens), a 128-wide model trained from scratch, a fixed "
              "pixel codec in place of the VAE. The edit is a recolouring that keeps every pixel in place, the "
              "easiest edit there is: edits that move, add or reinterpret content are not measured.",
              "- The LoRA learning rate and steps were chosen while building the demo by looking at E on seed 0 "
              "(rank 8, 600 steps of 10: lr 2e-3 gave a digit agreement of 0.42, 5e-3 0.86, 1e-2 0.96 on a "
              "600-step Base); other seeds were not looked at. Shorter training learns less (the quick profile).",
              "- T cannot know the digit (its caption names none, it sees no reference): it is the floor of style "
              "without content. B shows what the untrained model does with a reference. Only Base is measured; an "
              "edit LoRA on the distilled model is not.", "",
              f"{done_line(summary, lead='Wall time')}; `{summary['command']}`."]
    return "\n".join(lines) + "\n"


def write_grid(path: Path, results: list[dict], world: World, per_class: int) -> Path:
    """Seed 0's first reference of each digit: rows reference, target, E, T, B (``world.grid``), each named on
    the left; written atomically."""
    from PIL import Image, ImageDraw

    from ..outputs import atomic_path
    from .world import grid

    refs, _ = eval_refs(world, per_class, 0)
    pick = np.arange(10) * per_class
    by = {(r["arm"], r["seed"]): r for r in results}
    rows = [plain(refs[pick]), styled(refs[pick])] + [klein.load_samples(by[(a, 0)]["samples"])["edits"][pick]
                                                      for a in ARMS]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True, folder=False) as tmp:
        body = grid(np.concatenate(rows), rows=len(rows), cols=10, scale=6)
        canvas = Image.new("RGB", (body.width + 56, body.height), (128, 128, 128))
        canvas.paste(body, (56, 0))
        draw, h = ImageDraw.Draw(canvas), body.height / len(rows)
        for i, name in enumerate(("before", TARGET, *ARMS)):
            draw.text((4, int(i * h + h / 2 - 6)), name, fill=(255, 255, 255))
        canvas.save(tmp, format="PNG")
    return path
