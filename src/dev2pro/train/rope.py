"""FLUX's rotary embedding in fewer kernels than diffusers' ``apply_rotary_emb`` (``train.fused_rope``, opt-in).

Why: the eager training step is host-bound (issue 20: ~45k kernel launches per FLUX.1 step). diffusers rotates the
interleaved (real, imaginary) pairs of q and k with real arithmetic: a negated copy, a stack, two fp32 casts, two
products, a sum and a cast back -- 8 launches forward and about as many backward, for q and for k, in every block
(and again in a checkpointed block's recompute). The same rotation is one complex product,
``(x_r + i x_i)(cos + i sin)``, computed in fp32 as diffusers does and cast back once: 4 launches forward. The
result equals diffusers' to fp32 round-off before the cast to the input dtype (``tests/train/test_rope.py``).

RMSNorm needs no such help: diffusers builds FLUX's q/k norms as ``torch.nn.RMSNorm``, which runs torch's fused
kernel. Under ``torch.compile`` the rotation goes back to diffusers' code, which Inductor fuses on its own.

``use_fused_rope(True)`` swaps the function FLUX.1's and FLUX.2's attention processors call (a global of diffusers'
transformer modules, so it holds for the process); calls in another layout go to diffusers' own function.
"""

from __future__ import annotations

import importlib

import torch

# diffusers modules whose attention processors call ``apply_rotary_emb`` through a module global
MODULES = ("diffusers.models.transformers.transformer_flux", "diffusers.models.transformers.transformer_flux2")
_ORIGINAL = {}  # module name -> diffusers' apply_rotary_emb, while ours is installed
_LAST = [None, None, None]  # (cos, sin, complex angles): every block of one forward (and its recompute) shares them


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sequence_dim: int = 1) -> torch.Tensor:
    """Rotate ``x`` (B, S, H, D) if ``sequence_dim`` is 1, (B, H, S, D) if 2, by FLUX's rotary angles given as
    diffusers' ``(cos, sin)`` of shape (S, D), each frequency repeated for its pair; in fp32, returned in x's dtype."""
    if _LAST[0] is cos and _LAST[1] is sin and _LAST[2].device == x.device:
        freqs = _LAST[2]
    else:
        freqs = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float()).to(x.device)  # (S, D/2)
        _LAST[:] = cos, sin, freqs
    freqs = freqs[None, :, None, :] if sequence_dim == 1 else freqs[None, None, :, :]
    xf = x.float()
    if xf.stride(-1) != 1 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs (real, imag) pairs adjacent in memory
    rotated = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * freqs)
    return rotated.flatten(-2).to(x.dtype)


def _make(original):
    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        fits = (use_real and use_real_unbind_dim == -1 and sequence_dim in (1, 2) and isinstance(freqs_cis, tuple)
                and len(freqs_cis) == 2 and freqs_cis[0].dim() == 2 and x.dim() == 4)
        if not fits or torch.compiler.is_compiling():
            return original(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim,
                            sequence_dim=sequence_dim)
        return rotate(x, freqs_cis[0], freqs_cis[1], sequence_dim)

    apply_rotary_emb.dev2pro_fused = True
    return apply_rotary_emb


def use_fused_rope(enabled: bool = True) -> bool:
    """Install (or remove) the fused rotation for FLUX.1 and FLUX.2 in this process; returns whether it was on."""
    was = bool(_ORIGINAL)
    for name in MODULES:
        module = importlib.import_module(name)
        if enabled and name not in _ORIGINAL:
            _ORIGINAL[name] = module.apply_rotary_emb
            module.apply_rotary_emb = _make(_ORIGINAL[name])
        elif not enabled and name in _ORIGINAL:
            module.apply_rotary_emb = _ORIGINAL.pop(name)
    if not enabled:
        _LAST[:] = None, None, None  # let the last forward's angles go
    return was
