"""Z-Image and Z-Image-Turbo, as ZImagePipeline (and ZImageImg2ImgPipeline) compute them.

- Text: the Qwen3 encoder's second-to-last hidden states of the prompt in the tokenizer's chat
  template with thinking enabled (the spec's TextEncoder: layers (-2,), template
  "chat-thinking", 512 tokens), cut to the prompt's real tokens by the attention mask: each
  request (and its negative prompt) conditions on its own text length, and the pool evaluates
  rows of different lengths in separate calls.
- Guidance: diffusers guides when GUIDANCE g > 0, as pos + g (pos - neg): ordinary CFG at scale
  g + 1, which the pool runs (it guides above 1), combined in that form. g = 0 (Turbo) is one
  evaluation per step without the negative prompt. cfg_normalization (off) and cfg_truncation
  (1.0, which never truncates) are served at the pipeline's defaults; no request field changes
  them.
- Latents [1, C, 2 (H // 2f), 2 (W // 2f)]; sigmas linspace(1, 1/steps, steps) in float32, `mu`
  from the 2x2 patch count for a scheduler that shifts dynamically (max shift 1.15).
- The exported transformer (export/zimage.py) maps the timestep and negates the output, so the
  devices give a flow-matching velocity and the scheduler steps as for SD3 and Flux.
- The VAE decodes latents / scaling_factor + shift_factor; image-to-image scales a posterior
  sample as (sample - shift_factor) * scaling_factor and keeps the last steps * strength steps,
  strength 0.6 by default.
"""
from __future__ import annotations

from typing import Any

import torch

from models import tensors
from models.pipeline_spec import Z_IMAGE, PipelineSpec
from runtime.families import Family, TextEncoding, dynamic_shift, llm_states, prompt_rows
from runtime.guidance import Conditioning, Prediction
from runtime.request import ResolvedRequest

ZIMAGE_MAX_SHIFT = 1.15  # ZImagePipeline's default when the scheduler config has none


class ZImage(Family):
    name = Z_IMAGE
    title = "Z-Image"
    default_strength = 0.6  # ZImageImg2ImgPipeline
    strength_rounds_kept_steps = False
    latent_patch = 2

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        guided = request.guidance > 0
        encoder = next((e for e in spec.text_encoders if e.is_llm), None)
        if encoder is None:
            raise ValueError(f"{spec.model}: a Z-Image model needs an LLM text encoder")
        rows = await llm_states(encoding, encoder, prompt_rows(request, guided))
        cond = {tensors.ENCODER_HIDDEN_STATES: rows[0]}
        if not guided:
            return Conditioning(cond)
        uncond = {tensors.ENCODER_HIDDEN_STATES: rows[1]}
        return Conditioning(cond, uncond, request.guidance + 1.0, combine=guidance_above_one)

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        options = dynamic_shift(spec, self.latent_shape(request, spec), ZIMAGE_MAX_SHIFT)
        options["sigmas"] = torch.linspace(1.0, 1 / request.steps, request.steps).tolist()
        return options


def guidance_above_one(cond: Prediction, uncond: Prediction, scale: float) -> Prediction:
    """ZImagePipeline's guided prediction pos + g (pos - neg) for the CFG scale g + 1."""
    return cond + (scale - 1.0) * (cond - uncond)


FAMILY = ZImage()
