"""Model families: how each turns a request into conditioning, latents, timesteps and pixels.

One module per family, as diffusers has one pipeline per family; the generic
`runtime.pipeline.Pipeline` asks the request's family for each of these and does the rest
(transport, sampling, the uint8 image). A module of this package that defines `FAMILY`, a
`Family` whose `name` is a `PipelineSpec.family`, is found by `family_of`: adding a family means
adding its module here (and its export spec and tests), nothing else.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from models import tensors
from models.limits import MAX_GUIDANCE
from models.pipeline_spec import FAMILIES, PipelineSpec, TextEncoder
from runtime.driffusion import Blend, Denoise
from runtime.guidance import Conditioning
from runtime.pool import DevicePool
from runtime.request import GenerationRequest, RequestError, ResolvedRequest


class TextEncoding(Protocol):
    """What a family may ask the pipeline's encoders (over gRPC, HTTP or BLS)."""

    async def texts(self, encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
        """Every output of one text encoder (and its tokenizer) for `texts`, [N, ...] each."""

    async def labels(self, labels: list[int]) -> np.ndarray:
        """The label encoder's embeddings [N, 1, D] of class labels."""

    async def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's posterior parameters [1, 2C, h, w] (mean, log-variance) of pixels
        [1, 3, H, W] in [-1, 1]."""


@dataclass(frozen=True)
class StartState:
    """Where sampling starts: the latents at timestep index `start`, a blend applied after
    every refined step (inpainting with a plain model), and denoiser inputs the request adds
    to its conditioning (a 9-channel inpainting UNet's mask and masked-image latents)."""

    latents: torch.Tensor
    start: int = 0
    blend: Blend | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


class Family:
    """Stable Diffusion-style defaults; each family module overrides what its pipeline does
    differently."""

    name = ""
    title = ""  # how messages name the family's models
    default_strength = 0.8  # diffusers' img2img default for the family
    # how strength cuts the schedule: int(steps * strength) steps kept (SD, SDXL), or the
    # first int(steps - steps * strength) steps dropped (SD3, Flux)
    strength_rounds_kept_steps = True
    # the optional inputs the family serves beyond the sampler's: INIT_IMAGE and STRENGTH
    # (image-to-image), MASK (inpainting), TRUE_CFG (Flux's true_cfg_scale)
    takes_images = True
    takes_masks = False
    takes_true_cfg = False
    # latents drawn in whole patches of the transformer (Flux.1, Qwen-Image, Z-Image: 2x2):
    # each side is the pipeline's patch x (pixels // (patch x VAE factor))
    latent_patch = 1
    makes_video = False

    def check(self, request: GenerationRequest, spec: PipelineSpec) -> None:
        """Refuse the optional inputs this family (or this folder) does not serve, with a
        RequestError naming the field and what is allowed; a family that checks more extends
        this through super().check."""
        if request.true_cfg is not None:
            if not self.takes_true_cfg:
                raise RequestError("true_cfg", f"TRUE_CFG is for {served_by('takes_true_cfg')} "
                                               f"models; {self.of_family(spec)}: use GUIDANCE")
            check_scale("true_cfg", request.true_cfg, 1.0)
        self._check_image_inputs(request, spec)

    def of_family(self, spec: PipelineSpec) -> str:
        """How messages say which family the served model is of."""
        return f"{spec.model} is a model of the {self.title} family"

    def _check_image_inputs(self, request: GenerationRequest, spec: PipelineSpec) -> None:
        given = [name for name in ("init_image", "mask", "strength")
                 if getattr(request, name) is not None]
        if given and not self.takes_images:
            raise RequestError(given[0], f"{self.of_family(spec)}, which takes no "
                                         "image inputs (INIT_IMAGE, MASK, STRENGTH); "
                                         f"image-to-image is served for "
                                         f"{served_by('takes_images')} folders")
        if request.mask is not None and not self.takes_masks:
            raise RequestError("mask", f"inpainting is served for {served_by('takes_masks')} "
                                       f"folders; {self.of_family(spec)}: send "
                                       "INIT_IMAGE without MASK (image-to-image)")
        if request.init_image is None and given:
            raise RequestError(given[0], "needs an INIT_IMAGE (image-to-image or inpainting)")
        if request.init_image is not None and not spec.image_encoder:
            raise RequestError("init_image", f"{spec.model} is served without a VAE encoder; "
                                             "rebuild its engines with `driffusion "
                                             "build-engines` to take INIT_IMAGE")

    def frames(self, request: GenerationRequest, spec: PipelineSpec, pixels: int) -> int:
        """The request's video frames for images of `pixels` pixels each (an image family takes
        no FRAMES: RequestError)."""
        if request.frames is not None:
            raise RequestError("frames", f"{self.of_family(spec)}, which makes images; FRAMES "
                                         f"is for {served_by('makes_video')} models")
        return 1

    def guidance_2(self, request: GenerationRequest, spec: PipelineSpec,
                   guidance: float) -> float:
        """The second expert's guidance (only two-expert folders take GUIDANCE_2)."""
        if request.guidance_2 is not None:
            raise RequestError("guidance_2", f"GUIDANCE_2 is for two-expert (Wan 2.2) models; "
                                             f"{spec.model} has one denoiser: use GUIDANCE")
        return guidance

    def denoiser(self, pool: DevicePool, conditioning: Conditioning, request: ResolvedRequest,
                 spec: PipelineSpec) -> Denoise:
        """The sampler's model: one round's items over the pool with the request's conditioning
        (a family whose guidance depends on the timestep routes items itself)."""
        return pool.denoiser(conditioning)

    def first_kept_step(self, steps: int, strength: float) -> int:
        """The first of `steps` timesteps an image request runs at `strength`, as the family's
        image-to-image pipeline's get_timesteps cuts them."""
        if self.strength_rounds_kept_steps:
            return steps - min(int(steps * strength), steps)
        return int(max(steps - min(steps * strength, steps), 0))

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        raise NotImplementedError

    def latent_shape(self, request: ResolvedRequest, spec: PipelineSpec) -> tuple[int, ...]:
        """[1, C, h, w] of the request's latents, as the family's pipeline draws them."""
        patch = self.latent_patch
        factor = patch * spec.vae_scale_factor
        return (1, spec.latent_channels, patch * (request.height // factor),
                patch * (request.width // factor))

    def initial_latents(self, request: ResolvedRequest, spec: PipelineSpec, scheduler,
                        generator: torch.Generator) -> torch.Tensor:
        """The starting latents drawn from `generator` (seeded with SEED) as diffusers draws
        them, scaled by the scheduler's initial sigma."""
        noise = torch.randn(self.latent_shape(request, spec), generator=generator)
        # flow-matching schedulers have no init_noise_sigma: they start from the noise itself
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)

    async def start_state(self, encoding: TextEncoding, request: ResolvedRequest,
                          spec: PipelineSpec, scheduler,
                          generator: torch.Generator) -> StartState:
        """Text-to-image: noise at the first timestep. Image-to-image: the init image's
        latents (a posterior sample), noised to the first timestep that strength keeps; the
        draws from `generator` come in diffusers' order (posterior, then noise)."""
        if request.init_image is None:
            return StartState(self.initial_latents(request, spec, scheduler, generator))
        start = self.begin_at(scheduler, request)
        parameters = await encoding.image(to_pixels(request.init_image))
        image_latents = self.image_latents(posterior_sample(parameters, generator), spec)
        noise = torch.randn(image_latents.shape, generator=generator)
        return StartState(noised(scheduler, image_latents, noise, start), start)

    def begin_at(self, scheduler, request: ResolvedRequest) -> int:
        """The index of the first timestep an image request runs, set as the scheduler's begin
        index where it keeps one (as diffusers' get_timesteps does)."""
        start = self.first_kept_step(request.steps, request.strength) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return start

    def image_latents(self, sample: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
        """Latents of a VAE posterior sample, as the family's pipeline scales them: the inverse
        of `decoder_input` (scaling and shift, latents_mean / latents_std where the VAE has
        them)."""
        mean, std = latent_statistics(spec, sample.ndim)
        return (sample - mean - (spec.shift_factor or 0.0)) * spec.scaling_factor / std

    def timestep_options(self, request: ResolvedRequest, spec: PipelineSpec) -> dict[str, Any]:
        """Extra arguments of the scheduler's `set_timesteps` (custom sigmas, shift `mu`)."""
        return dynamic_shift(spec, self.latent_shape(request, spec))

    def decoder_input(self, latents: torch.Tensor, spec: PipelineSpec) -> torch.Tensor:
        """What the VAE decoder takes for the final latents (diffusers' scaling and shift, and
        the VAE's latents_mean / latents_std where it has them)."""
        mean, std = latent_statistics(spec, latents.ndim)
        scaled = latents * std / spec.scaling_factor + mean
        return scaled if spec.shift_factor is None else scaled + spec.shift_factor


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1], as diffusers' image processor."""
    pixels = image.astype(np.float32) / 255.0
    return torch.from_numpy(2.0 * pixels - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def posterior_sample(parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE's diagonal Gaussian posterior (mean, log-variance along channels),
    drawn from `generator` as diffusers' DiagonalGaussianDistribution.sample draws it."""
    mean, logvar = torch.chunk(parameters, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator)


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """`latents` noised to the scheduler's timestep `step` (flow matching: scale_noise)."""
    timestep = scheduler.timesteps[step:step + 1]
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, timestep, noise)
    return scheduler.add_noise(latents, noise, timestep)


def dynamic_shift(spec: PipelineSpec, latent_shape: tuple[int, ...],
                  max_shift_default: float = 1.16) -> dict[str, Any]:
    """`mu` for a flow-matching scheduler that shifts its sigmas by the image's token count
    (`use_dynamic_shifting`), as diffusers' SD3 and Flux pipelines compute it; {} otherwise."""
    config = spec.scheduler_config
    if not config.get("use_dynamic_shifting"):
        return {}
    patch = max(1, spec.size_multiple // spec.vae_scale_factor)
    tokens = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
    base_tokens = config.get("base_image_seq_len", 256)
    max_tokens = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return {"mu": tokens * slope + base_shift - slope * base_tokens}


def prompt_rows(request: ResolvedRequest, negative: bool) -> list[str]:
    """The texts to encode: the prompt, and the negative prompt ("" if none) when `negative`."""
    rows = [request.prompt or ""]
    return rows + [request.negative_prompt or ""] if negative else rows


def latent_statistics(spec: PipelineSpec,
                      rank: int = 4) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The VAE's per-channel latents_mean and latents_std shaped [1, C, 1, ...] for latents of
    `rank` dims (0 and 1 where its config has none)."""
    if not spec.latents_mean:
        return 0.0, 1.0
    shape = (1, -1, *(1,) * (rank - 2))
    return (torch.tensor(spec.latents_mean).view(shape),
            torch.tensor(spec.latents_std).view(shape))


async def llm_states(encoding: TextEncoding, encoder: TextEncoder,
                     texts: list[str]) -> list[np.ndarray]:
    """Each text's LLM states [1, tokens, D]: for an encoder that `trim`s (Qwen-Image,
    Z-Image), the tokens its attention mask keeps less the first `drop_tokens` (the template's
    prefix), as the pipelines cut them; otherwise all `max_length` tokens."""
    outputs = await encoding.texts(encoder, texts)
    states = outputs[tensors.TEXT_EMBEDDINGS]
    if not encoder.trim:
        return [row[None] for row in states]
    masks = outputs[tensors.ATTENTION_MASK].astype(bool)
    return [row[keep][encoder.drop_tokens:][None] for row, keep in zip(states, masks)]


def split_rows(inputs: dict[str, np.ndarray], guidance: float,
               negative: bool) -> Conditioning:
    """Conditioning from inputs whose row 0 is the prompt's and row 1 (if `negative`) the
    negative prompt's."""
    cond = {name: value[:1] for name, value in inputs.items()}
    uncond = {name: value[1:] for name, value in inputs.items()} if negative else None
    return Conditioning(cond, uncond, guidance)


def check_scale(field_name: str, value: float, low: float) -> float:
    """`value` if it is a finite number in low..MAX_GUIDANCE, else RequestError."""
    if not (np.isfinite(value) and low <= value <= MAX_GUIDANCE):
        raise RequestError(field_name, f"must be a number in {low:g}..{MAX_GUIDANCE:g}; "
                                       f"got {value}")
    return float(value)


def served_by(ability: str) -> str:
    """The titles of the families that have `ability` (a Family flag such as "takes_masks")."""
    known = families()
    return ", ".join(known[name].title for name in FAMILIES
                     if name in known and getattr(known[name], ability))


@functools.cache
def families() -> dict[str, Family]:
    """Every family of this package, by name."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found[family.name] = family
    return found


def family_of(spec: PipelineSpec) -> Family:
    """The family of a served model; ValueError names the families this runtime knows."""
    known = families()
    if spec.family not in known:
        raise ValueError(f"{spec.model}: family {spec.family!r} has no runtime module; known: "
                         f"{', '.join(sorted(known))}")
    return known[spec.family]
