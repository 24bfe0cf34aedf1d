"""`driffusion bench speed`: DRiffusion latency against sequential sampling on the same devices.

Backends, each measured side by side with sequential sampling in the same run:
- `sim`: `unet_sim` devices behind the embedded Triton, the sampler and pool in this process
  (the `driffusion generate` path). The closed-form model sleeps to a set latency per call, so
  what is left is orchestration: gRPC, the python backend, the sampler.
- `server`: the same devices, the sampler and pool inside the server's `driffusion` model: a
  plain gRPC client asks for whole images, as every other gRPC client does.
- `cpu`: the reference model's ONNX Runtime engines as `unet_cpu<i>` models behind Triton (the
  prompt asking for the digit is encoded once, by the served tokenizer and text encoder).
- `cpu-local`: the same engines as in-process ONNX Runtime sessions (no server, no gRPC): what
  the serving overhead is measured against.
Per mode and window: rounds, measured speedup, ideal speedup (sequential rounds / rounds),
efficiency (measured / ideal) and per-round overhead: wall time per round minus the model time of
the round's largest device call. For `sim` and `server` the model time is what the devices took,
from Triton's statistics of the `unet_sim` model (compute time per execution); for `cpu` it is
the engine's time measured in-process on this machine. Client CPU per device call is this
process's CPU time over the device calls of the run (for `server`, one gRPC call per image).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import positive_int
from models import paths, tensors
from models.limits import MAX_GUIDANCE
from runtime.driffusion import round_pattern

BACKENDS = ("sim", "server", "cpu", "cpu-local")
TRANSPORTS = ("http", "grpc")
TIMED_MODES = ("conservative", "aggressive")
DEFAULT_WINDOWS = (1, 2, 4, 8)
DEFAULT_OUT = paths.output_dir("bench", "speed")
# the goals of the orchestration-overhead issue (#14), checked where a run measured their setting
SIM_TARGET = {"latency_ms": 20.0, "steps": 50, "window": 4, "efficiency": 0.95}
SERVER_TARGET = {"sequential_overhead_ms": 2.0, "aggressive_overhead_ms": 3.0}
CLIENT_CPU_TARGET_MS = 0.5  # client CPU per device call (`sim`: the generate path)
CPU_TARGET = {"devices": 2, "speedup": 1.75}
DEVICE_MODEL = "unet_sim"
MODEL_TIME_CALLS = 30
WARM_UP_STEPS = 8
PROBE_SECONDS = 2.0
_SPIN = ("import time\ncpu, start = time.process_time(), time.perf_counter()\n"
         "while time.perf_counter() - start < {s}: pass\nprint(time.process_time() - cpu)")


@dataclass(frozen=True)
class SpeedSetup:
    """What every run of the benchmark shares."""

    steps: int = 50
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    modes: tuple[str, ...] = TIMED_MODES  # sequential always runs as the baseline
    repeat: int = 5
    guidance: float = 1.0
    scheduler: str = "ddim"
    label: int = 3
    seed: int = 0
    sim_latency_ms: float = 20.0
    cpu_devices: int = 2
    cpu_threads: int = 1
    pin_devices: bool = False
    transport: str = "http"  # how the client path (sim, cpu) calls the devices: http or grpc

    def runs(self) -> list[tuple[str, int]]:
        """(mode, window) of every timed run, the sequential baseline first."""
        return [("sequential", 1)] + [(mode, w) for w in self.windows for mode in self.modes]

    def validate(self) -> None:
        if self.steps < 1 or self.repeat < 1 or self.cpu_devices < 1 or self.cpu_threads < 1:
            raise ValueError("steps, repeat, devices and cpu threads must all be >= 1")
        if not self.windows or min(self.windows) < 1:
            raise ValueError(f"windows must be integers >= 1; got {list(self.windows)}")
        unknown = set(self.modes) - set(TIMED_MODES)
        if unknown:
            raise ValueError(f"modes {sorted(unknown)} are not timed; choose from {TIMED_MODES}")
        if self.sim_latency_ms < 0:
            raise ValueError(f"sim latency must be >= 0 ms; got {self.sim_latency_ms}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}; got {self.transport!r}")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be in 0..{MAX_GUIDANCE:g}; got {self.guidance}")


@dataclass(frozen=True)
class SpeedRecord:
    """One (backend, mode, window), timed `repeat` times."""

    backend: str
    mode: str
    window: int
    lanes: int  # concurrent device calls a round can make
    rounds: int
    items_per_call: int  # items in the largest device call (> 1: the window exceeds the lanes)
    seconds: float  # median
    seconds_runs: list[float]
    ms_per_round: float
    model_ms_per_round: float  # model time of each round's largest call, averaged over rounds
    overhead_ms_per_round: float
    speedup: float  # sequential seconds / seconds
    ideal_speedup: float  # sequential rounds / rounds
    efficiency: float  # speedup / ideal speedup
    cpu_ms_per_step: float  # CPU time of client, server and devices per timestep
    client_cpu_ms_per_step: float  # the part of it spent in this process (sampler, pool, gRPC)
    cores_busy: float  # that CPU time over wall time: how many cores the run kept busy
    device_calls_per_run: float = 0.0  # model calls one image made (0: not counted)
    client_cpu_ms_per_call: float | None = None  # this process's CPU per device call


@dataclass
class BackendResult:
    """Timings of one backend and what they were measured on."""

    backend: str
    description: str
    lanes: int
    model_call_ms: dict[int, float]  # rows per call -> model time, measured in-process
    records: list[SpeedRecord] = field(default_factory=list)
    pinned: dict[str, int] = field(default_factory=dict)  # device model -> CPU
    cores_obtained: float | None = None  # by as many busy processes as usable CPUs, just before
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Timing (any pool)


@dataclass
class Timings:
    """Raw measurements per (mode, window): wall seconds of each run, rounds, CPU seconds."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    rounds: dict[tuple[str, int], int] = field(default_factory=dict)
    cpu_seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # all runs together
    client_cpu_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    device_calls: dict[tuple[str, int], int] = field(default_factory=dict)  # all runs together
    # what the devices took per call, from Triton's statistics (absent: use the backend's table)
    device_ms: dict[tuple[str, int], float] = field(default_factory=dict)

    @classmethod
    def empty(cls, runs: Sequence[tuple[str, int]]) -> Timings:
        return cls({run: [] for run in runs}, {}, dict.fromkeys(runs, 0.0),
                   dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0))

    def add(self, run: tuple[str, int], seconds: float, rounds: int, client_cpu: float,
            server_cpu: float, calls: int) -> None:
        """One timed run: wall seconds, rounds, CPU seconds (this process, the server) and
        device calls."""
        self.seconds[run].append(seconds)
        self.rounds[run] = rounds
        self.client_cpu_seconds[run] += client_cpu
        self.cpu_seconds[run] += client_cpu + server_cpu
        self.device_calls[run] += calls


