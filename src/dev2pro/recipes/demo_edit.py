"""`dev2pro demo --family flux2-klein-edit`: does an edit LoRA trained by `dev2pro train` on FLUX.2 edit pairs
(``[[data.folders]] controls``) learn to use its reference image? Measured on the klein toy world, on a CPU.

The mechanics (reference tokens at time coordinate 10, token for token what ``Flux2KleinPipeline(image=[ref])``
builds) are tested against diffusers elsewhere; this demo measures the *effect*:

  world   pairs from the demo's digits (``lab/world.py``): before = a digit ``plain``, after = the same digit
          ``styled``; every pair captioned "sks style" only, so the digit of an edit can only come from its
          reference (``lab/klein_edit.py``). Images and references go through the klein demo's pixel codec, on the
          training side through `train`'s own folder cache (``klein.codec_vae_loaded``), on the sampling side
          through the pipeline's ``image=`` (``klein.pixel_codec_vae``).
  Base    the klein demo's tiny Base (``demo_klein.data_stage`` / ``base_stage``: `dedistill` from scratch on the
          text-to-image world); it never sees a reference.
  arms    per LoRA seed, the same shots, steps and seed: **E** `dev2pro train` on the pairs (controls), sampled
          with each held-out reference; **T** `dev2pro train` on the same after images without references,
          sampled without one (style without the digit); **B** Base sampled with the reference, no LoRA.
  judges  ``lab/judges``' digit and style judges per image on held-out references (digits no LoRA saw):
          digit agreement with the reference's label (chance 0.10), its palette-free variant, style fidelity,
          pixel RMS to styled(reference); mean intervals and E - T, E - B paired image by image and seed by seed.

Learning rate and steps: the text-to-image demo's lr 2e-3 left E at a digit agreement of 0.42 after 600 steps
(seed 0, 600-step Base); 5e-3 reached 0.86 and 1e-2 0.96, so the LoRAs train at 1e-2 (T too: same settings per
arm). The quick profile's shorter Base and LoRAs learn less (~0.5). LoRA jobs run in single-threaded worker
processes; finished stages (Base, LoRAs, samples) are reused on resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..lab import arms as lab_arms
from ..lab import klein, report
from ..lab import klein_edit as ke
from ..lab.cost import StageClock, done_line
from ..lab.judges import fit_judges
from ..lab.resume import finished_stage, pick_profile, prepare_run_folder
from ..lab.world import load_digits_world
from ..noise import quiet_libraries
from ..outputs import write_json, write_text
from ..schemas import load_train_config
from .demo_klein import CFG, base_stage, data_stage
from .train_lora import train


@dataclass(frozen=True)
class Profile:
    base_steps: int
    lora_steps: int
    seeds: int
    eval_per_class: int  # held-out references per digit class and seed (one noise seed each)
    sample_steps: int  # Base's sampling steps (true CFG)
    per_class: int = 5  # training pairs per digit class
    lora_batch: int = 10
    lr: float = 1e-2
    rank: int = 8
    batch: int = 32  # the Base's


PROFILES = {
    "quick": Profile(base_steps=150, lora_steps=300, seeds=1, eval_per_class=5, sample_steps=8),
    "default": Profile(base_steps=400, lora_steps=450, seeds=2, eval_per_class=5, sample_steps=12),
    "full": Profile(base_steps=600, lora_steps=600, seeds=3, eval_per_class=6, sample_steps=12),
}


def _job(job: dict) -> dict:
    """Worker: one (seed, arm): E and T train their LoRA with `dev2pro train` (codec-encoded folder cache), then
    every arm samples the seed's held-out references. Returns {arm, seed, samples file[, losses]}."""
    torch.set_num_threads(1)
    quiet_libraries()
    run = Path(job["run"])
    run.mkdir(parents=True, exist_ok=True)
    result = {"arm": job["arm"], "seed": job["seed"]}
    lora = None
    if job["arm"] != "B":
        summary = finished_stage(run)
        if summary is None:
            with klein.codec_vae_loaded():
                summary = train(load_train_config(None, data=ke.train_config(job)), progress=False, quiet=True)
        ke.check_codec_cache(run / "cache", Path(job["images"]))
        result["losses"] = summary["losses"]
        lora = run / "lora.diffusers.safetensors"
    samples = run / "samples.npz"
    if not samples.is_file():
        refs, _ = ke.eval_refs(load_digits_world(seed=0), job["eval_per_class"], job["seed"])
        rgb = ke.sample_edits(job["base"], lora, None if job["arm"] == "T" else refs, job["prompts"],
                              job["model_dir"], seeds=[job["seed"] * 100_000 + i for i in range(len(refs))],
                              steps=job["sample_steps"], cfg=CFG)
        klein.save_samples(samples, {"edits": rgb})
    result["samples"] = str(samples)
    return result


