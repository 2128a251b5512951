"""train.fsdp: which launches shard (accelerate configs, train.distributed) and what the settings say.

The two-process runs (DDP and FSDP equal one process, kill and resume) are end to end, in tests/recipes/test_dedistill.py.
"""

import os
from pathlib import Path

import pytest

from dev2pro.errors import UserError
from dev2pro.train.fsdp import FsdpSettings, settings_for

ROOT = Path(__file__).resolve().parents[2]


ACCELERATE_CONFIGS = {
    "1gpu.yaml": (1, 1, "bf16", dict(offload=True, activation_checkpointing=True, ram_efficient_loading=True)),
    "8gpu-fsdp.yaml": (8, 1, "bf16", dict(offload=False, activation_checkpointing=True,
                                          ram_efficient_loading=True)),
    "multinode-fsdp.yaml": (32, 4, "bf16", dict(offload=False, activation_checkpointing=True,
                                                ram_efficient_loading=True)),
    "cpu-fsdp.yaml": (2, 1, "no", dict(offload=False, activation_checkpointing=True, ram_efficient_loading=False)),
    "cpu-ddp.yaml": (2, 1, "no", None),
}


def test_every_accelerate_config_is_listed():
    assert sorted(p.name for p in (ROOT / "configs/accelerate").glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_parses_and_configures_what_it_claims(name, monkeypatch):
    """Parsed by accelerate's own config and launch code; the FSDP_* environment its launcher exports is what
    the recipe reads (per-block wrapping, FSDP2, sharded state, checkpointing, offload)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from dev2pro.train.fsdp import FsdpSettings, settings_from_accelerate

    path = ROOT / "configs/accelerate" / name
    procs, machines, precision, fsdp = ACCELERATE_CONFIGS[name]
    cfg = load_config_from_file(str(path))
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (procs, machines, precision)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    # every file goes through accelerate's torchrun launcher (its --cpu launcher would start a single process)
    assert (args.use_fsdp, args.multi_gpu, args.cpu) == (fsdp is not None, fsdp is None, False)
    env = prepare_multi_gpu_env(args)
    for k in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    settings = settings_from_accelerate()
    if fsdp is None:
        assert settings is None
    else:
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "FluxTransformerBlock,FluxSingleTransformerBlock"
        assert settings == FsdpSettings(reshard_after_forward=True, full_state=False, **fsdp)


def test_train_distributed_and_the_launcher_decide_together(monkeypatch):
    for k in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(k)
    assert settings_for("auto", "bf16") is None and settings_for("ddp", "bf16") is None
    assert settings_for("fsdp", "bf16") == FsdpSettings()
    with pytest.raises(UserError, match="fp16 needs a sharded gradient scaler"):
        settings_for("fsdp", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert settings_for("auto", "bf16") is not None
    with pytest.raises(UserError, match="accelerate config asks for FSDP"):
        settings_for("ddp", "bf16")