DeviceStats = Callable[[], tuple[int, float]]  # (device calls, device seconds) so far


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of processes (all their threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def cpu_clock(server_group: int | None = None) -> Callable[[], tuple[float, float]]:
    """(this process, a server's process group if given): CPU seconds used so far. This
    process's count leaves out what reading the server's count from /proc cost it."""
    from triton_models.serve import group_members

    reading = 0.0  # CPU seconds this clock spent reading /proc

    def clock() -> tuple[float, float]:
        nonlocal reading
        start = time.process_time()
        server = process_cpu_seconds(group_members(server_group)) if server_group else 0.0
        end = time.process_time()
        reading += end - start
        return end - reading, server

    return clock


async def time_runs(pool, conditioning, setup: SpeedSetup,
                    progress: Callable[[], None] = lambda: None,
                    clock: Callable[[], tuple[float, float]] | None = None, *,
                    latent_shape: Sequence[int] = (1, 8, 8),
                    scheduler_config: dict[str, Any] | None = None,
                    device_stats: DeviceStats | None = None) -> Timings:
    """Every run `repeat` times, interleaved, after a warm-up: wall time, rounds, CPU time,
    device calls.

    `clock` reads the CPU seconds used so far by (this process, what serves the pool);
    by default this process alone. `latent_shape` [C, H, W] and `scheduler_config` are the
    model's (default: the sim's and the reference model's 8x8 one-channel latents and schedule).
    `device_stats` reads the devices' own count of calls and seconds (Triton's statistics);
    with it, the timings hold what the devices took per call.
    """
    import torch

    from models.reference import SCHEDULER_CONFIG
    from runtime.driffusion import sample
    from runtime.schedulers import make_scheduler

    config = scheduler_config or SCHEDULER_CONFIG

    async def one(mode: str, window: int, steps: int) -> tuple[float, int]:
        scheduler = make_scheduler(setup.scheduler, steps, config)
        noise = torch.randn((1, *latent_shape),
                            generator=torch.Generator().manual_seed(setup.seed))
        before = pool.rounds
        start = time.perf_counter()
        await sample(pool.denoiser(conditioning), scheduler, noise * scheduler.init_noise_sigma,
                     mode=mode, window=window)
        return time.perf_counter() - start, pool.rounds - before

    async def timed(mode: str, window: int) -> tuple[float, int, int]:
        calls = pool.calls
        elapsed, rounds = await one(mode, window, setup.steps)
        return elapsed, rounds, pool.calls - calls

    for mode, window in setup.runs():
        await one(mode, window, min(setup.steps, WARM_UP_STEPS))
    return await repeat_runs(setup, timed, progress, clock or cpu_clock(), device_stats)


async def repeat_runs(setup: SpeedSetup, timed, progress: Callable[[], None],
                      clock: Callable[[], tuple[float, float]],
                      device_stats: DeviceStats | None) -> Timings:
    """`await timed(mode, window)` -> (seconds, rounds, device calls) for every run, `repeat`
    times, interleaved; CPU from `clock`, the devices' own time from `device_stats`."""
    timings = Timings.empty(setup.runs())
    device_seconds = dict.fromkeys(setup.runs(), 0.0)
    stats_calls = dict.fromkeys(setup.runs(), 0)
    for _ in range(setup.repeat):
        for run in setup.runs():
            stats_before = device_stats() if device_stats else (0, 0.0)  # not in the CPU time
            client_before, server_before = clock()
            elapsed, rounds, calls = await timed(*run)
            client_after, server_after = clock()
            if device_stats:
                stats_after = device_stats()
                stats_calls[run] += stats_after[0] - stats_before[0]
                device_seconds[run] += stats_after[1] - stats_before[1]
                calls = calls or stats_after[0] - stats_before[0]
            timings.add(run, elapsed, rounds, client_after - client_before,
                        server_after - server_before, calls)
            progress()
    timings.device_ms = {run: device_seconds[run] * 1000 / stats_calls[run]
                         for run in setup.runs() if stats_calls[run]}
    return timings


def build_records(backend: str, setup: SpeedSetup, lanes: int, timings: Timings,
                  call_ms: Callable[[int], float]) -> list[SpeedRecord]:
    """Speedups, ideal speedups, efficiency and per-round overhead from raw timings.

    `call_ms(rows)` is the model time of one device call with `rows` rows, used where the
    timings hold no time measured by the devices themselves.
    """
    rows_per_item = 2 if setup.guidance != 1.0 else 1  # each item is a cond/uncond pair
    base = statistics.median(timings.seconds[("sequential", 1)])
    base_rounds = timings.rounds[("sequential", 1)]
    records = []
    for (mode, window), runs in timings.seconds.items():
        pattern = round_pattern(mode, window, setup.steps)
        counted = timings.rounds[(mode, window)]
        if len(pattern) != counted:
            raise RuntimeError(f"{backend} {mode} window {window}: the pool counted {counted} "
                               f"rounds, the method has {len(pattern)}")
        cpu_seconds = timings.cpu_seconds[(mode, window)]
        median = statistics.median(runs)
        per_call = [math.ceil(items / lanes) for items in pattern]
        measured = timings.device_ms.get((mode, window))
        model_ms = measured if measured is not None else statistics.fmean(
            call_ms(items * rows_per_item) for items in per_call)
        calls = timings.device_calls.get((mode, window), 0)
        ms_per_round = median * 1000 / len(pattern)
        speedup, ideal = base / median, base_rounds / len(pattern)
        records.append(SpeedRecord(
            backend=backend, mode=mode, window=window, lanes=lanes, rounds=len(pattern),
            items_per_call=max(per_call), seconds=median, seconds_runs=runs,
            ms_per_round=ms_per_round, model_ms_per_round=model_ms,
            overhead_ms_per_round=ms_per_round - model_ms, speedup=speedup,
            ideal_speedup=ideal, efficiency=speedup / ideal,
            cpu_ms_per_step=cpu_seconds * 1000 / (len(runs) * setup.steps),
            client_cpu_ms_per_step=timings.client_cpu_seconds[(mode, window)] * 1000
            / (len(runs) * setup.steps),
            cores_busy=cpu_seconds / sum(runs),
            device_calls_per_run=calls / len(runs),
            client_cpu_ms_per_call=timings.client_cpu_seconds[(mode, window)] * 1000 / calls
            if calls else None,
        ))
    return records


# ---------------------------------------------------------------------------------------------
# Backends


def cores_obtained(workers: int, seconds: float = PROBE_SECONDS) -> float:
    """How many cores `workers` busy processes get here right now (CPU seconds / wall seconds).

    On a shared machine this is what parallel devices can get at most: with two CPU devices
    and 1.1 cores obtained, a parallel round cannot be much faster than a sequential one.
    """
    import subprocess
    import sys

    code = _SPIN.format(s=seconds)
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
    return sum(float(process.communicate()[0]) for process in processes) / seconds


def denoiser_row_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the UNet's inputs for a pipeline spec: the latent and, for a text
    model, the text encoder's states (a class-conditional model's label embedding otherwise)."""
    if spec.text_encoders:
        encoder = spec.text_encoders[0]
        context = (encoder.max_length, encoder.hidden_size)
    else:
        context = (1, spec.num_labels + 1)
    return {tensors.SAMPLE: tuple(spec.latent_shape), tensors.ENCODER_HIDDEN_STATES: context}


def onnx_call_ms(path: Path, threads: int,
                 row_shapes: dict[str, tuple[int, ...]]) -> Callable[[int], float]:
    """Median in-process time of one ONNX Runtime UNet call, by rows (measured once per size).

    `row_shapes`: the shape of one row of each input but the timestep (`denoiser_row_shapes`).
    """
    from runtime.local_devices import ort_session

    session = ort_session(path, threads)

    @cache
    def call_ms(rows: int) -> float:
        feeds = {name: np.zeros((rows, *shape), np.float32) for name, shape in row_shapes.items()}
        feeds[tensors.TIMESTEP] = np.full((rows,), 500.0, np.float32)
        session.run(None, feeds)
        times = []
        for _ in range(MODEL_TIME_CALLS):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    return call_ms


async def encode_condition(pipeline, label: int, guidance: float):
    """The Conditioning of digit `label`, encoded once by the pipeline's models the way a
    request is: by the prompt asking for it ("a handwritten three") for a text-to-image model
    such as the reference, by the label for a class-conditional one (the sim); the negative (the
    empty prompt, the null label) only with guidance."""
    from models.reference import prompt_for
    from runtime.pipeline import GenerationRequest

    if pipeline.spec.uses_prompts:
        request = GenerationRequest(prompt=prompt_for(label), guidance=guidance)
    else:
        request = GenerationRequest(label=label, guidance=guidance)
    return await pipeline.encode(pipeline.resolve(request))


async def _measure_served(endpoint: str, setup: SpeedSetup, progress,
                          clock: Callable[[], tuple[float, float]],
                          spec, device_stats: DeviceStats | None = None) -> tuple[int, Timings]:
    from runtime.generate import connect_pipeline
    from runtime.triton_clients import TritonEndpoints

    async with TritonEndpoints([endpoint]) as connection:
        pipeline = await connect_pipeline(connection, spec=spec)
        conditioning = await encode_condition(pipeline, setup.label, setup.guidance)
        return pipeline.pool.width, await time_runs(
            pipeline.pool, conditioning, setup, progress, clock,
            latent_shape=spec.latent_shape, scheduler_config=spec.scheduler_config,
            device_stats=device_stats)


def client_endpoint(server, setup: SpeedSetup) -> str:
    """The endpoint the client path calls the devices on: the server's HTTP or gRPC port."""
    return server.http_url if setup.transport == "http" else server.grpc_url


