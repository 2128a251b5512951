"""Adapter fidelity at the model's output: dev + adapter vs dev2pro, by rank, and the report's summary of it."""

import pytest
import torch

from dev2pro.flux.checkpoint import load_transformer
from dev2pro.lab.fidelity import adapter_fidelity, by_rank
from dev2pro.lora.ops import extract_pair
from dev2pro.outputs import save_safetensors


def test_by_rank_orders_json_string_keys_numerically():
    assert list(by_rank({"16": 0.9, "2": 0.4, "4": 0.6})) == ["2", "4", "16"]
    assert by_rank({8: 1.0}) == {"8": 1.0}


@pytest.fixture(scope="module")
def pair(tiny_dev_dir, tmp_path_factory):
    """dev and a "dev2pro" that differs from it by a rank-2 change of every linear weight (nothing else)."""
    model, _ = load_transformer(tiny_dev_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        if v.ndim == 2 and k.endswith(".weight") and min(v.shape) > 2:
            v = v + 0.1 * v.norm() / v.numel() ** 0.5 * torch.randn(v.shape[0], 2, generator=g) @ \
                torch.randn(2, v.shape[1], generator=g)
        sd[k] = v.contiguous()
    path = save_safetensors(sd, tmp_path_factory.mktemp("fid") / "dev2pro.safetensors")
    return tiny_dev_dir, path, model.config, extract_pair(model.state_dict(), sd, 2)[0]


def test_adapter_fidelity_summary(pair):
    dev, d2p, config, rank2 = pair
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 16, config.joint_attention_dim, generator=g)
    pooled = torch.randn(3, config.pooled_projection_dim, generator=g)
    report = {"recommended_rank": 2, "energy_target": 0.9, "not_linear": ["x.bias"],
              "total": {"energy_by_rank": {"2": 1.0, "1": 0.6}, "output_error_by_rank": {"2": 0.0, "1": 0.3}}}
    s = adapter_fidelity(dev, d2p, report, (1, 2), {"rank 2 again": rank2}, embeds, pooled)
    assert s["recommended_rank"] == 2 and s["not_linear"] == 1 and s["energy_target"] == 0.9
    assert list(s["energy_by_rank"]) == ["1", "2"] and list(s["layer_error_by_rank"]) == ["1", "2"]
    m = s["model"]
    assert list(m) == ["extracted r1", "extracted r2", "rank 2 again", "dev (no adapter)"]
    assert m["rank 2 again"] == m["extracted r2"]
    assert m["extracted r2"]["unexplained"] < 1e-3 and m["extracted r2"]["moved"] == pytest.approx(1.0, abs=1e-3)
    assert 0.05 < m["extracted r1"]["unexplained"] < 1.0
    assert m["dev (no adapter)"] == {"output_error": m["dev (no adapter)"]["output_error"], "unexplained": 1.0,
                                     "moved": 0.0} and m["dev (no adapter)"]["output_error"] > 0


def test_adapter_errors_same_at_one_and_two_threads(pair):
    from threadpoolctl import threadpool_limits

    from dev2pro.lab.fidelity import adapter_output_errors

    dev, d2p, config, rank2 = pair
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(2, 16, config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=g)
    got, before = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with threadpool_limits(limits=n):
                got.append(adapter_output_errors(dev, d2p, {"r2": rank2}, embeds, pooled))
            assert torch.get_num_threads() == n  # the caller's count comes back
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]
