"""FLUX.2 BFL <-> diffusers key maps against diffusers' own converter and Flux2Transformer2DModel."""

import pytest
import torch
from families.flux2.bfl_reference import bfl_forward, random_bfl_state_dict
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

from dev2pro.errors import CheckpointError
from dev2pro.families.flux2 import keys
from dev2pro.families.flux2.spec import TINY_DEV, TINY_KLEIN, build_transformer, detect_state_dict

SPECS = pytest.mark.parametrize("spec", [TINY_KLEIN, TINY_DEV], ids=["klein", "dev"])


def _forward(model, spec, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(7))
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 16, spec.in_channels, generator=g),
            encoder_hidden_states=torch.randn(2, 7, spec.context_dim, generator=g),
            timestep=torch.tensor([0.3, 0.8]), img_ids=img_ids, txt_ids=txt_ids,
            guidance=torch.tensor([4.0, 2.5]) if spec.guidance_embeds else None, return_dict=False)[0]


def _load(spec, sd):
    model = build_transformer(spec)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


@SPECS
def test_bfl_to_diffusers_equals_diffusers_converter_and_loads_strict(spec):
    bfl = random_bfl_state_dict(spec)
    ours = keys.bfl_to_diffusers(bfl)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(build_transformer(spec, device="meta").state_dict())
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    torch.testing.assert_close(_forward(_load(spec, ours), spec), _forward(_load(spec, theirs), spec),
                               rtol=0, atol=0)


@SPECS
def test_round_trip_is_bit_exact(spec):
    bfl = random_bfl_state_dict(spec, seed=3)
    back = keys.diffusers_to_bfl(keys.bfl_to_diffusers(bfl))
    assert set(back) == set(bfl)
    assert all(torch.equal(back[k], bfl[k]) for k in bfl)
    model_sd = build_transformer(spec, seed=5).state_dict()  # and from the diffusers side
    again = keys.bfl_to_diffusers(keys.diffusers_to_bfl(model_sd))
    assert set(again) == set(model_sd) and all(torch.equal(again[k], model_sd[k]) for k in model_sd)


def test_final_adaln_halves_are_swapped():
    bfl = random_bfl_state_dict(TINY_KLEIN)
    h = TINY_KLEIN.hidden
    w = bfl["final_layer.adaLN_modulation.1.weight"]
    out = keys.bfl_to_diffusers(bfl)["norm_out.linear.weight"]
    assert torch.equal(out[:h], w[h:]) and torch.equal(out[h:], w[:h])


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfy_prefixes_are_taken_off(prefix):
    bfl = random_bfl_state_dict(TINY_KLEIN)
    prefixed = {prefix + k: v for k, v in bfl.items()}
    ours = keys.bfl_to_diffusers(prefixed)
    assert all(torch.equal(ours[k], v) for k, v in keys.bfl_to_diffusers(bfl).items())
    with pytest.raises(KeyError):  # diffusers' converter looks the prefixed name up in its bare-key tables
        convert_flux2_transformer_checkpoint_to_diffusers(dict(prefixed))
    back = keys.diffusers_to_bfl(ours, prefix=prefix)
    assert set(back) == set(prefixed)


def test_plan_streams_one_output_at_a_time():
    bfl = random_bfl_state_dict(TINY_KLEIN)
    steps = keys.plan({k: tuple(v.shape) for k, v in bfl.items()}, "bfl", "diffusers")
    q = steps["transformer_blocks.1.attn.to_q.weight"]
    assert q == [("double_blocks.1.img_attn.qkv.weight", (0, 64), None)]
    reads = []
    t = keys.assemble(steps["norm_out.linear.weight"], lambda k: reads.append(k) or bfl[k])
    assert reads == ["final_layer.adaLN_modulation.1.weight"] * 2 and t.shape == (128, 64)


def test_foreign_or_incomplete_keys_are_refused():
    bfl = random_bfl_state_dict(TINY_KLEIN)
    with pytest.raises(CheckpointError, match="not part of a FLUX.2"):
        keys.bfl_to_diffusers({**bfl, "img_in.bias": torch.zeros(64)})
    d = keys.bfl_to_diffusers(bfl)
    del d["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="lacks some of its parts"):
        keys.diffusers_to_bfl(d)


def test_converted_file_detects_as_the_same_spec():
    bfl = random_bfl_state_dict(TINY_DEV)
    assert detect_state_dict(bfl) == TINY_DEV
    assert detect_state_dict(keys.bfl_to_diffusers(bfl)) == TINY_DEV
    model = Flux2Transformer2DModel(**TINY_DEV.diffusers_config())
    assert detect_state_dict(model.state_dict()) == TINY_DEV


def test_streaming_and_fp8_are_exact():
    bfl = random_bfl_state_dict(TINY_KLEIN, prefix="model.diffusion_model.")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}
    reads = []
    get = lambda k: reads.append(k) or fp8[k]  # noqa: E731
    out = dict(keys.iter_converted({k: tuple(v.shape) for k, v in fp8.items()}, get, "bfl", "diffusers"))
    assert set(reads) == set(fp8) and all(v.dtype == torch.float8_e4m3fn for v in out.values())
    back = keys.diffusers_to_bfl(out, prefix="model.diffusion_model.")
    assert all(torch.equal(back[k].view(torch.uint8), fp8[k].view(torch.uint8)) for k in fp8)


@SPECS
def test_converted_model_computes_what_bfls_model_computes(spec):
    """Our diffusers-layout weights in Flux2Transformer2DModel == BFL's own forward on the BFL weights (fp32)."""
    bfl = random_bfl_state_dict(spec, seed=7)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 16, spec.in_channels, generator=g), torch.randn(2, 7, spec.context_dim, generator=g)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(7))
    t, guidance = torch.tensor([0.3, 0.8]), torch.tensor([4.0, 2.5]) if spec.guidance_embeds else None
    with torch.no_grad():
        ours = _load(spec, keys.bfl_to_diffusers(bfl))(
            hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, return_dict=False)[0]
        ref = bfl_forward(bfl, spec, x, img_ids.expand(2, -1, -1).float(), t, ctx, txt_ids.expand(2, -1, -1).float(),
                          guidance)
    assert ref.abs().mean() > 1e-2  # a real signal, not zeros
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