def triton_device_stats(client, model: str) -> DeviceStats:
    """(calls, seconds of compute) of `model` so far, from Triton's statistics: what the device
    itself took per request, queueing and transport left out (requests that Triton batched into
    one execution each count that execution's time)."""

    def read() -> tuple[int, float]:
        statistics = client.get_inference_statistics(model, as_json=True)
        calls, nanoseconds = 0, 0
        for stats in statistics.get("model_stats", []):
            inference = stats.get("inference_stats", {})
            calls += int(inference.get("compute_infer", {}).get("count", 0))
            nanoseconds += sum(int(inference.get(part, {}).get("ns", 0))
                               for part in ("compute_input", "compute_infer", "compute_output"))
        return calls, nanoseconds / 1e9

    return read


def _sim_options(setup: SpeedSetup, pipeline_model: bool):
    """The sim devices of the `sim` and `server` backends: one instance (lane) per item of the
    largest window."""
    from triton_models.repository import RepositoryOptions

    return RepositoryOptions(model="sim", devices=max(setup.windows),
                             sim_latency_ms=setup.sim_latency_ms, pipeline_model=pipeline_model)


def measure_sim(setup: SpeedSetup, workdir: Path, progress) -> BackendResult:
    """`unet_sim` behind Triton, the sampler and the pool in this process."""
    import tritonclient.grpc as grpc_client

    from triton_models.serve import serving

    options = _sim_options(setup, pipeline_model=False)
    load_before = list(os.getloadavg())
    with serving(options, workdir / "sim-repository", workdir / "sim-tritonserver.log") as (
            server, repository):
        stats = triton_device_stats(grpc_client.InferenceServerClient(server.grpc_url),
                                    DEVICE_MODEL)
        width, timings = asyncio.run(_measure_served(client_endpoint(server, setup), setup,
                                                     progress, cpu_clock(server.process.pid),
                                                     repository.spec, stats))
    return BackendResult(
        "sim", f"unet_sim behind Triton ({options.devices} instances), "
        f"{setup.sim_latency_ms:g} ms per call; sampler and pool in this process, devices "
        f"called over {setup.transport}",
        width, {1: setup.sim_latency_ms},
        build_records("sim", setup, width, timings, lambda rows: setup.sim_latency_ms),
        load_before=load_before, load_after=list(os.getloadavg()))


