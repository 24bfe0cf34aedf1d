"""Validation of an exported ONNX file: ONNX Runtime against PyTorch on random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.specs import NetworkSpec

# (atol, rtol): an output passes when max|onnx - torch| <= atol + rtol * max|torch|
DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-3, 2e-2)}


@dataclass(frozen=True)
class OutputError:
    """Error of one output: max absolute error, and that error relative to max|reference|."""

    name: str
    max_abs: float
    max_rel: float
    reference_max: float
    allowed_abs: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.allowed_abs

    def describe(self) -> str:
        verdict = "ok" if self.ok else "ABOVE TOLERANCE"
        return (
            f"{self.name}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
            f"(allowed abs {self.allowed_abs:.3g}) {verdict}"
        )


@dataclass(frozen=True)
class ValidationReport:
    """Per-output errors of one network at one input shape."""

    network: str
    precision: str
    input_shapes: dict[str, tuple[int, ...]]
    outputs: list[OutputError]

    @property
    def ok(self) -> bool:
        return all(output.ok for output in self.outputs)

    def describe(self) -> str:
        return "; ".join(output.describe() for output in self.outputs)

    def to_json(self) -> dict:
        return {
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "outputs": {
                o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel, "allowed_abs": o.allowed_abs}
                for o in self.outputs
            },
        }


class ValidationError(RuntimeError):
    """The ONNX outputs differ from PyTorch by more than the tolerance."""

    def __init__(self, path: Path, report: ValidationReport) -> None:
        super().__init__(
            f"{path}: ONNX Runtime output differs from PyTorch ({report.precision}, inputs "
            f"{report.input_shapes}): {report.describe()}"
        )
        self.report = report


def compare_outputs(
    name: str, actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float
) -> OutputError:
    """Max absolute and scale-relative error of `actual` against `reference`."""
    if actual.shape != reference.shape:
        raise ValueError(f"{name}: ONNX output shape {actual.shape} != torch {reference.shape}")
    actual64 = actual.astype(np.float64)
    reference64 = reference.astype(np.float64)
    max_abs = float(np.max(np.abs(actual64 - reference64), initial=0.0))
    if not np.all(np.isfinite(actual64)):
        max_abs = float("inf")
    reference_max = float(np.max(np.abs(reference64), initial=0.0))
    return OutputError(
        name=name,
        max_abs=max_abs,
        max_rel=max_abs / max(reference_max, 1e-12),
        reference_max=reference_max,
        allowed_abs=atol + rtol * reference_max,
    )


def run_onnxruntime(path: Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Outputs of the ONNX file in ONNX Runtime on the CPU, in graph output order."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in inputs.items()})


@torch.no_grad()
def run_torch(
    spec: NetworkSpec, module: nn.Module, inputs: dict[str, torch.Tensor]
) -> list[np.ndarray]:
    """Reference outputs of the fp32 torch module; floating inputs are computed in fp32."""
    wrapped = spec.wrap(module).eval()
    args = [v.float() if v.is_floating_point() else v for v in inputs.values()]
    outputs = wrapped(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.float().numpy() for o in outputs]


def validate_onnx(
    path: Path,
    spec: NetworkSpec,
    module: nn.Module,
    *,
    batch: int,
    height: int | None = None,
    width: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Run the ONNX file and the fp32 torch module on the same random inputs; raise if too far."""
    default_atol, default_rtol = DEFAULT_TOLERANCES[spec.precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    inputs = spec.sample_inputs(batch, height, width, seed=seed)
    actual = run_onnxruntime(path, inputs)
    reference = run_torch(spec, module, inputs)
    report = ValidationReport(
        network=spec.name,
        precision=spec.precision,
        input_shapes={name: tuple(value.shape) for name, value in inputs.items()},
        outputs=[
            compare_outputs(name, a, r, atol, rtol)
            for name, a, r in zip(spec.output_names, actual, reference)
        ],
    )
    if not report.ok:
        raise ValidationError(path, report)
    return report
