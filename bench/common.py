"""What the apps share: argument types, machine facts, the reference engines, stopping on SIGTERM."""
from __future__ import annotations

import argparse
import os
import platform
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from models import paths

if TYPE_CHECKING:
    from engines.manifest import EngineSet

Log = Callable[[str], None]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def ensure_reference_engines(log: Log = print, model: str = "reference") -> EngineSet:
    """A bundled reference model's ONNX Runtime CPU engines (`reference` or `reference-flow`),
    exported and built first if missing or stale."""
    from engines.build import build_engines
    from engines.build_types import BuildRequest

    request = BuildRequest(source=model, name=model, engines_root=paths.engines_root(),
                           onnx_dir=paths.onnx_dir(model), backend="onnxruntime")
    (engine_set,) = build_engines(request, log).engine_sets()
    return engine_set


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (like Ctrl-C) so that `finally` blocks stop servers."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


T = TypeVar("T")


def infer_inputs(fields: dict[str, Any]) -> list:
    """tritonclient gRPC inputs (the aio client takes the same) of named numpy arrays, each
    typed by its dtype."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in fields.items():
        tensor = InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def run_stopping_servers(work: Callable[[], T],
                         errors: tuple[type[Exception], ...]) -> T | int:
    """`work()` with SIGTERM taken as Ctrl-C: its result, or the exit code after an interrupt
    (130: the servers it started are stopped by then) or one of `errors` (1, printed)."""
    import sys

    try:
        with sigterm_as_interrupt():
            return work()
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        return 130
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def machine_info() -> dict[str, Any]:
    """Facts about this machine that timings depend on, the current load included."""
    import diffusers
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average_1_5_15_min": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "diffusers": diffusers.__version__,
    }
