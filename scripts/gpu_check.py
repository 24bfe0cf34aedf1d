"""Measure the GPU path in one run: UNet latency, single-GPU DRiffusion, Triton and TensorRT.

Run on a GPU machine (`bash scripts/gpu_run.sh` there, `make gpu-check` here) or, with
`--dry-run`, on the CPU with tiny shapes so the same code paths can be tested without a GPU.
Every section is independent: a failure is recorded with its error and the next section runs.
DIR/gpu_check.json is rewritten after every section, so a run cut short still leaves numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from typing_extensions import Self

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LOG = logging.getLogger("gpu_check")
SECTIONS = ("environment", "unet", "driffusion", "triton", "tensorrt")
TRITON_MODEL_FILE = SCRIPTS_DIR / "gpu_check_triton_model.py"
UNET_IO_NAMES = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUT_NAME = "out_sample"
EXTRA_LIBS_DIR = "driffusion_extra_libs"  # where pack_triton.sh puts a carried libpython

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json): 860 M params.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# Stable Diffusion 1.5's scheduler settings, as DDIM with eta 0.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Profile:
    """Shapes and repetition counts of one kind of run."""

    name: str
    unet_config: dict
    context_tokens: int
    batches: tuple[int, ...]
    steps: int
    windows: tuple[int, ...]
    warmup: int
    repeats: int
    sample_repeats: int
    dtype: str
    triton_instances: int
    cpu_threads: int | None = None  # torch threads per process on the CPU (None: torch's choice)
    guidance: float = 7.5
    # Least seconds left for a section to start (a section also stops its loops early).
    section_min_s: dict = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet_config["sample_size"]
        return (self.unet_config["in_channels"], size, size)

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.context_tokens, self.unet_config["cross_attention_dim"])


FULL = Profile(
    name="sd15", unet_config=SD15_UNET, context_tokens=77, batches=(1, 2, 4, 8, 16), steps=50,
    windows=(2, 4, 8), warmup=3, repeats=10, sample_repeats=3, dtype="float16",
    triton_instances=2,
    section_min_s={"unet": 20, "driffusion": 30, "triton": 60, "tensorrt": 240},
)
DRY = Profile(
    name="tiny", unet_config=TINY_UNET, context_tokens=8, batches=(1, 2, 4), steps=8,
    windows=(4,), warmup=1, repeats=3, sample_repeats=1, dtype="float32", triton_instances=2,
    cpu_threads=1,
    section_min_s={"unet": 1, "driffusion": 1, "triton": 5, "tensorrt": 5},
)


class SkipSection(Exception):
    """A section that cannot run here; the reason (and any partial result) is recorded."""

    def __init__(self, reason: str, result: dict | None = None) -> None:
        super().__init__(reason)
        self.result = result or {}


class Deadline:
    """The run's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