def _jobs(root: Path, p: Profile, world, model_dir: Path, base: str, prompts: Path) -> list[dict]:
    jobs = []
    for s in range(p.seeds):
        after, before = ke.write_pairs(root / "data" / f"pairs-seed{s}", world, p.per_class, s)
        common = {"seed": s, "model_dir": str(model_dir), "base": base, "prompts": str(prompts),
                  "images": str(after), "steps": p.lora_steps, "lr": p.lr, "rank": p.rank,
                  "lora_batch": p.lora_batch, "eval_per_class": p.eval_per_class, "sample_steps": p.sample_steps}
        jobs.append({**common, "arm": "E", "controls": str(before), "run": str(root / "arms" / f"E-seed{s}")})
        jobs.append({**common, "arm": "T", "run": str(root / "arms" / f"T-seed{s}")})
        jobs.append({**common, "arm": "B", "run": str(root / "arms" / f"B-seed{s}")})
    return jobs


def run_demo_edit(out: str = "demo-klein-edit-out", profile: str = "default", seeds: int | None = None,
                  overwrite: bool = False, progress: bool = True, workers: int = 2) -> dict:
    """World -> Base -> E/T LoRAs and B x seeds -> judges -> report.md, results.json, grids/edits-seed0.png."""
    p = pick_profile(PROFILES, profile, seeds, "2 or more for seed-level intervals")
    quiet_libraries()
    torch.set_num_threads(1)  # two threads on two busy cores are several times slower than one
    root = Path(out).resolve()
    resumed = prepare_run_folder(root, {"version": 1, "family": "flux2-klein-edit", "profile": profile, **asdict(p)},
                       overwrite)
    clock = StageClock()

    print("[1/4] data: digits -> the Base's image folder and shards; edit pairs (before plain, after styled, "
          f"captioned \"{ke.INSTRUCTION}\" only)")
    world = load_digits_world(seed=0)
    model_dir, base_shards, _, _ = data_stage(root, world, 0, p.per_class)
    prompts = root / "data" / "edit-prompts.safetensors"
    if not prompts.is_file():
        klein.write_prompts(klein.load_text_encoder(model_dir), [ke.INSTRUCTION], prompts)
    clock.mark("data")

    print("[2/4] Base: flow matching from scratch on the text-to-image world (it never sees a reference)")
    base = base_stage(root, model_dir, base_shards, p.base_steps, p.batch, progress)
    clock.mark("base")

    print(f"[3/4] arms x {p.seeds} seed(s): E (edit LoRA, `train` with controls), T (text-to-image LoRA), "
          "B (Base + reference); each sampled on held-out references")
    jobs = _jobs(root, p, world, model_dir, base["file"], prompts)
    results = lab_arms.run_jobs(_job, jobs, workers, progress, initializer=quiet_libraries)
    clock.mark("arms")

    print("[4/4] judges and report")
    table = ke.evaluate(results, fit_judges(world, seed=0), world, seeds=p.seeds, per_class=p.eval_per_class)
    grid = ke.write_grid(root / "grids" / "edits-seed0.png", results, world, p.eval_per_class)
    clock.mark("report")
    summary = {"family": "flux2-klein-edit", "profile": profile, "settings": asdict(p), "cfg": CFG,
               "instruction": ke.INSTRUCTION, "stages": report.stage_losses({"base": base["losses"]}, results),
               "table": table, "timings_seconds": clock.wall_seconds(("data", "base", "arms")),
               "cpu_seconds": clock.cpu_summary(workers, parallel="arms"), "resumed": resumed,
               "command": f"dev2pro demo --family flux2-klein-edit{'' if profile == 'default' else ' --' + profile}"
                          f"{'' if seeds is None else f' --seeds {seeds}'}"}
    write_json(root / "results.json", summary)
    write_text(root / "report.md", ke.markdown(summary))
    print((root / "report.md").read_text())
    print(f"{done_line(summary)}: {root / 'report.md'}, {root / 'results.json'}, {grid}")
    return summary
