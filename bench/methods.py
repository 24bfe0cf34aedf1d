"""`driffusion bench methods`: draft orders, verified tolerances and ParaDiGMS, side by side.

Everything runs on one closed-form model (the exact denoiser of a Gaussian mixture), so every
difference is the method's: per scheduler and step count it measures rounds (parallel model
calls), model evaluations per sample, RMS deviation from sequential sampling and RMS distance
to a reference solution of the probability-flow ODE (a fine second-order solve). ParaDiGMS is
run from diffusers as it ships (`StableDiffusionParadigmsPipeline`), with the same model
wrapped as its `unet`.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import machine_info, positive_int
from models.closed_form import GaussianMixtureModel
from runtime.driffusion import DraftHook, Refiner, Schedule, sample
from runtime.pipeline import CountingDenoise

SCHEDULER_KINDS = ("ddim", "dpmpp2m", "unipc")
PARADIGMS_KINDS = ("ddim", "ddpm")
NOISE_SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
SAMPLE_SHAPE = (1, 8, 8)
TOLERANCES = (0.0, 0.01, 0.03, 0.1, 0.3, math.inf)
PARADIGMS_TOLERANCES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
REFERENCE_FINAL_LOG_SNR = 12.0
PLOT_FLOOR = 1e-7  # where an exact (zero) deviation is drawn on the log axis


@dataclass(frozen=True)
class Setup:
    """What every run of one benchmark shares."""

    window: int = 4
    batch: int = 16
    latent_seed: int = 1
    mixture_seed: int = 0
    components: int = 4
    component_std: float = 0.3
    mean_spread: float = 0.8
    reference_steps: int = 1000


@dataclass
class Record:
    """One sampling run, measured."""

    scheduler: str
    steps: int
    method: str  # "driffusion", "driffusion-oracle" or "paradigms"
    mode: str
    draft_order: int | None
    tolerance: float | None
    rounds: int
    evaluations: int  # model evaluations per sample
    deviation: float | None  # RMS distance to the same sampler run sequentially
    median_sample_deviation: float | None
    component_changes: int  # samples that end nearest another mixture mean than sequentially
    reference_distance: float | None  # RMS distance to the reference ODE solution

    @property
    def label(self) -> str:
        parts = [self.method, self.mode]
        if self.draft_order is not None:
            parts.append(f"order {self.draft_order}")
        if self.tolerance is not None:
            parts.append(f"tol {self.tolerance:g}")
        return " ".join(parts)


# benchmarked scheduler -> diffusers class (ParaDiGMS runs on diffusers' parallel schedulers)
BENCHMARKED_SCHEDULERS = {
    "ddim": "DDIMScheduler", "dpmpp2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "paradigms-ddim": "DDIMParallelScheduler",
    "paradigms-ddpm": "DDPMParallelScheduler",
}


def make_scheduler(kind: str, steps: int):
    """A diffusers scheduler of `kind` on the benchmark's noise schedule, timesteps set."""
    from runtime.schedulers import make_scheduler as scheduler_from_config

    if kind not in BENCHMARKED_SCHEDULERS:
        raise ValueError(f"scheduler {kind!r} is not benchmarked; choose one of "
                         f"{', '.join(BENCHMARKED_SCHEDULERS)}")
    class_name = BENCHMARKED_SCHEDULERS[kind]
    clip = {"clip_sample": False} if "DDIM" in class_name or "DDPM" in class_name else {}
    return scheduler_from_config(kind, steps, {**NOISE_SCHEDULE, **clip}, class_name=class_name)

def mixture_model(setup: Setup) -> GaussianMixtureModel:
    """The benchmark's data: a mixture of isotropic Gaussians with random means."""
    generator = torch.Generator().manual_seed(setup.mixture_seed)
    means = torch.randn((setup.components, *SAMPLE_SHAPE), generator=generator) * setup.mean_spread
    alphas_cumprod = make_scheduler("ddim", 1).alphas_cumprod
    return GaussianMixtureModel(means, setup.component_std, alphas_cumprod=alphas_cumprod)


def starting_latents(setup: Setup) -> torch.Tensor:
    generator = torch.Generator().manual_seed(setup.latent_seed)
    return torch.randn((setup.batch, *SAMPLE_SHAPE), generator=generator)


