"""Recipe for `dev2pro sample`: render prompts x seeds from any Flux base with LoRAs, one PNG each plus a grid.

The story: check every input path and the output folder (before minutes of loading), load VAE + text encoders +
scheduler from the model folder, encode all prompts and the negative and free the encoders, load the transformer
(the folder's or ``--transformer``, any layout/dtype; fp8 kept as fp8 with ``--fp8``), apply the LoRAs, render, write.
The output folder is built in a temp sibling and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from .. import sampling as S
from ..errors import UserError
from ..flux.checkpoint import open_checkpoint
from ..flux.header import read_header
from ..arguments import check_size
from ..config import as_list, parse_size
from ..data.buckets import fitted_references
from ..lora import adapter as adaptermod
from ..lora.formats import file_edit_references
from ..strength import strength_note
from ..owned import check_owned_folder, owned_folder
from ..train.blockswap import enable_block_swap
from ..train.preflight import check_reference


def png_info(prompt: str, seed: int, negative: str, settings: dict) -> dict:
    """PNG text chunks: prompt, seed, all settings as JSON, and an A1111-style 'parameters' line that image
    browsers (Civitai, A1111/Forge 'PNG info') display."""
    g = settings["guidance"]
    params = (f"{prompt}\nNegative prompt: {negative}\nSteps: {settings['steps']}, Sampler: Euler (flow matching), "
              f"Guidance: {g['embedded']}, CFG scale: {g['cfg']}, Seed: {seed}, "
              f"Size: {settings['width']}x{settings['height']}, Model: {settings['transformer']}")
    if settings["loras"]:
        params += ", LoRAs: " + "; ".join(f"{Path(p).name}:{s:g}" for p, s in settings["loras"])
    if settings.get("adapter"):
        params += f", Adapter: {Path(settings['adapter'][0]).name}:{settings['adapter'][1]:g}"
    return {"prompt": prompt, "seed": str(seed), "negative": negative, "dev2pro": settings, "parameters": params,
            "Software": "dev2pro"}


def png_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:03d}-{S.slug(prompt)}-s{seed}.png"


def _reference_arg(image, family, size: tuple[int, int], loras):
    """``--image`` value(s), checked -> one path (as before), a list (several references) or None; a note for an
    edit LoRA (``loras``) given another count of references (none: it renders text-to-image, as asked)."""
    paths = [str(x) for x in as_list(image)]
    if any(not x.strip() for x in paths):  # an empty shell variable: no silent text-to-image render
        raise UserError("--image: an empty path; give the reference image's file, or leave --image out")
    if paths:
        check_reference(paths, family, "--image", size)
    for path, _ in loras:
        if (refs := file_edit_references(path)) and refs != len(paths):
            print(f"note: {Path(path).name} was trained on edit pairs with {refs} reference image(s) per edit; "
                  f"pass as many --image to render its edit ({len(paths)} given)")
    return None if not paths else paths[0] if len(paths) == 1 else paths


def _print_notes(spec, base, loras) -> None:
    """What the user may not expect: a klein file of unknown variant, a LoRA calibrated to another strength here."""
    notes = [S.unknown_variant_note(spec, base)] + [strength_note(p, s, spec.variant) for p, s in loras]
    for note in filter(None, notes):
        print(note)


def _rendered_model(metadata, base: str, adapter) -> tuple[dict, str]:
    """(metadata, name) of what is rendered: the base, or base + a de-distillation adapter (dev + adapter = dev2pro,
    rendered as dev2pro is used, as training's with_adapter grids)."""
    if adapter and adapter[1] > 0:
        own = read_header(Path(adapter[0])).get("__metadata__") or {}
        if S.dedistilled(own):
            return own, f"{Path(base).name} + adapter {Path(adapter[0]).name}"
    return metadata, Path(base).name


def _guidance(spec, metadata, name: str, guidance: float | None, cfg: float | None, mode: str):
    """What a render of this base applies: the base's own scale where none is given (a de-distilled export: true CFG
    at guidance 1, said); a step-distilled base never runs CFG (said when asked for)."""
    if S.step_distilled(spec):  # its pipeline runs no CFG whatever we pass: say so, record what it does
        if (guidance or 1.0) > 1.0 or (cfg or 1.0) > 1.0 or mode == "true_cfg":  # asked for CFG
            print(f"note: {spec.variant} is sampled without CFG (it is step-distilled); --guidance/--cfg/--mode "
                  "ignored")
        return S.no_cfg()
    given = guidance
    guidance, true_cfg = S.default_guidance(spec, metadata, guidance, cfg)
    if cfg is not None and cfg <= 1.0 and not spec.guidance_embeds:
        guidance = 1.0  # an explicit --cfg 1 turns true CFG off (else --guidance is these bases' CFG scale)
    if given is None and S.dedistilled(metadata) and true_cfg > 1.0 and mode == "auto":
        print(f"note: {name} is a dev2pro de-distillation (trained at guidance 1): rendered with true CFG "
              f"{true_cfg:g} at guidance 1 and the negative prompt, as its run's cfg grids; --guidance sets another")
    return S.resolve_guidance(spec.guidance_embeds, mode, guidance, true_cfg)


def run_sample(model: str, prompts: Sequence[str], out: str, *, transformer: str | None = None,
               loras: Sequence[str | tuple[str, float]] = (), negative: str = "", guidance: float | None = None,
               cfg: float | None = None, mode: str = "auto", steps: int | None = None,
               size: str | tuple[int, int] = (1024, 1024),
               seeds: Sequence[int] = (0,), overwrite: bool = False, fp8: bool = False,
               max_sequence_length: int = 512, blocks_to_swap: int = 0,
               adapter: str | tuple[str, float] | None = None, image: str | list[str] | None = None,
               allow_pickle: bool = False) -> list[Path]:
    """Render every prompt x seed; returns the written PNG paths (the grid last, when there is one).

    ``adapter`` (path[:scale]): a training adapter (e.g. dev -> dev2pro) added as a side branch after the LoRAs,
    so dev + adapter + LoRA renders what the LoRA does on dev2pro without a second base file. ``guidance`` and
    ``steps`` default to the base's own (FLUX.1: 3.5 and 20; FLUX.2 dev: embedded 4, 50; klein Base: true CFG 4, 50);
    FLUX.2 klein distilled is sampled as it is used, without CFG (4 steps unless ``steps`` says otherwise).
    ``image``: a reference image every prompt edits (FLUX.2; the pipeline's ``image``), fitted to ``size``; a list:
    several (a multi-reference edit LoRA), in the order it was trained with."""
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise UserError("give a prompt (--prompt TEXT) or a prompts file (--prompts FILE)")
    if not seeds:
        raise UserError("give at least one seed")
    width, height = check_size(*(parse_size(size) if isinstance(size, str) else size))
    loras = [S.parse_lora_arg(x) if isinstance(x, str) else (str(x[0]), float(x[1])) for x in loras]
    if isinstance(adapter, str):
        adapter = S.parse_lora_arg(adapter)
    S.check_inputs_exist(model, transformer, loras + ([adapter] if adapter else []))
    names = [png_name(pi, prompt, seed) for pi, prompt in enumerate(prompts) for seed in seeds]
    names += ["grid.png"] if len(names) > 1 else []
    check_owned_folder(out, overwrite, "sample", names, "sample folder")  # before minutes of loading and rendering
    header = open_checkpoint(transformer or model, allow_pickle=allow_pickle)
    if transformer:
        S.check_folder_family(model, transformer, header)
    family, spec = header.family, header.spec()
    _print_notes(spec, transformer or model, loras)
    image = _reference_arg(image, family, (width, height), loras)
    steps = steps if steps is not None else S.own_settings(spec)[0]
    g = _guidance(spec, *_rendered_model(header.metadata, transformer or model, adapter), guidance, cfg, mode)

    device = S.default_device()
    dtype = S.default_dtype(device)
    t0 = time.time()
    components, embeds, negative_embeds = S.prepare_family(model, family, prompts, negative, device, dtype,
                                                           max_sequence_length)
    base, ckpt = S.load_base(transformer or model, loras, dtype, fp8_storage=fp8, allow_pickle=allow_pickle)
    if adapter:  # before the block swap: its weights, like the LoRAs', stay on the device
        adaptermod.attach_file(base, adapter[0], adapter[1], torch.float32 if dtype == torch.float32 else dtype)
    enable_block_swap(base, blocks_to_swap, device)  # .to(device) when 0; keeps fp8 storage dtypes
    pipe = family.build_pipeline(components, base, distilled=S.step_distilled(spec))
    pipe.vae.to(device)
    mode = " (embedded)" if g.mode == "embedded" and g.cfg <= 1 else ""  # "guidance 3.5" alone could read as CFG
    print(f"base {ckpt.path} ({ckpt.layout}, {ckpt.spec().variant}); {g.describe()}{mode}; {len(loras)} LoRA(s)"
          + (f" + adapter {adapter[0]}" if adapter else "") + f"; loaded in {time.time() - t0:.1f}s")

    t0 = time.time()
    refs = {"references": [fitted_references(image, (width, height))] * len(prompts)} if image else {}
    images = family.render(pipe, embeds, seeds, g, negative=negative_embeds, steps=steps, width=width, height=height,
                           **refs)
    seconds = time.time() - t0

    width, height = images[0].size  # what was rendered is what the PNGs record
    settings = dict(model=str(model), transformer=str(transformer or model), loras=[[p, s] for p, s in loras],
                    guidance=g.to_dict(), steps=steps, width=width, height=height, fp8=fp8,
                    adapter=list(adapter) if adapter else None, **({"image": image} if image else {}))
    with owned_folder(out, overwrite, "sample", names, "sample folder") as tmp:
        i = 0
        for pi, prompt in enumerate(prompts):
            for seed in seeds:
                name = png_name(pi, prompt, seed)
                S.save_png(images[i], tmp / name, png_info(prompt, seed, negative, settings))
                i += 1
        if len(images) > 1:
            grid = S.make_grid(images, rows=len(prompts), cols=len(seeds))
            S.save_png(grid, tmp / "grid.png", {"prompts": prompts, "seeds": seeds, "dev2pro": settings,
                                                "Software": "dev2pro"})
    out = Path(out)
    print(f"wrote {len(images)} image(s) ({len(prompts)} prompt(s) x {len(seeds)} seed(s), {seconds:.1f}s)"
          + (" and grid.png" if len(images) > 1 else "") + f" to {out}/")
    return [out / n for n in names]
