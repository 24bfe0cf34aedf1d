"""Validation of an exported ONNX file: ONNX Runtime against PyTorch on random inputs.

fp32 and fp16 files run in ONNX Runtime against the fp32 torch module. ONNX Runtime has no
bf16 CPU kernels (MatMul, Add, Mul, Softmax ... are not implemented for bfloat16), so a bf16
file is validated in two parts: its graph, with every bfloat16 type widened to float32, runs in
ONNX Runtime against the torch module holding the same bf16-rounded weights in fp32 (does the
file compute what the module computes?), and the bf16 torch module that was traced runs
against the fp32 one (is bf16 accurate enough for this network?). The bf16 kernels themselves
run only where the engine is built (TensorRT, torch on a GPU).

What is allowed scales with the reference: atol + rtol * max|reference| (DEFAULT_TOLERANCES),
plus, where an output misses that, NOISE_FACTOR times the reference's own fp32 noise. The
reference is torch in fp32, and a network can amplify fp32 rounding far beyond rtol: a tiny SD
UNet with a LoRA fused at scale 10 (or -10) is 0.23% (0.37%) of max|output| away from the same
module in fp64 in torch, and 0.32% in ONNX Runtime, so the two fp32 runs differ by 0.55%, 5x
the fp32 rtol, with nothing wrong in the file (on other random inputs, up to 9.5%, torch fp32
itself being 10% off fp64). That noise is measured by running the torch module again on inputs
each moved by one fp32 step (`fp32_noise`): a network that amplifies a one-ulp change of its
inputs amplifies the one-ulp rounding of its intermediate values alike. On that UNet (5 inputs,
scale +-10, 6 nudge pairs each) ONNX Runtime vs torch was at most 4.9x the larger movement of
two nudges (median 0.3x; one nudge alone varies 20-fold, hence two), so NOISE_FACTOR is 8. A
well-conditioned network's noise is near 1e-6 of max|output|, so there a wrong file (an error
of a percent or more) fails as before. A network whose inputs are all integers (a text
encoder's token ids) has no input to nudge: its noise is 0 and its tolerance atol + rtol only.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from export.precision import BF16_MODELS
from export.specs import NetworkSpec

# (atol, rtol): an output passes when max|onnx - torch| <= atol + rtol * max|torch| (+ noise)
DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-3, 2e-2), "bf16": (2e-2, 6e-2)}
# allowed error per unit of the reference's measured fp32 noise (see the module docstring)
NOISE_FACTOR = 8.0
NOISE_NUDGES = 2  # runs of the reference on nudged inputs; the noise is their largest movement
NOISE_SEED = 7  # which way each input value is nudged
# the fp32 torch reference on given inputs, outputs in graph order
Runner = Callable[[dict[str, torch.Tensor]], list[np.ndarray]]


@dataclass(frozen=True)
class OutputError:
    """Error of one output: max absolute error, and that error relative to max|reference|."""

    name: str
    max_abs: float
    max_rel: float
    reference_max: float
    allowed_abs: float
    reference_noise: float = 0.0  # fp32 noise of the reference, measured only where needed

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.allowed_abs

    def describe(self) -> str:
        verdict = "ok" if self.ok else "ABOVE TOLERANCE"
        noise = (f", with {NOISE_FACTOR:g} x the reference's fp32 noise {self.reference_noise:.3g}"
                 if self.reference_noise else "")
        return (
            f"{self.name}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
            f"(allowed abs {self.allowed_abs:.3g}{noise}) {verdict}"
        )


@dataclass(frozen=True)
class ValidationReport:
    """Per-output errors of one network at one input shape, and how they were measured."""

    network: str
    precision: str
    input_shapes: dict[str, tuple[int, ...]]
    outputs: list[OutputError]
    method: str = "onnxruntime vs torch fp32"

    @property
    def ok(self) -> bool:
        return all(output.ok for output in self.outputs)

    def describe(self) -> str:
        return "; ".join(output.describe() for output in self.outputs)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "outputs": {
                o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel, "allowed_abs": o.allowed_abs,
                         "reference_noise": o.reference_noise}
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


class PrecisionError(ValidationError):
    """A reduced-precision network that overflows or misses the tolerance against fp32; the
    message names the network and the precisions that would work."""

    def __init__(self, path: Path, report: ValidationReport, model_class: str) -> None:
        failed = next(output for output in report.outputs if not output.ok)
        overflow = not np.isfinite(failed.max_abs)
        what = ("inf/NaN" if overflow else
                f"an error of {failed.max_abs:.3g} (allowed {failed.allowed_abs:.3g})")
        working = ["fp32"]
        if overflow and report.precision == "fp16" and model_class in BF16_MODELS:
            working.append("bf16 (fp32's range)")
        RuntimeError.__init__(
            self,
            f"{report.network}: {report.precision} gives {what} in `{failed.name}`; export it "
            f"at {' or '.join(working)} with --network-precision {report.network}=fp32 "
            f"({path.name}, inputs {report.input_shapes}: {report.describe()})"
        )
        self.report = report


def compare_outputs(
    name: str, actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
    reference_noise: float = 0.0,
) -> OutputError:
    """Max absolute and scale-relative error of `actual` against `reference`, allowed
    atol + rtol * max|reference| + NOISE_FACTOR * reference_noise."""
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
        allowed_abs=atol + rtol * reference_max + NOISE_FACTOR * reference_noise,
        reference_noise=reference_noise,
    )


def compare_all(names: list[str], actual: list[np.ndarray], reference: list[np.ndarray],
                tolerance: tuple[float, float], rerun: Runner,
                inputs: dict[str, torch.Tensor]) -> list[OutputError]:
    """Each output's error at `tolerance`; where one misses it, every output compared again
    with the fp32 noise of the reference measured (`rerun`: the fp32 reference on inputs)."""
    errors = [compare_outputs(n, a, r, *tolerance) for n, a, r in zip(names, actual, reference)]
    if not any(np.isfinite(error.max_abs) and not error.ok for error in errors):
        return errors  # all within tolerance, or only inf/NaN, which no noise excuses
    noise = fp32_noise(rerun, inputs, reference)
    return [compare_outputs(n, a, r, *tolerance, reference_noise=s)
            for n, a, r, s in zip(names, actual, reference, noise)]


def fp32_noise(rerun: Runner, inputs: dict[str, torch.Tensor],
               reference: list[np.ndarray]) -> list[float]:
    """Per output, the largest max|reference - the reference on inputs each one fp32 step away|
    of NOISE_NUDGES runs: how far fp32 rounding alone moves this network's outputs (see the
    module docstring)."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noise = [0.0] * len(reference)
    for _ in range(NOISE_NUDGES):
        nudged = {name: _one_step_away(value, generator) for name, value in inputs.items()}
        noise = [max(largest, _movement(moved, original))
                 for largest, moved, original in zip(noise, rerun(nudged), reference)]
    return noise