def counting(model: GaussianMixtureModel, batch: int) -> CountingDenoise:
    """An async `denoise` over the closed-form model that counts rounds and evaluations."""

    async def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t)

    return CountingDenoise(denoise, batch)


def run_driffusion(
    model, setup: Setup, kind: str, steps: int, mode: str, draft_order: int = 1, tolerance=None
) -> tuple[torch.Tensor, CountingDenoise]:
    """Sample once with the DRiffusion sampler; returns the result and the call counts."""
    denoise = counting(model, setup.batch)
    window = 1 if mode == "sequential" else setup.window
    result = asyncio.run(
        sample(
            denoise,
            make_scheduler(kind, steps),
            starting_latents(setup),
            mode=mode,
            window=window,
            draft_order=draft_order,
            tolerance=tolerance,
        )
    )
    return result, denoise


def exact_later_drafts(model: GaussianMixtureModel, scheduler) -> DraftHook:
    """Oracle `draft` hook: the method's drafts in the first drafting round, exact ones after.

    Exact drafts are the refined states themselves, computed ahead on a replica of `scheduler`
    (the run's own, in its current state) with the true model outputs; the deviation left is
    the first drafting round's alone.
    """

    def draft(info: dict) -> list[torch.Tensor]:
        if info["round"] <= 1:  # round 0 evaluates step 0 alone; round 1 drafts first
            return info["drafts"]
        replica = Refiner(copy.deepcopy(scheduler))
        x, drafts = info["x"], []
        for step in info["steps"]:
            drafts.append(x)
            timestep = scheduler.timesteps[step]
            output = model(x, timestep.reshape(1).repeat(x.shape[0]).float())
            x = replica(output, timestep, x)
        return drafts

    return draft


def run_first_round_floor(
    model, setup: Setup, kind: str, steps: int
) -> tuple[torch.Tensor, CountingDenoise]:
    """Aggressive mode with exact drafts after the first drafting round (an oracle)."""
    denoise = counting(model, setup.batch)
    scheduler = make_scheduler(kind, steps)
    result = asyncio.run(
        sample(
            denoise,
            scheduler,
            starting_latents(setup),
            mode="aggressive",
            window=setup.window,
            draft=exact_later_drafts(model, scheduler),
        )
    )
    return result, denoise


class _ClosedFormUNet(torch.nn.Module):
    """The closed-form model dressed as the `unet` a diffusers pipeline calls; counts calls."""

    def __init__(self, model: GaussianMixtureModel, batch: int) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.config = SimpleNamespace(in_channels=SAMPLE_SHAPE[0], sample_size=SAMPLE_SHAPE[1])
        self.rounds = 0
        self.evaluations = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True, **_):
        self.rounds += 1
        self.evaluations += x.shape[0] // self.batch
        return (self.model(x, t),)


def run_paradigms(model, setup: Setup, kind: str, steps: int, tolerance: float):
    """Sample once with diffusers' ParaDiGMS pipeline; returns the result and the call counts.

    No text encoder, tokenizer, VAE or safety checker is needed: prompt embeddings go in
    directly (ignored by the closed-form model), guidance is off, output_type="latent".
    """
    from diffusers import StableDiffusionParadigmsPipeline

    unet = _ClosedFormUNet(model, setup.batch)
    pipeline = StableDiffusionParadigmsPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=make_scheduler(f"paradigms-{kind}", steps),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    pixels = SAMPLE_SHAPE[1] * pipeline.vae_scale_factor  # the pipeline sizes latents from pixels
    result = pipeline(
        prompt_embeds=torch.zeros(setup.batch, 1, 8),
        height=pixels,
        width=pixels,
        num_inference_steps=steps,
        parallel=setup.window,
        tolerance=tolerance,
        guidance_scale=1.0,
        latents=starting_latents(setup),
        generator=torch.Generator().manual_seed(setup.latent_seed + 1),
        output_type="latent",
    ).images
    return result, unet


