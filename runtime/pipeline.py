"""Prompt or label -> image: tokenize, encode, sample with DRiffusion over a device pool, decode.

The same `Pipeline` runs in the `generate` client (model clients over gRPC or HTTP) and inside
the Triton `driffusion` model (model clients over BLS). It does what every model family shares
(request checks, transport to the tokenizers, encoders and decoder, the sampler, the uint8
image) and asks the request's family (`runtime/families/`: SD, SDXL, SD3, Flux,
class-conditional) for what diffusers' pipeline of that family does its own way: the
conditioning, the latents' shape and draw, the scheduler's timesteps and the decoder's input.
So sequential mode gives diffusers' image.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from models import tensors
from models.pipeline_spec import PipelineSpec, TextEncoder
from runtime.device import DEFAULT_DEADLINE_S, ModelClient
from runtime.driffusion import DRAFT_ORDERS, MODES, VP_SCHEDULERS, sample
from runtime.families import Family, StartState, check_scale, family_of
from runtime.guidance import Conditioning
from runtime.pool import DevicePool
from runtime.request import (
    Cancelled,
    GenerationRequest,
    RequestError,
    ResolvedRequest,
)
from runtime.request import shown as _shown
from runtime.schedulers import (
    compatible,
    make_scheduler,
    max_steps,
    scheduler_class_name,
    scheduler_names,
)

__all__ = ["Cancelled", "CountingDenoise", "GenerationRequest", "GenerationResult", "Pipeline", "PipelineSpec",
           "RequestError", "ResolvedRequest", "resolve", "to_uint8_image"]

# tokenizer models: TEXT (BYTES [N, 1]) in; input_ids (INT64 [N, max_length]) and the number of
# tokens truncation dropped per text (INT32 [N, 1]) out
TOKENIZER_TEXT = "TEXT"
TOKENIZER_DROPPED = "DROPPED"
log = logging.getLogger("driffusion")


@dataclass(frozen=True)
class GenerationResult:
    """An image and what DRiffusion did to make it."""

    image: np.ndarray  # uint8 [H, W, 3]; a video model's frames: uint8 [F, H, W, 3]
    rounds: int  # parallel rounds (sequential: one per step)
    evaluations: int  # model evaluations (CFG pairs count once)


def resolve(request: GenerationRequest, spec: PipelineSpec, default_window: int) -> ResolvedRequest:
    """Validate a request against the spec; RequestError names the first bad field."""
    _check_prompt_sizes(request, spec.max_prompt_bytes)
    label, negative_label = _resolve_condition(request, spec)
    if request.mode not in MODES:
        raise RequestError("mode", f"must be one of {', '.join(MODES)}; got {_shown(request.mode)}")
    window = min(default_window, spec.max_window) if request.window is None else request.window
    if not 1 <= window <= spec.max_window:
        raise RequestError("window", f"must be in 1..{spec.max_window}; got {window}")
    guidance = check_scale("guidance",
                           spec.default_guidance if request.guidance is None else request.guidance,
                           0.0)
    scheduler = _resolve_scheduler(request.scheduler, spec)
    steps = _resolve_steps(request.steps, scheduler, spec)
    if not 0 <= request.seed < 2**63:
        raise RequestError("seed", f"must be in 0..2^63-1; got {request.seed}")
    _check_tolerance(request.mode, request.tolerance)
    if request.draft_order not in DRAFT_ORDERS:
        raise RequestError("draft_order", f"must be one of {DRAFT_ORDERS}; got {request.draft_order}")
    scheduler_class = scheduler_class_name(scheduler, spec.scheduler_config)
    if request.draft_order == 2 and scheduler_class not in VP_SCHEDULERS:
        raise RequestError("draft_order", f"2 needs a noise-prediction multistep scheduler "
                                          f"(ddim, dpmpp2m, unipc, ddpm, pndm); got {scheduler}")
    family = family_of(spec)
    family.check(request, spec)
    height, width = _resolve_sizes(request, spec)
    strength = _resolve_strength(request, steps, family)
    prompt = request.prompt if spec.uses_prompts else None
    negative = request.negative_prompt if spec.uses_prompts else None
    true_cfg = spec.default_true_cfg if request.true_cfg is None else float(request.true_cfg)
    frames = family.frames(request, spec, height * width)
    guidance_2 = family.guidance_2(request, spec, guidance)
    return ResolvedRequest(prompt, negative, label, negative_label, request.seed, steps,
                           request.mode, window, guidance, scheduler, request.tolerance,
                           request.draft_order, height, width, true_cfg, request.init_image,
                           request.mask, strength, frames, guidance_2)


def _resolve_sizes(request: GenerationRequest, spec: PipelineSpec) -> tuple[int, int]:
    """HEIGHT and WIDTH, or the init image's size (HEIGHT and WIDTH, when given, must equal it;
    the mask must match it; the engines must take it: RequestError names INIT_IMAGE)."""
    if request.init_image is None:
        return (_resolve_size("height", request.height, spec.image_size[0], spec.height_range,
                              spec),
                _resolve_size("width", request.width, spec.image_size[1], spec.width_range,
                              spec))
    image = request.init_image
    _check_pixels("init_image", image, 3)
    height, width = size = image.shape[:2]
    for name, value, side in (("height", request.height, height),
                              ("width", request.width, width)):
        if value is not None and value != side:
            raise RequestError(name, f"must equal INIT_IMAGE's {name} {side} (images are not "
                                     f"resized); got {_shown(value)}")
    if not (_size_fits(height, spec.image_size[0], spec.height_range, spec)
            and _size_fits(width, spec.image_size[1], spec.width_range, spec)):
        raise RequestError("init_image", f"is {height}x{width} pixels (height x width); "
                                         f"{spec.model}'s engines take {_allowed_sizes(spec)} "
                                         "(images are not resized)")
    if request.mask is not None:
        _check_pixels("mask", request.mask, 2)
        if request.mask.shape != size:
            raise RequestError("mask", f"must be the size of INIT_IMAGE {list(size)}; got "
                                       f"{list(request.mask.shape)}")
    return height, width


def _check_pixels(name: str, image: object, rank: int) -> None:
    shape = "[H, W, 3]" if rank == 3 else "[H, W]"
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == rank
            and (rank == 2 or image.shape[2] == 3)):
        got = (f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise RequestError(name, f"must be UINT8 {shape}; got {got}")


def _resolve_strength(request: GenerationRequest, steps: int, family: Family) -> float:
    """STRENGTH, or the family's default (inpainting: 1.0, as diffusers' inpaint pipeline);
    it must keep at least one of the steps."""
    if request.init_image is None:
        return 1.0
    default = 1.0 if request.mask is not None else family.default_strength
    strength = default if request.strength is None else request.strength
    if not (np.isfinite(strength) and 0 < strength <= 1):
        raise RequestError("strength", f"must be in (0, 1]; got {strength}")
    if family.first_kept_step(steps, strength) >= steps:
        raise RequestError("strength", f"{strength:g} keeps none of the {steps} steps; use at "
                                       f"least {1 / steps:.3g} or more steps")
    return float(strength)


def _check_prompt_sizes(request: GenerationRequest, limit: int) -> None:
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text is not None and len(text.encode("utf-8", "surrogatepass")) > limit:
            raise RequestError(name, f"must be at most {limit} bytes of UTF-8")
        if text is not None and "\x00" in text:
            raise RequestError(name, "must not contain NUL characters")


def _resolve_scheduler(name: str | None, spec: PipelineSpec) -> str:
    scheduler = name or spec.default_scheduler
    if scheduler not in scheduler_names():
        raise RequestError("scheduler", f"must be one of {', '.join(scheduler_names())}; "
                                        f"got {_shown(scheduler)}")
    if not compatible(scheduler, spec.scheduler_config):
        usable = [n for n in scheduler_names() if compatible(n, spec.scheduler_config)]
        raise RequestError("scheduler", f"{scheduler} does not fit {spec.model} (a "
                                        f"{'flow-matching' if 'flow_euler' in usable else 'noise-prediction'}"
                                        f" model); use one of {', '.join(usable)}")
    return scheduler


def _resolve_steps(steps: int | None, scheduler: str, spec: PipelineSpec) -> int:
    steps = spec.default_steps if steps is None else steps
    if not 1 <= steps <= spec.max_steps:
        raise RequestError("steps", f"must be in 1..{spec.max_steps}; got {steps}")
    limit = max_steps(scheduler, spec.scheduler_config, spec.max_steps)
    if steps > limit:
        raise RequestError("steps", f"scheduler {scheduler} runs at most {limit} steps for "
                                    f"{spec.model}; got {steps}")
    return steps


def _resolve_size(name: str, value: int | None, default: int, allowed: tuple[int, int] | None,
                  spec: PipelineSpec) -> int:
    if value is None:
        return default
    if not _size_fits(value, default, allowed, spec):
        low, high = allowed or (default, default)
        if low == high:
            allowed_text = f"{low} pixels (the engines are built for that size only)"
        else:
            allowed_text = (f"{low}..{high} pixels and a multiple of {spec.size_multiple} "
                            "(the engines' profile)")
        raise RequestError(name, f"must be {allowed_text}; got {_shown(value)}")
    return value


def _size_fits(value: int, default: int, allowed: tuple[int, int] | None,
               spec: PipelineSpec) -> bool:
    """Whether the engines take images `value` pixels along a side whose profile is `allowed`
    (None: fixed at `default`)."""
    low, high = allowed or (default, default)
    return low <= value <= high and value % spec.size_multiple == 0


def _allowed_sizes(spec: PipelineSpec) -> str:
    """The image sizes the engines take, for messages: "8x8 pixels only", or the ranges."""
    height, width = spec.image_size
    if spec.height_range is None and spec.width_range is None:
        return f"{height}x{width} pixels only"
    low_h, high_h = spec.height_range or (height, height)
    low_w, high_w = spec.width_range or (width, width)
    return (f"heights {low_h}..{high_h} and widths {low_w}..{high_w} pixels, multiples of "
            f"{spec.size_multiple}")


def _check_tolerance(mode: str, tolerance: float | None) -> None:
    if mode == "verified" and (tolerance is None or not tolerance >= 0):
        raise RequestError("tolerance", f"mode verified needs a tolerance >= 0; got {tolerance}")
    if mode != "verified" and tolerance is not None:
        raise RequestError("tolerance", f"applies to mode verified only, not {mode}")


def _resolve_condition(request: GenerationRequest,
                       spec: PipelineSpec) -> tuple[int | None, int | None]:
    """(label, negative label) of a class-conditional request; prompts are checked for others."""
    if spec.uses_prompts:
        if request.label is not None:
            raise RequestError("label", f"{spec.model} takes a PROMPT, not a LABEL")
        if request.prompt is None:
            raise RequestError("prompt", f"{spec.model} needs a PROMPT (an empty one is allowed)")
        return None, None
    if (request.label is None) == (request.prompt is None):
        raise RequestError("label", "give exactly one of LABEL or PROMPT")
    if request.prompt is not None:
        label = label_of_prompt(request.prompt, spec, "prompt")
    elif not 0 <= request.label < spec.num_labels:
        raise RequestError("label", f"must be in 0..{spec.num_labels - 1}; got {request.label}")
    else:
        label = int(request.label)
    negative = spec.null_label
    if request.negative_prompt:
        negative = label_of_prompt(request.negative_prompt, spec, "negative_prompt")
    return label, negative


def label_of_prompt(prompt: str, spec: PipelineSpec, field_name: str) -> int:
    """The one label a prompt names ("a handwritten 7", "seven"); RequestError otherwise."""
    words = set(re.findall(r"[a-z0-9]+", prompt.lower()))
    matches = {k for k, names in enumerate(spec.label_names) if words & set(names)}
    if len(matches) != 1:
        known = ", ".join("/".join(names) for names in spec.label_names)
        raise RequestError(
            field_name,
            f"{spec.model} is class-conditional: the prompt must name exactly one class "
            f"({known}); got {_shown(prompt)}",
        )
    return matches.pop()


class Pipeline:
    """Encode the request, sample with DRiffusion over the pool, decode to uint8 pixels.

    `models` holds the model clients by their Triton names: the tokenizers and text encoders
    the spec names (or the label encoder `text_encoder`), and `vae_decoder` for latent models.
    Nothing of a request is kept on the pipeline: one Pipeline serves concurrent requests.
    """

    def __init__(self, spec: PipelineSpec, pool: DevicePool, models: Mapping[str, ModelClient],
                 deadline_s: float | None = DEFAULT_DEADLINE_S) -> None:
        needed = self.needed_models(spec)
        missing = [name for name in needed if name not in models]
        if missing:
            raise ValueError(f"{spec.model} needs the models {', '.join(needed)}; "
                             f"missing: {', '.join(missing)}")
        self.spec = spec
        self.family: Family = family_of(spec)
        self.pool = pool
        self.models = dict(models)
        self.deadline_s = deadline_s  # of each tokenizer, encoder and decoder call

    @staticmethod
    def needed_models(spec: PipelineSpec) -> list[str]:
        """Names of the non-device models the pipeline of `spec` calls."""
        if spec.uses_prompts:
            names = [name for e in spec.text_encoders for name in (e.tokenizer, e.network)]
        else:
            names = ["text_encoder"]
        names += ["vae_decoder"] if spec.decoder == "vae" else []
        return names + (["vae_encoder"] if spec.image_encoder else [])

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        return resolve(request, self.spec, self.pool.width)

    def steps_to_run(self, request: ResolvedRequest) -> int:
        """The steps a resolved request refines (an image request: those strength keeps)."""
        if request.init_image is None:
            return request.steps
        return request.steps - self.family.first_kept_step(request.steps, request.strength)

    async def _infer(self, name: str, inputs: dict[str, np.ndarray],
                     outputs: list[str]) -> dict[str, np.ndarray]:
        return await self.models[name].infer(inputs, outputs, self.deadline_s)

    # -- conditioning: the family asks the encoders through `texts` and `labels` -------------

    async def encode(self, request: ResolvedRequest) -> Conditioning:
        """The denoiser's conditioning for the request (and its negative, for guidance)."""
        return await self.family.conditioning(self, request, self.spec)

    async def labels(self, labels: list[int]) -> np.ndarray:
        """The label encoder's embeddings [N, 1, D] (float32) of class labels."""
        # one row per label: encoders take [rows, 1] on the wire (a batching model's per-row
        # scalar), which Triton reshapes to the network's [rows]
        result = await self._infer("text_encoder",
                                   {tensors.LABEL: np.array(labels, np.int64).reshape(-1, 1)},
                                   [tensors.TEXT_EMBEDDINGS])
        return result[tensors.TEXT_EMBEDDINGS].astype(np.float32)

    async def texts(self, encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
        """Every output of one text encoder for `texts` ([N, ...] each, float32); an LLM
        encoder's chosen hidden states come with the tokenizer's attention mask (int64)."""
        token_names = [tensors.INPUT_IDS, TOKENIZER_DROPPED]
        token_names += [tensors.ATTENTION_MASK] if encoder.takes_mask else []
        tokens = await self._infer(encoder.tokenizer,
                                   {TOKENIZER_TEXT: np.array([[t.encode()] for t in texts],
                                                             dtype=np.object_)},
                                   token_names)
        for text, dropped in zip(texts, tokens[TOKENIZER_DROPPED].reshape(-1)):
            if dropped > 0:
                log.warning("%s: the prompt was truncated to %d tokens, %d token(s) dropped: %s",
                            encoder.tokenizer, encoder.max_length, int(dropped), _shown(text))
        inputs = {tensors.INPUT_IDS: tokens[tensors.INPUT_IDS].astype(np.int64)}
        if encoder.takes_mask:
            inputs[tensors.ATTENTION_MASK] = tokens[tensors.ATTENTION_MASK].astype(np.int64)
        names = ([tensors.TEXT_EMBEDDINGS] if encoder.is_t5 or encoder.is_llm else
                 [tensors.TEXT_EMBEDDINGS, tensors.PENULTIMATE_HIDDEN_STATES, tensors.POOLED])
        result = await self._infer(encoder.network, inputs, names)
        outputs = {name: value.astype(np.float32) for name, value in result.items()}
        if encoder.takes_mask:
            outputs[tensors.ATTENTION_MASK] = inputs[tensors.ATTENTION_MASK]
        return outputs

    async def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's posterior parameters [1, 2C, h, w] of pixels [1, 3, H, W]."""
        result = await self._infer("vae_encoder", {tensors.IMAGES: pixels.numpy()},
                                   [tensors.LATENT_PARAMETERS])
        return torch.from_numpy(np.array(result[tensors.LATENT_PARAMETERS], np.float32))

    # -- sampling and decoding ---------------------------------------------------------------

    def scheduler(self, request: ResolvedRequest):
        """The request's scheduler with its timesteps set as the family's pipeline sets them."""
        return make_scheduler(request.scheduler, request.steps, self.spec.scheduler_config,
                              **self.family.timestep_options(request, self.spec))

    async def start_state(self, request: ResolvedRequest,
                          scheduler) -> tuple[StartState, torch.Generator]:
        """Where sampling starts (latents [1, C, h, w] drawn as diffusers draws them for SEED,
        the first timestep, inpainting's blend or inputs), and the generator that stochastic
        schedulers go on drawing from."""
        generator = torch.Generator("cpu").manual_seed(request.seed)
        state = await self.family.start_state(self, request, self.spec, scheduler, generator)
        return state, generator

    async def latents(self, request: ResolvedRequest,
                      progress: Callable[[int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      ) -> tuple[torch.Tensor, int, int]:
        """(final latents [1, C, h, w], rounds, model evaluations) for a resolved request.

        `should_stop` is asked before every round; when it answers True the run ends with
        `Cancelled` and no further device call is made.
        """
        conditioning = await self.encode(request)
        scheduler = self.scheduler(request)
        state, generator = await self.start_state(request, scheduler)
        conditioning = with_inputs(conditioning, state.inputs)
        counter = CountingDenoise(self.family.denoiser(self.pool, conditioning, request,
                                                       self.spec),
                                  conditioning.batch, should_stop)
        result = await sample(
            counter, scheduler, state.latents, mode=request.mode, window=request.window,
            generator=generator, progress=progress, tolerance=request.tolerance,
            draft_order=request.draft_order, start=state.start, blend=state.blend,
        )
        return result, counter.rounds, counter.evaluations

    async def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 image [H, W, 3] of latents [1, C, h, w] (a video model's frames [F, H, W, 3]
        of latents [1, C, f, h, w])."""
        images = latents
        if self.spec.decoder == "vae":
            scaled = self.family.decoder_input(latents, self.spec)
            result = await self._infer("vae_decoder",
                                       {tensors.LATENT: scaled.numpy().astype(np.float32)},
                                       [tensors.IMAGES])
            images = torch.from_numpy(np.array(result[tensors.IMAGES]))
        if images.ndim == 5:  # [1, 3, F, H, W]: every frame as an image
            return np.stack([to_uint8_image(images[:, :, frame])
                             for frame in range(images.shape[2])])
        return to_uint8_image(images)

    async def generate(self, request: GenerationRequest,
                       progress: Callable[[int], None] | None = None) -> GenerationResult:
        """The image for a request (RequestError for bad fields)."""
        return await self.run(self.resolve(request), progress)

    async def run(self, request: ResolvedRequest,
                  progress: Callable[[int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """The image for a resolved request (`Cancelled` once `should_stop()` answers True)."""
        latents, rounds, evaluations = await self.latents(request, progress, should_stop)
        return GenerationResult(await self.decode(latents), rounds, evaluations)


def with_inputs(conditioning: Conditioning, inputs: Mapping[str, np.ndarray]) -> Conditioning:
    """The conditioning with more denoiser inputs, the same for the prompt and its negative."""
    if not inputs:
        return conditioning
    uncond = None if conditioning.uncond is None else {**conditioning.uncond, **inputs}
    return replace(conditioning, cond={**conditioning.cond, **inputs}, uncond=uncond)


class CountingDenoise:
    """A denoise that counts its rounds and model evaluations (items of latent batch `batch`),
    and stops before a round once `should_stop()` answers True."""

    def __init__(self, denoise, batch: int = 1,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.denoise = denoise
        self.batch = batch
        self.should_stop = should_stop
        self.rounds = 0
        self.evaluations = 0

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(self.rounds)
        self.rounds += 1
        self.evaluations += x.shape[0] // self.batch
        return await self.denoise(x, t)


def to_uint8_image(images: torch.Tensor) -> np.ndarray:
    """The first image of [B, C, H, W] in [-1, 1] as uint8 RGB [H, W, 3] (outside clipped; one
    channel is repeated), rounded as diffusers' image processor rounds."""
    pixels = ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels.permute(1, 2, 0).contiguous().numpy()
