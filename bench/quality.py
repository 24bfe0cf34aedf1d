"""`driffusion bench quality`: sample quality of DRiffusion against sequential sampling.

On the bundled reference models (text-to-image diffusers folders of 8x8 digits: `reference`, a
Stable Diffusion UNet with DDIM, and `reference-flow`, an SD3 transformer with flow matching),
each digit asked for by a prompt ("a handwritten seven"), for each model, guidance scale, step
count, mode and window: the evaluation classifier's accuracy on the decoded samples against the
digits asked for, the digits-FD (Frechet distance on the classifier's features) against the
real digits, and the mean distance to the sequential sample of the same seed. Every run starts
from the same noise, so the differences are the method's. Sampling runs in-process with a
batched local denoise (all samples of a round in one call; the prompts encoded once by the
text encoders, the latents decoded by the VAE); no server is needed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import positive_int
from bench.metrics import (
    class_accuracy,
    classifier_features,
    frechet_distance,
    mean_sample_distance,
)
from models import paths, tensors
from models.limits import MAX_GUIDANCE
from models.reference import (
    EMPTY_PROMPT,
    NUM_CLASSES,
    PROMPT_TEMPLATES,
    ReferenceModel,
    prompt_for,
    to_gray,
)
from models.reference_flow import FlowReferenceModel
from runtime.pipeline import CountingDenoise
from runtime.schedulers import DEFAULT, compatible, scheduler_names

QUALITY_MODELS = ("reference", "reference-flow")
QUALITY_MODES = ("conservative", "aggressive")
DENOISE_BACKENDS = ("onnxruntime", "torch")
DigitsModel = ReferenceModel | FlowReferenceModel
DEFAULT_WINDOWS = (2, 4, 8)
DEFAULT_STEPS = (50, 20)
DEFAULT_GUIDANCE = (1.0, 1.5)
DEFAULT_OUT = paths.output_dir("bench", "quality")
TARGET = {"mode": "aggressive", "window": 4, "steps": 50, "accuracy_points": 1.0,
          "fd_ratio": 1.10}
GRID_SAMPLES = 6  # samples per digit shown in each panel of quality.png


@dataclass(frozen=True)
class QualitySetup:
    """What every run of the benchmark shares."""

    models: tuple[str, ...] = ("reference",)
    per_class: int = 20
    steps: tuple[int, ...] = DEFAULT_STEPS
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    modes: tuple[str, ...] = QUALITY_MODES  # sequential always runs as the baseline
    guidance: tuple[float, ...] = DEFAULT_GUIDANCE
    seed: int = 0
    backend: str = "onnxruntime"
    threads: int = 1
    scheduler: str = DEFAULT  # each model's own scheduler class (DDIM, flow-matching Euler)
    draft_order: int = 1
    template: str = PROMPT_TEMPLATES[0]  # the prompt asking for a digit: {word} or {digit}

    @property
    def samples(self) -> int:
        return self.per_class * NUM_CLASSES

    def runs(self) -> list[tuple[str, int]]:
        """(mode, window) per guidance and step count, the sequential baseline first."""
        return [("sequential", 1)] + [(mode, w) for mode in self.modes for w in self.windows]

    def validate(self) -> None:
        unknown_models = [name for name in self.models if name not in QUALITY_MODELS]
        if not self.models or unknown_models:
            raise ValueError(f"models must be some of {', '.join(QUALITY_MODELS)}; got "
                             f"{list(self.models)}")
        if self.per_class < 1 or self.threads < 1:
            raise ValueError("per-class samples and threads must be >= 1")
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be integers >= 1; got {list(self.steps)}")
        if not self.windows or min(self.windows) < 1:
            raise ValueError(f"windows must be integers >= 1; got {list(self.windows)}")
        if not self.guidance or not all(0 <= g <= MAX_GUIDANCE for g in self.guidance):
            raise ValueError(f"guidance scales must be in 0..{MAX_GUIDANCE:g}; "
                             f"got {list(self.guidance)}")
        unknown = set(self.modes) - set(QUALITY_MODES)
        if unknown:
            raise ValueError(f"modes {sorted(unknown)} are not measured; choose from "
                             f"{QUALITY_MODES}")
        if self.backend not in DENOISE_BACKENDS:
            raise ValueError(f"backend must be one of {DENOISE_BACKENDS}; got {self.backend!r}")
        if "{word}" not in self.template and "{digit}" not in self.template:
            raise ValueError(f"the prompt template must name the digit with {{word}} or "
                             f"{{digit}}; got {self.template!r}")

    def prompts(self) -> list[str]:
        """The prompt of every sample: `per_class` of each digit, digit by digit."""
        return [prompt_for(digit, self.template) for digit in range(NUM_CLASSES)
                for _ in range(self.per_class)]


@dataclass(frozen=True)
class QualityRecord:
    """One (guidance, steps, mode, window) over all samples."""

    guidance: float
    steps: int
    mode: str
    window: int
    rounds: int
    accuracy: float  # classifier's label == requested label
    accuracy_delta_points: float  # minus sequential's, in percentage points
    fd: float  # digits-FD against all real digits
    fd_ratio: float  # over sequential's
    distance_to_sequential: float  # mean per-sample RMS pixel difference, range [-1, 1]
    max_abs_diff_to_sequential: float
    seconds: float
    model: str = "reference"


# ---------------------------------------------------------------------------------------------
# Batched local denoise


def make_denoiser(model: DigitsModel, setup: QualitySetup, prompts: Sequence[str],
                  guidance: float, denoiser_onnx: Path | None = None):
    """The batched local denoise for a batch of prompts (the empty prompt as the negative):
    the model's denoiser in PyTorch, or its engine in ONNX Runtime (`denoiser_onnx`), as one
    in-process device that takes each round in one call."""
    from runtime.guidance import Conditioning
    from runtime.local_devices import LocalDevice
    from runtime.pool import DevicePool

    if isinstance(prompts, str) or not prompts:
        raise ValueError("make_denoiser needs a non-empty list of prompts")
    if setup.backend == "torch":
        device = torch_device(model)
    else:
        device = LocalDevice.from_onnx(denoiser_onnx, threads=setup.threads)
    cond = {name: value.numpy() for name, value in model.denoiser_inputs(prompts).items()}
    uncond = {name: value.numpy().repeat(len(prompts), 0)
              for name, value in model.denoiser_inputs([EMPTY_PROMPT]).items()}
    return DevicePool([device], batched=True).denoiser(Conditioning(cond, uncond, guidance))


def torch_device(model: DigitsModel):
    """The model's denoiser in PyTorch as an in-process device (inputs by tensor name)."""
    from runtime.local_devices import LocalDevice, LocalModel

    def run(**inputs):
        given = {name: torch.from_numpy(value) for name, value in inputs.items()}
        sample, timestep = given.pop(tensors.SAMPLE), given.pop(tensors.TIMESTEP)
        return {tensors.OUT_SAMPLE: model.denoise(sample, timestep, **given).numpy()}

    return LocalDevice(LocalModel(f"{model.preset}-torch", run))


