"""`dev2pro demo [--family flux2-dev]`: the Dev2Pro claim, measured end to end on a CPU with the real Flux classes
at toy scale -- on FLUX.1 or on FLUX.2 [dev] architecture models (what differs: ``lab/demo_families.py``).

The claim (Flux-Dev2Pro): a LoRA trained on a de-distilled base at guidance 1.0 and applied to dev beats a LoRA
trained on dev directly. Every piece is rebuilt small, with the recipes users run; the demo's parts live in `lab/`:

  world    scikit-learn's 8x8 digits (1,797 real images) as the base world, white on black, captioned
           "a photo of the digit three"; the new concept, never seen by any base, is a style: the digit drawn
           orange on deep blue, few-shot (5 images per class), captioned "sks style, the digit three". Captions
           go through the tiny family's real text stack (CLIP/T5; FLUX.2 dev: Mistral3); a fixed invertible pixel
           codec stands in for the VAE; data goes through `dev2pro cache`'s shard writer (`lab/world.py`).
  pro      a tiny transformer without guidance embedding, trained from scratch by `dedistill` (objective
           flow, 10% caption dropout): a real CFG model.
  dev      `dedistill` objective `guidance_distill` (Meng et al., Algorithm 1): pro's weights plus a grown guidance
           embedding, regressed onto pro's CFG output at w ~ U[1, 5].
  dev2pro  `dedistill` objective `flow` at guidance 1.0 from dev (the Dev2Pro recipe); `--full` adds a
           `cfg_teacher` de-distillation as a fifth arm.
  adapters dev -> dev2pro as a LoRA (`lora/adapter.py`): extracted from the two bases by `lora extract` at the rank
           its `--ranks` report recommends (0.9 of the energy), and de-distilled directly as a LoRA of that rank
           (`dedistill` with ``train.adapter_rank``); their fidelity by rank goes into the report.
  arms     `dev2pro train` LoRAs, same data/steps/seed per arm: A dev @ its usual guidance (3.5; FLUX.2: 4.0), B
           dev @ 1.0, C dev2pro @ 1.0, D pro (oracle, sampled on pro with true CFG); C-ext and C-lora train on dev
           with the extracted / the de-distilled adapter on (`model.adapter`: Dev2Pro as a training adapter). All
           but D are applied to dev, sampled at (dev guidance, 1.0) after a short and the full training length.
  judges   classifiers fitted here on real data (`lab/judges.py`): style fidelity, digit accuracy, Frechet
           distances (to real concept images and to the oracle's samples), guidance integrity.

Bases are trained once per run; each LoRA seed (>= 3) changes the few-shot subset, the LoRA init and noise, and
the sampling seeds, so the intervals measure LoRA-training variance on fixed bases. LoRA jobs run in two
single-threaded workers; everything runs on one thread and judges score each image alone, so the numbers depend on
the seeds only. A finished stage is reused when the run is resumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..lab import arms as lab_arms
from ..lab import dataset, demo_families, report
from ..lab.cost import StageClock, done_line
from ..lab.fidelity import adapter_fidelity
from ..lab.judges import fit_judges
from ..lab.resume import finished_stage, pick_profile, prepare_run_folder
from ..lab.world import DIGIT_WORDS, load_digits_world
from ..noise import quiet_libraries
from ..outputs import write_json
from ..schemas import load_dedistill_config, load_train_config
from .dedistill import dedistill
from .lora_tools import extract_lora
from .train_lora import train


@dataclass(frozen=True)
class Profile:
    pro_steps: int
    dev_steps: int
    dedistill_steps: int
    lora_steps: int
    lora_short: int
    seeds: int
    eval_per_class: int  # samples per digit class and setting
    sample_steps: int
    batch: int = 32
    lora_batch: int = 10
    per_class: int = 5  # few-shot concept images per digit class
    cfg_teacher_arm: bool = False
    adapter_arms: bool = True  # C-ext and C-lora: train on dev + a dev -> dev2pro adapter


PROFILES = {
    "quick": Profile(pro_steps=150, dev_steps=60, dedistill_steps=40, lora_steps=40, lora_short=15, seeds=3,
                     eval_per_class=3, sample_steps=8, cfg_teacher_arm=True),  # every path, little learning
    "default": Profile(pro_steps=1000, dev_steps=400, dedistill_steps=250, lora_steps=150, lora_short=50,
                       seeds=5, eval_per_class=6, sample_steps=12),
    "full": Profile(pro_steps=4000, dev_steps=2000, dedistill_steps=1000, lora_steps=400, lora_short=100,
                    seeds=8, eval_per_class=20, sample_steps=24, cfg_teacher_arm=True),
}
# FLUX.2 dev: a 128-wide transformer (4x FLUX.1's toy) and 56 tokens, compute-bound: bases at batch 16
PROFILES_BY_FAMILY = {"flux1": PROFILES, "flux2-dev": {
    "quick": Profile(pro_steps=60, dev_steps=20, dedistill_steps=12, lora_steps=16, lora_short=8, seeds=3,
                     eval_per_class=2, sample_steps=4, batch=16),
    "default": Profile(pro_steps=600, dev_steps=200, dedistill_steps=120, lora_steps=80, lora_short=30,
                       seeds=5, eval_per_class=4, sample_steps=10, batch=16),
    "full": Profile(pro_steps=3000, dev_steps=1000, dedistill_steps=600, lora_steps=300, lora_short=100,
                    seeds=8, eval_per_class=12, sample_steps=20, batch=16, cfg_teacher_arm=True)}}


def arms_for(dev_guidance: float) -> dict[str, tuple[str, float, str]]:
    """arm -> (training base, training guidance, what it is); every arm but the oracle is applied to dev."""
    return {"A": ("dev", dev_guidance, f"dev @ {dev_guidance}"), "B": ("dev", 1.0, "dev @ 1.0"),
            "C": ("dev2pro", 1.0, "dev2pro @ 1.0"), "C-ext": ("dev", 1.0, "dev + extracted adapter @ 1.0"),
            "C-lora": ("dev", 1.0, "dev + LoRA-de-distilled adapter @ 1.0"), "D": ("pro", 1.0, "pro + CFG (oracle)"),
            "E": ("dev2pro_cfg", 1.0, "dev2pro(cfg_teacher) @ 1.0")}


DEV_GUIDANCE = demo_families.get("flux1").dev_guidance  # FLUX.1's dev is used (and arm A trains) at 3.5
GUIDANCES = (DEV_GUIDANCE, 1.0)  # every arm is sampled at each (a family's: (its dev guidance, 1.0))
MAIN = ("long", DEV_GUIDANCE)  # the setting the verdict is about: the full-length LoRA applied to dev as it is used
ARMS = arms_for(DEV_GUIDANCE)
ADAPTER_ARMS = {"C-ext": "extracted", "C-lora": "dedistilled"}  # arm -> which adapter is on while it trains
ADAPTER_RANKS = (2, 4, 8, 16, 32)  # fidelity by rank; the tiny FLUX.1 is 64 wide, FLUX.2 dev 128
ORACLE = "D"


# ------------------------------------------------------------------------------------------------ stages
def _data(root: Path, world, p: Profile, fam) -> tuple[Path, str, Path, dict, Path]:
    """Model folder, pro's start, shards (base world, a concept set per seed), eval prompts: the family's pieces."""
    model_dir, pro_start = fam.write_model(root / "models")
    base_shards, concept_shards, prompts = dataset.write_world(root, world, p.seeds, p.per_class,
                                                               fam.load_text_encoder(model_dir), fam.write_shards,
                                                               fam.write_prompts)
    return model_dir, pro_start, base_shards, concept_shards, prompts


def dedistill_stage(root: Path, name: str, objective: str, model_dir: Path, shards: Path, steps: int, lr: float,
                    seed: int, *, batch: int, progress: bool, start: str = "", teacher: str = "", dropout: float = 0.0,
                    adapter_rank: int = 0, text_len: int = dataset.T5_LEN, teacher_w: tuple = (1.0, 5.0)) -> dict:
    """One toy base (or, with ``adapter_rank``, a dev -> dev2pro adapter) through `dev2pro dedistill`; reused."""
    run = root / "runs" / name
    run.parent.mkdir(parents=True, exist_ok=True)
    done = finished_stage(run)
    if done is None:
        cfg = load_dedistill_config(None, data={
            "objective": objective,
            "model": {"path": str(model_dir), "transformer": start, "teacher": teacher,
                      "gradient_checkpointing": False, "t5_max_length": text_len},
            "data": {"shards": str(shards), "batch_size": batch, "caption_dropout": dropout},
            "teacher": {"w_min": teacher_w[0], "w_max": teacher_w[1]},
            "train": {"steps": steps, "lr": lr, "warmup_steps": max(1, steps // 20), "schedule": "cosine",
                      "seed": seed, "mixed_precision": "no", "ema_decay": 0.99, "max_grad_norm": 1.0,
                      "adapter_rank": adapter_rank},
            "save": {"output_dir": str(run), "name": name, "formats": ["bfl"], "dtype": "fp32", "overwrite": True},
        })
        print(f"[{name}] dedistill objective={objective}, {steps} steps")
        done = dedistill(cfg, progress=progress)
    file = run / (f"{name}-adapter.safetensors" if adapter_rank else f"{name}.safetensors")
    return {"file": str(file), "losses": done["losses"], "objective": objective}


def _bases(root: Path, p: Profile, ms: Path, sh: Path, progress: bool, init: str, text_len: int) -> dict:
    kw = dict(batch=p.batch, progress=progress, text_len=text_len)
    print("[2/6] pro: a CFG model trained from scratch (flow matching, 10% caption dropout)")
    bases = {"pro": dedistill_stage(root, "pro", "flow", ms, sh, p.pro_steps, 2e-3, 0, start=init, dropout=0.1, **kw)}
    print("[3/6] dev: guidance-distilled from pro (Meng et al. Alg. 1, w ~ U[1, 5], a guidance embedding grown)")
    bases["dev"] = dedistill_stage(root, "dev", "guidance_distill", ms, sh, p.dev_steps, 1e-3, 1,
                                   start=bases["pro"]["file"], teacher=bases["pro"]["file"], **kw)
    print("[4/6] dev2pro: de-distilled from dev (flow matching at guidance 1.0)")
    bases["dev2pro"] = dedistill_stage(root, "dev2pro", "flow", ms, sh, p.dedistill_steps, 5e-4, 2,
                                       start=bases["dev"]["file"], **kw)
    if p.cfg_teacher_arm:
        bases["dev2pro_cfg"] = dedistill_stage(root, "dev2pro_cfg", "cfg_teacher", ms, sh, p.dedistill_steps, 5e-4, 3,
                                               start=bases["dev"]["file"], teacher=bases["dev"]["file"], **kw)
    return bases


def _adapters(root: Path, bases: dict, prompts: Path, p: Profile, progress: bool, model_dir: Path,
              shards: Path, fam) -> tuple[dict, dict]:
    """The two dev -> dev2pro adapters and their fidelity: extracted by `lora extract` at the rank its --ranks
    report recommends (0.9 of the energy), and de-distilled as a LoRA of that rank (`dedistill`,
    train.adapter_rank). Returns ({arm: adapter file}, fidelity summary for the report)."""
    print("[4b/6] adapters: dev -> dev2pro extracted (lora extract) and de-distilled as a LoRA")
    folder = root / "adapters"
    folder.mkdir(exist_ok=True)
    dev, d2p = bases["dev"]["file"], bases["dev2pro"]["file"]
    report_file = folder / "fidelity.json"
    fid = json.loads(report_file.read_text()) if report_file.is_file() else \
        extract_lora(dev, d2p, str(report_file), ranks=list(ADAPTER_RANKS), exact=True, overwrite=True)
    rank = int(fid["recommended_rank"])
    ext = folder / f"extracted-r{rank}.safetensors"
    if not ext.is_file():
        extract_lora(dev, d2p, str(ext), rank=rank, exact=True, overwrite=True)
    bases["dev2pro_lora"] = dedistill_stage(root, "dev2pro_lora", "flow", model_dir, shards, p.dedistill_steps, 2e-3,
                                            4, batch=p.batch, progress=progress, start=dev, adapter_rank=rank,
                                            text_len=fam.text_len)
    others = {f"de-distilled LoRA r{rank}": bases["dev2pro_lora"]["file"]}
    summary = adapter_fidelity(dev, d2p, fid, ADAPTER_RANKS, others, *fam.prompt_embeds(prompts))
    return {"C-ext": str(ext), "C-lora": bases["dev2pro_lora"]["file"]}, summary


def _arm_jobs(root: Path, p: Profile, arms: dict, bases: dict, adapter_files: dict, model_dir: Path,
              prompt_file: Path, concept_shards: dict, fam) -> list[dict]:
    """One `_lora_job` per (seed, arm), plus dev without LoRA per seed as the guidance reference."""
    jobs = []
    for s in range(p.seeds):
        common = {"seed": s, "family": fam.name, "guidances": [fam.dev_guidance, 1.0], "text_len": fam.text_len,
                  "model_dir": str(model_dir), "prompts": str(prompt_file),
                  "shards": str(concept_shards[s]), "eval_per_class": p.eval_per_class,
                  "sample_steps": p.sample_steps, "steps": p.lora_steps, "short": p.lora_short,
                  "lora_batch": p.lora_batch}
        jobs.append({**common, "arm": "ref", "run": str(root / "arms" / f"ref-seed{s}"),
                     "target": bases["dev"]["file"]})
        for a, (base, guidance, _) in arms.items():
            target = bases["pro"]["file"] if a == ORACLE else bases["dev"]["file"]
            jobs.append({**common, "arm": a, "run": str(root / "arms" / f"{a}-seed{s}"),
                         "base": bases[base]["file"], "guidance": guidance, "target": target,
                         "adapter": adapter_files.get(a, "")})
    return jobs


def _lora_job(job: dict) -> dict:
    """Worker: train one arm's LoRA with `dev2pro train`, then sample it (short and full length) at each guidance.

    Returns file names only: samples are written as .npz files (decoded RGB, class-major)."""
    torch.set_num_threads(1)  # one worker per core; and a LoRA's round-off must not move with the core count
    quiet_libraries()
    fam = demo_families.get(job.get("family", "flux1"))
    run = Path(job["run"])
    run.mkdir(parents=True, exist_ok=True)
    result, loras = {"arm": job["arm"], "seed": job["seed"]}, {"none": None}
    if job["arm"] != "ref":
        summary = finished_stage(run)
        if summary is None:
            cfg = load_train_config(None, data={
                "model": {"path": job["model_dir"], "transformer": job["base"], "adapter": job.get("adapter", ""),
                          "dtype": "fp32", "gradient_checkpointing": False, "t5_max_length": job["text_len"]},
                "data": {"shards": job["shards"], "batch_size": job["lora_batch"]},
                "lora": {"rank": 8, "alpha": 8}, "log_every": 50,
                "train": {"steps": job["steps"], "lr": 2e-3, "seed": job["seed"], "guidance": job["guidance"],
                          "warmup_steps": 5},
                "save": {"output_dir": str(run), "every": job["short"], "formats": [fam.lora_format],
                         "overwrite": True}})
            summary = train(cfg, progress=False, quiet=True)  # parallel workers: no interleaved console
        result["losses"] = summary["losses"]
        x = fam.lora_suffix
        loras = {"short": run / f"lora-step{job['short']:06d}{x}.safetensors", "long": run / f"lora{x}.safetensors"}
    result["samples"] = fam.sample_arm(run, job["target"], loras, job["prompts"], job["model_dir"], seed=job["seed"],
                                       per_class=job["eval_per_class"], steps=job["sample_steps"],
                                       guidances=job["guidances"], size=dataset.SIZE)
    return result


# ------------------------------------------------------------------------------------------------ recipe
def run_demo(out: str | None = None, profile: str = "default", seeds: int | None = None, overwrite: bool = False,
             progress: bool = True, workers: int = 2, family: str = "flux1") -> dict:
    """Build the world, the three (four) bases and the LoRA arms, judge them, write report.md/.html/results.json."""
    fam = demo_families.get(family)
    profiles = PROFILES_BY_FAMILY[fam.name]
    p = pick_profile(profiles, profile, seeds)
    quiet_libraries()
    torch.set_num_threads(1)  # faster on busy cores; round-off must not move with the core count (lab/threads.py)
    root = Path(out or fam.out).resolve()
    stamp = {"version": 1, **({} if fam.name == "flux1" else {"family": fam.name}), "profile": profile, **asdict(p)}
    resumed = prepare_run_folder(root, stamp, overwrite)  # FLUX.1's stamp as before: its earlier folders still resume
    clock = StageClock()
    guidances, main = (fam.dev_guidance, 1.0), ("long", fam.dev_guidance)

    # 1. world, data folders, shards (text through the tiny family's real tokenizers and encoders)
    print(f"[1/6] data: scikit-learn digits -> image folders -> shards ({fam.title} text stack and latent layout)")
    world = load_digits_world(seed=0)
    model_dir, pro_start, base_shards, concept_shards, prompt_file = _data(root, world, p, fam)
    clock.mark("data")

    # 2-4. bases through `dev2pro dedistill`; the dev -> dev2pro adapters through `lora extract` and `dedistill`
    bases = _bases(root, p, model_dir, base_shards, progress, pro_start, fam.text_len)
    clock.mark("bases")
    adapter_files, fidelity = {}, None
    if p.adapter_arms:
        adapter_files, fidelity = _adapters(root, bases, prompt_file, p, progress, model_dir, base_shards, fam)
    clock.mark("adapters")

    # 5. LoRA arms x seeds (and dev without LoRA as the guidance reference), two single-threaded workers
    arms = {a: v for a, v in arms_for(fam.dev_guidance).items()
            if v[0] in bases and (a not in ADAPTER_ARMS or a in adapter_files)}
    jobs = _arm_jobs(root, p, arms, bases, adapter_files, model_dir, prompt_file, concept_shards, fam)
    print(f"[5/6] LoRA arms {', '.join(arms)} x {p.seeds} seeds via `dev2pro train`, sampled at guidance "
          f"{' and '.join(map(str, guidances))}")
    results = lab_arms.run_jobs(_lora_job, jobs, workers, progress, initializer=quiet_libraries)
    clock.mark("arms")

    # 6. judges, tables, report
    print("[6/6] judges and report")
    table = report.evaluate(results, fit_judges(world, seed=0), world, arms=list(arms), oracle=ORACLE, seeds=p.seeds,
                            per_class=p.eval_per_class, guidances=guidances, main=main)
    stages = report.stage_losses({name: b["losses"] for name, b in bases.items()}, results)
    clock.mark("report")
    flag = "" if fam.name == "flux1" else f" --family {fam.name}"
    summary = {"family": fam.name, "family_title": fam.title, "profile": profile, "settings": asdict(p),
               "arms": {a: v[2] for a, v in arms.items()}, "oracle": ORACLE, "guidances": list(guidances),
               "main_setting": {"length": main[0], "guidance": main[1]}, "stages": stages, "table": table,
               "adapters": fidelity, "timings_seconds": clock.wall_seconds(("data", "bases", "adapters", "arms")),
               "cpu_seconds": clock.cpu_summary(workers, parallel="arms"), "resumed": resumed,
               "command": f"dev2pro demo{flag}{'' if profile == 'default' else ' --' + profile}"
                          f"{'' if seeds is None else f' --seeds {seeds}'}",
               "digits": list(DIGIT_WORDS)}
    write_json(root / "results.json", summary)
    report.write_reports(root, summary, results, world)
    print((root / "report.md").read_text())
    print(f"{done_line(summary, workers)}: {root / 'report.md'}, {root / 'report.html'}, {root / 'results.json'}")
    return summary
