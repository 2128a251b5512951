"""Host RAM of a training run, per phase, for the memory plan (``plan.estimate``): what the CPU side holds while
the base loads, while a text encoder runs on the CPU, and during the steps (block swap's pinned buffer, the data in
memory). Pure arithmetic over a ``plan.PlanInputs`` (``inp``) and the ``plan.Plan`` being filled in (``plan``), which
``plan.estimate`` passes: this module does not import ``plan`` back."""

from __future__ import annotations


def pinned_bytes(nbytes: int) -> int:
    """Host bytes of one pinned buffer: PyTorch's CUDA host allocator rounds a request up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def host_parts(inp, plan, text_bytes: int) -> dict[str, int]:
    """Host RAM per phase. Loading: the base is read on the CPU first (+ the inference base, the adapter).
    Text encoding: the encoder when it runs on the CPU. Training: the swapped blocks' pinned master buffer (one
    buffer, rounded up to a power of two), the inference base parked on the CPU between samples, and the data in
    memory -- the sample prompts' and the empty prompt's embeddings (fp32) and the loader's batches in flight
    (bf16 text + fp32 latents; the caches themselves stay on disk)."""
    s = inp.spec
    record = inp.text_tokens * s.context_dim
    latents = max(inp.image_tokens) * s.in_channels * 4
    data = (inp.sample_prompts + 2) * record * 4 + 2 * inp.batch_size * (record * 2 + latents)
    parked = plan.base_bytes if inp.inference_base else 0
    return {"loading": plan.base_bytes + parked + plan.adapter_bytes,
            "text encoding": text_bytes if inp.text_encoder == "cpu" else 0,
            "training": pinned_bytes(plan.swapped_bytes) + parked + data}
