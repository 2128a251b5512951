"""Recipe for `dev2pro compare CONFIG.toml`: the same prompts and seeds through several "arms", side by side.

An arm is a base transformer + LoRAs + guidance settings, e.g. "LoRA trained on dev2pro, applied to dev at 3.5" vs
"LoRA trained on dev, applied to dev at 3.5". Every arm starts from the same noise (same seeds) and the same text
embeddings (encoded once, with the shared model folder's encoders, which are then freed), so differences between
arms come from the arms alone. Arms are loaded one at a time and released, so memory is one transformer at a time.

Output folder (built in a temp sibling, renamed into place): ``compare.png`` (one labelled column block per arm,
rows = prompts, columns = seeds), ``report.html`` (self-contained: images as base64 data URIs, settings and metrics
tables), ``results.json`` and ``images/<arm>/*.png`` (each with its settings in PNG text chunks). Metrics are the
network-free ones in ``lab.metrics`` plus an optional user hook ``metric_hook = "module:function"`` (or
``"path/to/file.py:function"``), called per arm as ``fn(images, prompts) -> {name: float}`` with one prompt per image.
"""

from __future__ import annotations

import base64
import gc
import html
import importlib
import importlib.util
import io
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import families
from .. import sampling as S
from ..arguments import check_size
from ..config import parse_size, to_dict
from ..data.buckets import fitted_references
from ..errors import UserError
from ..flux.checkpoint import open_checkpoint
from ..lora.formats import load_lora
from ..lab import metrics as M
from ..outputs import make_parent, write_json, write_text
from ..owned import check_owned_folder, owned_folder
from ..schemas import CompareConfig, load_compare_config
from ..train.preflight import check_reference

BLOCK_PAD = 8  # pixels between arm blocks in compare.png