# ---------------------------------------------------------------------------------------------
# Measuring


def sample_images(model: DigitsModel, denoise, setup: QualitySetup, noise: torch.Tensor,
                  steps: int, mode: str, window: int,
                  progress: Callable[[int], None]) -> tuple[torch.Tensor, int]:
    """Decoded gray samples [N, 1, 8, 8] clipped to the image range [-1, 1], and the rounds
    sampling took."""
    from runtime.driffusion import sample
    from runtime.schedulers import make_scheduler

    scheduler = make_scheduler(setup.scheduler, steps, model.scheduler_config)
    counting = CountingDenoise(denoise)
    # flow-matching schedulers have no init_noise_sigma: they start from the noise itself
    start = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    latents = asyncio.run(sample(counting, scheduler, start,
                                 mode=mode, window=window, progress=progress,
                                 draft_order=1 if mode == "sequential" else setup.draft_order))
    return to_gray(model.decode(latents)).clamp(-1, 1), counting.rounds


def measure(model: DigitsModel, setup: QualitySetup, real_features: torch.Tensor,
            progress: Callable[[int], None],
            denoiser_onnx: Path | None = None) -> tuple[list[QualityRecord], dict]:
    """Every (guidance, steps, mode, window) of one model; also the samples of each run, by
    key (model, guidance, steps, mode, window)."""
    if not compatible(setup.scheduler, model.scheduler_config):
        raise ValueError(f"scheduler {setup.scheduler} does not fit {model.preset}; use "
                         f"{DEFAULT} (its own) or one of the same kind")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(setup.per_class)
    noise = model.initial_noise(setup.samples, torch.Generator().manual_seed(setup.seed))
    records, samples = [], {}
    for guidance in setup.guidance:
        denoise = make_denoiser(model, setup, setup.prompts(), guidance, denoiser_onnx)
        for steps in setup.steps:
            baseline = None
            for mode, window in setup.runs():
                start = time.perf_counter()
                images, rounds = sample_images(model, denoise, setup, noise, steps, mode,
                                               window, progress)
                seconds = time.perf_counter() - start
                accuracy = class_accuracy(model.classifier, images, labels)
                fd = frechet_distance(classifier_features(model.classifier, images),
                                      real_features)
                if baseline is None:
                    baseline = (images, accuracy, fd)
                records.append(QualityRecord(
                    guidance=guidance, steps=steps, mode=mode, window=window, rounds=rounds,
                    accuracy=accuracy, accuracy_delta_points=(accuracy - baseline[1]) * 100,
                    fd=fd, fd_ratio=fd / baseline[2] if baseline[2] > 0 else float("nan"),
                    distance_to_sequential=mean_sample_distance(images, baseline[0]),
                    max_abs_diff_to_sequential=(images - baseline[0]).abs().max().item(),
                    seconds=seconds, model=model.preset,
                ))
                samples[(model.preset, guidance, steps, mode, window)] = images
    return records, samples


