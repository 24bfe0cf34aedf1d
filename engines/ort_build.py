"""ONNX Runtime CPU engines: the exported ONNX optimised offline by ONNX Runtime, then checked."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import tensors

# "extended" adds CPU fusions (attention, GELU, layer norm) and stays hardware independent;
# "all" adds layout changes that tie the saved model to the CPU it was optimised on
ORT_OPTIMIZATION_LEVEL = "extended"


class OrtBuildError(RuntimeError):
    """ONNX Runtime could not optimise a network, or the optimised model computes differently."""


@dataclass(frozen=True)
class OrtBuild:
    engine_path: Path
    seconds: float
    max_abs_difference: float


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def build_ort_engine(
    onnx_path: Path, engine_path: Path, profile: dict[str, Any], inputs: list[dict]
) -> OrtBuild:
    """Write the ORT-optimised model to `engine_path` and check it matches the source model."""
    import onnxruntime

    started = time.perf_counter()
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = engine_path.with_name(engine_path.name + ".data")
    for stale in (engine_path, data_path):
        stale.unlink(missing_ok=True)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(engine_path)
    if onnx_path.with_name(onnx_path.name + ".data").is_file():
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_path.name
        )
    try:
        source = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # ORT raises its own untyped exceptions
        raise OrtBuildError(f"ONNX Runtime cannot load {onnx_path}: {error}") from error
    difference = _compare(source, engine_path, profile, inputs)
    return OrtBuild(engine_path, time.perf_counter() - started, difference)


def _compare(source, engine_path: Path, profile: dict[str, Any], inputs: list[dict]) -> float:
    """Run source and optimised model on the same random inputs at the profile's min shapes."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    engine = onnxruntime.InferenceSession(
        str(engine_path), options, providers=["CPUExecutionProvider"]
    )
    feeds = _random_feeds(profile, inputs)
    worst = 0.0
    for expected, actual in zip(source.run(None, feeds), engine.run(None, feeds)):
        expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
        difference = float(np.max(np.abs(expected64 - actual64), initial=0.0))
        scale = float(np.max(np.abs(expected64), initial=0.0))
        if not np.isfinite(difference) or difference > 1e-3 * max(scale, 1.0):
            raise OrtBuildError(
                f"{engine_path}: the ORT-optimised model differs from its source by "
                f"{difference:.3g} (output scale {scale:.3g})"
            )
        worst = max(worst, difference)
    return worst


def _random_feeds(profile: dict[str, Any], inputs: list[dict]) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    feeds = {}
    for tensor in inputs:
        shape = tuple(profile[tensor["name"]][0])
        dtype = np.dtype(tensors.dtype_named(tensor["dtype"]).name)
        if np.issubdtype(dtype, np.integer):
            # ids and labels: 0 is valid for every embedding table
            feeds[tensor["name"]] = np.zeros(shape, dtype=dtype)
        else:
            feeds[tensor["name"]] = generator.standard_normal(shape).astype(dtype)
    return feeds
