"""Training objectives for Flux transformers: one ``predict`` call site and the three losses built on it.

- ``flow``: plain flow matching at a fixed guidance input (1.0 in the Dev2Pro recipe). `train` (LoRA) and
  `dedistill` (objective ``flow``) both use it.
- ``cfg_teacher``: the student, at guidance 1.0, answers for the caption (c) and the empty prompt (u); its CFG
  combination ``u + w (c - u)`` must match a frozen guidance-distilled teacher asked at guidance ``w``.
- ``guidance_distill``: the opposite direction (how dev was made from pro; Meng et al., Algorithm 1): the student,
  asked at guidance ``w``, must match the CFG combination of a teacher sampled with true CFG.

``draw`` makes every random draw of a step, for the whole (global) batch, in a fixed order -- caption dropout,
noise, sigmas, the CFG scale ``w`` -- from one generator, then keeps this rank's slice, so N processes train the
weights one process trains on the same global batch, and a resumed run draws what the uninterrupted one drew.
``predict`` is the only place the transformer is called in training and the only place its guidance tensor is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flow import flow_loss, flow_target, noisy_input, sample_sigmas
from . import families
from .flux.latents import pack, pack_references

from .choices import OBJECTIVES  # noqa: E402 -- re-exported


@dataclass
class Noised:
    """One (micro-)batch with its draws: clean latents (B, C, h, w), noise, sigmas (B,), text, CFG scales (B,)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    prompt_embeds: torch.Tensor  # (B, seq, D)
    pooled: torch.Tensor | None  # (B, P); None for families without a pooled text vector (FLUX.2)
    w: torch.Tensor  # (B,) CFG scales for the teacher objectives (ones when not drawn)
    weights: torch.Tensor | None = None  # (B,) loss weight per sample (reg images); None: all 1
    mask: torch.Tensor | None = None  # (B, 1, h, w) loss mask on the latent grid; None: no image has one
    control: torch.Tensor | None = None  # (B, n, C, h, w) n reference images' latents (edit pairs); None: none

    def to(self, device) -> "Noised":
        """This batch on ``device``, so x_t and the target are built there (no host copy queued behind the forward).
        To CUDA through pinned memory: a copy from pageable memory waits for the stream (the previous step)."""
        cuda = torch.device(device).type == "cuda"
        move = (lambda t: t if t is None else (t.pin_memory() if cuda and not t.is_cuda else t).to(
            device, non_blocking=True))
        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @property
    def x_t(self) -> torch.Tensor:
        """The noisy input as tokens (B, T, C*4)."""
        return pack(noisy_input(self.x0, self.noise, self.sigmas))

    @property
    def target(self) -> torch.Tensor:
        """The flow-matching velocity target as tokens (B, T, C*4)."""
        return pack(flow_target(self.x0, self.noise))

    @property
    def token_weights(self) -> torch.Tensor | None:
        """The loss mask as the loss sees the target: each latent pixel's weight on its channels, packed
        (B, T, C*4); None without a mask."""
        return None if self.mask is None else pack(self.mask.expand(-1, self.x0.shape[1], -1, -1))


@dataclass
class ModelInputs:
    """What the transformer reads besides guidance: packed tokens, sigmas, text, and the latent size."""

    x_t: torch.Tensor
    sigmas: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    h: int
    w: int
    reference: torch.Tensor | None = None  # (B, n*T', C*4) clean reference-image tokens the model attends to
    reference_hw: tuple[int, int] | None = None  # their latent (h, w): (h, w) up to 1 MP, smaller above

    @classmethod
    def of(cls, batch: Noised) -> "ModelInputs":
        c = batch.control  # (B, n, C, h', w')
        ref = None if c is None else pack_references(c)
        return cls(batch.x_t, batch.sigmas, batch.prompt_embeds, batch.pooled, *batch.x0.shape[2:], ref,
                   None if c is None else tuple(c.shape[-2:]))

    @property
    def text(self) -> dict:
        """The text tensors the family's ``model_inputs`` reads."""
        return {k: v for k, v in (("prompt_embeds", self.prompt_embeds), ("pooled", self.pooled)) if v is not None}

    def with_empty(self, empty: dict) -> "ModelInputs":
        """A 2B batch: these rows with their captions, then the same rows with the empty prompt (one forward)."""
        dev = self.prompt_embeds.device  # the batch may already be on the device, the empty prompt not
        pe = torch.cat([self.prompt_embeds, empty["prompt_embeds"].to(dev).expand_as(self.prompt_embeds)])
        pooled = None if self.pooled is None else torch.cat([self.pooled,
                                                             empty["pooled"].to(dev).expand_as(self.pooled)])
        ref = None if self.reference is None else torch.cat([self.reference, self.reference])
        return ModelInputs(torch.cat([self.x_t, self.x_t]), torch.cat([self.sigmas, self.sigmas]), pe, pooled,
                           self.h, self.w, ref, self.reference_hw)


