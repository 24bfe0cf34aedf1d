"""DRiffusion draft-and-refine sampling over a diffusers scheduler (pure: tensors in, tensors out).

The normative definition is docs/METHOD.md. One call of `denoise` is one parallel round:
the items of a round are independent model evaluations that a device pool may spread over
devices. Drafts are first-order skip transitions computed from the schedule arrays; refinement
is the scheduler's own `step`, called exactly once per timestep, in order.
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]
Progress = Callable[[int], None]

MODES = ("sequential", "conservative", "aggressive", "verified")
DRAFT_ORDERS = (1, 2)
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
    if mode == "verified":
        raise ValueError("the rounds of mode 'verified' depend on the data; count them instead")
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

    @property
    def log_snr(self) -> torch.Tensor:
        """lambda_i = log(alpha_i / sigma_i) (VP family)."""
        return (self.alpha / self.sigma).log()

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

    def output_for(self, x: torch.Tensor, x0: torch.Tensor, step: int) -> torch.Tensor:
        """The model output (by prediction type) that predicts x0 at state x (VP family)."""
        alpha, sigma = self.alpha[step].item(), self.sigma[step].item()
        eps = (x - alpha * x0) / sigma
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return alpha * eps - sigma * x0
        return x0

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


def _replica(scheduler):
    """An independent copy of a scheduler, in its current state, stepping with its class's update."""
    replica = copy.deepcopy(scheduler)
    # A `step` patched onto the instance (a spy, a hook) is copied by reference and would still
    # advance the original scheduler.
    vars(replica).pop("step", None)
    return replica


