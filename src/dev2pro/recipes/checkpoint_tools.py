"""Recipes for `dev2pro init-tiny`, `dev2pro inspect` and `dev2pro convert`."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..flux import checkpoint as ckptmod
from ..flux import convert as flux_convert
from ..flux import inspection
from ..flux.fp8 import Fp8Policy


_TINY_VARIANTS = {"flux1": ("dev", "pro"), "flux2-klein": ("base", "distilled"), "flux2-dev": ("dev",)}


def init_tiny(out_dir: str, variant: str | None = None, seed: int = 0, overwrite: bool = False,
              family: str = "flux1") -> Path:
    """A tiny random-weight model folder of ``family`` (flux1 | flux2-klein | flux2-dev) and ``variant``."""
    allowed = _TINY_VARIANTS.get(family)
    if allowed is None:
        raise UserError(f"--family {family}: choose one of {', '.join(_TINY_VARIANTS)}")
    variant = variant or allowed[0]
    if variant not in allowed:
        raise UserError(f"--variant {variant} is not a {family} variant: choose {' or '.join(allowed)}")
    # lazy: loads diffusers + transformers (~3 s); inspect/convert don't
    if family == "flux1":
        from ..flux.tiny import write_tiny_model

        path = write_tiny_model(Path(out_dir), variant=variant, seed=seed, overwrite=overwrite)
        print(f"wrote tiny {variant} model folder to {path} (loadable with diffusers FluxPipeline.from_pretrained)")
        return path
    from ..families.flux2.tiny import write_tiny

    name = "dev" if family == "flux2-dev" else f"klein-{variant}"
    path = write_tiny(Path(out_dir), variant=name, seed=seed, overwrite=overwrite)
    pipeline = "Flux2Pipeline" if family == "flux2-dev" else "Flux2KleinPipeline"
    print(f"wrote tiny FLUX.2 {name} model folder to {path} (loadable with diffusers {pipeline}.from_pretrained)")
    return path


def inspect(path: str, as_json: bool = False, allow_pickle: bool = False) -> dict:
    info = inspection.describe(ckptmod.open_checkpoint(path, allow_pickle=allow_pickle))
    if as_json:
        print(json.dumps(info, indent=2))
        return info
    print(f"{info['path']}")
    print(f"  family      {info['family']}")
    print(f"  layout      {info['layout']}" + (f" (key prefix '{info['key_prefix']}')" if info["key_prefix"] else ""))
    print(f"  variant     {info['variant']}: {info['variant_detail']}")
    print(f"  blocks      {info['double_blocks']} double + {info['single_blocks']} single, hidden {info['hidden']},"
          f" {info['heads']} heads")
    print(f"  params      {info['params'] / 1e9:.3f} B" if info["params"] > 1e8 else
          f"  params      {info['params']:,}")
    print(f"  size        {info['size_bytes'] / 1024**3:.2f} GiB" if info["size_bytes"] > 1e8 else
          f"  size        {info['size_bytes']:,} bytes")
    print(f"  fp8         {info['fp8']}")
    print("  dtypes      " + "; ".join(f"{g}: " + ", ".join(f"{d} x{n}" for d, n in sorted(c.items()))
                                       for g, c in sorted(info["dtypes"].items())))
    if info["missing"]:
        print(f"  missing     {inspection.missing_summary(info['missing'], limit=8)}: the file is incomplete "
              f"(it will not load; convert refuses it without --allow-incomplete)")
    if info["other_component_keys_ignored"]:
        print(f"  ignored     {info['other_component_keys_ignored']} keys of other components (VAE/text encoders)")
    return info


def convert(src: str, dst: str, layout: str | None = None, dtype: str | None = None, keep: str | None = None,
            overwrite: bool = False, allow_pickle: bool = False, drop_guidance: bool = False,
            allow_incomplete: bool = False, show_progress: bool = True, variant: str | None = None) -> Path:
    policy = Fp8Policy.from_names(keep.split(",")) if keep is not None else Fp8Policy()
    ckpt = ckptmod.open_checkpoint(src, allow_pickle=allow_pickle)
    bar: list = []

    def progress(n: int) -> None:  # the bar starts with the first byte: refusals print only their error
        if not show_progress:
            return
        if not bar:
            bar.append(tqdm(total=ckpt.size_bytes(), unit="B", unit_scale=True, desc="convert", leave=False))
        bar[0].update(n)
    try:
        out = flux_convert.convert(src, dst, layout=layout, dtype=dtype, policy=policy, overwrite=overwrite,
                              allow_pickle=allow_pickle, drop_guidance=drop_guidance, progress=progress,
                              allow_incomplete=allow_incomplete, variant=variant)
    finally:
        if bar:
            bar[0].close()
    print(f"wrote {out} (layout {flux_convert.output_layout(ckpt.layout, dst, layout)}, dtype {dtype or 'as input'})")
    return out
