"""`dev2pro demo --family flux2-klein`: "train on Base, use on the distilled model", measured on FLUX.2 [klein]
architecture toy models on a CPU (issue 19, step 4).

BFL ships FLUX.2 [klein] twice: an undistilled Base (true CFG, ~50 steps) "for LoRA training" and a distilled model
for use (4 steps, no CFG, no guidance embedding). Users ask whether a Base-trained LoRA works on the distilled model
and at what strength (reports say 1.5-2.0). The demo rebuilds the question small, with the recipes users run:

  world      the FLUX.1 demo's world (``lab/world.py``: 8x8 digits, the orange-on-blue "sks style" concept, 5 shots
             per digit), captions through the tiny klein folder's Qwen3 text stack (its token embeddings scaled so
             the prompt survives 9 random layers: ``lab.klein.write_model``), images through a fixed 32-channel
             pixel codec in FLUX.2's stored latent layout (``lab/klein.py``).
  Base       ``Flux2Transformer2DModel`` (tiny klein, 128 wide: 2 double + 4 single blocks, no guidance embedding) from
             scratch by `dedistill` (objective flow, 10% caption dropout): a real CFG model.
  distilled  `dedistill` objective ``guidance_distill`` with ``w_min == w_max == CFG``: the student answers Base's CFG
             output at that one scale in a single forward, with no guidance embedding (klein's distilled form). It is
             guidance-distilled ONLY, not step-distilled: it is sampled like klein distilled (``DISTILLED_STEPS``
             steps, no CFG) but its few-step quality is whatever flow matching on this toy world gives.
  arms       `dev2pro train` LoRAs, same shots, steps and seed per arm: **B** on Base, applied to the distilled model
             at ``STRENGTHS`` (B->D) and sampled on Base with true CFG (B->B, the oracle); **D** on the distilled
             model, sampled on it (D->D). `calibrate`'s measurement (``strength.effect`` / ``strength.calibrate``)
             recommends, per seed, the strength at which B's effect on the distilled model equals its effect at 1.0
             on Base; B->D is sampled at it too.
  judges     ``lab/judges`` (style fidelity, digit accuracy, Frechet distances) and ``lab/report``'s paired tests.

Bases are trained once per run; each LoRA seed changes the few-shot subset, the LoRA init and noise, and the
sampling seeds. LoRA jobs run in single-threaded worker processes; finished stages are reused on resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..families.flux2.spec import TINY_KLEIN
from ..lab import arms as lab_arms
from ..lab import dataset, klein, report
from ..lab import klein_report as kr
from ..lab.cost import StageClock, done_line
from ..lab.judges import fit_judges
from ..lab.resume import finished_stage, pick_profile, prepare_run_folder
from ..lab.world import load_digits_world
from ..noise import quiet_libraries
from ..outputs import write_json
from ..schemas import load_train_config
from .demo import dedistill_stage
from .train_lora import train


@dataclass(frozen=True)
class Profile:
    base_steps: int
    distill_steps: int
    lora_steps: int
    seeds: int
    eval_per_class: int  # samples per digit class and arm
    base_sample_steps: int  # Base (and the oracle) with true CFG
    calibrate_seeds: int = 2  # noise seeds per prompt for `calibrate`'s effect
    batch: int = 32
    lora_batch: int = 10
    per_class: int = 5  # few-shot concept images per digit class


PROFILES = {
    "quick": Profile(base_steps=150, distill_steps=60, lora_steps=40, seeds=3, eval_per_class=3,
                     base_sample_steps=8, calibrate_seeds=1),  # every path, little learning
    "default": Profile(base_steps=600, distill_steps=200, lora_steps=120, seeds=5, eval_per_class=6,
                       base_sample_steps=12),
    "full": Profile(base_steps=4000, distill_steps=2000, lora_steps=400, seeds=8, eval_per_class=20,
                    base_sample_steps=24),
}
# The tiny klein transformer, 128 wide (TINY_KLEIN is 64). A token is a 2x2 patch of 32 channels = 128 numbers, of
# which the codec's 3-dimensional colour space fills 12; in the other 116 the flow target is the noise itself
# (x_t / sigma), which the model must pass through. At width 64 it cannot (128 -> 64 -> 128): the Base's loss stalled
# at ~0.6 and its samples came out speckled (every LoRA arm, the oracle included, judged out of style); at 128 the
# same 400 steps reach ~0.13 with a quarter of the speckle. (FLUX.1's toy is 64 wide for 64-number tokens.)
KLEIN_SPEC = TINY_KLEIN.with_(hidden=128, num_heads=8)
CFG = 3.5  # Base's true-CFG scale, and the one scale the distilled model answers
DISTILLED_STEPS = 4  # klein distilled's own step count, no CFG
STRENGTHS = (1.0, 1.25, 1.5, 2.0)  # B's LoRA on the distilled model
CALIBRATE_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


# ------------------------------------------------------------------------------------------------ stages
def data_stage(root: Path, world, seeds: int, per_class: int) -> tuple[Path, Path, dict, Path]:
    """The tiny klein folder, image folders -> shards (base world, one concept set per seed; ``seeds`` 0: none),
    eval prompts. Reused when written (also by `demo --family flux2-klein-edit`)."""
    model_dir = root / "models" / "klein"
    if not (model_dir / "model_index.json").is_file():
        klein.write_model(model_dir, seed=0, spec=KLEIN_SPEC)
    base_shards, concept_shards, prompts = dataset.write_world(root, world, seeds, per_class,
                                                               klein.load_text_encoder(model_dir),
                                                               klein.write_shards, klein.write_prompts)
    return model_dir, base_shards, concept_shards, prompts


def base_stage(root: Path, model_dir: Path, base_shards: Path, steps: int, batch: int, progress: bool) -> dict:
    """Base: flow matching from scratch, 10% caption dropout (a true-CFG model); a finished one is reused."""
    return dedistill_stage(root, "base", "flow", model_dir, base_shards, steps, 2e-3, 0, dropout=0.1, batch=batch,
                           progress=progress, text_len=klein.TEXT_LEN, teacher_w=(CFG, CFG))


def _calibrate(job: dict, lora: Path) -> dict:
    """`calibrate`'s measurement (``lab.klein.calibrate``: its library calls, batched renders) on this seed's B
    LoRA: its effect at 1.0 on Base with true CFG -> the strength with the same effect on the distilled model."""
    out = Path(job["run"]) / "calibration.json"
    if not out.is_file():
        r = klein.calibrate(job["base"], job["distilled"], lora, job["prompts"], job["model_dir"],
                            seeds=[job["seed"] * 100_000 + 50_000 + i for i in range(job["calibrate_seeds"])],
                            base_steps=job["base_sample_steps"], cfg=CFG, distilled_steps=DISTILLED_STEPS,
                            strengths=CALIBRATE_GRID)
        write_json(out, r)
    return json.loads(out.read_text())


def _job(job: dict) -> dict:
    """Worker: one (seed, arm): train its LoRA with `dev2pro train` (B on Base, D on the distilled model), calibrate
    B, sample; "ref" samples both models without a LoRA. Returns samples file names (decoded RGB, class-major)."""
    torch.set_num_threads(1)
    quiet_libraries()
    run = Path(job["run"])
    run.mkdir(parents=True, exist_ok=True)
    arm, result = job["arm"], {"arm": job["arm"], "seed": job["seed"], "samples": {}}
    common = dict(seed=job["seed"], per_class=job["eval_per_class"])
    lora = None
    if arm != "ref":
        summary = finished_stage(run)
        if summary is None:
            cfg = load_train_config(None, data={
                "model": {"path": job["model_dir"], "transformer": job["train_on"], "dtype": "fp32",
                          "gradient_checkpointing": False, "t5_max_length": klein.TEXT_LEN},
                "data": {"shards": job["shards"], "batch_size": job["lora_batch"]},
                "lora": {"rank": 8, "alpha": 8},
                "train": {"steps": job["steps"], "lr": 2e-3, "seed": job["seed"], "warmup_steps": 5},
                "save": {"output_dir": str(run), "formats": ["diffusers"], "overwrite": True},
                "log_every": 50,
            })
            summary = train(cfg, progress=False, quiet=True)
        result["losses"] = summary["losses"]
        lora = run / "lora.diffusers.safetensors"  # diffusers/PEFT names: what load_base reads for FLUX.2

    def sample(name: str, target: str, strengths, base: bool) -> None:
        f = run / f"samples-{name}.npz"
        if not f.is_file():
            arrays = klein.sample_model(target, lora, strengths, job["prompts"], job["model_dir"], **common,
                                        steps=job["base_sample_steps"] if base else DISTILLED_STEPS,
                                        cfg=CFG if base else 1.0, distilled=not base)
            klein.save_samples(f, arrays)
        result["samples"][name] = str(f)

    if arm == "ref":
        sample("distilled", job["distilled"], [None], base=False)
        sample("base", job["base"], [None], base=True)
    elif arm == "D":
        sample("distilled", job["distilled"], [1.0], base=False)
    else:  # B: the oracle on Base, the strength sweep on the distilled model, then the calibrated strength
        sample("base", job["base"], [1.0], base=True)
        sample("distilled", job["distilled"], list(STRENGTHS), base=False)
        cal = _calibrate(job, lora)
        result["calibration"] = {k: cal[k] for k in ("reference_effect", "points", "recommended_strength", "note")}
        s = cal["recommended_strength"]
        if s is not None:
            sample("calibrated", job["distilled"], [s], base=False)
    return result


def _jobs(root: Path, p: Profile, bases: dict, model_dir: Path, prompts: Path, concept_shards: dict) -> list[dict]:
    jobs = []
    for s in range(p.seeds):
        common = {"seed": s, "model_dir": str(model_dir), "prompts": str(prompts), "shards": str(concept_shards[s]),
                  "eval_per_class": p.eval_per_class, "base_sample_steps": p.base_sample_steps,
                  "calibrate_seeds": p.calibrate_seeds, "steps": p.lora_steps, "lora_batch": p.lora_batch,
                  "base": bases["base"]["file"], "distilled": bases["distilled"]["file"]}
        jobs.append({**common, "arm": "B", "run": str(root / "arms" / f"B-seed{s}"), "train_on": common["base"]})
        jobs.append({**common, "arm": "D", "run": str(root / "arms" / f"D-seed{s}"),
                     "train_on": common["distilled"]})
        jobs.append({**common, "arm": "ref", "run": str(root / "arms" / f"ref-seed{s}")})
    return jobs


# ------------------------------------------------------------------------------------------------ recipe
def run_demo_klein(out: str = "demo-klein-out", profile: str = "default", seeds: int | None = None,
                   overwrite: bool = False, progress: bool = True, workers: int = 2) -> dict:
    """World -> Base -> distilled -> LoRA arms x seeds (+ calibration) -> judges -> report.md/results.json."""
    p = pick_profile(PROFILES, profile, seeds)
    quiet_libraries()
    torch.set_num_threads(1)  # two threads on two busy cores are several times slower than one
    root = Path(out).resolve()
    resumed = prepare_run_folder(root, {"version": 1, "family": "flux2-klein", "profile": profile, **asdict(p)},
                                 overwrite)
    clock = StageClock()

    print("[1/5] data: scikit-learn digits -> image folders -> shards (klein's Qwen3 text, 32-channel pixel codec)")
    world = load_digits_world(seed=0)
    model_dir, base_shards, concept_shards, prompts = data_stage(root, world, p.seeds, p.per_class)
    clock.mark("data")

    print("[2/5] Base: flow matching from scratch, 10% caption dropout (a true-CFG model)")
    bases = {"base": base_stage(root, model_dir, base_shards, p.base_steps, p.batch, progress)}
    # guidance_distill at one scale: the student has no guidance embedding
    kw = dict(batch=p.batch, progress=progress, text_len=klein.TEXT_LEN, teacher_w=(CFG, CFG))
    print(f"[3/5] distilled: guidance-distilled from Base at CFG {CFG} (no guidance embedding; not step-distilled)")
    bases["distilled"] = dedistill_stage(root, "distilled", "guidance_distill", model_dir, base_shards,
                                         p.distill_steps, 1e-3, 1, start=bases["base"]["file"],
                                         teacher=bases["base"]["file"], **kw)
    clock.mark("bases")

    jobs = _jobs(root, p, bases, model_dir, prompts, concept_shards)
    print(f"[4/5] LoRA arms B (Base) and D (distilled) x {p.seeds} seeds via `dev2pro train`; B calibrated with "
          f"`calibrate` and applied to the distilled model at {', '.join(map(str, STRENGTHS))} and the calibrated "
          f"strength")
    results = lab_arms.run_jobs(_job, jobs, workers, progress, initializer=quiet_libraries)
    clock.mark("arms")

    print("[5/5] judges and report")
    table = kr.evaluate(results, fit_judges(world, seed=0), world, seeds=p.seeds, per_class=p.eval_per_class,
                        strengths=STRENGTHS)
    stages = report.stage_losses({n: b["losses"] for n, b in bases.items()}, results)
    clock.mark("report")
    summary = {"family": "flux2-klein", "profile": profile, "settings": asdict(p), "cfg": CFG,
               "distilled_steps": DISTILLED_STEPS, "strengths": list(STRENGTHS), "stages": stages, "table": table,
               "timings_seconds": clock.wall_seconds(("data", "bases", "arms")),
               "cpu_seconds": clock.cpu_summary(workers, parallel="arms"), "resumed": resumed,
               "command": f"dev2pro demo --family flux2-klein{'' if profile == 'default' else ' --' + profile}"
                          f"{'' if seeds is None else f' --seeds {seeds}'}"}
    write_json(root / "results.json", summary)
    kr.write_report(root, summary, results)
    print((root / "report.md").read_text())
    print(f"{done_line(summary, workers)}: {root / 'report.md'}, {root / 'results.json'}")
    return summary