def driffusion_inputs(spec, setup: SpeedSetup, mode: str, window: int, steps: int) -> list:
    """A plain tritonclient request for one image of digit `setup.label`: by prompt for a
    text-to-image model, by label for a class-conditional one."""
    from bench.common import infer_inputs
    from models.reference import prompt_for

    condition = ({"PROMPT": np.array([prompt_for(setup.label).encode()], np.object_)}
                 if spec.uses_prompts else {"LABEL": np.array([setup.label], np.int32)})
    return infer_inputs({
        **condition,
        "STEPS": np.array([steps], np.int32),
        "MODE": np.array([mode.encode()], np.object_),
        "WINDOW": np.array([window], np.int32),
        "SEED": np.array([setup.seed], np.int64),
        "GUIDANCE": np.array([setup.guidance], np.float32),
        "SCHEDULER": np.array([setup.scheduler.encode()], np.object_),
    })


def time_server_runs(client, spec, setup: SpeedSetup, progress: Callable[[], None],
                     clock: Callable[[], tuple[float, float]],
                     device_stats: DeviceStats) -> Timings:
    """Every run `repeat` times, interleaved, after a warm-up, each one image asked of the
    `driffusion` model over gRPC: wall time, rounds (its ROUNDS output), CPU, device calls."""
    from runtime.generate import PIPELINE_MODEL

    def one(mode: str, window: int, steps: int) -> tuple[float, int]:
        inputs = driffusion_inputs(spec, setup, mode, window, steps)
        start = time.perf_counter()
        result = client.infer(PIPELINE_MODEL, inputs)
        return time.perf_counter() - start, int(result.as_numpy("ROUNDS")[0])

    async def timed(mode: str, window: int) -> tuple[float, int, int]:
        return (*one(mode, window, setup.steps), 0)  # device calls: from the statistics

    for mode, window in setup.runs():
        one(mode, window, min(setup.steps, WARM_UP_STEPS))
    return asyncio.run(repeat_runs(setup, timed, progress, clock, device_stats))


