"""`dev2pro demo`: the Dev2Pro claim, measured end to end on a CPU with the real Flux classes at toy scale.

The claim (Flux-Dev2Pro): a LoRA trained on a de-distilled base at guidance 1.0 and applied to FLUX.1-dev beats a
LoRA trained on dev directly. Nobody can retrain BFL's models here, but every piece of the story can be rebuilt
small, with the recipes users run:

  world    scikit-learn's 8x8 digits (1,797 real images) as the base world, white on black, captioned
           "a photo of the digit three"; the new concept, never seen by any base, is a style: the digit turned
           90 degrees and drawn orange on blue, few-shot (5 images per class), captioned "sks style, the digit
           three". Captions go through the tiny family's real CLIP/T5 tokenizers and encoders. Flux's VAE is
           replaced by a fixed invertible pixel codec (`lab/world.py`): the VAE downsamples by 8 and would turn an
           8x8 digit into one latent pixel; images are stored as 64x64 PNGs of 8x8 blocks, so the codec plays the
           VAE's part (/8) losslessly. Data goes through `dev2pro cache`'s shard writer.
  pro      a tiny Flux transformer without guidance embedding, trained from scratch by `dedistill` (objective
           flow, 10% caption dropout): a real CFG model.
  dev      `dedistill` objective `guidance_distill` (Meng et al., Algorithm 1): pro's weights plus a guidance
           embedding, regressed onto pro's CFG output at w ~ U[1, 5].
  dev2pro  `dedistill` objective `flow` at guidance 1.0 from dev (the Dev2Pro recipe); `--full` adds a
           `cfg_teacher` de-distillation as a fifth arm.
  adapters dev -> dev2pro as a LoRA (`lora/adapter.py`): extracted from the two bases by `lora extract` at the rank
           its `--ranks` report recommends (0.9 of the energy), and de-distilled directly as a LoRA of that rank
           (`dedistill` with ``train.adapter_rank``); their fidelity by rank goes into the report.
  arms     `dev2pro train` LoRAs, same data/steps/seed per arm: A dev @ 3.5, B dev @ 1.0, C dev2pro @ 1.0, D pro
           (oracle, sampled on pro with true CFG); C-ext and C-lora train on dev with the extracted / the
           de-distilled adapter on (`model.adapter`: one base, Dev2Pro as a training adapter). Every arm but D is
           applied to dev and sampled at guidance 3.5 and 1.0, after a short and the full training length.
  judges   classifiers fitted here on real data (`lab/judges.py`): style fidelity, digit accuracy, Frechet
           distances (to real concept images and to the oracle's samples), guidance integrity.

The bases are trained once per demo seed; each LoRA seed (>= 3) changes the few-shot subset, the LoRA init and
noise, and the sampling seeds, so the intervals measure LoRA-training variance on fixed bases. LoRA jobs run in two
single-threaded worker processes (one per core). A finished stage is reused when the run is resumed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..outputs import write_json

T5_LEN = 16  # the longest caption is 10 T5 tokens
SIZE = 64  # pixel side seen by the pipeline: 8x8 digit pixels as 8x8 blocks


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
# arm -> (training base, training guidance, what it is); every arm but the oracle is applied to dev
ARMS = {
    "A": ("dev", 3.5, "dev @ 3.5"),
    "B": ("dev", 1.0, "dev @ 1.0"),
    "C": ("dev2pro", 1.0, "dev2pro @ 1.0"),
    "C-ext": ("dev", 1.0, "dev + extracted adapter @ 1.0"),
    "C-lora": ("dev", 1.0, "dev + LoRA-de-distilled adapter @ 1.0"),
    "D": ("pro", 1.0, "pro + CFG (oracle)"),
    "E": ("dev2pro_cfg", 1.0, "dev2pro(cfg_teacher) @ 1.0"),
}
ADAPTER_ARMS = {"C-ext": "extracted", "C-lora": "dedistilled"}  # arm -> which adapter is on while it trains
ADAPTER_RANKS = (2, 4, 8, 16, 32)  # fidelity by rank; the tiny family is 64 wide
ORACLE = "D"
GUIDANCES = (3.5, 1.0)


# ------------------------------------------------------------------------------------------------ data
def _write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, caption, make_rgb) -> Path:
    from ..lab.world import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    for i, (rgb, y) in enumerate(zip(make_rgb(images), labels)):
        to_pil(rgb, scale=SIZE // 8).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(int(y)))
    return folder


def _encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The shard writer's "VAE": (B, 3, 64, 64) in [-1, 1] -> 8x8 block means -> codec latents (B, 16, 8, 8)."""
    from ..lab.world import encode

    rgb = torch.nn.functional.avg_pool2d((pixels.float() + 1) / 2, SIZE // 8)  # (B, 3, 8, 8)
    return encode(rgb.permute(0, 2, 3, 1))


def _text_encoder(model_dir: Path):
    from .train_steps import load_encoders, text_encoder

    return text_encoder(load_encoders(model_dir, "cpu")["pipe"], "cpu", T5_LEN)


def _shards(folder: Path, out: Path, encode_text) -> Path:
    from ..data.buckets import make_buckets
    from ..data.shards import collect_sources, write_shards

    samples, bad = collect_sources([folder])
    return write_shards(samples, out, per_shard=512, buckets=make_buckets(SIZE * SIZE, step=SIZE),
                        encode_latents=_encode_pixels, encode_text=encode_text,
                        settings={"codec": "dev2pro-demo-pixel-v1", "t5_max_length": T5_LEN}, skipped=bad,
                        batch_size=64)


# ------------------------------------------------------------------------------------------------ stages
def _stage_done(run: Path) -> dict | None:
    f = run / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _base(root: Path, name: str, objective: str, model_dir: Path, shards: Path, steps: int, lr: float, p: Profile,
          seed: int, progress: bool, start: str = "", teacher: str = "", dropout: float = 0.0,
          adapter_rank: int = 0) -> dict:
    """One base model (or, with ``adapter_rank``, a dev -> dev2pro LoRA adapter) through `dev2pro dedistill`;
    returns its summary (reused when already finished)."""
    from .dedistill import dedistill, load_dedistill_config

    run = root / "runs" / name
    run.parent.mkdir(parents=True, exist_ok=True)
    done = _stage_done(run)
    if done is None:
        cfg = load_dedistill_config(None, data={
            "objective": objective,
            "model": {"path": str(model_dir), "transformer": start, "teacher": teacher,
                      "gradient_checkpointing": False, "t5_max_length": T5_LEN},
            "data": {"shards": str(shards), "batch_size": p.batch, "caption_dropout": dropout},
            "teacher": {"w_min": 1.0, "w_max": 5.0},
            "train": {"steps": steps, "lr": lr, "warmup_steps": max(1, steps // 20), "schedule": "cosine",
                      "seed": seed, "mixed_precision": "no", "ema_decay": 0.99, "max_grad_norm": 1.0,
                      "adapter_rank": adapter_rank},
            "save": {"output_dir": str(run), "name": name, "formats": ["bfl"], "dtype": "fp32", "overwrite": True},
        })
        print(f"[{name}] dedistill objective={objective}, {steps} steps")
        done = dedistill(cfg, progress=progress)
    file = run / (f"{name}-adapter.safetensors" if adapter_rank else f"{name}.safetensors")
    return {"file": str(file), "losses": done["losses"], "objective": objective}


def _arm_jobs(root: Path, p: Profile, arms: list[str], bases: dict, adapter_files: dict, model_dir: Path,
              prompt_file: Path, concept_shards: dict) -> list[dict]:
    """One `_lora_job` per (seed, arm), plus dev without LoRA per seed as the guidance reference."""
    jobs = []
    for s in range(p.seeds):
        common = {"seed": s, "model_dir": str(model_dir), "prompts": str(prompt_file), "shards": str(concept_shards[s]),
                  "eval_per_class": p.eval_per_class, "sample_steps": p.sample_steps, "steps": p.lora_steps,
                  "short": p.lora_short, "lora_batch": p.lora_batch}
        jobs.append({**common, "arm": "ref", "run": str(root / "arms" / f"ref-seed{s}"),
                     "target": bases["dev"]["file"]})
        for a in arms:
            base, guidance, _ = ARMS[a]
            target = bases["pro"]["file"] if a == ORACLE else bases["dev"]["file"]
            jobs.append({**common, "arm": a, "run": str(root / "arms" / f"{a}-seed{s}"), "base": bases[base]["file"],
                         "guidance": guidance, "target": target, "adapter": adapter_files.get(a, "")})
    return jobs


def _by_rank(d: dict) -> dict[str, float]:
    """Rank-keyed numbers in rank order (JSON files hold them with string keys, sorted as strings)."""
    return {str(k): v for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def _adapters(root: Path, bases: dict, prompts: Path, p: Profile, progress: bool, model_dir: Path,
              shards: Path) -> tuple[dict, dict]:
    """The two dev -> dev2pro adapters and their fidelity: extracted by `lora extract` at the rank its --ranks
    report recommends (0.9 of the energy), and de-distilled as a LoRA of that rank (`dedistill`,
    train.adapter_rank). Returns ({arm: adapter file}, fidelity summary for the report)."""
    from safetensors.torch import load_file

    from ..flux.checkpoint import load_transformer
    from ..lab.fidelity import adapter_output_errors
    from ..lora.ops import extract_pair
    from .lora_tools import extract_lora

    folder = root / "adapters"
    folder.mkdir(exist_ok=True)
    dev, d2p = bases["dev"]["file"], bases["dev2pro"]["file"]
    report = folder / "fidelity.json"
    fid = json.loads(report.read_text()) if report.is_file() else \
        extract_lora(dev, d2p, str(report), ranks=list(ADAPTER_RANKS), exact=True, overwrite=True)
    rank = int(fid["recommended_rank"])
    ext = folder / f"extracted-r{rank}.safetensors"
    if not ext.is_file():
        extract_lora(dev, d2p, str(ext), rank=rank, exact=True, overwrite=True)
    bases["dev2pro_lora"] = _base(root, "dev2pro_lora", "flow", model_dir, shards, p.dedistill_steps, 2e-3, p, 4,
                                  progress, start=dev, adapter_rank=rank)
    a_sd, b_sd = (load_transformer(f, dtype=torch.float32)[0].state_dict() for f in (dev, d2p))
    candidates = {f"extracted r{k}": extract_pair(a_sd, b_sd, k)[0] for k in ADAPTER_RANKS}
    candidates[f"de-distilled LoRA r{rank}"] = bases["dev2pro_lora"]["file"]
    t = load_file(str(prompts))
    model = adapter_output_errors(dev, d2p, candidates, t["prompt_embeds"], t["pooled"])
    summary = {"recommended_rank": rank, "energy_target": fid["energy_target"],
               "energy_by_rank": _by_rank(fid["total"]["energy_by_rank"]),
               "layer_error_by_rank": _by_rank(fid["total"]["output_error_by_rank"]),
               "model": model,
               "not_linear": len(fid["not_linear"])}
    return {"C-ext": str(ext), "C-lora": bases["dev2pro_lora"]["file"]}, summary


def _lora_job(job: dict) -> dict:
    """Worker: train one arm's LoRA with `dev2pro train`, then sample it (short and full length) at each guidance.

    Returns file names only: samples are written as .npy files (decoded RGB, class-major)."""
    torch.set_num_threads(1)
    from ..flux.checkpoint import load_transformer
    from ..lab.world import decode
    from ..lora.formats import load_lora
    from ..lora.ops import apply_lora
    from ..sampling import build_pipeline, render_latents
    from .train_lora import load_train_config, quiet_libraries, train

    quiet_libraries()
    run = Path(job["run"])
    result = {"arm": job["arm"], "seed": job["seed"], "samples": {}}
    loras = {}
    if job["arm"] != "ref":
        summary = _stage_done(run)
        if summary is None:
            cfg = load_train_config(None, data={
                "model": {"path": job["model_dir"], "transformer": job["base"], "adapter": job.get("adapter", ""),
                          "dtype": "fp32",
                          "gradient_checkpointing": False, "t5_max_length": T5_LEN},
                "data": {"shards": job["shards"], "batch_size": job["lora_batch"]},
                "lora": {"rank": 8, "alpha": 8},
                "train": {"steps": job["steps"], "lr": 2e-3, "seed": job["seed"], "guidance": job["guidance"],
                          "warmup_steps": 5},
                "save": {"output_dir": str(run), "every": job["short"], "formats": ["kohya"], "overwrite": True},
                "log_every": 50,
            })
            summary = train(cfg, progress=False, quiet=True)  # parallel workers: no interleaved console
        result["losses"] = summary["losses"]
        loras = {"short": run / f"lora-step{job['short']:06d}.safetensors", "long": run / "lora.safetensors"}
    from safetensors.torch import load_file

    prompts = load_file(job["prompts"])
    n = job["eval_per_class"]
    embeds = [(prompts["prompt_embeds"][k:k + 1], prompts["pooled"][k:k + 1]) for k in range(10) for _ in range(n)]
    seeds = [job["seed"] * 100_000 + i for _ in range(10) for i in range(n)]  # same noise for every class
    negative = (prompts["empty_embeds"][None], prompts["empty_pooled"][None])
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(job["model_dir"], subfolder="scheduler")
    for length, lora in (loras.items() if loras else [("none", None)]):
        out = run / f"samples-{length}.npz"
        if not out.is_file():
            model, _ = load_transformer(job["target"], dtype=torch.float32)
            if lora is not None:
                apply_lora(model, load_lora(lora), 1.0, adapter_name="arm")
            pipe = build_pipeline({"scheduler": scheduler}, model)
            arrays = {}
            for g in GUIDANCES:
                lat = render_latents(pipe, embeds, seeds, guidance=g, negative=negative, steps=job["sample_steps"],
                                     width=SIZE, height=SIZE)
                arrays[f"g{g}"] = decode(lat)
            tmp = out.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(out)
        result["samples"][length] = str(out)
    return result


# ------------------------------------------------------------------------------------------------ recipe
def run_demo(out: str = "demo-out", profile: str = "default", seeds: int | None = None, overwrite: bool = False,
             progress: bool = True, workers: int = 2) -> dict:
    """Build the world, the three (four) bases and the LoRA arms, judge them, write report.md/.html/results.json."""
    from ..flux.tiny import write_tiny_model
    from ..lab import report
    from ..lab.judges import fit_judges
    from ..lab.world import DIGIT_WORDS, base_caption, concept_caption, few_shot, load_digits_world, plain, styled
    from .train_lora import quiet_libraries

    if profile not in PROFILES:
        raise UserError(f"unknown demo profile {profile!r}: use one of {', '.join(PROFILES)}")
    p = PROFILES[profile] if seeds is None else replace(PROFILES[profile], seeds=seeds)
    if p.seeds < 1:
        raise UserError("--seeds must be >= 1 (3 or more for confidence intervals)")
    quiet_libraries()
    torch.set_num_threads(1)  # two threads on two busy cores are several times slower than one
    root = Path(out).resolve()
    stamp = {"version": 1, "profile": profile, **asdict(p)}
    _prepare_root(root, stamp, overwrite)
    t0 = time.perf_counter()
    timings, cpu = {}, _Cpu()

    # 1. world, data folders, shards (text through the tiny family's real tokenizers and encoders)
    print("[1/6] data: scikit-learn digits -> image folders -> shards")
    world = load_digits_world(seed=0)
    model_dir = root / "models" / "tiny"
    if not (model_dir / "model_index.json").is_file():
        write_tiny_model(model_dir, variant="pro", seed=0, overwrite=True)
    encode_text = _text_encoder(model_dir)
    base_dir = root / "data" / "base"
    if not base_dir.is_dir():
        _write_folder(base_dir, world.train_images, world.train_labels, base_caption, plain)
    base_shards = _shards(base_dir, root / "shards" / "base", encode_text)
    concept_shards = {}
    for s in range(p.seeds):
        d = root / "data" / f"concept-seed{s}"
        if not d.is_dir():
            images, labels = few_shot(world, p.per_class, seed=s)
            _write_folder(d, images, labels, concept_caption, styled)
        concept_shards[s] = _shards(d, root / "shards" / f"concept-seed{s}", encode_text)
    prompts = encode_text([concept_caption(k) for k in range(10)])
    empty = encode_text([""])
    from ..outputs import save_safetensors

    prompt_file = save_safetensors({**prompts, "empty_embeds": empty["prompt_embeds"][0],
                                    "empty_pooled": empty["pooled"][0]}, root / "prompts.safetensors", overwrite=True)
    del encode_text
    timings["data"] = time.perf_counter() - t0
    cpu.mark("data")

    # 2-4. bases through `dev2pro dedistill`
    ms, sh = model_dir, base_shards
    print("[2/6] pro: a CFG model trained from scratch (flow matching, 10% caption dropout)")
    bases = {"pro": _base(root, "pro", "flow", ms, sh, p.pro_steps, 2e-3, p, 0, progress, dropout=0.1)}
    print("[3/6] dev: guidance-distilled from pro (Meng et al. Alg. 1, w ~ U[1, 5])")
    bases["dev"] = _base(root, "dev", "guidance_distill", ms, sh, p.dev_steps, 1e-3, p, 1, progress,
                         start=bases["pro"]["file"], teacher=bases["pro"]["file"])
    print("[4/6] dev2pro: de-distilled from dev (flow matching at guidance 1.0)")
    bases["dev2pro"] = _base(root, "dev2pro", "flow", ms, sh, p.dedistill_steps, 5e-4, p, 2, progress,
                             start=bases["dev"]["file"])
    if p.cfg_teacher_arm:
        bases["dev2pro_cfg"] = _base(root, "dev2pro_cfg", "cfg_teacher", ms, sh, p.dedistill_steps, 5e-4, p, 3,
                                     progress, start=bases["dev"]["file"], teacher=bases["dev"]["file"])
    timings["bases"] = time.perf_counter() - t0 - timings["data"]
    cpu.mark("bases")
    adapter_files, fidelity = {}, None
    if p.adapter_arms:
        print("[4b/6] adapters: dev -> dev2pro extracted (lora extract) and de-distilled as a LoRA")
        adapter_files, fidelity = _adapters(root, bases, prompt_file, p, progress, ms, sh)
    timings["adapters"] = time.perf_counter() - t0 - timings["data"] - timings["bases"]
    cpu.mark("adapters")

    # 5. LoRA arms x seeds (and dev without LoRA as the guidance reference), two single-threaded workers
    arms = [a for a in ARMS if ARMS[a][0] in bases and (a not in ADAPTER_ARMS or a in adapter_files)]
    jobs = _arm_jobs(root, p, arms, bases, adapter_files, model_dir, prompt_file, concept_shards)
    for j in jobs:
        Path(j["run"]).mkdir(parents=True, exist_ok=True)
    print(f"[5/6] LoRA arms {', '.join(arms)} x {p.seeds} seeds via `dev2pro train`, sampled at guidance "
          f"{' and '.join(map(str, GUIDANCES))}")
    results = _run_jobs(jobs, workers, progress)
    timings["arms"] = time.perf_counter() - t0 - timings["data"] - timings["bases"] - timings["adapters"]
    cpu.mark("arms")

    # 6. judges, tables, report
    print("[6/6] judges and report")
    judges = fit_judges(world, seed=0)
    table = report.evaluate(results, judges, world, arms=arms, oracle=ORACLE, seeds=p.seeds,
                            per_class=p.eval_per_class)
    stages = {name: report.loss_change(b["losses"]) for name, b in bases.items()}
    for r in results:
        if r["arm"] != "ref":
            stages[f"lora-{r['arm']}-seed{r['seed']}"] = report.loss_change(r["losses"])
    timings["total"] = time.perf_counter() - t0
    cpu.mark("report")
    summary = {"profile": profile, "settings": asdict(p), "arms": {a: ARMS[a][2] for a in arms}, "oracle": ORACLE,
               "guidances": list(GUIDANCES), "stages": stages, "table": table,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}, "adapters": fidelity,
               "cpu_seconds": cpu.summary(workers),
               "command": f"dev2pro demo{'' if profile == 'default' else ' --' + profile}"
                          f"{'' if seeds is None else f' --seeds {seeds}'}",
               "digits": list(DIGIT_WORDS)}
    write_json(root / "results.json", summary)
    report.write_reports(root, summary, results, world)
    print((root / "report.md").read_text())
    print(f"done in {timings['total']:.0f} s ({summary['cpu_seconds']['total']:.0f} CPU-s; on {workers} idle cores "
          f"about {summary['cpu_seconds']['idle_wall_estimate']:.0f} s): {root / 'report.md'}, "
          f"{root / 'report.html'}, {root / 'results.json'}")
    return summary


class _Cpu:
    """CPU seconds per stage, this process plus its finished worker processes. On a shared machine wall time
    measures the other jobs too; CPU time is the demo's own cost. With the LoRA jobs spread over ``workers``
    single-threaded processes and the rest serial, an idle machine would take about serial + arms / workers."""

    def __init__(self):
        self.last, self.stages = self._now(), {}

    @staticmethod
    def _now() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))

    def mark(self, stage: str) -> None:
        now = self._now()
        self.stages[stage], self.last = round(now - self.last, 1), now

    def summary(self, workers: int) -> dict:
        serial = sum(v for k, v in self.stages.items() if k != "arms")
        return {**self.stages, "total": round(sum(self.stages.values()), 1),
                "idle_wall_estimate": round(serial + self.stages.get("arms", 0.0) / max(1, workers), 1)}


