"""Qwen-Image's export wrappers against diffusers' own modules: the transformer wrapper (2x2
packing, t / 1000, the rotary embedding in real arithmetic instead of torch.polar and complex
products) gives QwenImageTransformer2DModel's output at several latent grids, text lengths and
batches; the one-frame VAE wrappers give AutoencoderKLQwenImage's decode and posterior."""
from __future__ import annotations

import copy

import pytest
import torch

from export.specs import (
    TEXT_LENGTH,
    QwenImageTransformerSpec,
    QwenImageVAEDecoderSpec,
    QwenImageVAEEncoderSpec,
    UnsupportedModelError,
    pack_latents,
    unpack_latents,
)


def tiny_transformer(**overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    options = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2,
               "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
               "axes_dims_rope": (4, 6, 6)}
    return QwenImageTransformer2DModel(**(options | overrides)).eval()


def tiny_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


@pytest.mark.parametrize("batch, height, width, text_length", [
    (1, 6, 10, 7), (2, 8, 4, 13), (3, 10, 6, 1), (1, 2, 2, 40)])
def test_the_wrapper_gives_the_transformers_output(batch, height, width, text_length):
    """Odd packed grids (3 x 5) exercise the rotary's ceil/floor split of rows and columns."""
    transformer = tiny_transformer()
    original = copy.deepcopy(transformer)  # the wrapper installs its attention on the module
    wrapped = QwenImageTransformerSpec.from_model(transformer, latent_size=(6, 10)).wrap(
        transformer)
    generator = torch.Generator().manual_seed(batch * 100 + text_length)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 1000
    states = torch.randn(batch, text_length, 32, generator=generator)
    with torch.no_grad():
        output = wrapped(sample, timestep, states)
        expected = original(hidden_states=pack_latents(sample), timestep=timestep / 1000,
                            encoder_hidden_states=states,
                            img_shapes=[[(1, height // 2, width // 2)]] * batch,
                            return_dict=False)[0]
    expected = unpack_latents(expected, height, width)
    assert output.shape == (batch, 4, height, width)
    torch.testing.assert_close(output, expected, atol=2e-6, rtol=1e-5)
    # the rotation matters: text states moved to other positions give another output
    with torch.no_grad():
        flipped = wrapped(sample, timestep, states.flip(1))
    assert text_length == 1 or (flipped - output).abs().max() > 1e-3


def test_the_spec_has_a_dynamic_text_length_up_to_the_family_maximum():
    spec = QwenImageTransformerSpec.from_model(tiny_transformer(), max_text_length=512,
                                               latent_size=(6, 10))
    assert spec.inputs[2].shape == ("batch", TEXT_LENGTH, 32)
    assert spec.profile((1, 2, 4))["encoder_hidden_states"] == (
        (1, 1, 32), (2, 128, 32), (4, 512, 32))
    assert (spec.in_channels, spec.out_channels, spec.latent_multiple) == (4, 4, 2)


@pytest.mark.parametrize("option", ["guidance_embeds", "zero_cond_t", "use_additional_t_cond"])
def test_edit_and_guidance_transformers_are_refused(option):
    with pytest.raises(UnsupportedModelError, match=option):
        QwenImageTransformerSpec.from_model(tiny_transformer(**{option: True}))


def test_the_one_frame_vae_wrappers_give_the_vaes_decode_and_posterior():
    vae = tiny_vae()
    decoder = QwenImageVAEDecoderSpec.from_model(vae, latent_size=(6, 10))
    encoder = QwenImageVAEEncoderSpec.from_model(vae, latent_size=(6, 10))
    assert (decoder.vae_scale_factor, decoder.latent_channels) == (2, 4)
    assert [t.name for t in encoder.inputs] == ["images"]
    latent = torch.randn(2, 4, 6, 10)
    images = torch.rand(2, 3, 12, 20) * 2 - 1
    with torch.no_grad():
        decoded = decoder.wrap(vae)(latent)
        parameters = encoder.wrap(vae)(images)
        expected_images = vae.decode(latent.unsqueeze(2)).sample[:, :, 0]
        expected_parameters = vae.encode(images.unsqueeze(2)).latent_dist.parameters[:, :, 0]
    torch.testing.assert_close(decoded, expected_images)
    torch.testing.assert_close(parameters, expected_parameters)
    assert decoded.shape == (2, 3, 12, 20) and parameters.shape == (2, 8, 6, 10)