def measure_server(setup: SpeedSetup, workdir: Path, progress) -> BackendResult:
    """The `driffusion` model over `unet_sim` devices, asked by a plain gRPC client."""
    import tritonclient.grpc as grpc_client

    from triton_models.serve import serving

    options = _sim_options(setup, pipeline_model=True)
    load_before = list(os.getloadavg())
    with serving(options, workdir / "server-repository", workdir / "server-tritonserver.log") as (
            server, repository):
        client = grpc_client.InferenceServerClient(server.grpc_url)
        timings = time_server_runs(client, repository.spec, setup, progress,
                                   cpu_clock(server.process.pid),
                                   triton_device_stats(client, DEVICE_MODEL))
        client.close()
    return BackendResult(
        "server", f"the driffusion model over unet_sim ({options.devices} instances), "
        f"{setup.sim_latency_ms:g} ms per call; a plain gRPC client asks for whole images",
        options.devices, {1: setup.sim_latency_ms},
        build_records("server", setup, options.devices, timings,
                      lambda rows: setup.sim_latency_ms),
        load_before=load_before, load_after=list(os.getloadavg()))


def measure_cpu(setup: SpeedSetup, workdir: Path, progress) -> BackendResult:
    """The reference engines as `unet_cpu<i>` models behind Triton (optionally pinned to CPUs)."""
    from bench.common import ensure_reference_engines
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import serving

    engines = ensure_reference_engines(lambda line: None)
    options = RepositoryOptions(model="reference", devices=setup.cpu_devices,
                                cpu_threads=setup.cpu_threads, pipeline_model=False)
    load_before = list(os.getloadavg())
    with serving(options, workdir / "cpu-repository", workdir / "cpu-tritonserver.log") as (
            server, repository):
        pinned = pin_device_stubs(server, [d.name for d in repository.devices]) \
            if setup.pin_devices else {}
        width, timings = asyncio.run(_measure_served(client_endpoint(server, setup), setup,
                                                     progress, cpu_clock(server.process.pid),
                                                     repository.spec))
    load_after = list(os.getloadavg())
    call_ms = onnx_call_ms(engines.path("unet"), setup.cpu_threads,
                           denoiser_row_shapes(repository.spec))
    return BackendResult(
        "cpu", f"reference ONNX Runtime engines behind Triton, {setup.cpu_devices} unet_cpu "
        f"devices, {setup.cpu_threads} intra-op thread(s) each, called over {setup.transport}",
        width, _call_table(call_ms),
        build_records("cpu", setup, width, timings, call_ms), pinned=pinned,
        load_before=load_before, load_after=load_after)


def local_pipeline(engines, pool):
    """A Pipeline over in-process models: the engine set's tokenizer (its files beside the
    engines), text encoder and VAE decoder as ONNX Runtime sessions, and `pool`."""
    from models.pipeline_spec import SPEC_FILE, PipelineSpec
    from runtime.local_devices import LocalModel, ort_session, session_output_names
    from runtime.pipeline import Pipeline

    spec = PipelineSpec.from_json((engines.directory / SPEC_FILE).read_text())
    models = {}
    for encoder in spec.text_encoders:
        models[encoder.tokenizer] = LocalModel(
            encoder.tokenizer, _tokenize_function(engines.directory / encoder.tokenizer))
    for name in Pipeline.needed_models(spec):
        if name not in models:
            session = ort_session(engines.path(name), 1)
            models[name] = LocalModel(name, lambda session=session, **inputs: dict(zip(
                session_output_names(session), session.run(None, inputs))))
    return Pipeline(spec, pool, models)