# ---------------------------------------------------------------------------------------------
# The UNet, eager or by CUDA-graph replay


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def build_unet(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A UNet2DConditionModel with seeded random weights, created directly on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no full-size fp32 copy
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    return unet.eval().requires_grad_(False)


@dataclass
class _Graph:
    """One captured UNet call with its static input and output buffers."""

    graph: Any
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    output: torch.Tensor

    def replay(self, sample, timestep, context) -> torch.Tensor:
        self.sample.copy_(sample)
        self.timestep.copy_(timestep)
        self.context.copy_(context)
        self.graph.replay()
        # Graphs share one memory pool: the output must be copied before another replays.
        return self.output.clone()


class UNetRunner:
    """One UNet on one device: `runner(sample, timestep, context)`, eager or by CUDA graphs.

    With graphs, one graph is captured per row count on first use; if a capture fails the
    runner records why and stays eager from then on.
    """

    def __init__(self, config: dict, device: str, dtype: torch.dtype,
                 context_tokens: int, cuda_graphs: bool) -> None:
        started = time.perf_counter()
        self.unet = build_unet(config, device, dtype)
        self.build_s = time.perf_counter() - started
        self.device = torch.device(device)
        self.dtype = dtype
        self.sample_shape = (config["in_channels"], config["sample_size"], config["sample_size"])
        self.context_shape = (context_tokens, config["cross_attention_dim"])
        self.graphs: dict[int, _Graph] = {}
        self.graph_error: str | None = None
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        if cuda_graphs and not self.use_graphs:
            self.graph_error = "CUDA graphs need a CUDA device"
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @property
    def kind(self) -> str:
        return "cuda_graph" if self.use_graphs else "eager"

    @property
    def parameters_m(self) -> float:
        return sum(p.numel() for p in self.unet.parameters()) / 1e6

    def inputs(self, rows: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
        """Random inputs of `rows` rows on the runner's device."""
        generator = torch.Generator(self.device).manual_seed(seed)
        options = {"device": self.device, "dtype": self.dtype, "generator": generator}
        sample = torch.randn((rows, *self.sample_shape), **options)
        context = torch.randn((rows, *self.context_shape), **options)
        timestep = torch.full((rows,), 500.0, device=self.device)
        return sample, timestep, context

    @torch.no_grad()
    def eager(self, sample, timestep, context) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, sample, timestep, context) -> torch.Tensor:
        graph = self.graph(sample.shape[0]) if self.use_graphs else None
        if graph is None:
            return self.eager(sample, timestep, context)
        return graph.replay(sample, timestep, context)

    def graph(self, rows: int) -> _Graph | None:
        """The graph for `rows` rows, captured now if needed (None once graphs failed)."""
        if rows not in self.graphs and self.use_graphs:
            try:
                self.graphs[rows] = self._capture(rows)
            except Exception as error:  # noqa: BLE001 - any capture failure means "use eager"
                self.use_graphs = False
                self.graph_error = f"capture at {rows} rows: {type(error).__name__}: {error}"
                LOG.warning("CUDA graphs disabled: %s", self.graph_error)
        return self.graphs.get(rows) if self.use_graphs else None

    @torch.no_grad()
    def _capture(self, rows: int) -> _Graph:
        sample, timestep, context = self.inputs(rows)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager(sample, timestep, context)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.eager(sample, timestep, context)
        return _Graph(graph, sample, timestep, context, output)

    def prepare(self, row_counts) -> None:
        """Capture (or, eager, warm up) every row count before anything is timed."""
        for rows in sorted(set(row_counts)):
            self(*self.inputs(rows))
        synchronize(self.device)

    @torch.no_grad()
    def run_host(self, sample: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        """The UNet on host tensors (the Triton model's entry): a contiguous host answer."""
        output = self(sample.to(self.device, self.dtype),
                      timestep.to(self.device, torch.float32),
                      context.to(self.device, self.dtype))
        return output.to("cpu", sample.dtype).contiguous()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn: Callable[[], Any], device: torch.device, warmup: int,
               repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of fn after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def summary_ms(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "all_ms": [round(value, 3) for value in times]}


# ---------------------------------------------------------------------------------------------
# Shared state of one run


@dataclass
class Check:
    """What every section gets: options, profile, budget and the lazily built UNet."""

    out: Path
    profile: Profile
    device: torch.device
    deadline: Deadline
    cuda_graphs: bool
    triton_instances: int
    shared: dict = field(default_factory=dict)

    def runner(self) -> UNetRunner:
        if "runner" not in self.shared:
            LOG.info("building the %s UNet on %s (%s)", self.profile.name, self.device,
                     self.profile.dtype)
            self.shared["runner"] = UNetRunner(
                self.profile.unet_config, str(self.device), torch_dtype(self.profile.dtype),
                self.profile.context_tokens, self.cuda_graphs,
            )
        return self.shared["runner"]

    def conditioning(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded stand-ins for the text embeddings: (cond, uncond), each [1, S, D]."""
        generator = torch.Generator("cpu").manual_seed(7)
        cond, uncond = torch.randn((2, 1, *self.profile.context_shape), generator=generator)
        return cond, uncond

    def latents(self, scheduler) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(42)
        noise = torch.randn((1, *self.profile.latent_shape), generator=generator)
        return noise * scheduler.init_noise_sigma

    def stop_early(self, reserve_s: float) -> bool:
        return self.deadline.remaining() < reserve_s


def make_scheduler(steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


# ---------------------------------------------------------------------------------------------
# a. environment


def section_environment(check: Check) -> dict:
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: package_version(name) for name in (
            "numpy", "diffusers", "transformers", "onnx", "onnxruntime", "tritonclient",
            "grpcio", "protobuf", "tensorrt")},
        "tensorrt_present": importlib.util.find_spec("tensorrt") is not None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
    result["nvidia_smi"] = nvidia_smi()
    try:
        install = locate_triton()
        result["triton"] = {"server": str(install.server), "libpython": str(install.libpython)}
    except SkipSection as reason:
        result["triton"] = {"missing": str(reason)}
    return result


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict | None:
    """GPU name, driver and memory as nvidia-smi reports them (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,driver_version,memory.total,compute_cap"
    try:
        answer = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (subprocess.SubprocessError, OSError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"gpus": [dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
                     for line in answer]}


# ---------------------------------------------------------------------------------------------
# b. UNet latency


def section_unet(check: Check) -> dict:
    runner = check.runner()
    profile = check.profile
    result: dict[str, Any] = {
        "config": profile.name, "dtype": profile.dtype, "build_s": round(runner.build_s, 2),
        "parameters_m": round(runner.parameters_m, 1),
        "latent": list(runner.sample_shape), "context": list(runner.context_shape),
        "batches": {},
    }
    for batch in profile.batches:
        if check.stop_early(profile.section_min_s["driffusion"] + 10):
            result["truncated"] = "budget"
            break
        result["batches"][str(batch)] = unet_batch_latency(check, runner, batch)
        LOG.info("unet batch %d: %s", batch, {k: v.get("median_ms") for k, v in
                                              result["batches"][str(batch)].items()
                                              if isinstance(v, dict)})
    result["cuda_graphs"] = runner.kind == "cuda_graph"
    result["cuda_graph_error"] = runner.graph_error
    if check.device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def unet_batch_latency(check: Check, runner: UNetRunner, batch: int) -> dict:
    profile = check.profile
    inputs = runner.inputs(batch)
    eager = summary_ms(measure_ms(lambda: runner.eager(*inputs), check.device,
                                  profile.warmup, profile.repeats))
    entry: dict[str, Any] = {"eager": eager,
                             "images_per_s_eager": round(batch * 1e3 / eager["median_ms"], 2)}
    graph = runner.graph(batch) if runner.use_graphs else None
    if graph is not None:
        replay = summary_ms(measure_ms(lambda: graph.replay(*inputs), check.device,
                                       profile.warmup, profile.repeats))
        reference = runner.eager(*inputs).float()
        entry["cuda_graph"] = replay
        entry["images_per_s_graph"] = round(batch * 1e3 / replay["median_ms"], 2)
        entry["graph_max_abs_diff"] = float((graph.replay(*inputs).float() - reference)
                                            .abs().max())
    return entry


# ---------------------------------------------------------------------------------------------
# c. single-GPU DRiffusion, each round batched into one UNet call


class BatchedDenoiser:
    """The sampler's `denoise`: one round is ONE UNet call; CFG doubles its rows."""

    def __init__(self, runner: UNetRunner, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance: float) -> None:
        self.runner = runner
        self.cond = cond.to(runner.device, runner.dtype)
        self.uncond = uncond.to(runner.device, runner.dtype)
        self.guidance = guidance
        self.calls = 0

    @property
    def uses_cfg(self) -> bool:
        return self.guidance != 1.0

    def rows(self, items: int) -> int:
        return items * self.cond.shape[0] * (2 if self.uses_cfg else 1)

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        items = x.shape[0] // self.cond.shape[0]
        sample = x.to(self.runner.device, self.runner.dtype)
        timestep = t.to(self.runner.device, torch.float32, non_blocking=True)
        context = self.cond.repeat(items, 1, 1)
        if not self.uses_cfg:
            return self.runner(sample, timestep, context).to(x.dtype)
        uncond = self.uncond.repeat(items, 1, 1)
        output = self.runner(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                             torch.cat([uncond, context])).to(x.dtype)
        low, high = output.chunk(2)
        return low + self.guidance * (high - low)


def mode_plan(profile: Profile) -> list[tuple[str, int]]:
    return [("sequential", 1)] + [("aggressive", window) for window in profile.windows]


async def timed_sample(denoise, check: Check, mode: str, window: int,
                       device: torch.device) -> tuple[float, torch.Tensor]:
    """Wall-clock seconds of one DRiffusion sampling run and its final latents."""
    from runtime.driffusion import sample

    scheduler = make_scheduler(check.profile.steps)
    latents = check.latents(scheduler).to(device)
    started = time.perf_counter()
    final = await sample(denoise, scheduler, latents, mode=mode, window=window)
    synchronize(device)
    return time.perf_counter() - started, final.float().cpu()


def compare(final: torch.Tensor, baseline: torch.Tensor | None) -> dict:
    entry = {"finite": bool(torch.isfinite(final).all())}
    if baseline is not None:
        delta = (final - baseline).abs()
        entry["max_abs_diff_vs_sequential"] = float(delta.max())
        entry["rms_diff_vs_sequential"] = float(delta.pow(2).mean().sqrt())
        entry["sequential_abs_max"] = float(baseline.abs().max())
    return entry


def section_driffusion(check: Check) -> dict:
    from runtime.driffusion import round_pattern

    runner = check.runner()
    profile = check.profile
    cond, uncond = check.conditioning()
    result: dict[str, Any] = {"backend": runner.kind, "scheduler": "DDIM", "steps": profile.steps,
                              "guidance": profile.guidance, "latent_batch": 1, "runs": []}
    for guidance in (1.0, profile.guidance):
        denoiser = BatchedDenoiser(runner, cond, uncond, guidance)
        baseline_s = baseline = None
        for mode, window in mode_plan(profile):
            if check.stop_early(10):
                result["truncated"] = "budget"
                return result
            pattern = round_pattern(mode, window, profile.steps)
            runner.prepare(denoiser.rows(items) for items in pattern)
            denoiser.calls = 0
            times, final = [], None
            for _ in range(profile.sample_repeats):
                seconds, final = asyncio.run(timed_sample(denoiser, check, mode, window,
                                                          runner.device))
                times.append(seconds)
            median_s = statistics.median(times)
            if mode == "sequential":
                baseline_s, baseline = median_s, final
                check.shared[f"sequential_cfg{guidance != 1.0:d}"] = final
            run = {"cfg": guidance != 1.0, "mode": mode, "window": window,
                   "rounds": len(pattern), "unet_calls": denoiser.calls // profile.sample_repeats,
                   "max_rows_per_call": denoiser.rows(max(pattern)),
                   "seconds": round(median_s, 4), "all_s": [round(s, 4) for s in times],
                   "speedup_vs_sequential": round(baseline_s / median_s, 3),
                   **compare(final, None if mode == "sequential" else baseline)}
            result["runs"].append(run)
            LOG.info("driffusion cfg=%s %s w%d: %.3f s, %d rounds, speedup %.2f", run["cfg"],
                     mode, window, median_s, run["rounds"], run["speedup_vs_sequential"])
    result["backend"] = runner.kind  # a graph failure mid-section turns it eager
    return result


# ---------------------------------------------------------------------------------------------
# d. the same through a Triton server (python-backend model running the PyTorch UNet)


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver with the python backend, as nvidia-pytriton lays it out."""

    server: Path
    libs: Path
    backend: Path
    stub: Path
    libpython: Path


def locate_triton() -> TritonInstall:
    """Find nvidia-pytriton's server on sys.path (installed, or unpacked from triton-min)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for entry in map(Path, filter(None, sys.path)):
        home = entry / "pytriton" / "tritonserver"
        if (home / "bin" / "tritonserver").is_file():
            stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not stub.is_file():
                raise SkipSection(f"{home} has no python backend stub for Python {version}")
            return TritonInstall(home / "bin" / "tritonserver", entry / "nvidia_pytriton.libs",
                                 home / "backends" / "python", stub,
                                 find_libpython(version, entry / EXTRA_LIBS_DIR))
    raise SkipSection("no tritonserver on sys.path: install nvidia-pytriton, or carry "
                      ".whl/triton-min.tar.xz (scripts/pack_triton.sh) and unpack it on PYTHONPATH")


def find_libpython(version: str, carried: Path) -> Path:
    """The shared libpython the backend stub links against: this Python's own, else carried."""
    name = f"libpython{version}.so.1.0"
    folders = (sysconfig.get_config_var("LIBDIR"), Path(sys.base_prefix) / "lib",
               "/usr/lib/x86_64-linux-gnu", carried)
    for folder in folders:
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    raise SkipSection(f"{name} not found (this Python is not a shared build and none was carried)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_config(name: str, profile: Profile, device: str, instances: int,
                 cuda_graphs: bool) -> str:
    """config.pbtxt of the check's UNet as a python-backend model."""
    dtype = {"float16": "TYPE_FP16", "float32": "TYPE_FP32"}[profile.dtype]
    channels, height, width = profile.latent_shape
    tokens, dim = profile.context_shape
    parameters = {
        "scripts_dir": str(SCRIPTS_DIR), "unet_config": json.dumps(profile.unet_config),
        "device": device, "dtype": profile.dtype, "context_tokens": str(tokens),
        "cuda_graphs": "1" if cuda_graphs else "0", "cpu_threads": str(profile.cpu_threads or 0),
    }
    params = "\n".join(
        f"  {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }},"
        for key, value in parameters.items()
    ).rstrip(",")
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "sample" data_type: {dtype} dims: [ -1, {channels}, {height}, {width} ] }},
  {{ name: "timestep" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "encoder_hidden_states" data_type: {dtype} dims: [ -1, {tokens}, {dim} ] }}
]
output [
  {{ name: "{UNET_OUTPUT_NAME}" data_type: {dtype} dims: [ -1, {channels}, {height}, {width} ] }}
]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters [
{params}
]
"""


def write_model_repository(root: Path, install: TritonInstall, check: Check) -> str:
    """Model repository + python backend dir under root; returns the model's name."""
    name = f"unet_{'gpu' if check.device.type == 'cuda' else 'cpu'}0"
    version_dir = root / "models" / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TRITON_MODEL_FILE, version_dir / "model.py")
    (root / "models" / name / "config.pbtxt").write_text(model_config(
        name, check.profile, str(check.device), check.triton_instances, check.cuda_graphs))
    backend = root / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (install.backend / "libtriton_python.so",
                   install.backend / "triton_python_backend_utils.py", install.stub):
        shutil.copy2(source, backend / source.name)
    write_stub_environment(root / "stubenv")
    return name


