"""Flux.2 (Klein; dev's rules too), as Flux2KleinPipeline and Flux2Pipeline: one LLM's states.

- Conditioning: the LLM encoder's hidden states of the family's layers, stacked per token
  (export/specs.py, LLMEncoderSpec), over all max_sequence_length tokens: the pipelines pad the
  prompt and pass every position to the transformer (the attention mask reaches the LLM only).
- Klein runs classifier-free guidance when GUIDANCE > 1, unless the folder says it is step-
  distilled (model_index.json's is_distilled). Flux2KleinPipeline has no negative prompt and
  encodes "" in its place; a request's NEGATIVE_PROMPT, when given, is encoded like the prompt
  and takes the empty prompt's place. dev embeds GUIDANCE in the transformer (`guidance` [B])
  and runs no classifier-free guidance. dev's prompts lose "[IMG]" first, as Flux2Pipeline's
  format_input drops it (its Pixtral processor counts image tokens).
- Latents are drawn already 2x2-patchified, [1, 4C, H / 16, W / 16], as the pipelines draw
  them; the exported transformer packs them into tokens and back, and the exported VAE decoder
  undoes the batch-norm normalisation and the patchify (export/specs.py), so the final latents
  go to the decoder as they are.
- Timesteps: sigmas linspace(1, 1/steps, steps) (unless the scheduler uses its own flow
  sigmas), shifted by an empirical `mu` of the token count and the step count.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models import tensors
from models.pipeline_spec import FLUX2, PipelineSpec
from runtime.families import Family, TextEncoding, split_rows
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest

# the pipelines' empirical shift: mu is linear in the image's token count at 10 and at 200
# steps (and linear in the steps between them); beyond LARGE_IMAGE_TOKENS the 200-step line
MU_AT_10_STEPS = (8.73809524e-05, 1.89833333)  # slope per token, intercept
MU_AT_200_STEPS = (0.00016927, 0.45666666)
LARGE_IMAGE_TOKENS = 4300
IMAGE_TOKEN = "[IMG]"  # what Flux2Pipeline removes from dev's prompts
MISTRAL_ENCODERS = ("Mistral3ForConditionalGeneration",)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """The sigma shift `mu` of Flux.2's pipelines for `image_tokens` latent tokens."""
    at_200 = MU_AT_200_STEPS[0] * image_tokens + MU_AT_200_STEPS[1]
    if image_tokens > LARGE_IMAGE_TOKENS:
        return float(at_200)
    at_10 = MU_AT_10_STEPS[0] * image_tokens + MU_AT_10_STEPS[1]
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + at_200 - 200.0 * slope)


class Flux2(Family):
    name = FLUX2
    title = "Flux.2"
    takes_images = False

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        encoder = next((e for e in spec.text_encoders if e.is_llm), None)
        if encoder is None:
            raise ValueError(f"{spec.model}: a Flux.2 model needs an LLM text encoder")
        guided = (not spec.guidance_embeds and not spec.cfg_distilled
                  and request.guidance > 1.0)
        rows = [request.prompt or ""]
        rows += [request.negative_prompt or ""] if guided else []
        if encoder.kind in MISTRAL_ENCODERS:
            rows = [row.replace(IMAGE_TOKEN, "") for row in rows]
        inputs = {tensors.ENCODER_HIDDEN_STATES:
                  (await encoding.texts(encoder, rows))[tensors.TEXT_EMBEDDINGS]}
        if spec.guidance_embeds:
            inputs[tensors.GUIDANCE] = np.full(len(rows), request.guidance, np.float32)
        return split_rows(inputs, request.guidance, guided)

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        _, _, height, width = self.latent_shape(request, spec)
        options: dict[str, Any] = {"mu": empirical_mu(height * width, request.steps)}
        if not spec.scheduler_config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / request.steps, request.steps)
        return options

    def decoder_input(self, latents: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
        return latents


FAMILY = Flux2()