def _tokenize_function(directory: Path):
    """The `tokenizer` model in-process: TEXT (bytes [N]) -> input_ids [N, 77], DROPPED [N]."""
    from transformers import AutoTokenizer

    from runtime.pipeline import TOKENIZER_DROPPED, TOKENIZER_TEXT

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    def tokenize(**inputs):
        texts = [bytes(text).decode() for text in inputs[TOKENIZER_TEXT].reshape(-1)]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
        return {tensors.INPUT_IDS: np.array(ids, np.int64),
                TOKENIZER_DROPPED: np.zeros((len(texts), 1), np.int32)}

    return tokenize


def measure_cpu_local(setup: SpeedSetup, workdir: Path, progress) -> BackendResult:
    """The same engines as in-process ONNX Runtime sessions, each in its own worker thread."""
    from bench.common import ensure_reference_engines
    from runtime.local_devices import LocalDevice
    from runtime.pool import DevicePool

    engines = ensure_reference_engines(lambda line: None)
    devices = [LocalDevice.from_onnx(engines.path("unet"), threads=setup.cpu_threads,
                                     name=f"cpu{i}") for i in range(setup.cpu_devices)]
    pool = DevicePool(devices)
    pipeline = local_pipeline(engines, pool)
    load_before = list(os.getloadavg())

    async def measure():
        conditioning = await encode_condition(pipeline, setup.label, setup.guidance)
        return await time_runs(pool, conditioning, setup, progress,
                               latent_shape=pipeline.spec.latent_shape,
                               scheduler_config=pipeline.spec.scheduler_config)

    timings = asyncio.run(measure())
    load_after = list(os.getloadavg())
    call_ms = onnx_call_ms(engines.path("unet"), setup.cpu_threads,
                           denoiser_row_shapes(pipeline.spec))
    return BackendResult(
        "cpu-local", f"the same engines in-process: {setup.cpu_devices} ONNX Runtime sessions "
        "in worker threads, no server", pool.width, _call_table(call_ms),
        build_records("cpu-local", setup, pool.width, timings, call_ms),
        load_before=load_before, load_after=load_after)


def _call_table(call_ms: Callable[[int], float]) -> dict[int, float]:
    return {rows: call_ms(rows) for rows in (1, 2, 4, 8)}


MEASURES: dict[str, Callable[[SpeedSetup, Path, Callable[[], None]], BackendResult]] = {
    "sim": measure_sim,
    "server": measure_server,
    "cpu": measure_cpu,
    "cpu-local": measure_cpu_local,
}


def pin_device_stubs(server, device_names: Sequence[str]) -> dict[str, int]:
    """Pin the python-backend stub process of device i to usable CPU i (round robin).

    Each device then has a core of its own instead of migrating between cores with the
    server and the client; every thread of the stub is pinned.
    """
    from triton_models.serve import group_members

    cpus = sorted(os.sched_getaffinity(0))
    stubs = {_stub_model(pid): pid for pid in group_members(server.process.pid)}
    pinned = {}
    for index, name in enumerate(device_names):
        if name not in stubs:
            raise RuntimeError(f"no stub process found for device model {name}")
        cpu = cpus[index % len(cpus)]
        for task in Path(f"/proc/{stubs[name]}/task").iterdir():
            os.sched_setaffinity(int(task.name), {cpu})
        pinned[name] = cpu
    return pinned