def write_stub_environment(venv: Path) -> None:
    """A tiny venv whose site-packages points at every folder on this process's sys.path.

    The backend stub embeds Python with an isolated config (PYTHONPATH and PYTHONHOME are
    ignored) and takes its prefix from the first `python3` on PATH; with this venv first on
    the server's PATH, the stub imports exactly what this process imports (carried wheels,
    this repository, the torch install) on the host's own standard library.
    """
    base = Path(getattr(sys, "_base_executable", sys.executable))
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = site_packages / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    (venv / "bin").mkdir(exist_ok=True)
    (venv / "bin" / "python3").unlink(missing_ok=True)
    (venv / "bin" / "python3").symlink_to(base)
    (venv / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\n"
        f"version = {platform.python_version()}\n")
    folders = [entry for entry in sys.path if entry and Path(entry).is_dir()]
    (site_packages / "gpu_check.pth").write_text("\n".join(folders) + "\n")


class TritonServer:
    """A tritonserver process on 127.0.0.1 with free ports; `with` starts and always stops it."""

    def __init__(self, install: TritonInstall, root: Path, log_path: Path,
                 ready_timeout_s: float) -> None:
        self.install = install
        self.root = root
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.grpc_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        # setpriv: the server gets SIGTERM if this process dies without stopping it.
        setpriv = shutil.which("setpriv")
        return [
            *([setpriv, "--pdeathsig", "TERM"] if setpriv else []),
            str(self.install.server),
            f"--model-repository={self.root / 'models'}",
            f"--backend-directory={self.root / 'backends'}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--allow-http=false", "--allow-metrics=false", "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",  # the config is complete: saves a stub launch
            "--backend-config=python,stub-timeout-seconds=300",
            f"--backend-config=python,shm-region-prefix-name=gpu_check_{os.getpid()}_",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        """Library paths, and a PATH whose first `python3` is the stub environment's."""
        env = dict(os.environ)
        libs = [str(self.install.libpython.parent), str(self.install.libs)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
        env["PATH"] = os.pathsep.join([str(self.root / "stubenv" / "bin"), env.get("PATH", "")])
        return env

    def __enter__(self) -> Self:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.environment(), start_new_session=True)
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.endpoint)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}: "
                                       f"{self.log_tail()}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2.0):
                        return
                time.sleep(0.5)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s: "
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # backend stubs left in our own group


