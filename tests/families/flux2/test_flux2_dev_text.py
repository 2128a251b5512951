"""FLUX.2 dev's Mistral3 text encoder stored in fp8 while caching (``model.text_encoder_dtype = "fp8"``): its
Linears hold e4m3 weights (bf16 compute), its embeddings stay close to the bf16 encoder's; FLUX.1 refuses it."""

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.families.flux2 import text
from dev2pro.flux.fp8 import Fp8Linear
from dev2pro.train.preflight import check_training_inputs


def test_fp8_mistral_encodes_close_to_bf16(flux2_dev_dir):
    bf16 = text.load_text_encoder(flux2_dev_dir, "cpu", torch.bfloat16)
    fp8 = text.load_text_encoder(flux2_dev_dir, "cpu", torch.float8_e4m3fn)
    linears = [m for m in bf16.text_encoder.modules() if type(m) is torch.nn.Linear]
    stored = [m for m in fp8.text_encoder.modules() if isinstance(m, Fp8Linear)]
    assert len(stored) == len(linears) > 40 and all(m.weight.dtype == torch.float8_e4m3fn for m in stored)
    a, _ = text.encode(bf16, ["a red cat on a mat", "a lighthouse at dusk"])
    b, _ = text.encode(fp8, ["a red cat on a mat", "a lighthouse at dusk"])
    rel = float((a - b).norm() / a.norm())
    assert a.shape == b.shape == (2, text.MAX_LENGTH, 96) and 0 < rel < 0.15  # e4m3: ~2^-4 per weight


def test_fp8_text_encoder_is_for_flux2_only(tiny_dev_dir, flux2_dev_dir):
    with pytest.raises(UserError, match=r"text_encoder_dtype = \"fp8\" is for FLUX\.2's text encoders"):
        check_training_inputs(str(tiny_dev_dir), str(tiny_dev_dir), text_dtype="fp8")
    check_training_inputs(str(flux2_dev_dir), str(flux2_dev_dir), text_dtype="fp8")  # FLUX.2 dev: accepted
