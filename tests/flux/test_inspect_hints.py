"""What `inspect` says a file is and how to sample it (a dev2pro de-distillation export is not dev), and what a
LoRA handed to a checkpoint command is told to run instead."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.cli import main
from dev2pro.flux import checkpoint as C
from dev2pro.flux.keys import diffusers_to_bfl
from dev2pro.flux.spec import TINY, build_transformer
from dev2pro.lora.formats import LoraModule, LoraWeights, save_lora

DEDISTILL = {"dev2pro.recipe": "dedistill", "dev2pro.objective": "flow", "dev2pro.steps": "8",
             "dev2pro.start": "FLUX.1-dev", "dev2pro.base_guidance_embeds": "true"}


def _bfl(path, guidance=True, metadata=None):
    sd = diffusers_to_bfl(build_transformer(TINY.with_(guidance_embeds=guidance), seed=0).state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_inspect_names_a_dedistillation_export_and_its_true_cfg_sampling(tmp_path, capsys):
    """A flow export keeps guidance_in, so its keys say 'dev: sample with embedded guidance'; its metadata says it
    is a de-distillation trained at guidance 1, which `dev2pro sample` renders with true CFG at guidance 1."""
    path = _bfl(tmp_path / "dev2pro.safetensors", metadata=DEDISTILL)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith("variant"))
    assert "dev2pro de-distillation (objective flow, 8 steps from FLUX.1-dev), trained at guidance 1" in line
    assert "true CFG 3.5 at guidance 1" in line and "sample with embedded guidance" not in line
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "dev" and info["guidance_embeds"]  # the keys' facts stay as they are
    assert info["dedistill"] == {"objective": "flow", "steps": 8, "start": "FLUX.1-dev", "dedistilled": True,
                                 "trained_guidance": 1.0, "sample_guidance": 1.0, "sample_cfg": 3.5}
    assert "true CFG 3.5" in info["variant_detail"]


@pytest.mark.parametrize("objective", ["cfg_teacher", "guidance_distill"])
def test_inspect_of_other_dedistill_exports(tmp_path, objective):
    """cfg_teacher is sampled like flow; guidance_distill makes a dev-like student, sampled as dev; without the
    guidance embedding (keep_guidance = false) there is no guidance value to name."""
    from dev2pro.flux import inspection

    meta = {**DEDISTILL, "dev2pro.objective": objective}
    info = inspection.describe(C.open_checkpoint(_bfl(tmp_path / "a.safetensors", metadata=meta)))
    if objective == "guidance_distill":
        assert info["dedistill"]["dedistilled"] is False and "sample_cfg" not in info["dedistill"]
        assert info["variant_detail"].startswith(f"dev2pro de-distillation export (objective {objective}")
        assert "embedded guidance" in info["variant_detail"]
        return
    assert "true CFG 3.5 at guidance 1" in info["variant_detail"]
    pro = inspection.describe(C.open_checkpoint(_bfl(tmp_path / "p.safetensors", guidance=False, metadata=meta)))
    assert pro["variant"] == "pro" and pro["dedistill"]["sample_guidance"] is None
    assert "true CFG 3.5 (no guidance embedding)" in pro["variant_detail"]


def test_inspect_of_a_plain_dev_is_unchanged(tmp_path):
    from dev2pro.flux import inspection

    info = inspection.describe(C.open_checkpoint(_bfl(tmp_path / "dev.safetensors")))
    assert "dedistill" not in info and "sample with embedded guidance" in info["variant_detail"]


def test_a_lora_given_to_convert_is_pointed_at_lora_convert(tmp_path, capsys):
    """`dev2pro convert LORA OUT` told the user to run `dev2pro lora info`; the command they need is
    `dev2pro lora convert IN OUT --layout ...` (inspect and lora merge --base get the same hint)."""
    lw = LoraWeights({"transformer_blocks.0.attn.to_q": LoraModule(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)})
    lora = save_lora(lw, tmp_path / "style.safetensors", "kohya")
    assert main(["convert", str(lora), str(tmp_path / "out.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "`dev2pro lora convert IN OUT --layout kohya|comfy|diffusers`" in err and "Traceback" not in err
    assert main(["inspect", str(lora)]) == 2
    assert "It looks like a LoRA, not a base model" in capsys.readouterr().err


@pytest.mark.parametrize("keys, lora, model", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_attn_qkv.alpha"],
     True, False),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], True, False),
    (["lycoris_single_blocks_0_linear1.lokr_w1"], True, False),
    (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], False, True),
    (["model.diffusion_model.img_in.weight", "model.diffusion_model.img_in.lora_A.weight"], False, True),
    (["x_embedder.weight", "transformer_blocks.0.attn.to_q.weight"], False, True),
    (["encoder.down.0.block.0.conv1.weight"], False, False),
])
def test_one_place_tells_a_lora_from_a_base_model_by_key_names(keys, lora, model):
    """flux.kinds decides for lora.sniff and for the not-Flux message: a key holding a model's input embedder is a
    base model even when a LoRA-like name sits beside it; LyCORIS and PEFT names count as LoRAs."""
    from dev2pro.flux.kinds import guess_family, has_lora_keys, has_model_keys

    assert has_lora_keys(keys) is lora and has_model_keys(keys) is model
    assert (guess_family(keys) or "").startswith("a LoRA") is lora