def section_triton(check: Check) -> dict:
    install = locate_triton()
    try:
        import tritonclient.grpc.aio  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "cannot talk to Triton"
        raise SkipSection(f"tritonclient[grpc] does not import: {type(error).__name__}: {error}")
    root = Path(tempfile.mkdtemp(prefix="gpu_check_triton_"))
    try:
        name = write_model_repository(root, install, check)
        ready_s = 90 if check.profile is DRY else 240
        started = time.perf_counter()
        with TritonServer(install, root, check.out / "tritonserver.log",
                          min(ready_s, check.deadline.remaining() - 10)) as server:
            start_s = time.perf_counter() - started
            LOG.info("tritonserver ready on %s in %.1f s", server.endpoint, start_s)
            result = asyncio.run(measure_triton(check, server.endpoint))
        return {"model": name, "instances": check.triton_instances, "server_start_s":
                round(start_s, 1), "libpython": str(install.libpython), **result}
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def measure_triton(check: Check, endpoint: str) -> dict:
    from runtime.devices import DevicePool, TritonEndpoints
    from runtime.driffusion import round_pattern

    profile = check.profile
    cond, uncond = check.conditioning()
    async with TritonEndpoints([endpoint]) as connection:
        devices = await connection.devices("unet_*", deadline_s=120.0)
        await warm_up_triton(devices[0], profile)
        result: dict[str, Any] = {"call_latency": await triton_call_latency(devices[0], profile),
                                  "runs": []}
        for guidance in (1.0, profile.guidance):
            baseline_s = baseline = None
            for mode, window in mode_plan(profile):
                for placement in ("batched",) if mode == "sequential" else ("batched", "spread"):
                    if check.stop_early(10):
                        result["truncated"] = "budget"
                        return result
                    pool = DevicePool(devices, batched=placement == "batched")
                    pool.condition(cond, uncond, guidance)
                    times, final = [], None
                    for _ in range(min(profile.sample_repeats, 2)):
                        seconds, final = await timed_sample(pool, check, mode, window,
                                                            torch.device("cpu"))
                        times.append(seconds)
                    median_s = statistics.median(times)
                    if mode == "sequential":
                        baseline_s, baseline = median_s, final
                    run = {"cfg": guidance != 1.0, "mode": mode, "window": window,
                           "placement": placement,
                           "rounds": len(round_pattern(mode, window, profile.steps)),
                           "requests": pool.calls // len(times), "seconds": round(median_s, 4),
                           "all_s": [round(s, 4) for s in times],
                           "speedup_vs_sequential": round(baseline_s / median_s, 3),
                           **compare(final, None if mode == "sequential" else baseline)}
                    in_process = check.shared.get(f"sequential_cfg{guidance != 1.0:d}")
                    if mode == "sequential" and in_process is not None:
                        run["max_abs_diff_vs_in_process"] = float((final - in_process).abs().max())
                    result["runs"].append(run)
                    LOG.info("triton cfg=%s %s w%d %s: %.3f s, speedup %.2f", run["cfg"], mode,
                             window, placement, median_s, run["speedup_vs_sequential"])
    return result