def reference_solution(model, latents: torch.Tensor, alpha: float, sigma: float, steps: int):
    """The probability-flow ODE from noise level (alpha, sigma) to clean data, solved finely.

    DPM-Solver++(2M) on a uniform log-SNR grid up to log-SNR 12, then the denoised end point.
    """
    lam = torch.linspace(math.log(alpha / sigma), REFERENCE_FINAL_LOG_SNR, steps + 1)
    lam = lam.to(torch.float64)
    alphas, sigmas = torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
    batch = latents.shape[0]
    x, previous = latents.to(torch.float64), None
    for n in range(steps):
        x0 = model.denoised(x, alphas[n].expand(batch), sigmas[n].expand(batch))
        slope_term = x0 if previous is None else 1.5 * x0 - 0.5 * previous
        h = (lam[n + 1] - lam[n]).item()
        x = (sigmas[n + 1] / sigmas[n]) * x + alphas[n + 1] * (1 - math.exp(-h)) * slope_term
        previous = x0
    return model.denoised(x, alphas[-1].expand(batch), sigmas[-1].expand(batch))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt().item()


def median_sample_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    per_sample = (a.to(torch.float64) - b.to(torch.float64)).flatten(1).pow(2).mean(1).sqrt()
    return statistics.median(per_sample.tolist())


def nearest_component(model: GaussianMixtureModel, samples: torch.Tensor) -> torch.Tensor:
    """Index of the mixture mean nearest to each sample."""
    flat_means = model.means.flatten(1)
    return torch.cdist(samples.to(torch.float64).flatten(1), flat_means).argmin(dim=1)


def driffusion_runs(tolerances) -> list[tuple[str, int, float | None]]:
    """(mode, draft_order, tolerance) of every DRiffusion run per scheduler and step count."""
    runs: list[tuple[str, int, float | None]] = [("sequential", 1, None)]
    runs += [(mode, order, None) for mode in ("aggressive", "conservative") for order in (1, 2)]
    runs += [("verified", order, tol) for order in (1, 2) for tol in tolerances]
    return runs


def measure_scheduler(model, setup: Setup, kind: str, steps: int, tolerances, progress) -> list:
    """Every DRiffusion run (and the first-round oracle) for one scheduler and step count."""
    sequential, _ = run_driffusion(model, setup, kind, steps, "sequential")
    schedule = Schedule.from_scheduler(make_scheduler(kind, steps))
    reference = reference_solution(
        model, starting_latents(setup), schedule.alpha[0].item(), schedule.sigma[0].item(),
        setup.reference_steps,
    )
    records = []
    for mode, order, tolerance in driffusion_runs(tolerances):
        result, calls = run_driffusion(model, setup, kind, steps, mode, order, tolerance)
        records.append(
            _record(model, (kind, steps, "driffusion", mode, order, tolerance), calls, result,
                    sequential, reference)
        )
        progress()
    result, calls = run_first_round_floor(model, setup, kind, steps)
    records.append(
        _record(model, (kind, steps, "driffusion-oracle", "aggressive", None, None), calls,
                result, sequential, reference)
    )
    progress()
    return records


def measure_paradigms(model, setup: Setup, kind: str, steps: int, tolerances, progress) -> list:
    """ParaDiGMS at each tolerance; deviation from its own run at tolerance 0 (sequential).

    DDIM is also compared with the reference ODE solution; DDPM is stochastic, so only with
    its own sequential run (same pre-drawn noise).
    """
    sequential, _ = run_paradigms(model, setup, kind, steps, 0.0)
    reference = None
    if kind == "ddim":
        schedule = Schedule.from_scheduler(make_scheduler("ddim", steps))
        reference = reference_solution(
            model, starting_latents(setup), schedule.alpha[0].item(), schedule.sigma[0].item(),
            setup.reference_steps,
        )
    records = []
    for tolerance in tolerances:
        result, calls = run_paradigms(model, setup, kind, steps, tolerance)
        records.append(
            _record(model, (f"paradigms-{kind}", steps, "paradigms", "parallel", None, tolerance),
                    calls, result, sequential, reference)
        )
        progress()
    return records


def _record(model, run, calls, result, sequential, reference) -> Record:
    """Measure one run; `run` is (scheduler, steps, method, mode, draft_order, tolerance)."""
    kind, steps, method, mode, order, tolerance = run
    changes = nearest_component(model, result) != nearest_component(model, sequential)
    return Record(
        scheduler=kind,
        steps=steps,
        method=method,
        mode=mode,
        draft_order=order,
        tolerance=tolerance,
        component_changes=int(changes.sum()),
        rounds=calls.rounds,
        evaluations=calls.evaluations,
        deviation=rms(result, sequential),
        median_sample_deviation=median_sample_rms(result, sequential),
        reference_distance=None if reference is None else rms(result, reference),
    )


