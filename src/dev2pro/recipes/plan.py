"""`dev2pro plan CONFIG.toml [--vram GB]` and the plan printed at the start of `dev2pro train`.

The recipe side of ``dev2pro.plan``: turn a train config into ``PlanInputs`` (the transformer's spec comes from
the checkpoint header, nothing is loaded), print the plan and compare it with the card (``--vram`` or the CUDA
device seen). The ``--vram`` presets are applied by the config loader (``schemas.load_train_config``).
"""

from __future__ import annotations

import logging
import math
import sys

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ plan
def plan_inputs(cfg):
    """PlanInputs for a train (or dedistill) config; the spec comes from the checkpoint header only."""
    from ..flux.checkpoint import open_checkpoint
    from ..plan import PlanInputs, encoder_params

    m = cfg.model
    spec = open_checkpoint(m.transformer or m.path, allow_pickle=m.allow_pickle).spec()
    res = cfg.data.resolution
    sample = cfg.sample.width * cfg.sample.height if cfg.sample.prompts else 0
    return PlanInputs(spec, m.dtype, fp8_storage=m.fp8_storage, fp8_keep=tuple(m.fp8_keep),
                      gradient_checkpointing=m.gradient_checkpointing, blocks_to_swap=m.blocks_to_swap,
                      rank=cfg.lora.rank, targets=cfg.lora.targets, extra_targets=tuple(cfg.lora.extra_targets),
                      optimizer=cfg.train.optimizer, batch_size=cfg.data.batch_size,
                      image_tokens=((res // 16) ** 2,), text_tokens=m.t5_max_length, sample_pixels=sample,
                      inference_base=bool(m.inference_base and cfg.sample.prompts), vae_tiling=m.vae_tiling,
                      adapter_params=adapter_params_in_file(getattr(m, "adapter", "")),
                      text_encoder=m.text_encoder, text_encoder_dtype=m.text_encoder_dtype,
                      **{f"{k}_params": v for k, v in encoder_params(m.path).items()})


def adapter_params_in_file(path: str) -> int:
    """Parameters of a training adapter file, from its safetensors header (no tensor is read)."""
    if not path:
        return 0
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight"))


def card_bytes(vram_gb: float | None) -> tuple[int | None, str]:
    """(bytes, description) of the card to check against: ``--vram`` if given, else the CUDA device seen."""
    from ..plan import GB

    if vram_gb:
        return int(vram_gb * GB), f"--vram {vram_gb:g}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return None, "no CUDA device"


def report(cfg, vram_gb: float | None = None, out=None) -> dict:
    """Print the plan and the fit verdict; returns the plan as a dict (plus 'fits' and 'message')."""
    from ..plan import advise, estimate, render

    out = out or sys.stdout
    inp = plan_inputs(cfg)
    plan = estimate(inp)
    print(render(plan), file=out, flush=True)
    card, what = card_bytes(vram_gb)
    result = plan.to_dict()
    if card is None:
        print("  (no GPU seen: pass --vram GB to check a card)", file=out, flush=True)
        return result
    fits, message = advise(inp, card)
    print(f"  {what}: {message}", file=out, flush=True)
    result.update(fits=fits, message=message)
    return result


def print_plan_safely(cfg) -> None:
    """The plan at the start of a run: informative only, so a failure to estimate never stops training."""
    try:
        report(cfg, cfg.model.vram or None)
    except Exception as e:  # noqa: BLE001 -- an estimate must not cost the user their run
        log.warning("memory plan unavailable: %s", e)


def add_plan_parser(sub):
    p = sub.add_parser("plan", help="estimate GPU memory and host RAM of a `dev2pro train` config before running it")
    p.add_argument("config", help="a train config TOML")
    p.add_argument("--vram", type=float, metavar="GB", help="check against a card of this size (default: the GPU seen)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")

    def run(a):
        from ..schemas import load_train_config

        report(load_train_config(a.config, a.set), a.vram)
    p.set_defaults(run=run)
    return p