def triton_rows(profile: Profile, lanes: int) -> list[int]:
    """Every row count a Triton run sends: a round whole or split over the lanes, x2 for CFG."""
    from runtime.devices import split_evenly
    from runtime.driffusion import round_pattern

    items = set()
    for mode, window in mode_plan(profile):
        for count in round_pattern(mode, window, profile.steps):
            items.add(count)
            items.update(len(chunk) for chunk in split_evenly(range(count), lanes) if chunk)
    return sorted({count * halves for count in items for halves in (1, 2)})


def random_rows(profile: Profile, rows: int) -> tuple[np.ndarray, ...]:
    generator = np.random.default_rng(rows)
    return (generator.standard_normal((rows, *profile.latent_shape), dtype=np.float32),
            np.full((rows,), 500.0, dtype=np.float32),
            generator.standard_normal((rows, *profile.context_shape), dtype=np.float32))


async def warm_up_triton(device, profile: Profile) -> None:
    """Let every instance see every row count (CUDA-graph capture happens on first use)."""
    for rows in triton_rows(profile, device.instances):
        inputs = random_rows(profile, rows)
        for _ in range(2):
            await asyncio.gather(*(device(*inputs) for _ in range(device.instances)))


async def triton_call_latency(device, profile: Profile) -> dict:
    """Round-trip milliseconds of single requests (gRPC + python backend + UNet)."""
    latency = {}
    for rows in sorted({1, 2 * max(profile.windows)}):
        inputs = random_rows(profile, rows)
        times = []
        for _ in range(profile.repeats):
            started = time.perf_counter()
            await device(*inputs)
            times.append((time.perf_counter() - started) * 1e3)
        latency[str(rows)] = summary_ms(times)
    return latency


