"""Flux.1 (dev, schnell), as FluxPipeline: CLIP's pooled projection and T5's states.

- Guidance-distilled transformers (dev) take GUIDANCE as an input (`guidance` [B]) instead of
  running classifier-free guidance; schnell has no guidance input and ignores GUIDANCE.
- True CFG (diffusers' `true_cfg_scale`, the TRUE_CFG input) evaluates the negative prompt too
  and mixes neg + true_cfg (pos - neg); it runs only when TRUE_CFG > 1 and a NEGATIVE_PROMPT is
  given, as in diffusers.
- Latents are drawn [1, C, 2(H // 2f), 2(W // 2f)] as FluxPipeline draws them before packing
  them 2x2; the sampler and the devices keep that unpacked layout and the exported transformer
  packs and unpacks inside (export/specs.py, FluxTransformerSpec). Packing only reorders
  elements and flow-matching Euler steps and drafts are elementwise, so the result equals
  diffusers' packed run.
- Timesteps: sigmas linspace(1, 1/steps, steps) (unless the scheduler uses its own flow sigmas)
  shifted by `mu` from the packed token count when the scheduler shifts dynamically (dev).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models import tensors
from models.pipeline_spec import FLUX, PipelineSpec
from runtime.families import (
    Family,
    TextEncoding,
    dynamic_shift,
    prompt_rows,
    split_rows,
)
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest

FLUX_MAX_SHIFT = 1.15  # FluxPipeline's default when the scheduler config has none


class Flux(Family):
    name = FLUX
    title = "Flux"
    default_strength = 0.6  # FluxImg2ImgPipeline
    strength_rounds_kept_steps = False
    takes_true_cfg = True
    latent_patch = 2

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        true_cfg = request.true_cfg > 1.0 and request.negative_prompt is not None
        rows = prompt_rows(request, true_cfg)
        clip = next(e for e in spec.text_encoders if not e.is_t5)
        t5 = next((e for e in spec.text_encoders if e.is_t5), None)
        if t5 is None:
            raise ValueError(f"{spec.model}: a Flux model needs a T5 text encoder")
        inputs = {
            tensors.ENCODER_HIDDEN_STATES: (await encoding.texts(t5, rows))[
                tensors.TEXT_EMBEDDINGS],
            tensors.POOLED_PROJECTIONS: (await encoding.texts(clip, rows))[tensors.POOLED],
        }
        if spec.guidance_embeds:
            inputs[tensors.GUIDANCE] = np.full(len(rows), request.guidance, np.float32)
        return split_rows(inputs, request.true_cfg, true_cfg)

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        options = dynamic_shift(spec, self.latent_shape(request, spec), FLUX_MAX_SHIFT)
        if not spec.scheduler_config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / request.steps, request.steps)
        return options


FAMILY = Flux()