def real_floor(model: DigitsModel, real: torch.Tensor, real_labels: torch.Tensor,
               per_class: int, seed: int) -> float:
    """digits-FD of `per_class` random real digits of each class against all real digits.

    The FD that a perfect sampler would score with as many samples (the estimate's floor).
    """
    order = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))
    chosen = torch.cat([order[real_labels[order] == digit][:per_class]
                        for digit in range(NUM_CLASSES)])
    return frechet_distance(classifier_features(model.classifier, real[chosen]),
                            classifier_features(model.classifier, real))


def check_target(records: Sequence[QualityRecord]) -> dict[str, Any] | None:
    """Aggressive window 4, 50 steps: accuracy within 1 point of sequential, FD within 10%.

    Checked at guidance 1 (where guidance does not dominate the FD), else the lowest measured.
    """
    candidates = [r for r in records if (r.mode, r.window, r.steps) ==
                  (TARGET["mode"], TARGET["window"], TARGET["steps"])]
    if not candidates:
        return None
    record = min(candidates, key=lambda r: (r.guidance != 1.0, r.guidance))
    accuracy_met = abs(record.accuracy_delta_points) <= TARGET["accuracy_points"]
    fd_met = record.fd_ratio <= TARGET["fd_ratio"]
    return {
        "name": f"{TARGET['mode']} window {TARGET['window']}, {TARGET['steps']} steps, guidance "
                f"{record.guidance:g}: accuracy within {TARGET['accuracy_points']:g} point of "
                f"sequential, FD within {(TARGET['fd_ratio'] - 1) * 100:.0f}%",
        "accuracy_delta_points": record.accuracy_delta_points, "fd_ratio": record.fd_ratio,
        "accuracy_met": accuracy_met, "fd_met": fd_met, "met": accuracy_met and fd_met,
    }


# ---------------------------------------------------------------------------------------------
# Report


