"""Latent packing equals diffusers' helpers and round-trips exactly; VAE normalisation follows the config."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from dev2pro.flux.latents import decode_latents, encode_images, image_ids, pack, text_ids, unpack


def tiny_vae(shift_factor=0.1159, scaling_factor=0.3611):
    """A Flux-shaped VAE (16 latent channels, /8, no quant convs) with tiny widths and random weights."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def test_pack_unpack_round_trip_and_diffusers_equality():
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack(latents)
    assert tokens.shape == (2, 3 * 5, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack(tokens, 6, 10), latents)
    # diffusers' unpack takes pixel sizes: 48 x 80 px at /8
    assert torch.equal(unpack(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))


def test_pack_groups_each_2x2_patch_into_one_token():
    latents = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens = pack(latents)  # (1, 4, 4): token 0 is the top-left patch, channel-major then row, col
    assert tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


def test_ids():
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))
    assert ids[:, 0].eq(0).all() and ids[4].tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(text_ids(7), torch.zeros(7, 3))
    assert image_ids(4, 6, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_odd_sizes_rejected_with_clear_message():
    with pytest.raises(ValueError, match="multiples of 16"):
        pack(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="tokens do not fill"):
        unpack(torch.zeros(1, 5, 64), 4, 4)


def test_encode_normalises_with_vae_config_and_decode_inverts_it():
    vae = tiny_vae()
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = encode_images(vae, pixels)
    assert latents.shape == (2, 16, 4, 6)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
        torch.testing.assert_close(decode_latents(vae, latents), vae.decode(raw).sample)
    sampled = encode_images(vae, pixels, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents)


def test_encode_without_shift_factor():
    vae = tiny_vae(shift_factor=None, scaling_factor=0.5)
    pixels = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(encode_images(vae, pixels), raw * 0.5)
