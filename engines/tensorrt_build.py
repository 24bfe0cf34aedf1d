"""TensorRT plan builds: strongly typed network from ONNX, one profile, per-arch timing cache.

Written against the TensorRT 10/11 Python API. TensorRT 11 builds strongly typed networks
only, so precision comes from the ONNX dtypes: an fp16 plan needs an fp16 export, and a bf16
network (float32 boundary, bfloat16 inside, casts between) builds as bf16 with its casts.
Not run here (no TensorRT builder on this machine): bf16 files are opset 22, which the
TensorRT ONNX parser in use must accept (unverified), and Flux's rotary embedding is computed
in float64 (diffusers' FluxPosEmbed on CPU and CUDA), which TensorRT may refuse; see
export/specs.py, _FluxForward.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.gpu import GpuInfo, set_device
from engines.manifest import EngineSet, check_plan_compatible

OPTIMIZATION_LEVELS = range(6)


class TensorRTBuildError(RuntimeError):
    """The ONNX parser or the builder rejected a network."""


@dataclass(frozen=True)
class PlanBuild:
    """What one plan build produced."""

    plan_path: Path
    seconds: float
    timing_cache_path: Path


def tensorrt_status() -> tuple[str | None, str | None]:
    """(TensorRT version, None) when the full builder imports, else (None, why not)."""
    try:
        import tensorrt
    except ImportError as error:
        return (
            None,
            f"TensorRT is not installed ({error.msg}; `pip install tensorrt` on a GPU machine)",
        )
    if not hasattr(tensorrt, "Builder"):
        return (
            None,
            f"TensorRT {tensorrt.__version__} here is a runtime-only package without a Builder",
        )
    return tensorrt.__version__, None


def timing_cache_path(cache_dir: Path, gpu: GpuInfo, tensorrt_version: str) -> Path:
    """One timing cache file per GPU architecture and TensorRT version, shared by all models."""
    return cache_dir / f"{gpu.arch}-trt{tensorrt_version}.cache"


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    gpu: GpuInfo,
    profile: dict[str, Any],
    optimization_level: int,
    cache_dir: Path,
    workspace_bytes: int | None = None,
) -> PlanBuild:
    """Parse `onnx_path`, build a strongly typed plan for `gpu` with one profile, save it."""
    import tensorrt as trt

    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization level {optimization_level} is not in 0..5")
    started = time.perf_counter()
    set_device(gpu.index)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the ONNX file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.add_optimization_profile(_optimization_profile(builder, network, profile, onnx_path))
    cache_path = timing_cache_path(cache_dir, gpu, trt.__version__)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT could not build {onnx_path} for {gpu.describe()} (see the log above)"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    # the config's cache started from the file, so this writes the old and new timings together
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = cache_path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_bytes(bytes(config.get_timing_cache().serialize()))
    scratch.replace(cache_path)
    return PlanBuild(plan_path, time.perf_counter() - started, cache_path)


def load_plan(engine_set: EngineSet, network: str):
    """Deserialize a plan after checking its manifest against the running TensorRT and GPU.

    Raises EngineMismatchError naming the built and the running TensorRT version and GPU
    instead of letting TensorRT fail on (or silently misuse) a foreign plan.
    """
    import tensorrt as trt

    gpu = check_plan_compatible(engine_set.manifest)
    set_device(gpu.index)
    path = engine_set.path(network)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise TensorRTBuildError(f"TensorRT could not deserialize {path} (see the log above)")
    return engine


def _network_flags(trt) -> int:
    # STRONGLY_TYPED is opt-in on TensorRT 10 and accepted-but-implied on TensorRT 11
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _optimization_profile(builder, network, profile: dict[str, Any], onnx_path: Path):
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = network_inputs - set(profile)
    if missing:
        raise TensorRTBuildError(
            f"{onnx_path}: the profile has no shapes for inputs {', '.join(sorted(missing))}"
        )
    optimization_profile = builder.create_optimization_profile()
    for name in sorted(network_inputs):
        low, opt, high = (tuple(shape) for shape in profile[name])
        optimization_profile.set_shape(name, low, opt, high)
    return optimization_profile