def format_table(records: Sequence[QualityRecord], samples: int, floor: float) -> str:
    header = (f"{'mode':<13}{'window':>6}{'rounds':>7}{'accuracy':>10}{'Δ acc pt':>9}"
              f"{'FD':>8}{'FD/seq':>8}{'dist to seq':>12}{'max |Δ|':>9}{'seconds':>9}")
    intro = (f"{samples} samples per run (same noise in every run); digits-FD of as many real "
             f"digits (same classes) vs all: {floor:.2f}")
    lines = [intro]
    for model, guidance, steps in dict.fromkeys((r.model, r.guidance, r.steps) for r in records):
        lines += ["", f"{model}, guidance {guidance:g}, {steps} steps", header]
        for r in records:
            if (r.model, r.guidance, r.steps) != (model, guidance, steps):
                continue
            lines.append(
                f"{r.mode:<13}{r.window:>6}{r.rounds:>7}{r.accuracy:>10.3f}"
                f"{r.accuracy_delta_points:>+9.1f}{r.fd:>8.2f}{r.fd_ratio:>8.2f}"
                f"{r.distance_to_sequential:>12.4f}{r.max_abs_diff_to_sequential:>9.3f}"
                f"{r.seconds:>9.1f}"
            )
    return "\n".join(lines)


def format_target(model: str, target: dict[str, Any] | None) -> str:
    if target is None:
        return f"{model} target: not measured (needs aggressive, window 4, 50 steps)"
    verdict = "met" if target["met"] else "MISSED"
    return (f"{model} target: {target['name']}: Δ accuracy "
            f"{target['accuracy_delta_points']:+.1f} pt, FD ratio {target['fd_ratio']:.3f} -> "
            f"{verdict}")


