"""Wan 2.1 and Wan 2.2 text-to-video, as WanPipeline: UMT5 states, 3-D latents, two experts.

- Prompts are cleaned as WanPipeline cleans them (HTML entities unescaped twice, whitespace
  runs collapsed, ends stripped; diffusers also runs ftfy where it is installed), tokenized to
  the family's max_sequence_length (512) with the attention mask, which the UMT5 encoder takes;
  states past the prompt's tokens are zeroed, as the pipeline zero-pads them.
- Classifier-free guidance when GUIDANCE > 1 with the negative prompt, or "" without one (the
  pipeline's default; Wan's long recommended negative prompt is the client's to send).
- Latents [1, C, (F - 1) // t + 1, H / s, W / s] for F frames under a VAE of temporal factor t
  and spatial factor s, drawn from the request's generator as the pipeline draws them; FRAMES
  that do not fit the temporal factor are rounded as diffusers rounds num_frames
  (F // t * t + 1).
- Wan 2.2 folders hold two experts: `transformer` for timesteps at or above boundary_ratio x
  num_train_timesteps, `transformer_2` below, guided by GUIDANCE_2 (guidance_scale_2, default
  GUIDANCE). The served denoiser holds both and picks by each row's timestep, so a round whose
  drafts straddle the boundary is still one round; each item is guided at its own timestep's
  scale (GUIDANCE_2 below the boundary).
- Decoding: latents x latents_std + latents_mean per channel, then the causal VAE decodes all
  frames at once.
"""
from __future__ import annotations

import html
import re
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from models import tensors
from models.pipeline_spec import WAN, PipelineSpec
from runtime.driffusion import Denoise
from runtime.families import Family, TextEncoding, check_scale, prompt_rows, split_rows
from runtime.guidance import Conditioning
from runtime.pool import DevicePool
from runtime.request import GenerationRequest, RequestError, ResolvedRequest


def clean_prompt(text: str) -> str:
    """A prompt as WanPipeline's prompt_clean leaves it (without ftfy)."""
    unescaped = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", unescaped).strip()


def frames_that_fit(frames: int, temporal_factor: int) -> int:
    """diffusers' num_frames rule: counts that are not 1 more than a multiple of the VAE's
    temporal factor become frames // factor * factor + 1."""
    if frames % temporal_factor != 1:
        frames = frames // temporal_factor * temporal_factor + 1
    return max(frames, 1)


def boundary_timestep(spec: PipelineSpec) -> float:
    """The timestep at and above which Wan 2.2's high-noise expert runs."""
    return spec.boundary_ratio * spec.scheduler_config.get("num_train_timesteps", 1000)


class Wan(Family):
    name = WAN
    title = "Wan"
    takes_images = False
    makes_video = True

    def frames(self, request: GenerationRequest, spec: PipelineSpec, pixels: int) -> int:
        frames = spec.default_frames if request.frames is None else request.frames
        if not 1 <= frames < 2**31:
            raise RequestError("frames", f"must be at least 1; got {frames}")
        frames = frames_that_fit(int(frames), spec.temporal_scale_factor)
        if frames * pixels > spec.max_video_pixels:
            raise RequestError("frames", f"{frames} frames of {pixels} pixels each are "
                                         f"{frames * pixels} pixels; this server takes at most "
                                         f"{spec.max_video_pixels} (FRAMES x HEIGHT x WIDTH)")
        return frames

    def guidance_2(self, request: GenerationRequest, spec: PipelineSpec,
                   guidance: float) -> float:
        if spec.boundary_ratio is None:
            return super().guidance_2(request, spec, guidance)
        if request.guidance_2 is None:
            return guidance
        return check_scale("guidance_2", request.guidance_2, 0.0)

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        rows = [clean_prompt(text) for text in prompt_rows(request, cfg)]
        outputs = await encoding.texts(spec.text_encoders[0], rows)
        kept = outputs[tensors.ATTENTION_MASK].astype(np.float32)[..., None]
        states = outputs[tensors.TEXT_EMBEDDINGS] * kept
        return split_rows({tensors.ENCODER_HIDDEN_STATES: states}, request.guidance, cfg)

    def latent_shape(self, request: ResolvedRequest, spec: PipelineSpec) -> tuple[int, ...]:
        factor = spec.vae_scale_factor
        latent_frames = (request.frames - 1) // spec.temporal_scale_factor + 1
        return (1, spec.latent_channels, latent_frames, request.height // factor,
                request.width // factor)

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        return {}

    def decoder_input(self, latents: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
        mean = torch.tensor(spec.latents_mean).view(1, -1, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(spec.latents_std).view(1, -1, 1, 1, 1)
        return latents / inverse_std + mean

    def denoiser(self, pool: DevicePool, conditioning: Conditioning, request: ResolvedRequest,
                 spec: PipelineSpec) -> Denoise:
        if spec.boundary_ratio is None:
            return pool.denoiser(conditioning)
        return pool.denoiser(replace(conditioning, guidance_at=partial(
            _expert_guidance, boundary_timestep(spec), request.guidance, request.guidance_2)))


def _expert_guidance(boundary: float, high: float, low: float, timestep: float) -> float:
    """GUIDANCE for the high-noise expert's timesteps (>= `boundary`), GUIDANCE_2 below."""
    return high if timestep >= boundary else low


FAMILY = Wan()
