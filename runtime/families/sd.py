"""Stable Diffusion 1.x / 2.x, as StableDiffusionPipeline: CLIP's last hidden state.

Image inputs as StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline take them.
Inpainting (MASK: 255 repaints, 0 keeps; binarised at 128) works on both kinds of folder:
- a 9-channel inpainting UNet gets the mask and the masked image's latents as two more inputs
  of every device call (`mask`, `masked_image_latents`; the exported UNet joins them to the
  latents along the channels, as the pipeline does before each call);
- a plain 4-channel UNet denoises the whole image and, after every refined step, the kept
  region is replaced by the init image's latents noised to the next timestep.
Draws from the request's generator come in the pipeline's order: the init image's posterior
(plain UNets, or strength < 1), the noise, then the masked image's posterior.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models import tensors
from models.pipeline_spec import STABLE_DIFFUSION, PipelineSpec
from runtime.families import (
    Family,
    StartState,
    TextEncoding,
    noised,
    posterior_sample,
    prompt_rows,
    split_rows,
    to_pixels,
)
from runtime.guidance import Conditioning
from runtime.request import GenerationRequest, RequestError, ResolvedRequest


class StableDiffusion(Family):
    """One CLIP encoder; the negative prompt ("" by default) is encoded for guidance > 1."""

    name = STABLE_DIFFUSION
    title = "SD 1.x/2.x"
    takes_masks = True

    def check(self, request: GenerationRequest, spec: PipelineSpec) -> None:
        super().check(request, spec)
        if spec.masked_inputs and request.mask is None:
            raise RequestError("mask", f"{spec.model} is an inpainting model (its UNet takes a "
                                       "mask and the masked image): send INIT_IMAGE and MASK")

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        (encoder,) = spec.text_encoders
        encoded = await encoding.texts(encoder, prompt_rows(request, cfg))
        states = {tensors.ENCODER_HIDDEN_STATES: encoded[tensors.TEXT_EMBEDDINGS]}
        return split_rows(states, request.guidance, cfg)

    async def start_state(self, encoding: TextEncoding, request: ResolvedRequest,
                          spec: PipelineSpec, scheduler,
                          generator: torch.Generator) -> StartState:
        if request.mask is None:
            return await super().start_state(encoding, request, spec, scheduler, generator)
        return await inpainting_start(self, encoding, request, spec, scheduler, generator)


async def inpainting_start(family: Family, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec, scheduler,
                           generator: torch.Generator) -> StartState:
    """The start of an inpainting run, as StableDiffusionInpaintPipeline prepares it."""
    start = family.begin_at(scheduler, request)
    pixels = to_pixels(request.init_image)
    repaint = torch.from_numpy(request.mask.astype(np.float32) / 255.0)[None, None]
    repaint = (repaint >= 0.5).to(torch.float32)
    full_strength = request.strength == 1.0
    image_latents = None
    if not spec.masked_inputs or not full_strength:
        image_latents = await _encoded(encoding, pixels, generator, family, spec)
    noise = torch.randn(family.latent_shape(request, spec), generator=generator)
    if full_strength:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = noised(scheduler, image_latents, noise, start)
    masked = await _encoded(encoding, pixels * (repaint < 0.5), generator, family, spec)
    latent_mask = F.interpolate(repaint, size=tuple(latents.shape[-2:]))
    if spec.masked_inputs:
        inputs = {tensors.MASK: latent_mask.numpy(),
                  tensors.MASKED_IMAGE_LATENTS: masked.numpy()}
        return StartState(latents, start, inputs=inputs)
    return StartState(latents, start, blend=_known_region_blend(
        scheduler, image_latents, noise, latent_mask))


async def _encoded(encoding: TextEncoding, pixels: torch.Tensor, generator: torch.Generator,
                   family: Family, spec: PipelineSpec) -> torch.Tensor:
    return family.image_latents(posterior_sample(await encoding.image(pixels), generator), spec)


def _known_region_blend(scheduler, image_latents: torch.Tensor, noise: torch.Tensor,
                        repaint: torch.Tensor):
    """After step i: the kept region is the init image's latents noised to timestep i+1 (none
    after the last step), the repainted region the refined latents."""
    last = len(scheduler.timesteps) - 1

    def blend(step: int, refined: torch.Tensor) -> torch.Tensor:
        known = image_latents
        if step < last:
            known = scheduler.add_noise(image_latents, noise,
                                        torch.tensor([scheduler.timesteps[step + 1]]))
        return (1 - repaint) * known + repaint * refined

    return blend


FAMILY = StableDiffusion()
