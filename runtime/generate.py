"""`driffusion generate`: one image from Triton endpoints, sampled with DRiffusion by this client.

A video model's frames (Wan: --frames, --guidance-2) go to an MP4 or a folder of PNGs
(runtime/video_files.py).

The client discovers every ready `unet_*` model on the endpoints, runs the draft-and-refine
sampler locally and sends each round's items to the devices concurrently over gRPC. A device
that fails mid-image is replaced by the others (same image); the text encoder and decoder are
used from whichever endpoint answers. The model
facts (latent shape, schedule, labels) come from the `driffusion` model's config on the
endpoints, or from `--spec FILE`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.device import DEFAULT_DEADLINE_S, DeviceError
from runtime.driffusion import DRAFT_ORDERS, MODES
from runtime.pipeline import (
    GenerationRequest,
    Pipeline,
    PipelineSpec,
    RequestError,
    ResolvedRequest,
)
from runtime.pool import DevicePool, PoolError
from runtime.schedulers import scheduler_names
from runtime.triton_clients import DEVICE_PATTERN, DiscoveryError, TritonEndpoints
from runtime.video_files import check_video_out, save_video

PIPELINE_MODEL = "driffusion"


@dataclass
class Run:
    """One timed generation."""

    request: ResolvedRequest
    image: np.ndarray
    seconds: float
    rounds: int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image on Triton endpoints with DRiffusion (client-side sampler)",
        description="Sample one image: this client runs the DRiffusion sampler and spreads each "
        "round over every ready unet_* model of the endpoints. --compare also runs sequential "
        "sampling and reports both latencies, the speedup and the pixel difference.",
    )
    parser.add_argument("--endpoints", default="http://127.0.0.1:8000",
                        help="comma-separated Triton endpoints: http://HOST:PORT (the HTTP port; "
                        "half the client CPU per device call) or HOST:PORT (the gRPC port) "
                        "(default %(default)s)")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", help="what to draw, e.g. 'a photo of a red car' (for a "
                           "class-conditional model: a prompt naming a class)")
    condition.add_argument("--label", type=int, help="class label of a class-conditional model")
    parser.add_argument("--negative-prompt", default=None,
                        help="what to guide away from (default: the empty prompt)")
    parser.add_argument("--image", type=Path, default=None,
                        help="init image (PNG/JPEG, RGB): image-to-image, or inpainting with "
                        "--mask; HEIGHT and WIDTH are its size, which the engines must accept")
    parser.add_argument("--mask", type=Path, default=None,
                        help="inpainting mask, the image's size: white (>= 128) is repainted, "
                        "black kept")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --image: the share of the schedule run from the noised image, "
                        "in (0, 1] (default: diffusers' for the family; 1 for inpainting)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, default=None,
                        help="video models: frames (diffusers' num_frames; counts that do not "
                        "fit the VAE's temporal factor t become F // t * t + 1; default the "
                        "model's)")
    parser.add_argument("--guidance-2", type=float, default=None,
                        help="Wan 2.2 two-expert models: the low-noise expert's guidance "
                        "(diffusers' guidance_scale_2; default --guidance)")
    parser.add_argument("--mode", choices=MODES, default="aggressive",
                        help="sampling mode (default %(default)s)")
    parser.add_argument("--window", type=int, default=None,
                        help="model evaluations per parallel round (default: the device count; "
                        "4 with --batched)")
    parser.add_argument("--steps", type=int, default=None, help="timesteps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the model's): classifier-free guidance, "
                        "or for guidance-distilled Flux models the scale they embed")
    parser.add_argument("--true-cfg", type=float, default=None,
                        help="Flux.1 and Qwen-Image: true classifier-free guidance scale "
                        "(diffusers' true_cfg_scale; runs with a --negative-prompt when > 1; "
                        "default the model's: Flux 1 (off), Qwen-Image 4)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="mode verified: accept drafts within this RMS distance over the "
                        "noise level (0 = sequential result)")
    parser.add_argument("--draft-order", type=int, choices=DRAFT_ORDERS, default=1,
                        help="1: first-order skip drafts (the paper's); 2: multistep extrapolation")
    parser.add_argument("--scheduler", default=None,
                        help=f"{', '.join(scheduler_names())} (default: the model's own)")
    parser.add_argument("--out", type=Path, default=Path("image.png"),
                        help="where to write the PNG (default %(default)s); a video model's "
                        "frames: clip.mp4 (H.264) or a folder, frames/ (one PNG a frame)")
    parser.add_argument("--compare", action="store_true",
                        help="also sample sequentially; print latencies, speedup, pixel difference")
    parser.add_argument("--repeat", type=int, default=3,
                        help="with --compare: time each mode this many times, report the median "
                        "(default %(default)s)")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="split the cond/uncond halves of each item over two devices")
    parser.add_argument("--batched", action="store_true",
                        help="send each round to one device as a single batched call of the "
                        "window's items (one GPU: DRiffusion's rounds as batches; window 4 unless "
                        "--window says otherwise)")
    parser.add_argument("--devices", default=DEVICE_PATTERN,
                        help="which models are devices, a glob (default %(default)s)")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help="deadline of one device call in seconds (default %(default)s)")
    parser.add_argument("--spec", type=Path, default=None,
                        help="PipelineSpec JSON, if no endpoint serves the driffusion model")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="give up after this many seconds; no device call is made after "
                        "(default: no limit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Run the command; Ctrl-C or --timeout-s cancels the sampling task, so no further round
    (and no further device call) is issued."""
    try:
        return asyncio.run(asyncio.wait_for(generate_command(args), args.timeout_s))
    except (TimeoutError, asyncio.TimeoutError):
        print(f"error: gave up after {args.timeout_s} s (--timeout-s); no further device calls",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: no further device calls", file=sys.stderr)
        return 130
    except (DiscoveryError, RequestError, DeviceError, PoolError, ValueError,
            FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


async def generate_command(args: argparse.Namespace) -> int:
    endpoints = [item for item in args.endpoints.split(",") if item.strip()]
    request = GenerationRequest(
        label=args.label, prompt=args.prompt, negative_prompt=args.negative_prompt,
        seed=args.seed, steps=args.steps, mode=args.mode, window=args.window,
        guidance=args.guidance, scheduler=args.scheduler, tolerance=args.tolerance,
        draft_order=args.draft_order, height=args.height, width=args.width,
        true_cfg=args.true_cfg, init_image=read_image(args.image, "RGB"),
        mask=read_image(args.mask, "L"), strength=args.strength, frames=args.frames,
        guidance_2=args.guidance_2,
    )
    async with TritonEndpoints(endpoints) as connection:
        pipeline = await connect_pipeline(connection, spec_file=args.spec, pattern=args.devices,
                                          deadline_s=args.deadline_s, cfg_parallel=args.cfg_parallel,
                                          batched=args.batched)
        resolved = pipeline.resolve(request)
        if pipeline.family.makes_video:
            check_video_out(args.out)
        print(f"{pipeline.spec.model}: {len(pipeline.pool.devices)} device model(s), "
              f"{pipeline.pool.width} lane(s): {', '.join(d.name for d in pipeline.pool.devices)}")
        repeat = args.repeat if args.compare else 1
        runs = await generate_runs(pipeline, resolved, compare=args.compare, quiet=args.quiet,
                                   repeat=repeat)
    for failover in pipeline.pool.failovers:
        print(f"warning: device {failover.device} failed after {failover.seconds:.2f} s "
              f"({failover.error}); its call was re-issued on {failover.replacement}",
              file=sys.stderr)
    if pipeline.family.makes_video:
        save_video(runs[-1].image, args.out)
    else:
        save_image(runs[-1].image, args.out)
    report(runs, args.out, repeat)
    return 0


async def connect_pipeline(connection: TritonEndpoints, *, spec: PipelineSpec | None = None,
                           spec_file: Path | None = None,
                           pattern: str = DEVICE_PATTERN,
                           deadline_s: float | None = DEFAULT_DEADLINE_S,
                           cfg_parallel: bool = False, batched: bool = False) -> Pipeline:
    """A client-side Pipeline over the devices, text encoder and decoder of the endpoints."""
    if spec is None:
        spec = (PipelineSpec.from_json(spec_file.read_text()) if spec_file
                else await read_spec(connection))
    devices = await connection.devices(pattern, deadline_s=deadline_s)
    models = {}
    for name in Pipeline.needed_models(spec):
        models[name] = await connection.find_replicas(name)
        if models[name] is None:
            raise DiscoveryError(f"{spec.model} needs a {name} model; no endpoint serves it ready")
    pool = DevicePool(devices, cfg_parallel=cfg_parallel, batched=batched)
    return Pipeline(spec, pool, models, deadline_s)


async def read_spec(connection: TritonEndpoints) -> PipelineSpec:
    """The PipelineSpec in the `driffusion` model's config on the first endpoint serving it."""
    for endpoint in connection.endpoints:
        if PIPELINE_MODEL in await connection.ready_models(endpoint):
            config = await connection.model_config(endpoint, PIPELINE_MODEL)
            return PipelineSpec.from_json(config["parameters"]["pipeline"]["string_value"])
    raise DiscoveryError(
        f"no endpoint serves the {PIPELINE_MODEL} model, which describes the served model; "
        "pass --spec FILE"
    )


async def generate_runs(pipeline: Pipeline, request: ResolvedRequest, *, compare: bool,
                        quiet: bool = False, repeat: int = 1) -> list[Run]:
    """The requested run, preceded by a sequential run (and a warm-up) with `compare`.

    Each run is repeated `repeat` times; the one with the median latency is reported.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    requests = [request]
    if compare:
        warm_up = replace(request, steps=1, mode="sequential", tolerance=None)
        await timed_run(pipeline, warm_up, quiet=True)
        requests.insert(0, replace(request, mode="sequential", window=1, tolerance=None))
    runs = []
    for item in requests:
        trials = [await timed_run(pipeline, item, quiet=quiet) for _ in range(repeat)]
        runs.append(sorted(trials, key=lambda run: run.seconds)[len(trials) // 2])
    return runs


async def timed_run(pipeline: Pipeline, request: ResolvedRequest, *, quiet: bool) -> Run:
    from tqdm import tqdm

    label = f"{request.mode} w={request.window}"
    with tqdm(total=pipeline.steps_to_run(request), desc=label, unit="step", disable=quiet,
              leave=False) as bar:
        start = time.perf_counter()
        result = await pipeline.run(request, progress=RoundProgress(bar))
        seconds = time.perf_counter() - start
    return Run(request, result.image, seconds, result.rounds)


class RoundProgress:
    """A run's progress on a tqdm bar: the timesteps refined, and the rounds that refined them
    (a DRiffusion round refines up to its window's steps)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.rounds = 0

    def __call__(self, steps: int) -> None:
        self.rounds += 1
        self.bar.set_postfix_str(f"round {self.rounds}", refresh=False)
        self.bar.update(steps)


def read_image(path: Path | None, mode: str) -> np.ndarray | None:
    """A picture file as uint8 pixels in PIL `mode` (RGB: [H, W, 3]; L: [H, W])."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read the image {path}: {error}") from error


def save_image(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def report(runs: Sequence[Run], out: Path, repeat: int = 1) -> None:
    if repeat > 1:
        print(f"latency: median of {repeat} runs")
    for run in runs:
        print(f"{run.request.mode:>12} window {run.request.window}: {run.seconds * 1000:8.1f} ms "
              f"({run.rounds} rounds, {run.request.steps} steps)")
    if len(runs) == 2:
        baseline, parallel = runs
        difference = np.abs(baseline.image.astype(int) - parallel.image.astype(int)).max()
        print(f"speedup {baseline.seconds / parallel.seconds:.2f}x; max pixel difference "
              f"{difference} / 255")
    print(f"wrote {out}")
