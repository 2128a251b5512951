"""What one training step keeps for backward: the memory plan's activation term (``plan.estimate`` calls
``activation_bytes``; ``inp`` is its ``plan.PlanInputs``, taken duck-typed so this module does not import ``plan``).

Activations are measured, not guessed. Each family states (``Family.activation_units``) how many hidden-wide
vectors per token, in the compute dtype, one double and one single block keep for backward without
checkpointing, with the LoRA on every Linear, per LoRA compute dtype: ``compute`` (bf16 LoRA: peft saves the
bf16 inputs it shares with nothing else) or ``fp32`` (an fp32 copy of the input for each LoRA'd Linear).
``measure_saved_bytes`` counts the bytes autograd saves (unique storages, weights excluded) in a real forward;
``tests/test_plan_activations.py`` runs it on both families on CPU and holds these constants to within 5% of it,
with the q/k RMSNorms run as CUDA runs them (the fused kernel keeps the bf16 input, where the CPU's composite one
keeps an fp32 copy); ``bench/activations.py`` runs it on a GPU with the real kernels. On top: each LoRA'd
Linear's rank-wide hidden, per token it sees. Other target presets save less than ``all_linear``: the plan is
then an upper bound. With per-block gradient checkpointing only each block's input is kept (one unit per token
per block) and one block is recomputed at a time in backward: peak = all block inputs + the largest block's saved
set + ``BACKWARD_UNITS`` of gradient work space. fp8 storage adds bf16 copies of dequantised weights that autograd
keeps: one block's worth with checkpointing, every fp8 block weight without (so fp8 without checkpointing saves
nothing). Attention assumes a flash/efficient kernel (no seq x seq matrix), as the CPU's SDPA is too.
``bench/gpu_train.py`` prints this estimate beside the measured peak of a real step.
"""

from __future__ import annotations

import re

from .families import of_spec, random_inputs

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BACKWARD_UNITS = 6  # gradient work space in backward, hidden-wide vectors per token


def block_position(key: str, num_double: int) -> int | None:
    """Execution position (0..56 for FLUX.1) of a diffusers key's block, None outside the blocks."""
    parts = key.split(".")
    if parts[0] == "transformer_blocks":
        return int(parts[1])
    if parts[0] == "single_transformer_blocks":
        return num_double + int(parts[1])
    return None


def stream_tokens(name: str, img: int, txt: int) -> int:
    """Tokens a Linear sees: image stream, text stream (add_*, ff_context, to_add_out), or both (single); the
    modulation (AdaLN) linears read one conditioning vector per sample, whatever the token count."""
    if _MODULATION.search(name):
        return 1
    if name.startswith("single_transformer_blocks."):
        return img + txt
    if not name.startswith("transformer_blocks."):
        one = ("time_text_embed", "time_guidance_embed", "stream_modulation", "norm")  # per-sample vectors
        return 1 if any(k in name for k in one) else (txt if "context" in name else img)
    if any(k in name for k in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")):
        return txt
    return img


_MODULATION = re.compile(r"blocks\.\d+\.(norm1|norm1_context|norm)\.linear$")


def lora_mode(inp) -> str:
    """Which of a family's ``activation_units`` apply: "fp32" when the LoRA computes in fp32 beside a lower compute
    dtype (peft then copies each LoRA'd Linear's input to fp32), else "compute"."""
    return "fp32" if inp.lora_dtype == "fp32" and inp.dtype != "fp32" else "compute"


def block_saved_bytes(inp, layers, img: int) -> dict[int, int]:
    """Bytes each block (by execution position) keeps for backward at ``img`` image tokens, batch 1, without
    checkpointing: the family's measured units + every LoRA'd Linear's rank-wide hidden."""
    s, b, txt = inp.spec, DTYPE_BYTES[inp.dtype], inp.text_tokens
    mode = lora_mode(inp)
    double, single = of_spec(s).activation_units[mode]
    hidden_bytes = 4 if mode == "fp32" else b
    out = {p: int((img + txt) * s.hidden * b * (double if p < s.num_double else single))
           for p in range(s.num_double + s.num_single)}
    for name, _, _ in layers:
        pos = block_position(name, s.num_double)
        if pos is not None:
            out[pos] += stream_tokens(name, img, txt) * inp.rank * hidden_bytes
    return out


def activation_bytes(inp, layers, per_block: dict, img: int) -> int:
    """Peak activation bytes of one training step at ``img`` image tokens (formula in the module docstring)."""
    s, b, txt = inp.spec, DTYPE_BYTES[inp.dtype], inp.text_tokens
    tokens = img + txt
    saved = block_saved_bytes(inp, layers, img)
    fp8_block = {p: n_fp8 * b for p, (_, n_fp8) in per_block.items()}  # dequantised copies autograd keeps
    outside = txt * s.context_dim * b + img * s.in_channels * 4 * 4 + tokens * s.head_dim * 4 * 2
    if inp.gradient_checkpointing:
        big = max(saved[p] + fp8_block.get(p, 0) for p in saved)
        act = len(saved) * tokens * s.hidden * b + big + BACKWARD_UNITS * tokens * s.hidden * b
    else:
        act = sum(saved.values()) + sum(fp8_block.values()) + BACKWARD_UNITS * tokens * s.hidden * b
    return inp.batch_size * (act + outside)


def measure_saved_bytes(spec, lora_dtype: str, img: int, txt: int, rank: int = 16, device="cpu") -> dict[str, int]:
    """What autograd keeps for backward inside the double and the single block of one bf16 training forward of a
    1+1-block ``spec`` on ``device``, every Linear LoRA'd as training does it (``add_lora`` + the LoRA compute
    dtype): {"double": bytes, "single": bytes}. Distinct storages (a view keeps its whole storage alive); left out:
    weights and buffers (the LoRA's bf16 compute copies included: the plan counts them as LoRA memory) and storages
    both blocks save (the rotary tables, FLUX.2's shared modulation: made once per step outside the blocks)."""
    import torch

    from .train.model import add_lora
    from .train.precision import lora_in_compute_dtype

    fam = of_spec(spec)
    model = fam.build_transformer(spec, device=device, dtype=torch.bfloat16, seed=0)
    names = fam.lora_targets("all_linear", spec.num_double, spec.num_single, (), guidance=spec.guidance_embeds)
    lora_in_compute_dtype(model, add_lora(model, names, rank, float(rank)), lora_dtype, torch.bfloat16)
    weights = set()  # read when the forward starts: the compute view swaps the LoRA's storages in
    model.register_forward_pre_hook(lambda m, a: weights.update(
        t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]))
    where, saved = ["outside"], {}
    for i, block in enumerate(fam.blocks(model)):
        kind = "double" if i < spec.num_double else "single"
        block.register_forward_pre_hook(lambda m, a, kind=kind: where.__setitem__(0, kind))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(where[0], {})[storage.data_ptr()] = storage.nbytes()
        return t

    kw = random_inputs(spec, img, txt, device, torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**kw, return_dict=False)
    shared = saved["double"].keys() & saved["single"].keys()
    return {kind: sum(n for ptr, n in saved[kind].items() if ptr not in shared) for kind in ("double", "single")}