def find(records, scheduler, steps, method="driffusion", mode=None, order=None, tolerance=None):
    """The one record matching the given fields."""
    matches = [
        r for r in records
        if r.scheduler == scheduler and r.steps == steps and r.method == method
        and (mode is None or r.mode == mode) and r.draft_order == order
        and r.tolerance == tolerance
    ]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} records for {scheduler} {steps} {method} {mode} {order}")
    return matches[0]


def order_ratios(records, schedulers, step_counts) -> list[dict]:
    """First- over second-order deviation, per scheduler, step count and mode (target: >= 3)."""
    ratios = []
    for kind in schedulers:
        for steps in step_counts:
            for mode in ("aggressive", "conservative"):
                first = find(records, kind, steps, mode=mode, order=1)
                second = find(records, kind, steps, mode=mode, order=2)
                row = {
                    "scheduler": kind,
                    "steps": steps,
                    "mode": mode,
                    "rms_ratio": _ratio(first.deviation, second.deviation),
                    "median_sample_ratio": _ratio(
                        first.median_sample_deviation, second.median_sample_deviation
                    ),
                }
                if mode == "aggressive":
                    floor = find(records, kind, steps, method="driffusion-oracle")
                    row["exact_later_drafts_rms_ratio"] = _ratio(first.deviation, floor.deviation)
                ratios.append(row)
    return ratios


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


def format_table(records) -> str:
    header = (
        f"{'run':44} {'rounds':>6} {'evals':>6} {'deviation':>10} {'median':>10} "
        f"{'flips':>5} {'ref dist':>9}"
    )
    lines = []
    groups = sorted({(r.scheduler, r.steps) for r in records}, key=lambda g: (g[1], g[0]))
    for kind, steps in groups:
        lines += ["", f"{kind}, {steps} steps", header]
        for r in (r for r in records if (r.scheduler, r.steps) == (kind, steps)):
            reference = "-" if r.reference_distance is None else f"{r.reference_distance:9.4f}"
            lines.append(
                f"{r.label:44} {r.rounds:6d} {r.evaluations:6d} {r.deviation:10.2e} "
                f"{r.median_sample_deviation:10.2e} {r.component_changes:5d} {reference:>9}"
            )
    return "\n".join(lines)


