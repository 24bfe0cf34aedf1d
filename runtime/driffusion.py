"""DRiffusion draft-and-refine sampling over a diffusers scheduler (pure: tensors in, tensors out).

The normative specification is DESIGN.md section 2. One call of `denoise` is one parallel round:
the items of a round are independent model evaluations that a device pool may spread over
devices. Drafts are first-order skip transitions computed from the schedule arrays; refinement
is the scheduler's own `step`, called exactly once per timestep, in order.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]
Progress = Callable[[int], None]

MODES = ("sequential", "conservative", "aggressive")
VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
)
SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def round_pattern(mode: str, window: int, num_steps: int) -> list[int]:
    """Items evaluated in each parallel round for `num_steps` timesteps."""
    _check_mode_and_window(mode, window)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    pattern: list[int] = []
    step = 0
    while step < num_steps:
        items = _round_items(mode, window, step, num_steps, first=not pattern)
        pattern.extend(items)
        step += sum(items)
    return pattern


def _round_items(mode: str, window: int, anchor: int, num_steps: int, first: bool) -> list[int]:
    """Items of the rounds that start at `anchor` (one round, or two for conservative)."""
    if mode == "sequential" or (mode == "aggressive" and first):
        return [1]
    if mode == "aggressive":
        return [min(window, num_steps - anchor)]
    drafts = min(window, num_steps - anchor - 1)
    return [1, drafts] if drafts > 0 else [1]


@dataclass(frozen=True)
class Schedule:
    """A scheduler's noise levels as plain arrays, for drafts and model-input scaling."""

    family: str  # "vp", "sigma" or "flow"
    prediction_type: str
    timesteps: torch.Tensor  # [T], what the model is given for each step
    alpha: torch.Tensor  # [T]: x_i = alpha_i * x0 + sigma_i * eps  (vp)
    sigma: torch.Tensor  # [T]: noise level of x_i (all families)

    @classmethod
    def from_scheduler(cls, scheduler) -> Schedule:
        names = {klass.__name__ for klass in type(scheduler).__mro__}
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("call scheduler.set_timesteps(num_steps) before sampling")
        timesteps = torch.as_tensor(timesteps)
        steps = len(timesteps)
        if names & set(FLOW_SCHEDULERS):
            sigma = _as_float64(scheduler.sigmas[:steps])
            return cls("flow", "flow", timesteps, 1.0 - sigma, sigma)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; "
                f"supported: {', '.join(PREDICTION_TYPES)}"
            )
        if names & set(SIGMA_SCHEDULERS):
            sigma = _as_float64(scheduler.sigmas[:steps])
            return cls("sigma", prediction_type, timesteps, torch.ones_like(sigma), sigma)
        if names & set(VP_SCHEDULERS):
            alpha, sigma = _vp_levels(scheduler, timesteps)
            return cls("vp", prediction_type, timesteps, alpha, sigma)
        raise ValueError(
            f"scheduler {type(scheduler).__name__} is not supported; supported: "
            f"{', '.join(VP_SCHEDULERS + SIGMA_SCHEDULERS + FLOW_SCHEDULERS)}"
        )

    def model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """What the network sees for latent x at `step` (sigma family: x / sqrt(sigma^2 + 1))."""
        if self.family != "sigma":
            return x
        sigma = self.sigma[step].item()
        return x / ((sigma**2 + 1) ** 0.5)

    def jump(self, x: torch.Tensor, output: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        """First-order skip transition J(x, output, src -> dst) from the schedule arrays."""
        if src == dst:
            return x
        if self.family == "flow":
            return x + (self.sigma[dst] - self.sigma[src]).item() * output
        x0, eps = self.split(x, output, src)
        if self.family == "sigma":
            return x0 + self.sigma[dst].item() * eps
        return self.alpha[dst].item() * x0 + self.sigma[dst].item() * eps

    def split(self, x: torch.Tensor, output: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        """Convert a model output at (x, step) into (x0, eps) by prediction type."""
        alpha, sigma = self.alpha[step].item(), self.sigma[step].item()
        if self.family == "sigma":
            return self._split_sigma(x, output, sigma)
        if self.prediction_type == "epsilon":
            return (x - sigma * output) / alpha, output
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * output, alpha * output + sigma * x
        return output, (x - alpha * output) / sigma

    def _split_sigma(self, x: torch.Tensor, output: torch.Tensor, sigma: float):
        if self.prediction_type == "epsilon":
            return x - sigma * output, output
        if self.prediction_type == "v_prediction":
            x0 = output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = output
        return x0, (x - x0) / sigma


def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(values).to(torch.float64)


def _vp_levels(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = scheduler.config
    if getattr(config, "use_flow_sigmas", False):
        raise ValueError(
            "use_flow_sigmas=True is not supported with VP schedulers; "
            "use FlowMatchEulerDiscreteScheduler for flow-matching models"
        )
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= len(timesteps):
        # DPM-Solver and UniPC carry their own (possibly Karras) noise levels.
        sigma_ratio = _as_float64(sigmas[: len(timesteps)])
        alpha = 1.0 / torch.sqrt(sigma_ratio**2 + 1.0)
        return alpha, sigma_ratio * alpha
    alphas_cumprod = _as_float64(scheduler.alphas_cumprod)
    a = alphas_cumprod[timesteps.long()]
    return a.sqrt(), (1.0 - a).sqrt()


class _Refiner:
    """Calls scheduler.step once per timestep, in order, with the caller's generator."""

    def __init__(self, scheduler, generator: torch.Generator | None) -> None:
        self.scheduler = scheduler
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.step_kwargs = {"generator": generator} if accepts_generator else {}

    def __call__(self, output: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor):
        if hasattr(self.scheduler, "is_scale_input_called"):
            # Model inputs are scaled by the sampler itself (per item, by its own sigma).
            self.scheduler.is_scale_input_called = True
        return self.scheduler.step(output, timestep, x, **self.step_kwargs).prev_sample


def _check_mode_and_window(mode: str, window: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the number of devices), got {window!r}")


class _Sampler:
    """State of one sampling run: the latent trajectory and the round loop."""

    def __init__(self, denoise, scheduler, latents, generator, progress) -> None:
        self.denoise = denoise
        self.schedule = Schedule.from_scheduler(scheduler)
        self.refine = _Refiner(scheduler, generator)
        self.batch = latents.shape[0]
        self.num_steps = len(self.schedule.timesteps)
        self.progress = progress
        self.x = latents

    async def evaluate(self, drafts: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """One parallel round over (step, latent) items; returns one output per item."""
        inputs = torch.cat([self.schedule.model_input(x, step) for step, x in drafts])
        timesteps = torch.cat(
            [self.schedule.timesteps[step].reshape(1).repeat(self.batch) for step, _ in drafts]
        ).to(torch.float32)
        outputs = await self.denoise(inputs, timesteps)
        expected = (len(drafts) * self.batch, *self.x.shape[1:])
        if tuple(outputs.shape) != expected:
            raise ValueError(
                f"denoise returned shape {tuple(outputs.shape)}, expected {expected} "
                f"({len(drafts)} items of latent batch {self.batch})"
            )
        return list(outputs.to(self.x.dtype).split(self.batch))

    def refine_from(self, anchor: int, outputs: list[torch.Tensor]) -> None:
        """Refine steps anchor .. anchor+len(outputs)-1 with the scheduler's own step."""
        for offset, output in enumerate(outputs):
            step = anchor + offset
            self.x = self.refine(output, self.schedule.timesteps[step], self.x)
        if self.progress is not None:
            self.progress(len(outputs))

    def drafts(self, guide: torch.Tensor, anchor: int, first: int, count: int):
        return [
            (anchor + k, self.schedule.jump(self.x, guide, anchor, anchor + k))
            for k in range(first, first + count)
        ]

    async def run_sequential(self) -> torch.Tensor:
        for step in range(self.num_steps):
            (output,) = await self.evaluate([(step, self.x)])
            self.refine_from(step, [output])
        return self.x

    async def run_aggressive(self, window: int) -> torch.Tensor:
        (guide,) = await self.evaluate([(0, self.x)])
        self.refine_from(0, [guide])
        anchor = 1
        while anchor < self.num_steps:
            count = min(window, self.num_steps - anchor)
            outputs = await self.evaluate(self.drafts(guide, anchor, 0, count))
            self.refine_from(anchor, outputs)
            guide = outputs[-1]
            anchor += count
        return self.x

    async def run_conservative(self, window: int) -> torch.Tensor:
        anchor = 0
        while anchor < self.num_steps:
            (fresh,) = await self.evaluate([(anchor, self.x)])
            count = min(window, self.num_steps - anchor - 1)
            outputs = await self.evaluate(self.drafts(fresh, anchor, 1, count)) if count else []
            self.refine_from(anchor, [fresh, *outputs])
            anchor += 1 + count
        return self.x


async def sample(
    denoise: Denoise,
    scheduler,
    latents: torch.Tensor,
    *,
    mode: str = "aggressive",
    window: int = 1,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Sample with DRiffusion draft-and-refine; returns the final latents.

    denoise: async (x[N,C,H,W], t[N]) -> raw model output, ONE parallel round of at most
        `window` items stacked item-major (item k holds rows k*B .. k*B+B-1).
    scheduler: a diffusers scheduler after `set_timesteps`.
    latents: starting latents [B,C,H,W], already scaled by `scheduler.init_noise_sigma`.
    mode: "sequential", "conservative" or "aggressive"; window: evaluations per round (devices).
    progress: optional callback given the number of timesteps refined after each round.
    """
    _check_mode_and_window(mode, window)
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    sampler = _Sampler(denoise, scheduler, latents, generator, progress)
    if mode == "sequential":
        return await sampler.run_sequential()
    if mode == "aggressive":
        return await sampler.run_aggressive(window)
    return await sampler.run_conservative(window)