def load_metric_hook(spec: str):
    """Import ``"pkg.module:function"`` or ``"path/to/file.py:function"``; a UserError says what failed."""
    where, sep, fn_name = spec.rpartition(":")
    if not sep or not where or not fn_name:
        raise UserError(f"metric_hook {spec!r} must look like 'module.path:function' or 'file.py:function'")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise UserError(f"metric_hook {spec!r}: file {where} does not exist")
            mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # any import-time failure of user code: report it, don't hide it in a traceback
        raise UserError(f"metric_hook {spec!r}: cannot import {where}: {type(e).__name__}: {e} (is it on "
                        "PYTHONPATH? a file path ending in .py also works)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"metric_hook {spec!r}: {where} has no function {fn_name!r}")
    return fn


def _call_hook(fn, spec: str, images: list, prompts: list[str]) -> dict[str, float]:
    result = fn(images, prompts)
    try:
        return {str(k): float(v) for k, v in dict(result).items()}
    except (TypeError, ValueError):
        raise UserError(f"metric_hook {spec!r} must return a dict of floats, got {result!r:.200}") from None


REPORT_FILES = ("compare.png", "results.json", "report.html")


def _image_file(arm: str, index: int, prompt: str, seed: int) -> str:
    return f"images/{S.slug(arm)}/{index:03d}-{S.slug(prompt)}-s{seed}.png"


def with_strengths(cfg: CompareConfig, strengths: list[float]) -> CompareConfig:
    """Every arm with LoRAs becomes one arm per strength ("NAME @1.5": each LoRA's scale times 1.5); arms
    without LoRAs (the bases) stay once -- the strength-transfer table users ask for, in one grid."""
    arms = []
    for arm in cfg.arms:
        if not arm.loras:
            arms.append(arm)
            continue
        for s in strengths:
            scaled = [f"{p}:{scale * s:g}" for p, scale in (S.parse_lora_arg(x) for x in arm.loras)]
            arms.append(replace(arm, name=f"{arm.name} @{s:g}", loras=scaled))
    return replace(cfg, arms=arms)


def run_compare(cfg: CompareConfig, out: str | None = None, overwrite: bool = False,
                strengths: list[float] | None = None) -> dict:
    """Render every arm, compute metrics, write compare.png / report.html / results.json. Returns the results.
    ``strengths``: expand each LoRA arm over these strengths (``with_strengths``)."""
    if strengths:
        cfg = with_strengths(cfg, strengths)
    out = Path(out or cfg.out)
    width, height = check_size(*parse_size(cfg.size), flag="size")  # the config's (or --set size=)
    arm_loras = {a.name: [S.parse_lora_arg(x) for x in a.loras] for a in cfg.arms}
    for arm in cfg.arms:
        S.check_inputs_exist(cfg.model, arm.transformer, arm_loras[arm.name])
    hook = load_metric_hook(cfg.metric_hook) if cfg.metric_hook else None
    make_parent(out, "output folder")  # out may come from the config (the CLI creates only --out's parents)
    names = [_image_file(a.name, pi, p, seed) for a in cfg.arms for pi, p in enumerate(cfg.prompts)
             for seed in cfg.seeds] + list(REPORT_FILES)
    check_owned_folder(out, overwrite, "compare", names, "compare folder")  # before minutes of loading and rendering
    headers = {a.name: open_checkpoint(a.transformer or cfg.model) for a in cfg.arms}
    family = open_checkpoint(cfg.model).family
    if cfg.image:
        check_reference(cfg.image, family, "image", (width, height))
    for a in cfg.arms:
        families.require_same(headers[a.name].family, family, f"arm {a.name!r}'s transformer",
                              f"the model folder {cfg.model}")
        try:  # every arm's LoRAs against its base's header, before the first arm renders
            paths, base = [p for p, _ in arm_loras[a.name]], a.transformer or cfg.model
            S.check_loras_fit(headers[a.name], paths, [load_lora(p, family=family, base=base) for p in paths], base)
        except UserError as e:
            raise UserError(f"arm {a.name!r}: {e}") from None
    specs = {name: h.spec() for name, h in headers.items()}  # each reads config.json / model_index.json: once
    guidance = {a.name: S.no_cfg() if S.step_distilled(specs[a.name]) else  # as its pipeline renders
                S.resolve_guidance(specs[a.name].guidance_embeds, a.mode,  # arm.cfg 1: the base's own
                                   *S.default_guidance(specs[a.name], headers[a.name].metadata, a.guidance,
                                                       a.cfg if a.cfg > 1.0 else None))
                for a in cfg.arms}

    device = S.default_device()
    dtype = S.default_dtype(device)
    components, embeds, negative = S.prepare_family(cfg.model, family, cfg.prompts, cfg.negative, device, dtype)
    components["vae"].to(device)

    refs = {"references": [fitted_references(cfg.image, (width, height))] * len(cfg.prompts)} if cfg.image else {}
    images, arm_info = _render_arms(cfg, family, arm_loras, guidance, components, embeds, negative, device, dtype,
                                    width, height, refs)

    # Metrics. Images are prompt-major: index = prompt * len(seeds) + seed index.
    flat_prompts = [p for p in cfg.prompts for _ in cfg.seeds]
    for info in arm_info:
        ims = images[info["name"]]
        info["metrics"] = M.pixel_stats(ims)
        info["metrics"]["diversity"] = M.diversity(ims, flat_prompts)
        if hook:
            info["metrics"].update({f"hook.{k}": v for k, v in _call_hook(hook, cfg.metric_hook, ims,
                                                                          flat_prompts).items()})
    distances = M.pairwise_distances(images)

    blocks = [S.make_grid(images[a.name], rows=len(cfg.prompts), cols=len(cfg.seeds)) for a in cfg.arms]
    grid = S.make_grid(blocks, rows=1, cols=len(blocks), labels=[a.name for a in cfg.arms], pad=BLOCK_PAD)
    width, height = next(iter(images.values()))[0].size  # what was rendered is what results.json records
    steps = sorted({int(a["steps"]) for a in arm_info})  # an arm's own (a step-distilled base: its 4)
    results = dict(model=cfg.model, prompts=cfg.prompts, negative=cfg.negative, seeds=cfg.seeds,
                   steps=steps[0] if len(steps) == 1 else steps,  # what was rendered, not the config's default
                   width=width, height=height, image=cfg.image, arms=arm_info, distances=distances, config=to_dict(cfg))
    files = _image_files(cfg, arm_info, images)
    with owned_folder(out, overwrite, "compare", names, "compare folder") as tmp:
        for (name, i), (rel, png_info) in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            S.save_png(images[name][i], tmp / rel, png_info)
        S.save_png(grid, tmp / "compare.png", {"prompts": cfg.prompts, "seeds": cfg.seeds,
                                               "arms": [a.name for a in cfg.arms], "Software": "dev2pro"})
        write_json(tmp / "results.json", results)
        write_text(tmp / "report.html", render_report(results, grid, images, refs.get("references", [None])[0]))
    print(f"wrote compare.png, report.html, results.json and images/ for {len(cfg.arms)} arm(s) to {out}/")
    return results


def _render_arms(cfg: CompareConfig, family, arm_loras: dict, guidance: dict, components: dict, embeds, negative,
                 device, dtype, width: int, height: int, refs: dict) -> tuple[dict[str, list], list[dict]]:
    """Each arm loaded, rendered and released in turn (one transformer in memory); -> (images by arm, arm info).
    ``refs``: the family's reference-image arguments (``{"references": [...]}``, FLUX.2 edits) or ``{}``."""
    images: dict[str, list] = {}
    arm_info = []
    for arm in cfg.arms:
        t0 = time.time()
        base, ckpt = S.load_base(arm.transformer or cfg.model, arm_loras[arm.name], dtype, fp8_storage=arm.fp8)
        spec = ckpt.spec()
        variant, distilled = getattr(spec, "variant", ""), S.step_distilled(spec)
        steps = arm.steps or (spec.sampling.steps if distilled else cfg.steps)  # distilled: its own
        pipe = family.build_pipeline(components, base.to(device), distilled=distilled)
        images[arm.name] = family.render(pipe, embeds, cfg.seeds, guidance[arm.name], negative=negative,
                                         steps=steps, width=width, height=height, **refs)
        seconds = time.time() - t0
        arm_info.append(dict(name=arm.name, transformer=str(arm.transformer or cfg.model), layout=ckpt.layout,
                             variant=variant, steps=steps,
                             loras=[[p, s] for p, s in arm_loras[arm.name]],
                             guidance=guidance[arm.name].to_dict(), fp8=arm.fp8, seconds=round(seconds, 2)))
        print(f"arm {arm.name!r}: {len(images[arm.name])} images in {seconds:.1f}s ({guidance[arm.name].describe()}, "
              f"{guidance[arm.name].mode})")
        del pipe, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return images, arm_info


# ------------------------------------------------------------------------------------------------ report
def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _image_files(cfg: CompareConfig, arm_info: list[dict], images: dict) -> dict:
    """(arm, image index) -> (path inside the output folder, PNG text chunks); each arm's info gets its images."""
    files = {}
    for info in arm_info:
        settings = {k: v for k, v in info.items() if k not in ("metrics", "seconds")}  # PNGs stay reproducible
        info["images"] = []
        for i in range(len(images[info["name"]])):
            pi, si = divmod(i, len(cfg.seeds))
            rel = _image_file(info["name"], pi, cfg.prompts[pi], cfg.seeds[si])
            files[info["name"], i] = (rel, {"prompt": cfg.prompts[pi], "seed": str(cfg.seeds[si]),
                                            "negative": cfg.negative, "arm": settings, "Software": "dev2pro",
                                            **({"image": cfg.image} if cfg.image else {})})
            info["images"].append(dict(prompt=cfg.prompts[pi], seed=cfg.seeds[si], file=rel))
    return files


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _reference_html(results: dict, reference) -> str:
    """The reference image(s) every prompt edits, as the arms saw them."""
    if reference is None:
        return ""
    shown = reference if isinstance(reference, list) else [reference]
    names = results["image"] if isinstance(results["image"], list) else [results["image"]]
    return (f'<p>Every prompt edits the reference image(s) {html.escape(", ".join(map(str, names)))} (fitted to the '
            'size):</p>' + "".join(f'<img src="{_data_uri(r)}" alt="reference image" title="reference {i + 1}">'
                                   for i, r in enumerate(shown)))


def render_report(results: dict, grid, images: dict[str, list], reference=None) -> str:
    """A self-contained HTML page: the grid, settings, metrics, distances, and every image by prompt; ``reference``:
    the fitted reference image every prompt edits, shown beside the grid."""
    arms = results["arms"]
    names = [a["name"] for a in arms]
    settings = _table(["arm", "transformer", "variant", "LoRAs", "mode", "embedded guidance", "CFG", "fp8", "seconds"],
                      [[a["name"], a["transformer"], a["variant"],
                        ", ".join(f"{Path(p).name}:{s:g}" for p, s in a["loras"]) or "none", a["guidance"]["mode"],
                        a["guidance"]["embedded"], a["guidance"]["cfg"], a["fp8"], a["seconds"]] for a in arms])
    metric_names = list(arms[0]["metrics"])
    metrics = _table(["arm"] + metric_names, [[a["name"]] + [a["metrics"][m] for m in metric_names] for a in arms])
    dist = _table([""] + names, [[a] + [results["distances"][a][b] for b in names] for a in names])
    n_seeds = len(results["seeds"])
    per_prompt = []
    for pi, prompt in enumerate(results["prompts"]):
        cells = "".join(
            f"<td><div class=arm>{html.escape(n)}</div>" + "".join(
                f'<img src="{_data_uri(images[n][pi * n_seeds + si])}" title="seed {s}">'
                for si, s in enumerate(results["seeds"])) + "</td>" for n in names)
        per_prompt.append(f"<h3>{html.escape(prompt)}</h3><table><tr>{cells}</tr></table>")
    steps = results["steps"] if isinstance(results["steps"], int) else " / ".join(map(str, results["steps"])) + \
        " (per arm)"
    shared = _table(["model", "negative", "seeds", "steps", "size"],
                    [[results["model"], results["negative"] or "(empty)", ", ".join(map(str, results["seeds"])),
                      steps, f"{results['width']}x{results['height']}"]])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dev2pro compare: {html.escape(' vs '.join(names))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}} img{{margin:2px}}
.arm{{font-weight:bold}}</style></head><body>
<h1>dev2pro compare</h1>
<p>Same prompts, seeds and text embeddings for every arm. Metrics are on a 0..1 pixel scale: hf_energy = mean
squared Laplacian (detail/noise), diversity = mean distance between seeds of one prompt (0 = collapsed).</p>
{_reference_html(results, reference)}<img src="{_data_uri(grid)}" alt="compare grid">
<h2>Shared settings</h2>{shared}
<h2>Arms</h2>{settings}
<h2>Metrics</h2>{metrics}
<h2>Mean absolute pixel distance between arms (same prompt and seed)</h2>{dist}
<h2>Images by prompt</h2>{''.join(per_prompt)}
</body></html>
"""


# ------------------------------------------------------------------------------------------------ CLI
def compare(config_path: str, out: str | None = None, overwrite: bool = False,
            overrides: list[str] | None = None, strengths: list[float] | None = None) -> dict:
    return run_compare(load_compare_config(config_path, overrides), out, overwrite, strengths)