def plot(records, path: Path, schedulers, step_counts) -> None:
    """Deviation from sequential against rounds: one curve per method, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(step_counts), len(schedulers), figsize=(5 * len(schedulers), 4 * len(step_counts)),
        squeeze=False,
    )
    for row, steps in enumerate(step_counts):
        for column, kind in enumerate(schedulers):
            axis = axes[row][column]
            _plot_panel(axis, records, kind, steps)
            axis.set_title(f"{kind}, {steps} steps")
            axis.set_xlabel("rounds (parallel model calls)")
            axis.set_ylabel("RMS deviation from sequential")
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(
        f"Method variants on a closed-form Gaussian mixture (zero drawn at {PLOT_FLOOR:g})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_panel(axis, records, kind, steps) -> None:
    def points(selected):
        return [r.rounds for r in selected], [max(r.deviation, PLOT_FLOOR) for r in selected]

    mine = [r for r in records if r.scheduler == kind and r.steps == steps]
    for order, marker in ((1, "o-"), (2, "s-")):
        verified = sorted(
            (r for r in mine if r.mode == "verified" and r.draft_order == order),
            key=lambda r: r.rounds,
        )
        axis.plot(*points(verified), marker, label=f"verified, order {order} (tolerances)")
    for r in mine:
        if r.mode in ("aggressive", "conservative") and r.method == "driffusion":
            marker = "^" if r.mode == "aggressive" else "v"
            axis.plot(*points([r]), marker, markersize=9, label=r.label)
    if kind == "ddim":
        paradigms = sorted(
            (r for r in records if r.scheduler == "paradigms-ddim" and r.steps == steps),
            key=lambda r: r.rounds,
        )
        axis.plot(*points(paradigms), "d--", label="ParaDiGMS DDIM (tolerances)")


def run_benchmark(args: argparse.Namespace) -> dict:
    setup = Setup(
        window=args.window,
        batch=args.batch,
        latent_seed=args.seed,
        reference_steps=args.reference_steps,
    )
    model = mixture_model(setup)
    per_scheduler = len(driffusion_runs(args.tolerances)) + 1
    total = len(args.schedulers) * len(args.steps) * per_scheduler
    paradigms_kinds = [] if args.no_paradigms else list(PARADIGMS_KINDS)
    total += len(paradigms_kinds) * len(args.steps) * len(args.paradigms_tolerances)
    from tqdm import tqdm

    records: list[Record] = []
    with tqdm(total=total, desc="bench methods", unit="run") as bar:
        for steps in args.steps:
            for kind in args.schedulers:
                records += measure_scheduler(
                    model, setup, kind, steps, args.tolerances, lambda: bar.update(1)
                )
            for kind in paradigms_kinds:
                records += measure_paradigms(
                    model, setup, kind, steps, args.paradigms_tolerances, lambda: bar.update(1)
                )
    return {
        "machine": machine_info(),
        "setup": asdict(setup),
        "model": "closed-form Gaussian mixture (models/closed_form.py), "
        f"noise schedule {NOISE_SCHEDULE}",
        "records": records,
        "order_ratios": order_ratios(records, args.schedulers, args.steps),
    }


def run(args: argparse.Namespace) -> int:
    results = run_benchmark(args)
    records = results["records"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serialisable = {**results, "records": [asdict(r) for r in records]}
    (out / "methods.json").write_text(json.dumps(_strict_json(serialisable), indent=2))
    print(format_table(records))
    print("\nfirst-order / second-order deviation (issue target: >= 3 for aggressive dpmpp2m):")
    for row in results["order_ratios"]:
        best = row.get("exact_later_drafts_rms_ratio")
        best_text = "" if best is None else f"  (exact drafts after the first round: {best:.2f})"
        print(
            f"  {row['scheduler']:8} {row['steps']:3d} steps {row['mode']:12} "
            f"RMS {row['rms_ratio']:.2f}  median sample {row['median_sample_ratio']:.2f}{best_text}"
        )
    if not args.no_plot:
        plot(records, out / "methods.png", args.schedulers, args.steps)
    plot_note = "" if args.no_plot else f" and {out / 'methods.png'}"
    print(f"\nwrote {out / 'methods.json'}{plot_note}")
    return 0


def _strict_json(value):
    """`value` with infinite floats written as the string "inf" (JSON has no infinity)."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict_json(item) for item in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"tolerance must be >= 0 (or inf), got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "methods",
        help="draft orders, verified tolerances and ParaDiGMS on a closed-form model",
        description="Runs DRiffusion (sequential, aggressive and conservative with first- and "
        "second-order drafts, verified at several tolerances) and diffusers' ParaDiGMS pipeline "
        "on the exact denoiser of a Gaussian mixture; reports rounds, model evaluations, RMS "
        "deviation from sequential sampling and distance to a fine reference ODE solve. Writes "
        "methods.json and methods.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--schedulers", nargs="+", choices=SCHEDULER_KINDS,
                        default=list(SCHEDULER_KINDS), help="DRiffusion schedulers to run")
    parser.add_argument("--steps", nargs="+", type=positive_int, default=[20, 50],
                        help="numbers of sampling steps")
    parser.add_argument("--window", type=positive_int, default=4,
                        help="model evaluations per round (devices), also ParaDiGMS' `parallel`")
    parser.add_argument("--batch", type=positive_int, default=16, help="samples per run")
    parser.add_argument("--seed", type=int, default=1, help="seed of the starting latents")
    parser.add_argument("--tolerances", nargs="+", type=_tolerance, default=list(TOLERANCES),
                        help="tolerances of verified mode (RMS draft error over noise level)")
    parser.add_argument("--paradigms-tolerances", nargs="+", type=_tolerance,
                        default=list(PARADIGMS_TOLERANCES), help="ParaDiGMS tolerances")
    parser.add_argument("--no-paradigms", action="store_true", help="skip ParaDiGMS")
    parser.add_argument("--reference-steps", type=positive_int, default=1000,
                        help="steps of the reference ODE solve")
    parser.add_argument("--out", default="out/bench/methods", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.set_defaults(run=run)
