"""Network specs: names, dtypes, dynamic axes, profiles, sample inputs and wrappers."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from tiny_models import small_sdxl_unet
from torch import nn

from export.presets import tiny_sd
from export.specs import (
    LabelEncoderSpec,
    TextEncoderSpec,
    UNet2DSpec,
    UNetSpec,
    UnsupportedModelError,
    VAEDecoderSpec,
    cfg_batch_range,
    spec_class_for,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def bundle():
    return tiny_sd()


def test_cfg_batch_range_doubles_the_window_for_guidance():
    assert cfg_batch_range(4) == (1, 2, 8)
    assert cfg_batch_range(3, guidance=False) == (1, 1, 3)
    with pytest.raises(ValueError, match="max_window"):
        cfg_batch_range(0)


def test_unet_spec_names_dtypes_and_dynamic_axes(bundle):
    spec = UNetSpec.from_model(bundle.modules["unet"], sequence_length=77, vae_scale_factor=8)
    assert spec.name == "unet"
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [
        ("sample", "float32", ("batch", 4, "latent_height", "latent_width")),
        ("timestep", "float32", ("batch",)),
        ("encoder_hidden_states", "float32", ("batch", 77, 32)),
    ]
    assert [(t.name, t.shape) for t in spec.outputs] == [
        ("out_sample", ("batch", 4, "latent_height", "latent_width"))
    ]
    assert spec.dynamic_axes == {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch"},
        "out_sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }


def test_unet_profile_covers_cfg_batches_and_latent_sizes(bundle):
    spec = UNetSpec.from_model(bundle.modules["unet"], sequence_length=77, vae_scale_factor=8)
    profile = spec.profile(cfg_batch_range(4), height=(64, 128, 256), width=64)
    assert profile["sample"] == ((1, 4, 8, 8), (2, 4, 16, 8), (8, 4, 32, 8))
    assert profile["timestep"] == ((1,), (2,), (8,))
    assert profile["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))
    # default size: the UNet's sample_size (8) times the VAE factor (8)
    assert spec.profile((1, 1, 1))["sample"][0] == (1, 4, 8, 8)


def test_profile_rejects_sizes_the_network_cannot_take(bundle):
    spec = UNetSpec.from_model(bundle.modules["unet"], vae_scale_factor=8)
    with pytest.raises(ValueError, match="height 60 is not a multiple of 16"):
        spec.profile((1, 2, 8), height=60)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        spec.profile((4, 2, 8))
    with pytest.raises(ValueError, match="precision 'int8'"):
        UNetSpec.from_model(bundle.modules["unet"], precision="int8")


def test_fp16_spec_keeps_timesteps_fp32_and_ids_int64(bundle):
    unet = UNetSpec.from_model(bundle.modules["unet"], precision="fp16")
    assert {t.name: t.dtype for t in unet.inputs} == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
    }
    encoder = TextEncoderSpec.from_model(bundle.modules["text_encoder"], precision="fp16")
    assert encoder.inputs[0].dtype == "int64"
    assert encoder.outputs[0].dtype == "float16"


def test_sdxl_unet_spec_adds_text_embeds_and_time_ids():
    spec = UNetSpec.from_model(small_sdxl_unet(), vae_scale_factor=8)
    inputs = {t.name: t for t in spec.inputs}
    assert list(inputs) == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    assert inputs["text_embeds"].shape == ("batch", 24)
    assert inputs["time_ids"].shape == ("batch", 6)
    # a refiner-like config: the text_embeds width decides how many time ids there are
    refiner = small_sdxl_unet(projection_class_embeddings_input_dim=32 + 5 * 8)
    assert UNetSpec.from_model(refiner, text_embeds_dim=32).time_ids_count == 5
    with pytest.raises(UnsupportedModelError, match="does not split"):
        UNetSpec.from_model(refiner, text_embeds_dim=33)


def test_unet2d_spec_has_class_labels_only_when_class_conditional():
    common = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    }
    plain = UNet2DSpec.from_model(UNet2DModel(**common))
    labelled = UNet2DSpec.from_model(UNet2DModel(**common, num_class_embeds=10))
    assert plain.input_names == ["sample", "timestep"]
    assert labelled.input_names == ["sample", "timestep", "class_labels"]
    labels = labelled.sample_inputs(16)["class_labels"]
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    with pytest.raises(UnsupportedModelError, match="class_embed_type='timestep'"):
        UNet2DSpec.from_model(UNet2DModel(**common, class_embed_type="timestep"))


def test_sample_inputs_match_the_spec_and_are_seeded(bundle):
    spec = UNetSpec.from_model(bundle.modules["unet"], vae_scale_factor=8)
    inputs = spec.sample_inputs(3, height=128, width=64, seed=7)
    assert list(inputs) == spec.input_names
    assert inputs["sample"].shape == (3, 4, 16, 8)
    assert inputs["timestep"].dtype == torch.float32
    assert 0 <= inputs["timestep"].min() and inputs["timestep"].max() < 1000
    again = spec.sample_inputs(3, height=128, width=64, seed=7)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


def test_wrap_is_a_positional_forward_returning_the_output(bundle):
    unet = bundle.modules["unet"]
    spec = UNetSpec.from_model(unet, vae_scale_factor=8)
    inputs = spec.sample_inputs(2)
    with torch.no_grad():
        wrapped = spec.wrap(unet)(*inputs.values())
        direct = unet(*inputs.values()).sample
    assert torch.equal(wrapped, direct)


def test_vae_decoder_spec_maps_latents_to_images(bundle):
    spec = VAEDecoderSpec.from_model(bundle.modules["vae_decoder"])
    assert spec.vae_scale_factor == 8
    profile = spec.profile((1, 1, 2), height=(64, 64, 128), width=64)
    assert profile["latent"] == ((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 16, 8))
    assert spec.outputs[0].shape == ("batch", 3, "image_height", "image_width")
    with torch.no_grad():
        images = spec.wrap(bundle.modules["vae_decoder"])(spec.sample_inputs(1)["latent"])
    assert images.shape == (1, 3, 64, 64)


def test_label_encoder_spec_reads_the_embedding_table():
    encoder = nn.Sequential(nn.Embedding(11, 64))
    spec = LabelEncoderSpec.from_model(encoder)
    assert (spec.num_labels, spec.embedding_dim) == (11, 64)
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("label", "int64", ("batch",))]
    assert spec.outputs[0].shape == ("batch", 1, 64)
    with torch.no_grad():
        out = spec.wrap(encoder)(torch.tensor([0, 10]))
    assert out.shape == (2, 1, 64)
    with pytest.raises(UnsupportedModelError, match="exactly one nn.Embedding"):
        LabelEncoderSpec.from_model(nn.Linear(2, 2))


def test_unsupported_model_class_is_named():
    with pytest.raises(
        UnsupportedModelError, match="Linear is not supported.*UNet2DConditionModel"
    ):
        spec_class_for(nn.Linear(2, 2), "unet")
