"""Wan's networks behind the product's contracts: UMT5 with its mask, the 3-D transformer (one,
or Wan 2.2's two experts picked by timestep) and the causal video VAE's decoder. Their specs
(UMT5EncoderSpec, WanTransformerSpec, WanVAEDecoderSpec) are in export/specs.py; these are the
forwards the specs wrap the diffusers modules in.

Video latents carry a frame axis: `sample` [B, C, latent_frames, h, w] and the decoder's
`images` [B, 3, frames, H, W]. The wrappers do what WanPipeline does around each call; the
family (runtime/families/wan.py) does the rest (prompt cleaning, zeroing states past the
prompt, latents_mean / latents_std).
"""
from __future__ import annotations

import torch
from torch import nn


class _Forward(nn.Module):
    """An export wrapper: forward takes the spec's inputs by their names, in order."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class MaskedT5Forward(_Forward):
    def forward(self, input_ids, attention_mask):
        return self.module(input_ids=input_ids, attention_mask=attention_mask)[0]


class WanForward(_Forward):
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


class WanDecoderForward(_Forward):
    def forward(self, latent):
        return _first(self.module.decode(latent, return_dict=False))
