"""Wan's networks behind the product's contracts: UMT5 with its mask, the 3-D transformer (one,
or Wan 2.2's two experts picked by timestep) and the causal video VAE's decoder.

Video latents carry a frame axis: `sample` [B, C, latent_frames, h, w] and the decoder's
`images` [B, 3, frames, H, W]. The wrappers do what WanPipeline does around each call; the
family (runtime/families/wan.py) does the rest (prompt cleaning, zeroing states past the
prompt, latents_mean / latents_std).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from export.precision import checked_precision
from export.specs import (
    BATCH,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    NetworkSpec,
    T5EncoderSpec,
    TensorSpec,
)
from models import tensors

LATENT_FRAMES = "latent_frames"
# WanPipeline's defaults: 480x832 pixels, 81 frames, 512 text tokens
WAN_DEFAULT_SIZE = (480, 832)
WAN_DEFAULT_FRAMES = 81
WAN_TEXT_TOKENS = 512


class _Forward(nn.Module):
    """An export wrapper: forward takes the spec's inputs by their names, in order."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class UMT5EncoderSpec(T5EncoderSpec):
    """UMT5EncoderModel (Wan): `input_ids` and `attention_mask` [B, S] int64 -> the last hidden
    state [B, S, d_model], called with the mask as WanPipeline calls it."""

    @property
    def inputs(self) -> list[TensorSpec]:
        tokens = (BATCH, self.sequence_length)
        return [TensorSpec(tensors.INPUT_IDS, "int64", tokens),
                TensorSpec(tensors.ATTENTION_MASK, "int64", tokens)]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _MaskedT5Forward(module)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.ATTENTION_MASK:  # a prompt of random length, right-padded
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
            return (torch.arange(shape[1]).unsqueeze(0) < lengths).to(torch.int64)
        return super().sample_value(tensor, shape, generator)


class _MaskedT5Forward(_Forward):
    def forward(self, input_ids, attention_mask):
        return self.module(input_ids=input_ids, attention_mask=attention_mask)[0]


@dataclass
class WanTransformerSpec(NetworkSpec):
    """WanTransformer3DModel (or Wan 2.2's `WanExperts`): `sample` [B, C, f, h, w], `timestep`
    [B] (the scheduler's timestep) and UMT5 states [B, 512, text_dim] -> `out_sample` (the
    flow prediction) like `sample`."""

    in_channels: int = 16
    out_channels: int = 16
    sequence_length: int = WAN_TEXT_TOKENS
    text_dim: int = 4096
    latent_frames: int = (WAN_DEFAULT_FRAMES - 1) // 4 + 1
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(cls, transformer: nn.Module, *, precision: str = "fp32",
                   vae_scale_factor: int = 8, name: str = "transformer") -> WanTransformerSpec:
        config = transformer.config
        return cls(
            name=name, precision=checked_precision(precision), vae_scale_factor=vae_scale_factor,
            image_size=WAN_DEFAULT_SIZE, latent_multiple=config.patch_size[1],
            in_channels=config.in_channels, out_channels=config.out_channels,
            text_dim=config.text_dim)

    def _latents(self, name: str, channels: int) -> TensorSpec:
        return self.activation(name, (BATCH, channels, LATENT_FRAMES, LATENT_HEIGHT,
                                      LATENT_WIDTH))

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._latents(tensors.SAMPLE, self.in_channels),
                TensorSpec(tensors.TIMESTEP, "float32", (BATCH,)),
                self.activation(tensors.ENCODER_HIDDEN_STATES,
                                (BATCH, self.sequence_length, self.text_dim))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._latents(tensors.OUT_SAMPLE, self.out_channels)]

    def dim_ranges(self, batch_range, height=None, width=None):
        ranges = super().dim_ranges(batch_range, height, width)
        return {**ranges, LATENT_FRAMES: (1, self.latent_frames, self.latent_frames)}

    def wrap(self, module: nn.Module) -> nn.Module:
        return _WanForward(module)


class _WanForward(_Forward):
    def forward(self, sample, timestep, encoder_hidden_states):
        return _first(self.module(hidden_states=sample, timestep=timestep,
                                  encoder_hidden_states=encoder_hidden_states, return_dict=False))


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one denoiser: rows at timesteps >= `boundary` (boundary_ratio x
    num_train_timesteps) go to `transformer` (high noise), the others to `transformer_2`.
    The family sends each call one expert's rows, so one expert runs per call."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module,
                 boundary: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = boundary

    @property
    def config(self):
        return self.transformer.config

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        high = timestep >= self.boundary
        if bool(high.all()):
            return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                    encoder_hidden_states=encoder_hidden_states,
                                    return_dict=False)
        if not bool(high.any()):
            return self.transformer_2(hidden_states=hidden_states, timestep=timestep,
                                      encoder_hidden_states=encoder_hidden_states,
                                      return_dict=False)
        output = torch.empty_like(hidden_states)
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            output[rows] = _first(expert(hidden_states=hidden_states[rows],
                                         timestep=timestep[rows],
                                         encoder_hidden_states=encoder_hidden_states[rows],
                                         return_dict=False))
        return (output,)


@dataclass
class WanVAEDecoderSpec(NetworkSpec):
    """AutoencoderKLWan's decoder: `latent` [B, z, f, h, w] (already de-normalised by
    latents_mean / latents_std) -> `images` [B, 3, 1 + (f - 1) t, H, W] in [-1, 1]. The
    causal cache of earlier frames lives inside one decode call, which runs frame by frame:
    the traced graph unrolls that loop, so f is fixed at export (one decoder per latent frame
    count; heights and widths stay dynamic). Validated against torch through the dynamo
    exporter (the torchscript one has no nearest-exact upsampling)."""

    latent_channels: int = 16
    temporal_scale_factor: int = 4
    latent_frames: int = (WAN_DEFAULT_FRAMES - 1) // 4 + 1
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(cls, vae: nn.Module, *, precision: str = "fp32",
                   latent_frames: int = (WAN_DEFAULT_FRAMES - 1) // 4 + 1,
                   name: str = "vae_decoder") -> WanVAEDecoderSpec:
        config = vae.config
        factor = 2 ** len(config.temperal_downsample)
        temporal = 2 ** sum(config.temperal_downsample)
        return cls(name=name, precision=checked_precision(precision), vae_scale_factor=factor,
                   image_size=WAN_DEFAULT_SIZE,
                   latent_multiple=1, latent_channels=config.z_dim,
                   temporal_scale_factor=temporal, latent_frames=latent_frames)

    @property
    def frames(self) -> int:
        return 1 + (self.latent_frames - 1) * self.temporal_scale_factor

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self.activation(tensors.LATENT, (BATCH, self.latent_channels, self.latent_frames,
                                                 LATENT_HEIGHT, LATENT_WIDTH))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self.activation(tensors.IMAGES,
                                (BATCH, 3, self.frames, IMAGE_HEIGHT, IMAGE_WIDTH))]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _WanDecoderForward(module)


class _WanDecoderForward(_Forward):
    def forward(self, latent):
        return _first(self.module.decode(latent, return_dict=False))