def _prepare_root(root: Path, stamp: dict, overwrite: bool) -> None:
    """A new folder, or the same demo's folder to resume; anything else needs --overwrite."""
    marker = root / "demo.json"
    if root.exists() and any(root.iterdir()):
        same = marker.is_file() and json.loads(marker.read_text()) == stamp
        if overwrite:
            shutil.rmtree(root)
        elif not same:
            raise UserError(f"{root} holds something else (another demo profile or other files); pass --overwrite "
                            f"to replace it or --out to pick another folder")
        else:
            print(f"resuming the demo in {root}: finished stages are reused")
    root.mkdir(parents=True, exist_ok=True)
    write_json(marker, stamp)


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="LoRA arms", unit="job", disable=not progress, dynamic_ncols=True)
    results = []
    if workers <= 1:
        for j in jobs:
            results.append(_lora_job(j))
            bar.update()
    else:  # spawn: workers start clean (no forked torch thread pools)
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_lora_job, j) for j in jobs]):
                results.append(fut.result())
                bar.update()
    bar.close()
    return sorted(results, key=lambda r: (r["seed"], r["arm"]))


def add_demo_parser(sub):
    """The `demo` subcommand (built in cli_commands, which imports nothing heavy)."""
    from ..cli_commands import add_demo

    add_demo(sub)
