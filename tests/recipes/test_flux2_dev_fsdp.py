"""The full fine-tune of FLUX.2 dev for clusters: FSDP2 per FLUX.2 block under `torchrun --nproc_per_node 2` (gloo,
CPU) on the tiny dev gives the weights one process gets with the same global batch, and writes a FLUX.2 BFL file."""

import pytest
from safetensors import safe_open

from .test_dedistill import LOSS_TOL, MULTI, WEIGHT_TOL, _losses, _run_cli, _toml, _torchrun, _weights, _worst


@pytest.mark.slow
def test_fsdp_full_finetune_of_flux2_dev_matches_one_process(tmp_path, flux2_dev_dir, sk_images):
    one = _toml(tmp_path, flux2_dev_dir, sk_images, out="one", steps=4, batch=2, checkpointing=True,
                objective="cfg_teacher")
    two = _toml(tmp_path, flux2_dev_dir, sk_images, out="two", steps=4, batch=1, checkpointing=True,
                objective="cfg_teacher")
    p1 = _run_cli([str(one), *MULTI])
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = _run_cli([str(two), *MULTI, "--set", 'train.distributed="fsdp"'], launcher=_torchrun())
    assert p2.returncode == 0, p2.stderr[-3000:]
    worst = _worst(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    print(f"FLUX.2 dev FSDP 2 ranks vs 1 process: worst weight difference {worst:.2e}")
    assert worst < WEIGHT_TOL
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert lb["world_size"] == 2 and lb["distributed"] == "fsdp"
    assert lb["losses"] == pytest.approx(la["losses"], abs=LOSS_TOL)
    with safe_open(str(tmp_path / "two" / "dev2pro.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "single_stream_modulation.lin.weight" in keys and "guidance_in.in_layer.weight" in keys  # FLUX.2 dev BFL
    state = tmp_path / "two" / "state" / "step-000004"
    assert {"rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"} <= {p.name for p in state.iterdir()}
