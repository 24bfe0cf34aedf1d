"""`driffusion demo` (`make demo`): the reference model on 2 CPU devices behind Triton, every digit
asked for by prompt ("a handwritten seven") and sampled sequentially and with both DRiffusion
modes, side by side.

Steps: build the reference model's ONNX Runtime engines if they are missing or stale (it is a
diffusers text-to-image folder: tokenizer, text encoder, UNet, VAE decoder), write a Triton
model repository with them and one `unet_cpu<i>` model per device, start the embedded
tritonserver on free ports, sample each digit with each mode (this client tokenizes and encodes
the prompt with the served tokenizer and text encoder, runs the sampler, sends every round's
items to the devices concurrently over Triton's HTTP port and decodes with the served VAE
decoder), stop the server (also on Ctrl-C, SIGTERM or an error), then print latency, speedup, rounds and quality
deltas and write PNGs and JSON.

"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Log,
    ensure_reference_engines,
    machine_info,
    positive_int,
    sigterm_as_interrupt,
)
from models import paths
from models.limits import MAX_GUIDANCE
from models.pipeline_spec import PipelineSpec

DEFAULT_OUT = paths.output_dir("demo")
DEMO_MODES = ("sequential", "conservative", "aggressive")
DIGITS = tuple(range(10))
QUICK_STEPS = 10
GRID_SCALE = 16  # each 8x8 digit is drawn as 128x128 pixels
GRID_GAP = 4
GRID_BACKGROUND = 64


# ---------------------------------------------------------------------------------------------
# Results: pure functions on sampled images


@dataclass
class DemoImage:
    """One sampled digit: how it was made, how long it took, what the classifier saw."""

    mode: str
    window: int
    digit: int
    seed: int
    seconds: float
    rounds: int
    pixels: np.ndarray = field(repr=False)  # uint8 [8, 8], gray
    predicted: int | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class ModeSummary:
    """One mode over all digits, compared with sequential sampling of the same seeds."""

    mode: str
    window: int
    rounds: int  # per image
    latency_ms: float  # median over the digits, per image (encode + sample + decode)
    speedup: float  # sequential latency / this latency
    ideal_speedup: float  # sequential rounds / these rounds
    accuracy: float  # classifier recognises the requested digit
    max_pixel_diff: int  # largest |pixel - sequential pixel| over all digits, of 255
    mean_pixel_diff: float  # mean |pixel - sequential pixel|, of 255


def summarise(images: Sequence[DemoImage]) -> list[ModeSummary]:
    """One row per mode (in order of first appearance), sequential first as the baseline."""
    modes = list(dict.fromkeys((image.mode, image.window) for image in images))
    by_mode = {key: [i for i in images if (i.mode, i.window) == key] for key in modes}
    baseline_key = next((key for key in modes if key[0] == "sequential"), None)
    if baseline_key is None:
        raise ValueError("summarise needs the sequential images as the baseline")
    baseline = {image.digit: image for image in by_mode[baseline_key]}
    base_latency = statistics.median(image.seconds for image in baseline.values())
    base_rounds = statistics.median(image.rounds for image in baseline.values())
    rows = []
    for (mode, window), group in by_mode.items():
        latency = statistics.median(image.seconds for image in group)
        rounds = statistics.median(image.rounds for image in group)
        differences = [np.abs(image.pixels.astype(int) - baseline[image.digit].pixels.astype(int))
                       for image in group]
        rows.append(ModeSummary(
            mode=mode, window=window, rounds=int(rounds), latency_ms=latency * 1000,
            speedup=base_latency / latency, ideal_speedup=base_rounds / rounds,
            accuracy=_accuracy(group),
            max_pixel_diff=int(max(d.max() for d in differences)),
            mean_pixel_diff=float(np.mean([d.mean() for d in differences])),
        ))
    return rows


def _accuracy(images: Sequence[DemoImage]) -> float:
    if any(image.predicted is None for image in images):
        return float("nan")
    return sum(image.predicted == image.digit for image in images) / len(images)


def format_table(rows: Sequence[ModeSummary]) -> str:
    """The demo's result table: one line per mode, deltas against the sequential row."""
    baseline = rows[0]
    header = (f"{'mode':<13}{'window':>6}{'rounds':>8}{'latency ms':>12}{'speedup':>9}"
              f"{'ideal':>7}{'accuracy':>10}{'Δ acc':>8}{'max Δpx':>9}{'mean Δpx':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        delta = (row.accuracy - baseline.accuracy) * 100
        lines.append(
            f"{row.mode:<13}{row.window:>6}{row.rounds:>8}{row.latency_ms:>12.1f}"
            f"{row.speedup:>8.2f}x{row.ideal_speedup:>6.2f}x{row.accuracy:>10.0%}"
            f"{delta:>+6.0f}pt{row.max_pixel_diff:>5}/255{row.mean_pixel_diff:>10.2f}"
        )
    return "\n".join(lines)


def grid_array(rows: Sequence[Sequence[np.ndarray]], scale: int = GRID_SCALE,
               gap: int = GRID_GAP, background: int = GRID_BACKGROUND) -> np.ndarray:
    """Images [H, W] (uint8) laid out as a grid, each upscaled `scale` times (nearest pixel).

    All rows must hold the same number of images of one shape; a `gap` of `background` pixels
    separates them and frames the grid.
    """
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("grid_array needs rows of equally many images")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be >= 1 and gap >= 0; got scale {scale}, gap {gap}")
    height, width = np.asarray(rows[0][0]).shape
    cell_h, cell_w = height * scale, width * scale
    grid = np.full((gap + len(rows) * (cell_h + gap), gap + len(rows[0]) * (cell_w + gap)),
                   background, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            image = np.asarray(image, dtype=np.uint8)
            if image.shape != (height, width):
                raise ValueError(f"image ({r}, {c}) has shape {image.shape}, expected "
                                 f"{(height, width)}")
            top, left = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
            grid[top:top + cell_h, left:left + cell_w] = np.kron(
                image, np.ones((scale, scale), dtype=np.uint8))
    return grid


def save_grid(path: Path, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
              column_labels: Sequence[str], title: str, scale: int = GRID_SCALE) -> None:
    """A labelled PNG of `grid_array(rows)`: row names on the left, column names on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid_array(rows, scale)
    height, width = np.asarray(rows[0][0]).shape
    step_y, step_x = height * scale + GRID_GAP, width * scale + GRID_GAP
    dpi = 100
    figure, axis = plt.subplots(figsize=(grid.shape[1] / dpi + 1.8, grid.shape[0] / dpi + 0.8),
                                dpi=dpi)
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([GRID_GAP + c * step_x + step_x / 2 for c in range(len(column_labels))])
    axis.set_xticklabels(column_labels)
    axis.set_yticks([GRID_GAP + r * step_y + step_y / 2 for r in range(len(row_labels))])
    axis.set_yticklabels(row_labels)
    axis.xaxis.tick_top()
    axis.tick_params(length=0)
    axis.set_xlabel(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")  # long row labels stay whole
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Sampling through Triton


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 50
    window: int = 2
    devices: int = 2
    guidance: float = 1.0
    seed: int = 0
    scheduler: str = "ddim"
    cpu_threads: int = 1
    repeat: int = 3  # time each image this many times, keep the median
    digits: tuple[int, ...] = DIGITS

    def runs(self) -> list[tuple[str, int]]:
        """(mode, window) of each image per digit, the sequential baseline first."""
        return [("sequential", 1)] + [(mode, self.window) for mode in DEMO_MODES[1:]]


async def sample_digits(endpoint: str, settings: DemoSettings,
                        spec: PipelineSpec,
                        progress: Callable[[], None] = lambda: None) -> list[DemoImage]:
    """Every digit in every mode through the models at `endpoint`, each asked for by its prompt
    (the runs of one digit back to back, so that a change in the machine's load hits every mode
    alike). `spec`: the served model's pipeline spec."""
    from models.reference import prompt_for
    from runtime.generate import connect_pipeline, timed_run
    from runtime.pipeline import GenerationRequest
    from runtime.triton_clients import TritonEndpoints

    async with TritonEndpoints([endpoint]) as connection:
        pipeline = await connect_pipeline(connection, spec=spec)

        def request(digit: int, mode: str, window: int, steps: int):
            return pipeline.resolve(GenerationRequest(
                prompt=prompt_for(digit), seed=settings.seed + digit, steps=steps, mode=mode,
                window=window, guidance=settings.guidance, scheduler=settings.scheduler))

        for mode, window in settings.runs():  # warm-up: first calls at each batch size
            await timed_run(pipeline, request(0, mode, window, min(settings.steps, 4)), quiet=True)
        images = []
        for digit in settings.digits:
            for mode, window in settings.runs():
                trials = [await timed_run(pipeline, request(digit, mode, window, settings.steps),
                                          quiet=True) for _ in range(settings.repeat)]
                run = sorted(trials, key=lambda trial: trial.seconds)[len(trials) // 2]
                images.append(DemoImage(mode, window, digit, settings.seed + digit, run.seconds,
                                        run.rounds, gray(run.image), prompt=prompt_for(digit)))
                progress()
        return images


def gray(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] of an RGB image uint8 [H, W, 3] (the channel mean, rounded)."""
    return np.rint(np.asarray(image, dtype=np.float64).mean(axis=-1)).astype(np.uint8)


def classify(images: Sequence[DemoImage]) -> None:
    """Fill in each image's `predicted` digit with the reference model's evaluation classifier."""
    for image, digit in zip(images, classify_pixels([image.pixels for image in images])):
        image.predicted = digit


def classify_pixels(images: Sequence[np.ndarray]) -> list[int]:
    """The digit the reference model's evaluation classifier sees in each gray uint8 [8, 8]."""
    import torch

    from models.reference import load_classifier

    classifier = load_classifier()
    pixels = torch.from_numpy(np.stack(images)).float()
    with torch.no_grad():
        return classifier((pixels / 127.5 - 1).unsqueeze(1)).argmax(dim=1).tolist()


# ---------------------------------------------------------------------------------------------
# The command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: every digit by prompt, sequentially and with DRiffusion on 2 CPU "
        "devices behind Triton, side by side",
        description="Builds the reference model's ONNX Runtime engines if needed, serves them "
        "with the embedded tritonserver (tokenizer, text encoder, VAE decoder and one unet_cpu<i> "
        "model per device, free local ports), asks for every digit by prompt ('a handwritten "
        "seven') sequentially and with conservative and aggressive DRiffusion, stops "
        "the server, and prints latency, speedup, rounds and quality deltas. Writes grid.png "
        "(rows: modes, columns: digits) and demo.json under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"DDIM steps (default 50; {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps instead of 50 (a smoke run)")
    parser.add_argument("--devices", type=positive_int, default=2,
                        help="unet_cpu device models to serve")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="DRiffusion window (default: the device count)")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale (1 = conditional model only)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of digit 0 (digit d: +d)")
    parser.add_argument("--cpu-threads", type=positive_int, default=1,
                        help="ONNX Runtime intra-op threads per device")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="time each image this many times and keep the median")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    if not 0 <= args.guidance <= MAX_GUIDANCE:
        raise ValueError(f"--guidance must be in 0..{MAX_GUIDANCE:g}; got {args.guidance}")
    steps = args.steps or (QUICK_STEPS if args.quick else 50)
    return DemoSettings(steps=steps, window=args.window or args.devices, devices=args.devices,
                        guidance=args.guidance, seed=args.seed, cpu_threads=args.cpu_threads,
                        repeat=args.repeat)


def run(args: argparse.Namespace) -> int:
    from engines.build import EngineBuildError
    from runtime.device import DeviceError
    from runtime.pipeline import RequestError
    from runtime.pool import PoolError
    from runtime.triton_clients import DiscoveryError
    from triton_models.serve import ServerError

    try:
        with sigterm_as_interrupt():
            return run_demo(settings_from_args(args), Path(args.out))
    except KeyboardInterrupt:
        print("\ninterrupted: Triton stopped", file=sys.stderr)
        return 130
    except (ServerError, EngineBuildError, DiscoveryError, DeviceError, PoolError, RequestError,
            FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run_demo(settings: DemoSettings, out: Path) -> int:
    from tqdm import tqdm

    from models.reference import prompt_for
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import serving

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    step = _step_printer(5)
    step("engines: reference model, ONNX Runtime CPU")
    ensure_reference_engines(lambda line: print(f"      {line}", flush=True))
    options = RepositoryOptions(model="reference", devices=settings.devices,
                                cpu_threads=settings.cpu_threads, pipeline_model=False)
    step(f"Triton: writing {out / 'repository'} and starting the embedded server")
    machine = machine_info()
    with serving(options, out / "repository", out / "tritonserver.log") as (server, repository):
        print(f"      ready on {server.http_url} (gRPC {server.grpc_url}): "
              f"{', '.join(repository.models)} "
              f"(log {server.log_path})", flush=True)
        total = len(settings.digits) * len(settings.runs())
        step(f"sampling {len(settings.digits)} digits by prompt (\"{prompt_for(7)}\", ...) x "
             f"{len(settings.runs())} modes, "
             f"{settings.steps} {settings.scheduler.upper()} steps, guidance {settings.guidance:g}, "
             f"window {settings.window} on {settings.devices} devices")
        with tqdm(total=total, unit="image", leave=False) as bar:
            images = asyncio.run(sample_digits(server.http_url, settings, repository.spec,
                                               lambda: bar.update()))
        step("stopping Triton")
    print("      stopped", flush=True)
    step("classifying the images and comparing each mode with sequential sampling")
    classify(images)
    rows = summarise(images)
    write_outputs(out, settings, images, rows, machine)
    print()
    print(format_table(rows))
    print(f"\nlatency: median per image over {len(settings.digits)} digits, each the median of "
          f"{settings.repeat} runs (tokenize + encode + "
          f"{settings.steps} steps + VAE decode, HTTP to {settings.devices} ONNX Runtime "
          "devices); "
          "ideal = sequential rounds / rounds; Δpx: pixel difference to the sequential image "
          "of the same seed.")
    print(f"wrote {out / 'grid.png'} and {out / 'demo.json'} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


def _step_printer(total: int) -> Log:
    count = 0

    def step(message: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count}/{total}] {message}", flush=True)

    return step


def write_outputs(out: Path, settings: DemoSettings, images: Sequence[DemoImage],
                  rows: Sequence[ModeSummary], machine: dict[str, Any]) -> None:
    """grid.png (rows: modes, columns: digits) and demo.json (settings, table, every image)."""
    labels = [f"{mode} w{window}" if mode != "sequential" else mode
              for mode, window in settings.runs()]
    grid = [[next(i.pixels for i in images if (i.mode, i.window, i.digit) == (mode, window, d))
             for d in settings.digits] for mode, window in settings.runs()]
    save_grid(out / "grid.png", grid, labels, [str(d) for d in settings.digits],
              f"reference model, {settings.steps} steps, guidance {settings.guidance:g}, "
              f"{settings.devices} ONNX Runtime devices behind Triton")
    record = {
        "settings": asdict(settings),
        "machine": machine,
        "summary": [asdict(row) for row in rows],
        "images": [{**asdict(image), "pixels": image.pixels.tolist()} for image in images],
    }
    (out / "demo.json").write_text(json.dumps(record, indent=1))
