"""train.attention_backend = "auto" (train/attention.py): each candidate is probed with the model's own layouts in a
child process; a crash or a wrong answer drops it, the fastest that passes is chosen and remembered per card."""

import json

import pytest
import torch

from dev2pro.families.flux2.spec import TINY_KLEIN
from dev2pro.flux.spec import FluxSpec
from dev2pro.train import attention as A
from dev2pro import families

# real head dim (128), a few heads: the shapes diffusers' processor hands a kernel at full size, on a CPU budget
FLUX1 = FluxSpec(hidden=256, num_heads=2, num_double=2, num_single=2, context_dim=64, pooled_dim=32)


def _config(spec) -> dict:
    return A.model_config(families.build_transformer(spec, device="meta"))


@pytest.mark.parametrize("spec", [FLUX1, TINY_KLEIN.with_(hidden=256, num_heads=2, axes_dim=(32, 32, 32, 32))])
def test_probe_runs_the_models_attention_forward_and_backward(spec):
    config = _config(spec)
    got = A.probe("native", config, (64, 16), "cpu", steps=1)
    assert got["ok"], got
    assert got["ms"] > 0
    fam, probe_spec, model = A.probe_model(config, "cpu")
    assert (probe_spec.num_double, probe_spec.num_single, probe_spec.hidden) == (1, 1, spec.hidden)
    assert not any(p.requires_grad for p in model.parameters())
    bad = A.probe("no-such-backend", config, (64, 16), "cpu")
    assert not bad["ok"] and "no-such-backend" in bad["error"]


def test_auto_drops_a_crashing_kernel_and_remembers_the_choice(tmp_path, monkeypatch):
    cache = tmp_path / "attention.json"
    config, tokens = _config(FLUX1), (64, 16)
    probe_fn = "attention_probes:crashing_probe"
    chosen = A.choose(config, tokens, "cpu", names=["_native_flash", "native"], probe_fn=probe_fn, cache=cache)
    assert chosen == "native"
    record = json.loads(cache.read_text())[A.cache_key(config, tokens, "cpu")]
    assert record["backend"] == "native"
    assert not record["probes"]["_native_flash"]["ok"]
    assert "died" in record["probes"]["_native_flash"]["error"]  # os.abort: the parent carried on
    # the second run with the same card, versions, model and tokens reads the answer: no probe process
    monkeypatch.setattr(A, "probe_in_child", lambda *a, **k: pytest.fail("probed again"))
    assert A.choose(config, tokens, "cpu", names=["_native_flash", "native"], probe_fn=probe_fn, cache=cache) \
        == "native"
    # another token count is another question
    with pytest.raises(pytest.fail.Exception):
        A.choose(config, (256, 16), "cpu", names=["native"], probe_fn=probe_fn, cache=cache)


def test_nothing_passes_means_pytorch_sdpa_and_nothing_is_remembered(tmp_path, monkeypatch):
    config = _config(FLUX1)
    assert A.candidates("cpu") == []
    assert A.choose(config, (64, 16), "cpu", cache=tmp_path / "a.json") == ""  # nothing to choose on a CPU
    assert not (tmp_path / "a.json").exists()
    wrong = {"ok": False, "error": "output differs from PyTorch's math kernel by 0.5 (relative)"}
    calls = []
    monkeypatch.setattr(A, "probe_in_child", lambda name, *a, **k: calls.append(name) or wrong)
    assert A.choose(config, (64, 16), "cpu", names=["native", "flash"], cache=tmp_path / "b.json") == ""
    assert calls == ["native", "flash"] and not (tmp_path / "b.json").exists()  # the next run probes again
    # a damaged cache file costs a probe, not the run
    (tmp_path / "c.json").write_text("{not json")
    ok = {"ok": True, "ms": 1.0, "error": ""}
    monkeypatch.setattr(A, "probe_in_child", lambda name, *a, **k: ok)
    assert A.choose(config, (64, 16), "cpu", names=["native"], cache=tmp_path / "c.json") == "native"
    assert json.loads((tmp_path / "c.json").read_text())[A.cache_key(config, (64, 16), "cpu")]["backend"] == "native"


def test_auto_in_a_train_config_resolves_to_sdpa_on_cpu(tmp_path):
    from dev2pro.recipe_inputs import attention_backend
    from dev2pro.schemas import TrainConfig

    cfg = TrainConfig()
    cfg.train.attention_backend = "auto"
    model = families.build_transformer(FLUX1, device="meta")
    assert attention_backend(cfg, model, torch.device("cpu")) == ""  # no probe, no header read, on a CPU
    cfg.train.attention_backend = "_native_math"
    assert attention_backend(cfg, model, "cpu") == "_native_math"
