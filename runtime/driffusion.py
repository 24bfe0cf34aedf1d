"""DRiffusion draft-and-refine sampling over a diffusers scheduler (pure: tensors in, tensors out).

The normative definition is docs/METHOD.md. One call of `denoise` is one parallel round:
the items of a round are independent model evaluations that a device pool may spread over
devices. Drafts are skip transitions computed from the schedule arrays (second-order
conservative drafts replay the scheduler on a replica); refinement is the scheduler's own
`step`, called exactly once per timestep, in order.

`sample` checks its arguments and runs one mode; each mode is a function over a `Run` (the
latent state, the schedule and the refinement step), built from small drafting and refining
functions. `callback` observes every refined step and `draft` may replace the drafts a round
evaluates (for oracles and ablations).
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]
Progress = Callable[[int], None]
Callback = Callable[[dict], None]
DraftHook = Callable[[dict], list[torch.Tensor]]
Blend = Callable[[int, torch.Tensor], torch.Tensor]  # (step i, refined x_{i+1}) -> x_{i+1}
Indexed = list[tuple[int, torch.Tensor]]  # (step, tensor) pairs: a round's items, x0s

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
        if names & set(FLOW_SCHEDULERS) or getattr(scheduler.config, "use_flow_sigmas", False):
            # flow matching, or a multistep solver (UniPC) on flow sigmas (Wan)
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

    def _split_sigma(
        self, x: torch.Tensor, output: torch.Tensor, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= len(timesteps):
        # DPM-Solver and UniPC carry their own (possibly Karras) noise levels.
        sigma_ratio = _as_float64(sigmas[: len(timesteps)])
        alpha = 1.0 / torch.sqrt(sigma_ratio**2 + 1.0)
        return alpha, sigma_ratio * alpha
    alphas_cumprod = _as_float64(scheduler.alphas_cumprod)
    a = alphas_cumprod[timesteps.long()]
    return a.sqrt(), (1.0 - a).sqrt()


class Refiner:
    """The refinement step: `scheduler.step` with the caller's generator, one call per timestep."""

    def __init__(self, scheduler, generator: torch.Generator | None = None) -> None:
        self.scheduler = scheduler
        self.generator = generator
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.step_kwargs = {"generator": generator} if accepts_generator else {}

    def __call__(
        self, output: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        if hasattr(self.scheduler, "is_scale_input_called"):
            # Model inputs are scaled by the sampler itself (per item, by its own sigma).
            self.scheduler.is_scale_input_called = True
        return self.scheduler.step(output, timestep, x, **self.step_kwargs).prev_sample

    def replica(self) -> Refiner:
        """An independent refiner in the current state that draws the noise this one draws next."""
        scheduler = copy.deepcopy(self.scheduler)
        # A `step` patched onto the instance (a spy, a hook) is copied by reference and would still
        # advance the original scheduler.
        vars(scheduler).pop("step", None)
        return Refiner(scheduler, _forked(self.generator))


def _forked(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator that will draw what `generator` draws next, leaving `generator` untouched."""
    if generator is None:
        return None
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


def _global_rng_restored(device: torch.device) -> AbstractContextManager:
    """Context in which draws from the global RNG of `device` are undone on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


@dataclass
class Run:
    """What the rounds of one sampling run share: the latent state, how to evaluate and refine."""

    denoise: Denoise
    schedule: Schedule
    refiner: Refiner
    x: torch.Tensor  # the refined state at the next step to refine
    draft_order: int = 1
    tolerance: float | None = None  # verified mode
    progress: Progress | None = None
    callback: Callback | None = None
    draft: DraftHook | None = None
    blend: Blend | None = None
    start: int = 0  # the first step to refine (img2img: the steps strength keeps)
    rounds: int = 0  # rounds evaluated so far
    predictions: Indexed = field(default_factory=list)  # last two accepted (step, x0), aggressive
    anchor_predictions: Indexed = field(default_factory=list)  # last two exact (step, x0)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.schedule.timesteps)


@dataclass(frozen=True)
class Evaluated:
    """One item of a round: the draft of `step`, the model's output there, the round's index."""

    step: int
    draft: torch.Tensor
    output: torch.Tensor
    round: int


async def sample_sequential(run: Run) -> torch.Tensor:
    """One model evaluation per round, at the refined state: the scheduler's own loop."""
    for step in range(run.start, run.num_steps):
        refine(run, await evaluate(run, [(step, run.x)]))
    return run.x


async def sample_aggressive(run: Run, window: int) -> torch.Tensor:
    """Rounds of `window` drafts from the anchor, guided by the previous round's last output.

    With `run.tolerance` set this is verified mode: a round's steps are accepted only while
    each draft stays within the tolerance of its refined state.
    """
    predict = run.draft_order == 2
    (guide,) = await evaluate(run, [(run.start, run.x)])
    refine(run, [guide], predict=predict)
    anchor = run.start + 1
    while anchor < run.num_steps:
        drafts = aggressive_drafts(run, guide.output, anchor, min(window, run.num_steps - anchor))
        evaluated = await evaluate(run, apply_draft_hook(run, anchor, drafts))
        accepted = refine(run, evaluated, predict=predict)
        guide = evaluated[accepted - 1]
        anchor += accepted
    return run.x


async def sample_conservative(run: Run, window: int) -> torch.Tensor:
    """Pairs of rounds: the anchor evaluated exactly, then up to `window` drafts guided by it."""
    anchor = run.start
    while anchor < run.num_steps:
        (fresh,) = await evaluate(run, [(anchor, run.x)])
        if run.draft_order == 2:
            remember_anchor(run, fresh)
        count = min(window, run.num_steps - anchor - 1)
        drafts = conservative_drafts(run, fresh.output, anchor, count)
        evaluated = await evaluate(run, apply_draft_hook(run, anchor, drafts)) if drafts else []
        anchor += refine(run, [fresh, *evaluated])
    return run.x


async def evaluate(run: Run, items: Indexed) -> list[Evaluated]:
    """One parallel round over (step, latent) items: the model output for each."""
    schedule, batch = run.schedule, run.batch
    inputs = torch.cat([schedule.model_input(x, step) for step, x in items])
    timesteps = torch.cat(
        [schedule.timesteps[step].reshape(1).repeat(batch) for step, _ in items]
    ).to(torch.float32)
    outputs = await run.denoise(inputs, timesteps)
    expected = (len(items) * batch, *run.x.shape[1:])
    if tuple(outputs.shape) != expected:
        raise ValueError(
            f"denoise returned shape {tuple(outputs.shape)}, expected {expected} "
            f"({len(items)} items of latent batch {batch})"
        )
    index, run.rounds = run.rounds, run.rounds + 1
    outputs = outputs.to(run.x.dtype).split(batch)
    return [Evaluated(step, x, output, index) for (step, x), output in zip(items, outputs)]


def apply_draft_hook(run: Run, anchor: int, drafts: Indexed) -> Indexed:
    """The drafts a round evaluates: the method's, or those the caller's `draft` hook returns."""
    if run.draft is None:
        return drafts
    steps = [step for step, _ in drafts]
    replaced = list(
        run.draft(
            {
                "round": run.rounds,
                "anchor": anchor,
                "x": run.x,
                "steps": steps,
                "drafts": [x for _, x in drafts],
            }
        )
    )
    if len(replaced) != len(steps):
        raise ValueError(f"the draft hook returned {len(replaced)} drafts for {len(steps)} steps")
    return list(zip(steps, replaced))


def refine(run: Run, evaluated: list[Evaluated], *, predict: bool = False) -> int:
    """Step the scheduler through a round's items in order; returns how many were accepted.

    In verified mode a draft that lies further than the tolerance from the refined state of its
    step ends the round there: its output (and every later one) is discarded before the
    scheduler ever steps with it, so the scheduler's state needs no rollback. `predict` keeps
    the accepted steps' data predictions for second-order aggressive drafts.
    """
    accepted = 0
    for item in evaluated:
        if accepted and rejects(run, item):
            break
        previous = run.x
        run.x = run.refiner(item.output, run.schedule.timesteps[item.step], previous)
        if run.blend is not None:
            run.x = run.blend(item.step, run.x)
        if predict:
            x0 = refined_prediction(run.schedule, item, previous)
            run.predictions = [*run.predictions[-1:], (item.step, x0)]
        if run.callback is not None:
            run.callback(
                {
                    "step": item.step,
                    "timestep": run.schedule.timesteps[item.step],
                    "round": item.round,
                    "x": run.x,
                    "x_prev": previous,
                    "draft": item.draft,
                    "output": item.output,
                }
            )
        accepted += 1
    if run.progress is not None:
        run.progress(accepted)
    return accepted


def rejects(run: Run, item: Evaluated) -> bool:
    """Whether verified mode refuses the draft of `item` against the refined state."""
    if run.tolerance is None:
        return False
    noise_level = run.schedule.sigma[item.step].item()
    return draft_deviation(item.draft, run.x, noise_level) > run.tolerance


def draft_deviation(draft: torch.Tensor, refined: torch.Tensor, noise_level: float) -> float:
    """Largest per-sample RMS distance between a draft and the refined state, over noise level."""
    rms = (draft - refined).flatten(1).pow(2).mean(1).sqrt()
    return (rms.max() / noise_level).item()


def aggressive_drafts(run: Run, guide: torch.Tensor, anchor: int, count: int) -> Indexed:
    """Drafts of steps anchor .. anchor+count-1 from the anchor state (the first is exact).

    Second-order drafts need two accepted predictions, so the first drafting round is
    first-order.
    """
    steps = range(anchor, anchor + count)
    if run.draft_order == 1 or len(run.predictions) < 2:
        return [(step, run.schedule.jump(run.x, guide, anchor, step)) for step in steps]
    return [
        (step, second_order_jump(run.schedule, run.x, anchor, step, run.predictions))
        for step in steps
    ]


def conservative_drafts(run: Run, fresh: torch.Tensor, anchor: int, count: int) -> Indexed:
    """Drafts of steps anchor+1 .. anchor+count from `fresh`, the output at the anchor itself."""
    if run.draft_order == 1 or len(run.anchor_predictions) < 2:
        steps = range(anchor + 1, anchor + 1 + count)
        return [(step, run.schedule.jump(run.x, fresh, anchor, step)) for step in steps]
    return replayed_drafts(run, fresh, anchor, count)


def refined_prediction(schedule: Schedule, item: Evaluated, refined: torch.Tensor) -> torch.Tensor:
    """The model's x0 at the refined state, estimated from an output evaluated at the draft.

    First-order Taylor step x0(refined) ~ x0(draft) + J (refined - draft) with the Jacobian
    of the optimal denoiser of unit-variance data, J = alpha I. Measured on the closed-form
    mixture, this beats both reading x0 at the draft (exact at high noise, where J ~ 0) and
    converting the output at the refined state (exact at low noise, where alpha J ~ 1).
    """
    x0 = schedule.split(item.draft, item.output, item.step)[0]
    return x0 + schedule.alpha[item.step].item() * (refined - item.draft)


def remember_anchor(run: Run, fresh: Evaluated) -> None:
    """Keep the exact data prediction at a conservative anchor (free of draft error)."""
    x0 = run.schedule.split(run.x, fresh.output, fresh.step)[0]
    run.anchor_predictions = [*run.anchor_predictions[-1:], (fresh.step, x0)]


def extrapolated_x0(
    schedule: Schedule, predictions: Indexed, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 at `step`, d x0 / d lambda) from the line in log-SNR through two predictions."""
    lam = schedule.log_snr
    (older, x0_older), (newer, x0_newer) = predictions
    slope = (x0_newer - x0_older) / (lam[newer] - lam[older]).item()
    return x0_newer + (lam[step] - lam[newer]).item() * slope, slope


def second_order_jump(
    schedule: Schedule, x: torch.Tensor, anchor: int, target: int, predictions: Indexed
) -> torch.Tensor:
    """Exponential-integrator jump from x at `anchor`, with x0 extrapolated linearly in log-SNR."""
    if target == anchor:
        return x
    lam = schedule.log_snr
    x0_anchor, slope = extrapolated_x0(schedule, predictions, anchor)
    h = (lam[target] - lam[anchor]).item()
    alpha, sigma = schedule.alpha, schedule.sigma
    decay = math.exp(-h)
    return (
        (sigma[target] / sigma[anchor]).item() * x
        + alpha[target].item() * (1 - decay) * x0_anchor
        + alpha[target].item() * (h - 1 + decay) * slope
    )


def replayed_drafts(run: Run, fresh: torch.Tensor, anchor: int, count: int) -> Indexed:
    """Drafts x~_{anchor+1..anchor+count} by the scheduler's own update, run on a replica.

    The first step uses the fresh output, so x~_{anchor+1} IS the refined state (for any
    scheduler, multistep and stochastic ones included: the replica draws the same noise).
    Later steps feed the replica the output that x0 extrapolated in log-SNR implies.
    """
    replica = run.refiner.replica()
    x, drafts = run.x, []
    with _global_rng_restored(x.device):
        for step in range(anchor, anchor + count):
            if step == anchor:
                output = fresh
            else:
                x0 = extrapolated_x0(run.schedule, run.anchor_predictions, step)[0]
                output = run.schedule.output_for(x, x0, step)
            x = replica(output, run.schedule.timesteps[step], x)
            drafts.append((step + 1, x))
    return drafts


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
    callback: Callback | None = None,
    draft: DraftHook | None = None,
    start: int = 0,
    blend: Blend | None = None,
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
    progress: optional callback given the number of timesteps refined after each round
        (after each pair of rounds in conservative mode).
    callback: optional, called after every refined step with a dict: "step" (index i),
        "timestep", "round" (index of the round that evaluated it), "x" (state after the step),
        "x_prev" (state before it), "draft" (the latent evaluated for step i) and "output" (the
        model output the step used).
    draft: optional hook that may replace the drafts of a drafting round: given a dict with
        "round", "anchor" (the step of the refined state the drafts start from), "x" (that
        state), "steps" and "drafts" (the method's drafts, one per step), it returns the
        latents to evaluate instead, one per step.
    start: the index of the first timestep to run (img2img and inpainting keep the last steps,
        as many as their strength says); `latents` are the state at that step. The scheduler's
        begin index is set to it, as diffusers' image-to-image pipelines do.
    blend: optional, applied to every refined state: given (step i, x_{i+1}), it returns the
        state the run goes on from (inpainting with a plain model re-noises the known region to
        the next timestep and pastes it in). Drafts are not blended; the refined states are.
    """
    _check_mode_and_window(mode, window)
    _check_tolerance(mode, tolerance)
    if isinstance(draft_order, bool) or draft_order not in DRAFT_ORDERS:
        raise ValueError(f"draft_order must be 1 or 2, got {draft_order!r}")
    if latents.dim() not in (4, 5):
        raise ValueError(f"latents must be [B, C, H, W] (a video's [B, C, F, H, W]), got shape "
                         f"{tuple(latents.shape)}")
    schedule = Schedule.from_scheduler(scheduler)
    if draft_order == 2 and schedule.family != "vp":
        raise ValueError(
            "draft_order=2 needs a VP scheduler (e.g. DPMSolverMultistepScheduler, "
            f"UniPCMultistepScheduler); got {type(scheduler).__name__}"
        )
    if not 0 <= start < len(schedule.timesteps):
        raise ValueError(f"start must be in 0..{len(schedule.timesteps) - 1} (a timestep "
                         f"index); got {start}")
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    run = Run(
        denoise, schedule, Refiner(scheduler, generator), latents, draft_order=draft_order,
        tolerance=tolerance, progress=progress, callback=callback, draft=draft, blend=blend,
        start=start,
    )
    if mode == "sequential":
        return await sample_sequential(run)
    if mode == "conservative":
        return await sample_conservative(run, window)
    return await sample_aggressive(run, window)


def _check_mode_and_window(mode: str, window: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the number of devices), got {window!r}")


def _check_tolerance(mode: str, tolerance: float | None) -> None:
    if mode != "verified":
        if tolerance is not None:
            raise ValueError(f"tolerance applies to mode 'verified' only, not {mode!r}")
        return
    if tolerance is None or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"mode 'verified' needs a tolerance >= 0, got {tolerance!r}")
