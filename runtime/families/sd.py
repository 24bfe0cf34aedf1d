"""Stable Diffusion 1.x / 2.x, as StableDiffusionPipeline: CLIP's last hidden state."""
from __future__ import annotations

from models import tensors
from models.pipeline_spec import STABLE_DIFFUSION, PipelineSpec
from runtime.devices import Conditioning
from runtime.families import Family, TextEncoding, prompt_rows, split_rows
from runtime.request import ResolvedRequest


class StableDiffusion(Family):
    """One CLIP encoder; the negative prompt ("" by default) is encoded for guidance > 1."""

    name = STABLE_DIFFUSION

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        (encoder,) = spec.text_encoders
        encoded = await encoding.texts(encoder, prompt_rows(request, cfg))
        states = {tensors.ENCODER_HIDDEN_STATES: encoded[tensors.TEXT_EMBEDDINGS]}
        return split_rows(states, request.guidance, cfg)


FAMILY = StableDiffusion()
