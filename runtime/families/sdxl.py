"""Stable Diffusion XL, as StableDiffusionXLPipeline: two CLIP encoders, pooled text, time ids.

Both encoders' penultimate states are concatenated; the second's pooled projection is
`text_embeds`; `time_ids` = (height, width, 0, 0, height, width). With no negative prompt and
`force_zeros_for_empty_prompt`, the negative conditioning is zeros (time ids kept).
"""
from __future__ import annotations

import numpy as np

from models import tensors
from models.pipeline_spec import STABLE_DIFFUSION_XL, PipelineSpec
from runtime.families import Family, TextEncoding, prompt_rows
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest


class StableDiffusionXL(Family):
    name = STABLE_DIFFUSION_XL
    title = "SDXL"
    default_strength = 0.3  # StableDiffusionXLImg2ImgPipeline

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        zero_negative = request.negative_prompt is None and spec.force_zeros_for_empty_prompt
        rows = prompt_rows(request, cfg and not zero_negative)
        encoded = [await encoding.texts(encoder, rows) for encoder in spec.text_encoders]
        size = [request.height, request.width]
        inputs = {
            tensors.ENCODER_HIDDEN_STATES: np.concatenate(
                [e[tensors.PENULTIMATE_HIDDEN_STATES] for e in encoded], axis=-1),
            tensors.TEXT_EMBEDS: encoded[-1][tensors.POOLED],
            tensors.TIME_IDS: np.tile(np.array([size + [0, 0] + size], np.float32),
                                      (len(rows), 1)),
        }
        cond = {name: value[:1] for name, value in inputs.items()}
        if not cfg:
            return Conditioning(cond, None, request.guidance)
        if zero_negative:
            uncond = {name: value if name == tensors.TIME_IDS else np.zeros_like(value)
                      for name, value in cond.items()}
        else:
            uncond = {name: value[1:] for name, value in inputs.items()}
        return Conditioning(cond, uncond, request.guidance)


FAMILY = StableDiffusionXL()