def _movement(moved: np.ndarray, original: np.ndarray) -> float:
    """max|moved - original|; 0 where either is not finite (such a run measures nothing)."""
    movement = float(np.max(np.abs(moved.astype(np.float64) - original), initial=0.0))
    return movement if np.isfinite(movement) else 0.0


def _one_step_away(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Floating values moved to the next fp32 number up or down (at random); others as they are."""
    if not value.is_floating_point():
        return value
    up = torch.rand(value.shape, generator=generator) < 0.5
    limit = torch.where(up, torch.tensor(float("inf")), torch.tensor(float("-inf")))
    return torch.nextafter(value.float(), limit)


def run_onnxruntime(
    path: Path, inputs: dict[str, torch.Tensor], optimize: bool = True
) -> list[np.ndarray]:
    """Outputs of the ONNX file in ONNX Runtime on the CPU, in graph output order."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {name: value.numpy() for name, value in inputs.items()})


@torch.no_grad()
def run_torch(
    spec: NetworkSpec, module: nn.Module, inputs: dict[str, torch.Tensor]
) -> list[np.ndarray]:
    """Outputs of the fp32 torch module; floating inputs are computed in fp32."""
    args = [v.float() if v.is_floating_point() else v for v in inputs.values()]
    return _outputs(spec.wrap(module).eval()(*args))


@torch.no_grad()
def run_torch_export_module(
    spec: NetworkSpec, module: nn.Module, inputs: dict[str, torch.Tensor]
) -> list[np.ndarray]:
    """Outputs of the module as it was traced (at the spec's precision, with its casts)."""
    return _outputs(spec.wrap_for_export(module).eval()(*inputs.values()))


def _outputs(outputs) -> list[np.ndarray]:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
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
    reduced_module: nn.Module | None = None,
) -> ValidationReport:
    """Run the ONNX file and the fp32 torch module on the same random inputs; raise if too far
    (PrecisionError for a reduced-precision network, naming the precisions that would work).

    bf16 (see the module docstring) needs `reduced_module`, the bf16 module that was traced;
    it is widened to fp32 in place as the reference of the widened graph.
    """
    default_atol, default_rtol = DEFAULT_TOLERANCES[spec.precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    inputs = spec.sample_inputs(batch, height, width, seed=seed)
    reference = run_torch(spec, module, inputs)
    rerun = functools.partial(run_torch, spec, module)
    if spec.precision == "bf16":
        if reduced_module is None:
            raise ValueError(f"{spec.name}: validating bf16 needs the traced bf16 module")
        report = _validate_bf16(path, spec, rerun, reduced_module, inputs, reference,
                                (atol, rtol))
    else:
        actual = run_onnxruntime(path, inputs)
        report = _report(spec, inputs, compare_all(spec.output_names, actual, reference,
                                                   (atol, rtol), rerun, inputs))
    if not report.ok:
        if spec.precision == "fp32":
            raise ValidationError(path, report)
        raise PrecisionError(path, report, type(module).__name__)
    return report


def _report(spec: NetworkSpec, inputs: dict[str, torch.Tensor], outputs: list[OutputError],
            method: str = ValidationReport.method) -> ValidationReport:
    return ValidationReport(
        network=spec.name,
        precision=spec.precision,
        input_shapes={name: tuple(value.shape) for name, value in inputs.items()},
        outputs=outputs,
        method=method,
    )


def _validate_bf16(path: Path, spec: NetworkSpec, rerun: Runner, reduced: nn.Module,
                   inputs: dict[str, torch.Tensor], reference: list[np.ndarray],
                   tolerance: tuple[float, float]) -> ValidationReport:
    """The bf16 torch module against fp32 (at the bf16 tolerance), then the graph widened to
    float32 in ONNX Runtime against the module with the same weights in fp32 (at fp32's);
    `rerun` runs the fp32 module."""
    bf16 = run_torch_export_module(spec, reduced, inputs)
    errors = compare_all([f"{name} (torch bf16 vs fp32)" for name in spec.output_names], bf16,
                         reference, tolerance, rerun, inputs)
    rounded_module = reduced.float()
    rounded = run_torch(spec, rounded_module, inputs)
    with tempfile.TemporaryDirectory(prefix="driffusion-widened-") as scratch:
        widened = Path(scratch) / "widened.onnx"
        widen_bf16(path, widened)
        # ORT's cast elimination drops the widened float->float casts and leaves their
        # consumers dangling; the unoptimised graph is the file's own computation anyway
        graph = run_onnxruntime(widened, inputs, optimize=False)
    graph_errors = compare_all(
        [f"{name} (ONNX graph widened to fp32)" for name in spec.output_names], graph, rounded,
        DEFAULT_TOLERANCES["fp32"], functools.partial(run_torch, spec, rounded_module), inputs)
    method = ("torch bf16 vs torch fp32; ONNX graph with bfloat16 widened to float32 in "
              "onnxruntime vs torch fp32 with the bf16-rounded weights (onnxruntime has no "
              "bf16 CPU kernels)")
    graph_report = _report(spec, inputs, graph_errors, method)
    if not graph_report.ok:  # the file computes something else: an export fault, not precision
        raise ValidationError(path, graph_report)
    return _report(spec, inputs, errors + graph_errors, method)


def widen_bf16(source: Path, target: Path) -> None:
    """Copy an ONNX file with every bfloat16 type, weight, constant and cast made float32."""
    model = onnx.load(str(source))
    _widen_graph(model.graph)
    onnx.save_model(model, str(target), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=target.name + ".data")


def _widen_graph(graph: onnx.GraphProto) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.BFLOAT16:
            graph.initializer[index].CopyFrom(_widened_tensor(tensor))
    for node in graph.node:
        for attribute in node.attribute:
            casts_to_bf16 = node.op_type == "Cast" and attribute.name == "to"
            if casts_to_bf16 and attribute.i == TensorProto.BFLOAT16:
                attribute.i = TensorProto.FLOAT
            if attribute.HasField("t") and attribute.t.data_type == TensorProto.BFLOAT16:
                attribute.t.CopyFrom(_widened_tensor(attribute.t))
            if attribute.HasField("g"):
                _widen_graph(attribute.g)


def _widened_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
