"""Model families: what differs between FLUX.1 and FLUX.2, said in one place per family.

A ``Family`` (the idea of BFL's ``ModelSpec`` and torchtune's per-family builders) answers, for one family:

- **keys**: which keys mark a checkpoint as this family, the key that names each layout (BFL/ComfyUI single file,
  diffusers), and the tensor ``Piece`` table between the layouts (``flux.keys``: rows of a BFL tensor are rows of
  a diffusers tensor), sized from a checkpoint's own shapes;
- **sizes**: the spec read off shapes or a diffusers ``config.json``, and the diffusers transformer built from it;
- **blocks**: the repeated blocks in execution order (block swap, FSDP wrap, checkpointing);
- **inputs**: what the transformer reads besides latents and guidance (text, ids), so ``objectives.predict``
  stays one call site for every family;
- **data**: the text stack (load, encode captions into the cached format, what keys that cache) and the VAE
  (load, encode pixels into stored latents that FLUX.1's 2x2 ``pack`` turns into the family's tokens).

Everything family-agnostic (reading safetensors headers, fp8, streaming writes, the training loop) stays where it
is and asks the family. A new family is a sub-package here plus one line in ``_registry`` (and its name in
``choices.FAMILIES``, the torch-free list the config schemas offer; a test keeps the two equal). Detection is by keys,
never file names; ``model.family`` (or ``family=`` in code) forces one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError, UserError
from .family import Family, Shapes, lazy  # noqa: F401 (the package's API)


def _registry() -> dict[str, Family]:
    # on first use: the family modules import torch, which the CLI and the schemas must not pay for at import
    from .flux1 import FAMILY as FLUX1
    from .flux2.family import FAMILY as FLUX2
    return {f.name: f for f in (FLUX1, FLUX2)}




def families() -> dict[str, Family]:
    """Every known family by name, in detection order."""
    return _registry()


def get(name: str) -> Family:
    """The family called ``name``; a UserError naming the choices otherwise."""
    fams = families()
    if name not in fams:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(fams)} (or \"auto\")")
    return fams[name]


def detect(keys: Iterable[str], layout: str, forced: str | None = None, source: str = "checkpoint") -> Family:
    """The family of a checkpoint from its (unprefixed) keys in ``layout``; ``forced`` (a family name, or None /
    "auto") overrides detection but must still fit the keys."""
    keys = list(keys)
    fams = families()
    if forced and forced != "auto":
        fam = get(forced)
        others = [f for f in fams.values() if f is not fam and f.claims(keys)]
        if others and not fam.claims(keys):
            raise CheckpointError(f"{source}: model.family = {forced!r}, but its keys are {others[0].title}'s; "
                                  f"remove model.family (detection is by keys) or pass a {fam.title} checkpoint")
        return fam
    claimed = [f for f in fams.values() if f.claims(keys)]
    if len(claimed) > 1:
        raise CheckpointError(f"{source} mixes keys of {' and '.join(f.title for f in claimed)}: a merged or "
                              f"corrupt file; convert it again from one source")
    if claimed:
        return claimed[0]
    return fams["flux1"]  # no family's own markers (a partial file): the original FLUX.1 rules decide


def of_folder(model_dir, forced: str | None = None) -> Family:
    """The family of a diffusers model folder, from the pipeline class its ``model_index.json`` names; ``forced`` (a
    family name; None / "auto" detect) is taken as it is (the family's own loaders then check the folder)."""
    if forced and forced != "auto":
        return get(forced)
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise UserError(f"{model_dir} is not a diffusers model folder (no model_index.json): point it at the whole "
                        "downloaded model folder (vae/, text encoder and tokenizer folders, model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise UserError(f"{index}: cannot read it ({e}); download the model folder again") from None
    for fam in families().values():
        if name in fam.pipelines:
            return fam
    known = "; ".join(f"{f.title}: {', '.join(f.pipelines)}" for f in families().values())
    raise UserError(f"{index} names the pipeline {name!r}, which dev2pro does not train ({known}); pass the family "
                    "explicitly if this folder holds one of them")


def of_spec(spec) -> Family:
    """The family a spec belongs to (every spec class names it)."""
    return get(spec.family)


def of_model(model) -> Family:
    """The family of a diffusers transformer (DDP/compile wrappers and peft models unwrapped), by its class."""
    inner = model
    for attr in ("module", "_orig_mod"):
        inner = getattr(inner, attr, inner)
    # the class and its bases: FSDP2's fully_shard swaps in a subclass (FSDPFlux2Transformer2DModel)
    names = {c.__name__ for m in (inner, getattr(inner, "base_model", None)) if m is not None for c in type(m).__mro__}
    for fam in families().values():
        if fam.transformer_class in names:
            return fam
    return get("flux1")


def build_transformer(spec, device: str = "cpu", dtype=None, seed: int | None = None):
    """The diffusers transformer for ``spec``, of its family's class (``device='meta'`` allocates nothing)."""
    return of_spec(spec).build_transformer(spec, device=device, dtype=dtype, seed=seed)


def random_inputs(spec, img: int, txt: int, device, dtype, seed: int = 0) -> dict:
    """Keyword arguments of one forward of ``spec``'s transformer on random data, batch 1: ``img`` packed image
    tokens (rounded to a square latent), ``txt`` text tokens, guidance 1 where the model takes it -- for probes and
    measurements that need the model's own layouts, not meaningful inputs."""
    import torch

    fam = of_spec(spec)
    g = torch.Generator().manual_seed(seed)
    text = {"prompt_embeds": torch.randn(1, txt, spec.context_dim, generator=g)}
    if fam.name == "flux1":
        text["pooled"] = torch.randn(1, spec.pooled_dim, generator=g)
    side = int(img ** 0.5)
    return fam.model_inputs(torch.randn(1, side * side, spec.in_channels, generator=g), torch.tensor([0.5]), text,
                            2 * side, 2 * side, torch.ones(1) if spec.guidance_embeds else None, device, dtype)


def require_same(a: Family, b: Family, what_a: str, what_b: str) -> None:
    """A one-line error when two things that must share a family do not (a LoRA and its base, ...)."""
    if a.name != b.name:
        raise UserError(f"{what_a} is {a.title} but {what_b} is {b.title}: they cannot be used together; use a "
                        f"{b.title} {what_a.split()[0]} or a {a.title} {what_b.split()[0]}")