# ---------------------------------------------------------------------------------------------
# e. TensorRT


def section_tensorrt(check: Check) -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        raise SkipSection("TensorRT is absent (`import tensorrt` finds no module)",
                          {"present": False})
    import tensorrt as trt

    result: dict[str, Any] = {"present": True, "version": trt.__version__}
    if check.device.type != "cuda":
        raise SkipSection("TensorRT engines need a CUDA device", result)
    if check.stop_early(check.profile.section_min_s["tensorrt"]):
        raise SkipSection("not enough budget left for an ONNX export and engine build", result)
    runner = check.runner()
    with tempfile.TemporaryDirectory(prefix="gpu_check_trt_") as folder:
        onnx_path = Path(folder) / "unet.onnx"
        started = time.perf_counter()
        export_unet_onnx(runner, onnx_path)
        result["onnx_export_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        engine = build_engine(trt, onnx_path, runner, max(check.profile.batches))
        result["engine_build_s"] = round(time.perf_counter() - started, 1)
    result["batches"] = tensorrt_latency(check, trt, engine, runner)
    return result


class _UNetForExport(torch.nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]


def export_unet_onnx(runner: UNetRunner, path: Path) -> None:
    """TorchScript-exporter ONNX (opset 17) with a dynamic batch axis, in the runner's dtype."""
    batch_axis = {0: "batch"}
    torch.onnx.export(
        _UNetForExport(runner.unet), runner.inputs(2), str(path),
        input_names=list(UNET_IO_NAMES), output_names=[UNET_OUTPUT_NAME],
        dynamic_axes={name: batch_axis for name in (*UNET_IO_NAMES, UNET_OUTPUT_NAME)},
        opset_version=17, dynamo=False,
    )


def build_engine(trt, onnx_path: Path, runner: UNetRunner, max_batch: int):
    """A TensorRT engine for batch 1..max_batch, precision taken from the ONNX dtypes."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = 2  # a faster build: the budget is minutes
    profile = builder.create_optimization_profile()
    shapes = {"sample": runner.sample_shape, "encoder_hidden_states": runner.context_shape,
              "timestep": ()}
    for name, tail in shapes.items():
        profile.set_shape(name, (1, *tail), (max(1, max_batch // 2), *tail), (max_batch, *tail))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    return trt.Runtime(logger).deserialize_cuda_engine(plan)


def tensorrt_latency(check: Check, trt, engine, runner: UNetRunner) -> dict:
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()

    def run(sample, timestep, encoder_hidden_states):
        output = torch.empty_like(sample)
        tensors = {"sample": sample, "timestep": timestep,
                   "encoder_hidden_states": encoder_hidden_states, UNET_OUTPUT_NAME: output}
        for name, tensor in tensors.items():
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return output

    batches = {}
    for batch in check.profile.batches:
        if check.stop_early(5):
            break
        inputs = runner.inputs(batch)
        times = measure_ms(lambda inputs=inputs: run(*inputs), check.device,
                           check.profile.warmup, check.profile.repeats)
        difference = (run(*inputs).float() - runner.eager(*inputs).float()).abs().max()
        batches[str(batch)] = {"tensorrt": summary_ms(times),
                               "max_abs_diff_vs_torch": float(difference)}
    return batches


# ---------------------------------------------------------------------------------------------
# Running the sections


SECTION_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    "environment": section_environment,
    "unet": section_unet,
    "driffusion": section_driffusion,
    "triton": section_triton,
    "tensorrt": section_tensorrt,
}


def run_section(name: str, check: Check) -> dict:
    """One section's record: status ok / skipped / error, seconds, and its result."""
    started = time.perf_counter()
    minimum = check.profile.section_min_s.get(name, 0)
    LOG.info("== %s (%.0f s of budget left)", name, check.deadline.remaining())
    try:
        if check.deadline.remaining() < minimum:
            raise SkipSection(f"budget: {check.deadline.remaining():.0f} s left, "
                              f"section needs at least {minimum} s")
        record = {"status": "ok", "result": SECTION_FUNCTIONS[name](check)}
    except SkipSection as skip:
        record = {"status": "skipped", "reason": str(skip), "result": skip.result}
        LOG.info("%s skipped: %s", name, skip)
    except Exception as error:  # noqa: BLE001 - a failed section must not stop the others
        record = {"status": "error", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=8)}
        LOG.error("%s failed: %s", name, record["error"])
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def markdown_summary(report: dict) -> str:
    """The headline numbers as Markdown tables, ready for docs/BENCHMARKS.md."""
    sections = report["sections"]
    env = sections.get("environment", {}).get("result", {})
    gpu = env.get("gpu", {})
    profile = report["profile"]
    title = (f"GPU: {gpu.get('name', 'none')} (sm {gpu.get('compute_capability', '-')}), "
             f"torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, "
             f"profile {profile['name']} {profile['dtype']}, {profile['steps']} DDIM steps")
    lines = [title, ""]
    unet = sections.get("unet", {}).get("result", {}).get("batches", {})
    if unet:
        lines += ["UNet latency:", "", "| batch | eager ms | CUDA graph ms |", "|---|---|---|"]
        lines += [f"| {batch} | {entry['eager']['median_ms']} | "
                  f"{entry.get('cuda_graph', {}).get('median_ms', '-')} |"
                  for batch, entry in unet.items()]
        lines.append("")
    header = "| CFG | mode | window | placement | rounds | s | speedup | max abs diff |"
    for name in ("driffusion", "triton"):
        runs = sections.get(name, {}).get("result", {}).get("runs", [])
        if runs:
            lines += [f"{name}:", "", header, "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {run['cfg']} | {run['mode']} | {run['window']} | "
                      f"{run.get('placement', 'one call')} | {run['rounds']} | {run['seconds']} | "
                      f"{run['speedup_vs_sequential']} | "
                      f"{run.get('max_abs_diff_vs_sequential', 0):.3g} |" for run in runs]
            lines.append("")
    for name, record in sections.items():
        note = record.get("reason") or record.get("error") or ""
        lines.append(f"{name}: {record['status']} {note}".rstrip())
    return "\n".join(lines) + "\n"


