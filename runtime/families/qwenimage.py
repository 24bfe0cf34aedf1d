"""Qwen-Image, as QwenImagePipeline (and QwenImageImg2ImgPipeline) compute it.

- Text: Qwen2.5-VL's language model, its last hidden state of the prompt written into the
  pipeline's own template (a format string, the spec's TextEncoder.template), cut to the
  prompt's real tokens by the attention mask, less the template's first `drop_tokens` (34)
  tokens, at most 512 tokens after that: each prompt (and negative prompt) conditions on its
  own text length, and the pool evaluates rows of different lengths in separate calls.
- True CFG (diffusers' `true_cfg_scale`, the TRUE_CFG input, 4.0 by default as in
  QwenImagePipeline.__call__) runs only when TRUE_CFG > 1 and a NEGATIVE_PROMPT is given: the
  prediction neg + s (pos - neg), rescaled to the norm of pos per packed token (its channels x
  the 2x2 patch). Without a negative prompt there is one evaluation per step. The transformer
  embeds no guidance: GUIDANCE is not used (diffusers ignores guidance_scale for it too).
- Latents [1, C, 2 (H // 2f), 2 (W // 2f)], drawn as the pipeline draws [1, 1, C, h, w]; the
  exported transformer packs and unpacks 2x2 inside. Sigmas linspace(1, 1/steps, steps),
  shifted by `mu` from the packed token count (max shift 1.15 when the scheduler has none).
- The VAE decodes latents x latents_std + latents_mean (the family base's rule, scaling factor
  1) on one frame; image-to-image normalises a posterior sample the other way and keeps the
  last steps x strength steps (strength 0.6 by default).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models import tensors
from models.pipeline_spec import QWEN_IMAGE, PipelineSpec
from runtime.families import Family, TextEncoding, dynamic_shift, llm_states, prompt_rows
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest

QWEN_IMAGE_MAX_SHIFT = 1.15  # QwenImagePipeline's default when the scheduler config has none
PATCH = 2  # the transformer's 2x2 latent patches


class QwenImage(Family):
    name = QWEN_IMAGE
    title = "Qwen-Image"
    default_strength = 0.6  # QwenImageImg2ImgPipeline
    strength_rounds_kept_steps = False
    takes_true_cfg = True
    latent_patch = PATCH

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        true_cfg = request.true_cfg > 1.0 and request.negative_prompt is not None
        encoder = next((e for e in spec.text_encoders if e.is_llm), None)
        if encoder is None:
            raise ValueError(f"{spec.model}: a Qwen-Image model needs an LLM text encoder")
        rows = await llm_states(encoding, encoder, prompt_rows(request, true_cfg))
        cond = {tensors.ENCODER_HIDDEN_STATES: rows[0]}
        if not true_cfg:
            return Conditioning(cond)
        return Conditioning(cond, {tensors.ENCODER_HIDDEN_STATES: rows[1]}, request.true_cfg,
                            combine=norm_rescaled_cfg)

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        options = dynamic_shift(spec, self.latent_shape(request, spec), QWEN_IMAGE_MAX_SHIFT)
        options["sigmas"] = np.linspace(1.0, 1 / request.steps, request.steps)
        return options


def norm_rescaled_cfg(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """QwenImagePipeline's true CFG on unpacked [B, C, h, w] predictions: neg + s (pos - neg),
    rescaled so that each 2x2 patch's vector of C x 4 values (one packed token) has the norm
    of pos's."""
    combined = uncond + scale * (cond - uncond)
    return combined * (_patch_norms(cond) / _patch_norms(combined))


def _patch_norms(x: np.ndarray) -> np.ndarray:
    """The norm of each 2x2 patch over channels, broadcast back to [B, C, h, w]."""
    batch, channels, height, width = x.shape
    patches = x.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    norms = np.sqrt(np.square(patches).sum(axis=(1, 3, 5), keepdims=True))
    return np.broadcast_to(norms, patches.shape).reshape(x.shape)


FAMILY = QwenImage()