def _forked(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator that will draw what `generator` draws next, leaving `generator` untouched."""
    if generator is None:
        return None
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


def _global_rng_restored(device: torch.device):
    """Context in which draws from the global RNG of `device` are undone on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def _check_mode_and_window(mode: str, window: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the number of devices), got {window!r}")


class _Sampler:
    """State of one sampling run: the latent trajectory, recent data predictions, the rounds."""

    def __init__(self, denoise, scheduler, latents, options: _Options) -> None:
        self.denoise = denoise
        self.schedule = Schedule.from_scheduler(scheduler)
        self.refine = _Refiner(scheduler, options.generator)
        self.options = options
        if options.draft_order == 2 and self.schedule.family != "vp":
            raise ValueError(
                "draft_order=2 needs a VP scheduler (e.g. DPMSolverMultistepScheduler, "
                f"UniPCMultistepScheduler); got {type(scheduler).__name__}"
            )
        self.batch = latents.shape[0]
        self.num_steps = len(self.schedule.timesteps)
        self.x = latents
        self.predictions: list[tuple[int, torch.Tensor]] = []  # last two accepted (step, x0)
        self.anchor_predictions: list[tuple[int, torch.Tensor]] = []  # last two fresh anchors

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

    def refine_from(
        self, anchor: int, drafts: list[tuple[int, torch.Tensor]], outputs: list[torch.Tensor]
    ) -> int:
        """Refine from `anchor` with the round's outputs; returns how many steps were accepted.

        In verified mode a draft that lies further than the tolerance from the refined state
        of its step ends the round there: its output (and every later one) is discarded before
        the scheduler ever steps with it, so the scheduler's state needs no rollback.
        """
        accepted = 0
        for (step, draft), output in zip(drafts, outputs):
            if accepted and self.rejects(draft, step):
                break
            refined = self.x
            self.x = self.refine(output, self.schedule.timesteps[step], refined)
            self.remember(step, draft, refined, output)
            accepted += 1
        if self.options.progress is not None:
            self.options.progress(accepted)
        return accepted

    def rejects(self, draft: torch.Tensor, step: int) -> bool:
        if self.options.tolerance is None:
            return False
        return draft_deviation(draft, self.x, self.schedule.sigma[step].item()) > (
            self.options.tolerance
        )

    def remember(
        self, step: int, draft: torch.Tensor, refined: torch.Tensor, output: torch.Tensor
    ) -> None:
        """Keep the data prediction of an accepted step for second-order drafts."""
        if self.options.draft_order != 2:
            return
        x0 = self.refined_prediction(step, draft, refined, output)
        self.predictions = [*self.predictions[-1:], (step, x0)]

    def refined_prediction(
        self, step: int, draft: torch.Tensor, refined: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor:
        """The model's x0 at the refined state, estimated from an output evaluated at the draft.

        First-order Taylor step x0(refined) ~ x0(draft) + J (refined - draft) with the Jacobian
        of the optimal denoiser of unit-variance data, J = alpha I. Measured on the closed-form
        mixture, this beats both reading x0 at the draft (exact at high noise, where J ~ 0) and
        converting the output at the refined state (exact at low noise, where alpha J ~ 1).
        """
        x0 = self.schedule.split(draft, output, step)[0]
        return x0 + self.schedule.alpha[step].item() * (refined - draft)

    def with_prediction(self, step: int, state: torch.Tensor, output: torch.Tensor):
        """The previous fresh anchor's data prediction followed by the one of (state, step).

        Conservative mode evaluates every anchor exactly, so these two are free of draft error.
        """
        x0 = self.schedule.split(state, output, step)[0]
        self.anchor_predictions = [*self.anchor_predictions[-1:], (step, x0)]
        return self.anchor_predictions

    def drafts(self, guide: torch.Tensor, anchor: int, first: int, count: int, predictions=None):
        """Draft steps anchor+first .. anchor+first+count-1 from the anchor state.

        first=1 means `guide` was evaluated at the anchor itself (conservative mode) and
        `predictions` are the exact anchor predictions; first=0 drafts from the running history.
        Second-order drafts need two predictions, so the first drafting round is first-order.
        """
        steps = range(anchor + first, anchor + first + count)
        history = self.predictions if predictions is None else predictions
        if self.options.draft_order == 1 or len(history) < 2:
            return [(step, self.schedule.jump(self.x, guide, anchor, step)) for step in steps]
        if first:
            return self.replayed_drafts(guide, anchor, count, history)
        return [(step, self.second_order_jump(anchor, step, history)) for step in steps]

    def extrapolated_x0(self, predictions, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 at `step`, d x0 / d lambda) from the line in log-SNR through two predictions."""
        lam = self.schedule.log_snr
        (older, x0_older), (newer, x0_newer) = predictions
        slope = (x0_newer - x0_older) / (lam[newer] - lam[older]).item()
        return x0_newer + (lam[step] - lam[newer]).item() * slope, slope

    def second_order_jump(self, anchor: int, target: int, predictions) -> torch.Tensor:
        """Exponential-integrator jump with x0 extrapolated linearly in log-SNR."""
        if target == anchor:
            return self.x
        lam = self.schedule.log_snr
        x0_anchor, slope = self.extrapolated_x0(predictions, anchor)
        h = (lam[target] - lam[anchor]).item()
        alpha, sigma = self.schedule.alpha, self.schedule.sigma
        decay = math.exp(-h)
        return (
            (sigma[target] / sigma[anchor]).item() * self.x
            + alpha[target].item() * (1 - decay) * x0_anchor
            + alpha[target].item() * (h - 1 + decay) * slope
        )

    def replayed_drafts(self, fresh: torch.Tensor, anchor: int, count: int, predictions):
        """Drafts x~_{anchor+1..anchor+count} by the scheduler's own update, run on a replica.

        The first step uses the fresh output, so x~_{anchor+1} IS the refined state (for any
        scheduler, multistep and stochastic ones included: the replica draws the same noise).
        Later steps feed the replica the output that x0 extrapolated in log-SNR implies.
        """
        replica = _Refiner(_replica(self.refine.scheduler), _forked(self.options.generator))
        x, drafts = self.x, []
        with _global_rng_restored(x.device):
            for step in range(anchor, anchor + count):
                if step == anchor:
                    output = fresh
                else:
                    x0 = self.extrapolated_x0(predictions, step)[0]
                    output = self.schedule.output_for(x, x0, step)
                x = replica(output, self.schedule.timesteps[step], x)
                drafts.append((step + 1, x))
        return drafts

    async def run_sequential(self) -> torch.Tensor:
        for step in range(self.num_steps):
            drafts = [(step, self.x)]
            self.refine_from(step, drafts, await self.evaluate(drafts))
        return self.x

    async def run_aggressive(self, window: int) -> torch.Tensor:
        first = [(0, self.x)]
        (guide,) = await self.evaluate(first)
        self.refine_from(0, first, [guide])
        anchor = 1
        while anchor < self.num_steps:
            drafts = self.drafts(guide, anchor, 0, min(window, self.num_steps - anchor))
            outputs = await self.evaluate(drafts)
            accepted = self.refine_from(anchor, drafts, outputs)
            guide = outputs[accepted - 1]
            anchor += accepted
        return self.x

    async def run_conservative(self, window: int) -> torch.Tensor:
        anchor = 0
        while anchor < self.num_steps:
            anchor_item = [(anchor, self.x)]
            (fresh,) = await self.evaluate(anchor_item)
            predictions = (
                self.with_prediction(anchor, self.x, fresh) if self.options.draft_order == 2 else []
            )
            count = min(window, self.num_steps - anchor - 1)
            drafts = self.drafts(fresh, anchor, 1, count, predictions)
            outputs = await self.evaluate(drafts) if drafts else []
            anchor += self.refine_from(anchor, anchor_item + drafts, [fresh, *outputs])
        return self.x


def draft_deviation(draft: torch.Tensor, refined: torch.Tensor, noise_level: float) -> float:
    """Largest per-sample RMS distance between a draft and the refined state, over noise level."""
    rms = (draft - refined).flatten(1).pow(2).mean(1).sqrt()
    return (rms.max() / noise_level).item()


@dataclass(frozen=True)
class _Options:
    generator: torch.Generator | None
    progress: Progress | None
    draft_order: int
    tolerance: float | None


async def sample(
    denoise: Denoise,
    scheduler,
    latents: torch.Tensor,
    *,
    mode: str = "aggressive",
    window: int = 1,
    generator: torch.Generator | None = None,
    draft_order: int = 1,
    tolerance: float | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Sample with DRiffusion draft-and-refine; returns the final latents.

    denoise: async (x[N,C,H,W], t[N]) -> raw model output, ONE parallel round of at most
        `window` items stacked item-major (item k holds rows k*B .. k*B+B-1).
    scheduler: a diffusers scheduler after `set_timesteps`.
    latents: starting latents [B,C,H,W], already scaled by `scheduler.init_noise_sigma`.
    mode: "sequential", "conservative", "aggressive", or "verified" (aggressive rounds that
        accept steps only while each draft stays within `tolerance` of its refined state,
        measured as RMS distance over the step's noise level; 0 reproduces sequential sampling,
        a large tolerance reproduces aggressive mode).
    window: model evaluations per round (the number of devices).
    draft_order: 1 (first-order skip transitions, the paper's) or 2 (multistep extrapolation
        from the last two data predictions; VP schedulers, best with DPM-Solver++ / UniPC).
    progress: optional callback given the number of timesteps refined after each round.
    """
    _check_mode_and_window(mode, window)
    _check_tolerance(mode, tolerance)
    if isinstance(draft_order, bool) or draft_order not in DRAFT_ORDERS:
        raise ValueError(f"draft_order must be 1 or 2, got {draft_order!r}")
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    options = _Options(generator, progress, draft_order, tolerance)
    sampler = _Sampler(denoise, scheduler, latents, options)
    if mode == "sequential":
        return await sampler.run_sequential()
    if mode == "conservative":
        return await sampler.run_conservative(window)
    return await sampler.run_aggressive(window)


def _check_tolerance(mode: str, tolerance: float | None) -> None:
    if mode != "verified":
        if tolerance is not None:
            raise ValueError(f"tolerance applies to mode 'verified' only, not {mode!r}")
        return
    if tolerance is None or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"mode 'verified' needs a tolerance >= 0, got {tolerance!r}")