def _stub_model(pid: int) -> str | None:
    """The model a python-backend stub process runs (its first argument is the model.py path)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2 or not argv[0].endswith(b"triton_python_backend_stub"):
        return None
    return Path(argv[1].decode()).parent.parent.name


# ---------------------------------------------------------------------------------------------
# Report


def find(records: Sequence[SpeedRecord], backend: str, mode: str, window: int) -> SpeedRecord | None:
    return next((r for r in records if (r.backend, r.mode, r.window) == (backend, mode, window)),
                None)


def check_targets(results: Sequence[BackendResult], setup: SpeedSetup) -> list[dict[str, Any]]:
    """The speed goals, where this run measured their setting."""
    records = [record for result in results for record in result.records]
    cores = {result.backend: result.cores_obtained for result in results}
    sim_setting = (setup.sim_latency_ms == SIM_TARGET["latency_ms"]
                   and setup.steps == SIM_TARGET["steps"])
    window = SIM_TARGET["window"]
    targets = []

    def target(name: str, value: float, unit: str, met: bool, matches: bool, backend: str):
        targets.append({"name": name, "value": value, "unit": unit, "met": met,
                        "setting_matches": matches, "cores_obtained": cores[backend]})

    for backend, path in (("sim", "the generate path"), ("server", "the driffusion model")):
        aggressive = find(records, backend, "aggressive", window)
        if aggressive is not None:
            target(f"{backend} ({path}), {SIM_TARGET['latency_ms']:g} ms devices, "
                   f"{SIM_TARGET['steps']} steps, window {window}, aggressive: efficiency >= "
                   f"{SIM_TARGET['efficiency']}", aggressive.efficiency, "",
                   aggressive.efficiency >= SIM_TARGET["efficiency"], sim_setting, backend)
    goals = (("sequential", 1, SERVER_TARGET["sequential_overhead_ms"]),
             ("aggressive", window, SERVER_TARGET["aggressive_overhead_ms"]))
    for mode, run_window, limit in goals:
        record = find(records, "server", mode, run_window)
        if record is not None:  # above the set latency, as the goal was measured
            overhead = record.ms_per_round - setup.sim_latency_ms
            target(f"server, {mode} window {run_window}: ms per round above the "
                   f"{setup.sim_latency_ms:g} ms devices <= {limit:g}", overhead, " ms",
                   overhead <= limit, sim_setting, "server")
    client = [r for r in records if r.backend == "sim" and r.client_cpu_ms_per_call is not None]
    if client:
        worst = max(client, key=lambda r: r.client_cpu_ms_per_call)
        target(f"sim (the generate path): client CPU per device call <= {CLIENT_CPU_TARGET_MS:g} "
               f"ms (worst run: {worst.mode} window {worst.window})",
               worst.client_cpu_ms_per_call, " ms",
               worst.client_cpu_ms_per_call <= CLIENT_CPU_TARGET_MS, True, "sim")
    cpu = find(records, "cpu", "aggressive", setup.cpu_devices)
    if cpu is not None:
        target(f"real CPU, {CPU_TARGET['devices']} devices, aggressive (window = devices): "
               f">= {CPU_TARGET['speedup']}x sequential", cpu.speedup, "x",
               cpu.speedup >= CPU_TARGET["speedup"], setup.cpu_devices == CPU_TARGET["devices"],
               "cpu")
    return targets


def format_backend(result: BackendResult, setup: SpeedSetup) -> str:
    header = (f"{'mode':<13}{'window':>6}{'rounds':>7}{'items/call':>11}{'ms/round':>10}"
              f"{'model ms':>9}{'overhead':>9}{'seconds':>9}{'speedup':>9}{'ideal':>7}"
              f"{'efficiency':>11}{'CPU ms/step':>12}{'client':>7}{'cores':>6}"
              f"{'calls':>7}{'client ms/call':>15}")
    lines = [f"{result.backend}: {result.description}; {result.lanes} lane(s); "
             f"{setup.steps} {setup.scheduler.upper()} steps, guidance {setup.guidance:g}, "
             f"median of {setup.repeat}; load {result.load_before[0]:.1f} -> "
             f"{result.load_after[0]:.1f}, {result.cores_obtained:.2f} cores obtainable"
             + (f"; pinned {result.pinned}" if result.pinned else ""),
             header]
    for r in result.records:
        lines.append(
            f"{r.mode:<13}{r.window:>6}{r.rounds:>7}{r.items_per_call:>11}{r.ms_per_round:>10.2f}"
            f"{r.model_ms_per_round:>9.2f}{r.overhead_ms_per_round:>9.2f}{r.seconds:>9.3f}"
            f"{r.speedup:>8.2f}x{r.ideal_speedup:>6.2f}x{r.efficiency:>11.2f}"
            f"{r.cpu_ms_per_step:>12.2f}{r.client_cpu_ms_per_step:>7.2f}{r.cores_busy:>6.2f}"
            f"{r.device_calls_per_run:>7.0f}" + (f"{r.client_cpu_ms_per_call:>15.3f}"
                                                 if r.client_cpu_ms_per_call is not None else "")
        )
    if result.backend in ("sim", "server"):
        lines.append("  model ms: what the unet_sim devices took per call (Triton's statistics); "
                     "overhead: ms/round above it")
    if any(r.items_per_call > 1 for r in result.records):
        lines.append(f"  windows above {result.lanes} lanes put several items in one device call "
                     "(items/call): those rounds cost a batched call, not one item's")
    return "\n".join(lines)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["targets:"]
    for target in targets:
        verdict = "met" if target["met"] else "MISSED"
        note = "" if target["setting_matches"] else " (this run's setting differs from the target's)"
        if target["cores_obtained"] is not None:
            note += (f" [busy processes got {target['cores_obtained']:.2f} of "
                     f"{len(os.sched_getaffinity(0))} cores just before]")
        lines.append(f"  {target['name']}: {target['value']:.2f}{target['unit']} {verdict}{note}")
    return "\n".join(lines)


def plot(results: Sequence[BackendResult], setup: SpeedSetup, path: Path) -> None:
    """Speedup against window: one line per mode, its ideal (from rounds) dashed; one panel
    per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    colours = {"conservative": "tab:blue", "aggressive": "tab:red"}
    for axis, result in zip(axes[0], results):
        for mode in setup.modes:
            mine = sorted((r for r in result.records if r.mode == mode), key=lambda r: r.window)
            windows = [r.window for r in mine]
            axis.plot(windows, [r.speedup for r in mine], "o-", color=colours[mode],
                      label=f"{mode} measured")
            axis.plot(windows, [r.ideal_speedup for r in mine], "--", color=colours[mode],
                      alpha=0.6, label=f"{mode} ideal (rounds)")
        axis.axhline(1.0, color="gray", linewidth=1, label="sequential")
        axis.axvline(result.lanes, color="gray", linestyle=":", linewidth=1, label="lanes")
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(setup.windows), [str(w) for w in setup.windows])
        axis.set_xlabel("window (items per round)")
        axis.set_ylabel("speedup over sequential")
        axis.set_title(f"{result.backend}: {result.lanes} lanes", fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"DRiffusion speed, {setup.steps} steps, guidance {setup.guidance:g}",
                    fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# The command


def run_benchmark(setup: SpeedSetup, backends: Sequence[str], out: Path) -> dict[str, Any]:
    """Measure every backend; returns the JSON-ready results (also written to speed.json)."""
    from tqdm import tqdm

    from bench.common import machine_info

    setup.validate()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    machine = machine_info()
    with tqdm(total=len(backends) * setup.repeat * len(setup.runs()), unit="run") as bar:
        for backend in backends:
            bar.set_description(f"bench speed {backend}: CPU probe")
            cores = cores_obtained(machine["usable_cpus"])
            bar.set_description(f"bench speed {backend}")
            result = MEASURES[backend](setup, out, lambda: bar.update())
            result.cores_obtained = cores
            results.append(result)
    report = {
        "setup": asdict(setup),
        "machine": machine,
        "backends": [asdict(result) for result in results],
        "targets": check_targets(results, setup),
    }
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    return {"report": report, "results": results}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "speed",
        help="latency of sequential, conservative and aggressive sampling per window",
        description="Times sequential, conservative and aggressive sampling for each window on "
        "unet_sim devices behind Triton (set latency) with the sampler in this process (sim) and "
        "inside the server's driffusion model asked by a plain gRPC client (server), on the "
        "reference model's ONNX Runtime devices behind Triton (cpu) and on the same engines "
        "in-process (cpu-local); reports rounds, speedup, ideal speedup from rounds, efficiency, "
        "per-round overhead above the devices' own time and the client's CPU per device call. "
        "Writes speed.json and speed.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="what to time: sim (sampler in this process), server (the "
                        "driffusion model), cpu (ONNX Runtime devices behind Triton), cpu-local "
                        "(the same engines in-process)")
    parser.add_argument("--windows", nargs="+", type=positive_int, default=list(DEFAULT_WINDOWS),
                        help="DRiffusion windows (items per round)")
    parser.add_argument("--modes", nargs="+", choices=TIMED_MODES, default=list(TIMED_MODES),
                        help="modes timed against sequential")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    parser.add_argument("--repeat", type=positive_int, default=5,
                        help="timed runs of each setting (interleaved); the median is reported")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance (1: no uncond half, one row per item)")
    parser.add_argument("--sim-latency-ms", type=float, default=20.0,
                        help="wall time of one unet_sim call")
    parser.add_argument("--devices", type=positive_int, default=2,
                        help="unet_cpu devices (cpu and cpu-local backends)")
    parser.add_argument("--cpu-threads", type=positive_int, default=1,
                        help="ONNX Runtime intra-op threads per CPU device")
    parser.add_argument("--transport", choices=TRANSPORTS, default="http",
                        help="how the client path (sim, cpu) calls the devices: Triton's HTTP "
                        "port (HTTP/1.1, binary tensors) or its gRPC port")
    parser.add_argument("--pin-devices", action="store_true",
                        help="pin each unet_cpu stub process to a CPU of its own")
    parser.add_argument("--label", type=int, default=3,
                        help="digit to sample (the reference model is asked for it by prompt, "
                        "'a handwritten three')")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip speed.png")
    parser.set_defaults(run=run)


def setup_from_args(args: argparse.Namespace) -> SpeedSetup:
    return SpeedSetup(
        steps=args.steps, windows=tuple(sorted(set(args.windows))), modes=tuple(args.modes),
        repeat=args.repeat, guidance=args.guidance, label=args.label, seed=args.seed,
        sim_latency_ms=args.sim_latency_ms, cpu_devices=args.devices,
        cpu_threads=args.cpu_threads, pin_devices=args.pin_devices, transport=args.transport,
    )


def run(args: argparse.Namespace) -> int:
    from bench.common import run_stopping_servers
    from engines.build import EngineBuildError
    from runtime.device import DeviceError
    from runtime.pool import PoolError
    from runtime.triton_clients import DiscoveryError
    from triton_models.serve import ServerError

    setup = setup_from_args(args)
    outcome = run_stopping_servers(
        lambda: run_benchmark(setup, args.backends, args.out),
        (ValueError, ServerError, EngineBuildError, DiscoveryError, DeviceError, PoolError,
         FileNotFoundError))
    if isinstance(outcome, int):
        return outcome
    for result in outcome["results"]:
        print()
        print(format_backend(result, setup))
    print()
    print(format_targets(outcome["report"]["targets"]))
    written = [args.out / "speed.json"]
    if not args.no_plot:
        plot(outcome["results"], setup, args.out / "speed.png")
        written.append(args.out / "speed.png")
    print(f"wrote {' and '.join(map(str, written))}")
    return 0