def write_json(path: Path, report: dict) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2, default=str))
    partial.replace(path)


def parse_sections(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="On the GPU machine use scripts/gpu_run.sh; without a GPU use --dry-run.")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for gpu_check.json, gpu_check.log and tritonserver.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny UNet, few steps, CPU: every CPU-capable path in < 60 s")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device to measure (default: cuda, or cpu with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="time budget; sections that no longer fit are skipped (default 240)")
    parser.add_argument("--sections", type=parse_sections, default=SECTIONS,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--triton-instances", type=int, default=None,
                        help="python-backend instances of the Triton UNet model (default 2)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="measure eager PyTorch only")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.triton_instances is not None and args.triton_instances < 1:
        parser.error(f"--triton-instances must be >= 1, got {args.triton_instances}")
    return args


def setup_logging(log_path: Path) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    LOG.handlers.clear()
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_path, mode="w")):
        handler.setFormatter(formatter)
        LOG.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU found (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}). Add --dry-run for the CPU rehearsal (`make gpu-check "
              "GPU_CHECK_ARGS=--dry-run`), or run scripts/gpu_run.sh on a GPU machine.",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out / "gpu_check.log")
    profile = DRY if args.dry_run else FULL
    check = Check(args.out, profile, device, Deadline(args.budget_s),
                  cuda_graphs=not args.no_cuda_graphs,
                  triton_instances=args.triton_instances or profile.triton_instances)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = torch.get_num_threads()
    if profile.cpu_threads:
        torch.set_num_threads(profile.cpu_threads)  # steadier CPU timings on shared machines
    try:
        return run_all(args, check)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace, check: Check) -> int:
    """Run the requested sections, rewriting the JSON after each; 1 if any section failed."""
    report: dict[str, Any] = {
        "schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run,
        "device": str(check.device), "budget_s": args.budget_s, "profile": asdict(check.profile),
        "sections": {},
    }
    json_path = args.out / "gpu_check.json"
    for name in args.sections:
        report["sections"][name] = run_section(name, check)
        report["elapsed_s"] = round(check.deadline.elapsed(), 1)
        write_json(json_path, report)
    summary = markdown_summary(report)
    (args.out / "gpu_check.md").write_text(summary)
    LOG.info("summary:\n%s", summary)
    LOG.info("wrote %s in %.1f s", json_path, check.deadline.elapsed())
    failed = [name for name, record in report["sections"].items() if record["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