def plot_grids(records: Sequence[QualityRecord], samples: dict, setup: QualitySetup,
               path: Path) -> None:
    """Sample grids side by side (rows: digits), one row of panels per model, for the first
    guidance and step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.demo import grid_array
    from models.reference import to_images

    guidance, steps = setup.guidance[0], setup.steps[0]
    shown = min(GRID_SAMPLES, setup.per_class)
    columns = len(setup.runs())
    figure, axes = plt.subplots(len(setup.models), columns, squeeze=False,
                                figsize=(0.4 + 0.36 * shown * columns, 0.2 + 4.4 * len(setup.models)))
    for row, model in zip(axes, setup.models):
        panels = [r for r in records if (r.model, r.guidance, r.steps) == (model, guidance, steps)]
        for axis, record in zip(row, panels):
            key = (model, guidance, steps, record.mode, record.window)
            pixels = to_images(samples[key]).numpy()
            rows = [[pixels[digit * setup.per_class + k] for k in range(shown)]
                    for digit in range(NUM_CLASSES)]
            axis.imshow(grid_array(rows, scale=4, gap=2), cmap="gray", vmin=0, vmax=255,
                        interpolation="nearest")
            name = record.mode if record.mode == "sequential" else f"{record.mode} w{record.window}"
            axis.set_title(f"{model}: {name}\n{record.rounds} rounds, acc {record.accuracy:.3f}\n"
                           f"FD {record.fd:.2f}, dist {record.distance_to_sequential:.3f}",
                           fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"{steps} steps, guidance {guidance:g}, same noise in every panel (rows: "
                    f"digits 0-9, \"{setup.template}\")", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# The command


def load_model(name: str, backend: str) -> DigitsModel:
    """A bundled reference by preset name; the flow model folds its zero T5 tokens in PyTorch
    (exact, 4x cheaper), its ONNX engine takes them all."""
    from models.reference import load_reference
    from models.reference_flow import load_flow_reference

    if name == "reference":
        return load_reference()
    return load_flow_reference(fold=backend == "torch")


def run_benchmark(setup: QualitySetup, out: Path,
                  plot: bool = True) -> tuple[dict[str, Any], list[QualityRecord]]:
    """Measure, write quality.json (and quality.png); returns the report and the records."""
    from tqdm import tqdm

    from bench.common import ensure_reference_engines, machine_info
    from models.reference import real_digits

    setup.validate()
    if setup.backend == "torch":
        torch.set_num_threads(setup.threads)
    real, real_labels = real_digits()
    total = len(setup.models) * len(setup.guidance) * sum(setup.steps) * len(setup.runs())
    records, samples, floor = [], {}, None
    started = time.perf_counter()
    with tqdm(total=total, desc="bench quality", unit="step") as bar:
        for name in setup.models:
            model = load_model(name, setup.backend)
            denoiser_onnx = None
            if setup.backend == "onnxruntime":
                engines = ensure_reference_engines(lambda line: print(line, flush=True), name)
                denoiser_onnx = engines.path(model.denoiser_network)
            real_features = classifier_features(model.classifier, real)
            if floor is None:  # one classifier judges every model
                floor = real_floor(model, real, real_labels, setup.per_class, setup.seed)
            model_records, model_samples = measure(model, setup, real_features, bar.update,
                                                   denoiser_onnx)
            records += model_records
            samples.update(model_samples)
    report = {
        "setup": asdict(setup),
        "machine": machine_info(),
        "seconds": time.perf_counter() - started,
        "real_vs_real_fd": floor,
        "records": [asdict(record) for record in records],
        "target": {name: check_target([r for r in records if r.model == name])
                   for name in setup.models},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    if plot:
        plot_grids(records, samples, setup, out / "quality.png")
    return report, records


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quality",
        help="class accuracy, digits-FD and distance to sequential per mode and window",
        description="Samples the bundled reference models in-process (batched local "
        "denoise), asking for each digit by prompt, with "
        "sequential, conservative and aggressive DRiffusion for each window, step count and "
        "guidance, from the same noise; reports the classifier's accuracy, the Frechet distance "
        "on its features against the real digits and the distance to the sequential sample of "
        "the same seed. Writes quality.json and quality.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", nargs="+", choices=QUALITY_MODELS, default=["reference"],
                        dest="models", help="the bundled models to measure (reference: SD UNet "
                        "and DDIM; reference-flow: SD3 transformer and flow matching)")
    parser.add_argument("--per-class", type=positive_int, default=20,
                        help="samples per digit (10 digits)")
    parser.add_argument("--steps", nargs="+", type=positive_int, default=list(DEFAULT_STEPS),
                        help="sampler step counts")
    parser.add_argument("--windows", nargs="+", type=positive_int,
                        default=list(DEFAULT_WINDOWS), help="DRiffusion windows")
    parser.add_argument("--modes", nargs="+", choices=QUALITY_MODES, default=list(QUALITY_MODES),
                        help="modes compared with sequential")
    parser.add_argument("--guidance", nargs="+", type=float, default=list(DEFAULT_GUIDANCE),
                        help="classifier-free guidance scales")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--backend", choices=DENOISE_BACKENDS, default="onnxruntime",
                        help="run the denoiser with its ONNX Runtime engine (built if missing) "
                        "or with PyTorch")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="intra-op threads of the denoiser")
    parser.add_argument("--scheduler", choices=scheduler_names(), default=DEFAULT,
                        help="the sampler's scheduler; default: each model's own (DDIM for "
                        "reference, flow-matching Euler for reference-flow)")
    parser.add_argument("--draft-order", type=int, choices=(1, 2), default=1,
                        help="DRiffusion drafts: 1 first-order skips (the paper's), 2 multistep "
                        "extrapolation (default: %(default)s)")
    parser.add_argument("--template", default=PROMPT_TEMPLATES[0],
                        help="the prompt that asks for a digit ({word}: seven, {digit}: 7)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip quality.png")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from engines.build import EngineBuildError

    setup = QualitySetup(
        models=tuple(args.models), per_class=args.per_class, steps=tuple(args.steps), windows=tuple(args.windows),
        modes=tuple(args.modes), guidance=tuple(args.guidance), seed=args.seed,
        backend=args.backend, threads=args.threads, scheduler=args.scheduler,
        draft_order=args.draft_order, template=args.template,
    )
    try:
        report, records = run_benchmark(setup, args.out, plot=not args.no_plot)
    except (ValueError, FileNotFoundError, EngineBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(records, setup.samples, report["real_vs_real_fd"]))
    print()
    for model, target in report["target"].items():
        print(format_target(model, target))
    written = [args.out / "quality.json"] + ([] if args.no_plot else [args.out / "quality.png"])
    print(f"wrote {' and '.join(map(str, written))} ({report['seconds']:.0f} s)")
    return 0
