"""Label or prompt -> image: text encoder, DRiffusion sampling over a device pool, decoder.

The same `Pipeline` runs in the `generate` client (model clients over gRPC) and inside the
Triton `driffusion` model (model clients over BLS). A `PipelineSpec` carries what a client must
know about the served model (latent shape, noise schedule, labels); the repository generator
writes it into the `driffusion` model's config so that any client can read it over gRPC.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from runtime.devices import DEFAULT_DEADLINE_S, DevicePool, ModelClient
from runtime.driffusion import DRAFT_ORDERS, MODES, sample
from runtime.schedulers import SCHEDULERS, make_scheduler

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DECODERS = ("pixels", "vae")
MAX_WINDOW = 256


class RequestError(ValueError):
    """A generation request with a bad field; `field` names it (e.g. "steps")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message


@dataclass(frozen=True)
class PipelineSpec:
    """What a client needs to know about a served class-conditional diffusion model."""

    model: str
    latent_shape: tuple[int, ...]  # [C, H, W] of one latent
    scheduler_config: dict[str, Any]
    num_labels: int
    null_label: int  # the "empty prompt" of classifier-free guidance
    label_names: tuple[tuple[str, ...], ...] = ()  # words a PROMPT may use for each label
    encoder_input: str = "label"
    encoder_output: str = "text_embeddings"
    decoder: str = "pixels"  # "pixels": latents are images in [-1, 1]; "vae": vae_decoder model
    vae_scaling_factor: float = 1.0
    decoder_input: str = "latent"
    decoder_output: str = "images"
    default_steps: int = 20
    default_guidance: float = 1.0
    default_scheduler: str = "ddim"
    # serving limits (the repository writer sets them from `driffusion serve --max-...`)
    max_steps: int = field(default=1000)
    max_window: int = MAX_WINDOW
    max_prompt_length: int = 512

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineSpec:
        """Parse a spec (plain JSON data, never evaluated); ValueError says what is wrong."""
        try:
            data = json.loads(text)
            data["latent_shape"] = tuple(data["latent_shape"])
            data["label_names"] = tuple(tuple(names) for names in data.get("label_names", ()))
            return cls(**data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a PipelineSpec JSON object: {type(error).__name__}: {error}") \
                from error

    def with_defaults(self, **changes: Any) -> PipelineSpec:
        return replace(self, **changes)


def digit_names(count: int = 10) -> tuple[tuple[str, ...], ...]:
    """Prompt words for the digit labels: ("0", "zero"), ("1", "one"), ..."""
    return tuple((str(k), DIGIT_NAMES[k]) for k in range(count))


@dataclass
class GenerationRequest:
    """One image to generate; None fields take the spec's defaults."""

    label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    mode: str = "aggressive"
    window: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    tolerance: float | None = None  # mode "verified" only
    draft_order: int = 1


@dataclass(frozen=True)
class ResolvedRequest:
    label: int
    negative_label: int
    seed: int
    steps: int
    mode: str
    window: int
    guidance: float
    scheduler: str
    tolerance: float | None = None
    draft_order: int = 1


def resolve(request: GenerationRequest, spec: PipelineSpec, default_window: int) -> ResolvedRequest:
    """Validate a request against the spec; RequestError names the first bad field."""
    _check_prompt_lengths(request, spec.max_prompt_length)
    label = _resolve_label(request, spec)
    negative = spec.null_label
    if request.negative_prompt:
        negative = label_of_prompt(request.negative_prompt, spec, "negative_prompt")
    steps = spec.default_steps if request.steps is None else request.steps
    if not 1 <= steps <= spec.max_steps:
        raise RequestError("steps", f"must be in 1..{spec.max_steps}; got {steps}")
    if request.mode not in MODES:
        raise RequestError("mode", f"must be one of {', '.join(MODES)}; got {request.mode!r}")
    window = min(default_window, spec.max_window) if request.window is None else request.window
    if not 1 <= window <= spec.max_window:
        raise RequestError("window", f"must be in 1..{spec.max_window}; got {window}")
    guidance = spec.default_guidance if request.guidance is None else request.guidance
    if not (np.isfinite(guidance) and 0 <= guidance <= 50):
        raise RequestError("guidance", f"must be a number in 0..50; got {guidance}")
    scheduler = request.scheduler or spec.default_scheduler
    if scheduler not in SCHEDULERS:
        raise RequestError("scheduler", f"must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if not 0 <= request.seed < 2**63:
        raise RequestError("seed", f"must be in 0..2^63-1; got {request.seed}")
    _check_tolerance(request.mode, request.tolerance)
    if request.draft_order not in DRAFT_ORDERS:
        raise RequestError("draft_order", f"must be one of {DRAFT_ORDERS}; got {request.draft_order}")
    return ResolvedRequest(label, negative, request.seed, steps, request.mode, window,
                           float(guidance), scheduler, request.tolerance, request.draft_order)


def _check_prompt_lengths(request: GenerationRequest, limit: int) -> None:
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text is not None and len(text) > limit:
            raise RequestError(name, f"must be at most {limit} characters; got {len(text)}")


def _check_tolerance(mode: str, tolerance: float | None) -> None:
    if mode == "verified" and (tolerance is None or not tolerance >= 0):
        raise RequestError("tolerance", f"mode verified needs a tolerance >= 0; got {tolerance}")
    if mode != "verified" and tolerance is not None:
        raise RequestError("tolerance", f"applies to mode verified only, not {mode}")


def _resolve_label(request: GenerationRequest, spec: PipelineSpec) -> int:
    if (request.label is None) == (request.prompt is None):
        raise RequestError("label", "give exactly one of LABEL or PROMPT")
    if request.prompt is not None:
        return label_of_prompt(request.prompt, spec, "prompt")
    if not 0 <= request.label < spec.num_labels:
        raise RequestError("label", f"must be in 0..{spec.num_labels - 1}; got {request.label}")
    return int(request.label)


def label_of_prompt(prompt: str, spec: PipelineSpec, field_name: str) -> int:
    """The one label a prompt names ("a handwritten 7", "seven"); RequestError otherwise."""
    words = set(re.findall(r"[a-z0-9]+", prompt.lower()))
    matches = {k for k, names in enumerate(spec.label_names) if words & set(names)}
    if len(matches) != 1:
        known = ", ".join("/".join(names) for names in spec.label_names)
        raise RequestError(
            field_name,
            f"{spec.model} is class-conditional: the prompt must name exactly one class "
            f"({known}); got {prompt!r}",
        )
    return matches.pop()


class Pipeline:
    """Encode the condition, sample with DRiffusion over the pool, decode to uint8 pixels."""

    def __init__(self, spec: PipelineSpec, pool: DevicePool, encoder: ModelClient,
                 decoder: ModelClient | None = None,
                 deadline_s: float | None = DEFAULT_DEADLINE_S) -> None:
        if spec.decoder == "vae" and decoder is None:
            raise ValueError(f"{spec.model} decodes with a vae_decoder model; none was given")
        self.spec = spec
        self.pool = pool
        self.encoder = encoder
        self.decoder = decoder
        self.deadline_s = deadline_s  # of each encoder and decoder call

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        return resolve(request, self.spec, self.pool.width)

    async def encode(self, label: int, negative_label: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [1, S, D] of the label and of the negative (null) label."""
        labels = np.array([label, negative_label], dtype=np.int64)
        result = await self.encoder.infer(
            {self.spec.encoder_input: labels}, [self.spec.encoder_output], self.deadline_s
        )
        embeddings = result[self.spec.encoder_output].astype(np.float32)
        return embeddings[:1], embeddings[1:]

    async def latents(self, request: ResolvedRequest,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Final latents [1, C, H, W] for a resolved request."""
        cond, uncond = await self.encode(request.label, request.negative_label)
        self.pool.condition(cond, uncond, request.guidance)
        scheduler = make_scheduler(request.scheduler, request.steps, self.spec.scheduler_config)
        generator = torch.Generator().manual_seed(request.seed)
        noise = torch.randn((1, *self.spec.latent_shape), generator=generator)
        return await sample(
            self.pool, scheduler, noise * scheduler.init_noise_sigma, mode=request.mode,
            window=request.window, generator=generator, progress=progress,
            tolerance=request.tolerance, draft_order=request.draft_order,
        )

    async def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 image [H, W, C] of latents [1, C, H, W]."""
        images = latents
        if self.spec.decoder == "vae":
            scaled = (latents / self.spec.vae_scaling_factor).numpy().astype(np.float32)
            result = await self.decoder.infer(
                {self.spec.decoder_input: scaled}, [self.spec.decoder_output], self.deadline_s
            )
            images = torch.from_numpy(result[self.spec.decoder_output])
        return to_uint8_image(images)

    async def generate(self, request: GenerationRequest,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
        """uint8 image [H, W, C] for a request (RequestError for bad fields)."""
        return await self.decode(await self.latents(self.resolve(request), progress))


def to_uint8_image(images: torch.Tensor) -> np.ndarray:
    """The first image of [B, C, H, W] in [-1, 1] as uint8 [H, W, C] (values outside clipped)."""
    pixels = ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()