def draw(batch: dict, gen: torch.Generator, *, dropout_p: float, empty: dict, timestep_sampling: str,
         sigmoid_scale: float, shift: float, w_range: tuple[float, float] | None = None, rank: int = 0,
         world: int = 1) -> Noised:
    """Caption dropout, noise, sigmas and (with ``w_range``) CFG scales for the global batch of ``world`` equal
    slices, then this rank's slice. ``batch`` (``data.loader.collate``) holds this rank's rows only."""
    x0 = batch["latents"]
    per, (_, c, h, w) = x0.shape[0], x0.shape
    n = per * world
    drop = torch.rand(n, generator=gen) < dropout_p if dropout_p > 0 else torch.zeros(n, dtype=torch.bool)
    noise = torch.randn((n, c, h, w), generator=gen)
    sigmas = sample_sigmas(n, timestep_sampling, gen, sigmoid_scale=sigmoid_scale, shift=shift,
                           image_seq_len=(h // 2) * (w // 2))
    scales = torch.rand(n, generator=gen) * (w_range[1] - w_range[0]) + w_range[0] if w_range else torch.ones(n)
    mine = slice(rank * per, (rank + 1) * per)
    text = {k: batch[k].clone() for k in ("prompt_embeds", "pooled") if k in batch}  # no pooled in FLUX.2
    for j, dropped in enumerate(drop[mine].tolist()):
        if dropped:
            for k in text:
                text[k][j] = empty[k]
    return Noised(x0, noise[mine], sigmas[mine], text["prompt_embeds"], text.get("pooled"), scales[mine],
                  batch.get("weights"), batch.get("mask"), batch.get("control"))


def predict(model, inputs: ModelInputs, guidance: float | torch.Tensor, device, dtype) -> torch.Tensor:
    """The velocity (B, T, C*4) in fp32 at ``guidance`` (a value, or one per row); models without a guidance
    embedding ignore it. Inputs are cast to ``dtype`` on ``device``."""
    inner = model.module if hasattr(model, "module") else model  # DDP
    b = inputs.x_t.shape[0]
    g = None
    if inner.config.guidance_embeds:
        g = (guidance if torch.is_tensor(guidance) else torch.full((b,), float(guidance))).to(device, dtype)
    ref = {} if inputs.reference is None else {"reference": inputs.reference,  # FLUX.2 edit pairs only
                                               "reference_hw": inputs.reference_hw}
    kwargs = families.of_model(inner).model_inputs(inputs.x_t, inputs.sigmas, inputs.text, inputs.h, inputs.w, g,
                                                   device, dtype, **ref)
    return model(**kwargs, return_dict=False)[0][:, :inputs.x_t.shape[1]].float()  # the reference's own: dropped


def flow_objective(student, batch: Noised, guidance: float, device, dtype) -> tuple[torch.Tensor, dict]:
    """Flow matching at a fixed ``guidance`` input."""
    pred = predict(student, ModelInputs.of(batch), guidance, device, dtype)
    weights, tokens = (None if t is None else t.to(device) for t in (batch.weights, batch.token_weights))
    loss = flow_loss(pred, batch.target.to(device), weights, tokens)
    return loss, {"loss/flow": loss.detach()}


def cfg_teacher_objective(student, teacher, batch: Noised, empty: dict, flow_weight: float, device, dtype,
                          teacher_dtype) -> tuple[torch.Tensor, dict]:
    """MSE(u + w (c - u), teacher(x_t, c, guidance=w)) [+ flow_weight * flow loss on c]; student at guidance 1.

    Caption and empty prompt go through the student as one 2B batch: one forward with grad instead of two.
    """
    b, inputs = batch.x0.shape[0], ModelInputs.of(batch)
    both = predict(student, inputs.with_empty(empty), 1.0, device, dtype)
    cond, uncond = both[:b], both[b:]
    guided = uncond + batch.w.to(device).view(b, 1, 1) * (cond - uncond)
    with torch.no_grad():
        target = predict(teacher, inputs, batch.w, device, teacher_dtype)
    distill = F.mse_loss(guided, target)
    parts = {"loss/distill": distill.detach()}
    loss = distill
    if flow_weight > 0:
        fl = flow_loss(cond, batch.target.to(device))
        parts["loss/flow"] = fl.detach()
        loss = loss + flow_weight * fl
    return loss, parts


def guidance_distill_objective(student, teacher, batch: Noised, empty: dict, device, dtype,
                               teacher_dtype) -> tuple[torch.Tensor, dict]:
    """MSE(student(x_t, c, guidance=w), u + w (c - u)) with u, c the teacher's outputs (Meng et al., Alg. 1)."""
    b, inputs = batch.x0.shape[0], ModelInputs.of(batch)
    with torch.no_grad():  # caption and empty prompt through the teacher as one 2B batch
        both = predict(teacher, inputs.with_empty(empty), 1.0, device, teacher_dtype)
        cond, uncond = both[:b], both[b:]
        target = uncond + batch.w.to(device).view(b, 1, 1) * (cond - uncond)
    pred = predict(student, inputs, batch.w, device, dtype)
    loss = F.mse_loss(pred, target)
    return loss, {"loss/distill": loss.detach()}


def objective_loss(objective: str, student, teacher, batch: Noised, empty: dict, device, dtype, teacher_dtype=None,
                   guidance: float = 1.0, flow_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The named objective's (loss, logged parts); ``guidance`` is the flow objective's fixed input."""
    if objective == "flow":
        return flow_objective(student, batch, guidance, device, dtype)
    if objective == "guidance_distill":
        return guidance_distill_objective(student, teacher, batch, empty, device, dtype, teacher_dtype)
    if objective == "cfg_teacher":
        return cfg_teacher_objective(student, teacher, batch, empty, flow_weight, device, dtype, teacher_dtype)
    raise ValueError(f"unknown objective {objective!r} (one of {', '.join(OBJECTIVES)})")
