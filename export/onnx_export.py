"""Export of torch networks to ONNX: trace, clean up, fold constants, check, save and validate."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.precision import checked_precision, export_opset, reduced_precision_copy
from export.presets import source_fingerprint, write_pipeline_files
from export.specs import IMAGE_HEIGHT, IMAGE_WIDTH, NetworkSpec, Range, as_range
from export.validate import ValidationReport, validate_onnx

EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18  # the dynamo exporter down-converts from 18 and wrote an invalid Split at 17
# protobuf cannot serialise one message above 2 GiB: bigger models keep weights in a side file
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
# polygraphy constant folding leaves tensors above this unfolded (e.g. Expand of a weight)
FOLD_SIZE_THRESHOLD = 64 * 1024**2
EXPORT_INDEX = "export.json"
TORCH_WEIGHTS_SUFFIX = ".safetensors"  # a torch-only network's weights in the export
# what an export holds; a lower number is an older release's export, rebuilt on first use
# (2: the VAE encoder is exported beside the decoder, for image inputs)
EXPORT_LAYOUT = 2
# ONNX ops without bfloat16 in any opset: bf16 networks run them in float32
FLOAT_ONLY_OPS = ("Einsum",)


@dataclass(frozen=True)
class ExportOptions:
    """How to export: precision, opset, exporter, profile ranges and validation tolerances.

    `precision` is the one asked for; each network gets its own from the rule of
    export/precision.py, then from `network_precisions` (network name -> precision).
    `max_sequence_length` overrides the family's T5 or LLM prompt tokens (SD3 256, Flux-dev 512,
    schnell 256, the LLM-conditioned families 512).
    """

    precision: str = "fp32"
    network_precisions: dict[str, str] = field(default_factory=dict)
    max_sequence_length: int | None = None
    opset: int = 18
    exporter: str = "torchscript"
    batch_range: Range = (1, 2, 8)
    height: int | Range | None = None
    width: int | Range | None = None
    validate: bool = True
    atol: float | None = None
    rtol: float | None = None
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    def __post_init__(self) -> None:
        checked_precision(self.precision)
        for precision in self.network_precisions.values():
            checked_precision(precision)
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        as_range(self.batch_range, "batch_range")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter {self.exporter!r} is not supported; use one of {EXPORTERS}")
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset {self.opset} is too old; use {MIN_OPSET} or newer")
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise ValueError("the dynamo exporter needs opset >= 18 (opset 17 gives invalid Split)")

    def profile_args(self) -> dict[str, Any]:
        """The options that decide the engine profile, as stored in export.json."""
        return {"batch_range": list(self.batch_range), "height": self.height, "width": self.width}

    def network_args(self) -> dict[str, Any]:
        """The options besides the profile that decide what each network's ONNX is."""
        return {"network_precisions": dict(sorted(self.network_precisions.items())),
                "max_sequence_length": self.max_sequence_length}


@dataclass
class ExportedNetwork:
    """One exported ONNX file and what was learnt while exporting it."""

    spec: NetworkSpec
    path: Path
    sha256: str
    profile: dict[str, tuple]
    seconds: float
    validation: ValidationReport | None = None
    opset: int = 0  # bf16 networks are exported at BF16_MIN_OPSET or newer

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.to_json(),
            "file": self.path.name,
            "opset": self.opset,
            "sha256": self.sha256,
            "profile": {k: [list(s) for s in v] for k, v in self.profile.items()},
            "export_seconds": round(self.seconds, 3),
            "validation": self.validation.to_json() if self.validation else None,
            "torch_only": self.spec.torch_only,
        }


@dataclass
class ExportResult:
    """All networks of one model exported for one requested precision into one directory."""

    model: str
    directory: Path
    options: ExportOptions
    networks: dict[str, ExportedNetwork] = field(default_factory=dict)


def onnx_filename(network: str, precision: str) -> str:
    """`unet.onnx` for fp32, `unet.fp16.onnx` / `unet.bf16.onnx` for the network's reduced
    precision, so every precision of a network lives in one directory."""
    return (
        f"{network}.onnx"
        if checked_precision(precision) == "fp32"
        else f"{network}.{precision}.onnx"
    )


def onnx_sha256(path: Path) -> str:
    """sha256 over the ONNX file and its external-data file, if it has one."""
    digest = hashlib.sha256()
    for part in (path, external_data_path(path)):
        if part.is_file():
            with part.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def external_data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def export_network(
    spec: NetworkSpec,
    module: nn.Module,
    path: Path,
    options: ExportOptions,
    log: Callable[[str], None] = print,
) -> ExportedNetwork:
    """Export one network at its spec's precision to `path`, clean and check the graph, then
    validate it (by default); `options.precision` is the requested one, not this network's."""
    started = time.perf_counter()
    precision = spec.precision
    opset = export_opset(options.opset, precision)
    exporter = options.exporter
    if spec.needs_dynamo and exporter != "dynamo":
        log(f"{spec.name}: the torchscript exporter cannot keep this network's dynamic dims "
            "(it bakes sizes computed from them into the graph); exporting with the dynamo "
            "exporter")
        exporter, opset = "dynamo", max(opset, DYNAMO_MIN_OPSET)
    batch_low, batch_opt, batch_high = options.batch_range
    profile = spec.profile(options.batch_range, options.height, options.width)
    # trace and validate at the profile's optimal image size
    dims = spec.dim_ranges(options.batch_range, options.height, options.width)
    height, width = dims[IMAGE_HEIGHT][1], dims[IMAGE_WIDTH][1]
    export_module = module if precision == "fp32" else reduced_precision_copy(module, precision)
    trace_inputs = spec.sample_inputs(batch_opt, height, width, seed=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="driffusion-export-") as scratch:
        raw_path = Path(scratch) / "raw.onnx"
        log(
            f"{spec.name}: tracing with the {exporter} exporter (opset {opset}, {precision})"
        )
        trace_to_onnx(spec, export_module, trace_inputs, raw_path, exporter, opset)
        model = onnx.load(str(raw_path))
    if precision == "bf16":
        run_float_only_ops_in_fp32(model.graph)
    log(f"{spec.name}: folding constants and cleaning up the graph")
    model = clean_graph(model)
    name_dynamic_dims(model, spec)
    save_onnx(model, path, options.external_data_threshold)
    del model
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    exported = ExportedNetwork(spec, path, onnx_sha256(path), profile, 0.0, opset=opset)
    if options.validate:
        # validate at a batch other than the traced one, so baked-in shapes cannot pass;
        # the smallest such batch keeps validating big models on a CPU affordable
        batch = batch_low if batch_low != batch_opt else batch_high
        exported.validation = validate_onnx(
            path,
            spec,
            module,
            batch=batch,
            height=height,
            width=width,
            atol=options.atol,
            rtol=options.rtol,
            reduced_module=export_module if precision == "bf16" else None,
        )
        log(
            f"{spec.name}: validated against PyTorch at batch {batch}: "
            f"{exported.validation.describe()}"
        )
    exported.seconds = time.perf_counter() - started
    return exported


def trace_to_onnx(
    spec: NetworkSpec,
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    exporter: str,
    opset: int,
) -> None:
    """Run torch.onnx.export on the spec's export wrapper with its names and dynamic axes."""
    wrapped = spec.wrap_for_export(module).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            tuple(inputs.values()),
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=exporter == "dynamo",
            do_constant_folding=True,
            **(_dynamo_arguments(spec, wrapped) if exporter == "dynamo"
               else {"dynamic_axes": spec.dynamic_axes}),
        )


def run_float_only_ops_in_fp32(graph: onnx.GraphProto) -> None:
    """Wrap the nodes of FLOAT_ONLY_OPS in casts to float32 and back (CastLike their first
    input), so a bf16 graph stays valid ONNX (e.g. SD3's unpatchify einsum)."""
    nodes = []
    for node in graph.node:
        if node.op_type not in FLOAT_ONLY_OPS:
            nodes.append(node)
            continue
        like, result = node.input[0], node.output[0]
        widened = [f"{node.name}/float32_input_{i}" for i in range(len(node.input))]
        nodes += [onnx.helper.make_node("Cast", [name], [cast], name=cast,
                                        to=onnx.TensorProto.FLOAT)
                  for name, cast in zip(node.input, widened)]
        node.input[:] = widened
        node.output[0] = f"{node.name}/float32_output"
        nodes += [node, onnx.helper.make_node("CastLike", [node.output[0], like], [result],
                                              name=f"{node.name}/cast_back")]
    graph.ClearField("node")
    graph.node.extend(nodes)


def _dynamo_arguments(spec: NetworkSpec, wrapped: nn.Module) -> dict[str, Any]:
    """The dynamo exporter's options: dynamic dims by input position, nested in one tuple for a
    wrapper that takes its inputs as *args (bf16 boundary casts), which dynamic_axes cannot be
    matched against by name."""
    dims = tuple(
        {axis: name for axis, name in enumerate(tensor.shape) if isinstance(name, str)}
        for tensor in spec.inputs
    )
    parameters = inspect.signature(wrapped.forward).parameters.values()
    varargs = any(parameter.kind is parameter.VAR_POSITIONAL for parameter in parameters)
    return {"dynamic_shapes": (dims,) if varargs else dims, "verbose": False, "optimize": True}


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants with polygraphy, then drop dead nodes and sort with onnx-graphsurgeon."""
    import onnx_graphsurgeon as gs
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    onnxruntime.set_default_logger_severity(3)  # folding warns for every unremovable Unsqueeze
    folded = fold_constants(
        model,
        size_threshold=FOLD_SIZE_THRESHOLD,
        error_ok=True,
        # onnx's C++ shape inference: ORT's symbolic one is several times slower here
        allow_onnxruntime_shape_inference=False,
    )
    graph = gs.import_onnx(folded)
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    return cleaned


def name_dynamic_dims(model: onnx.ModelProto, spec: NetworkSpec) -> None:
    """Name graph input/output dims as the spec does (the dynamo exporter invents its own)."""
    by_name = {t.name: t for t in [*spec.inputs, *spec.outputs]}
    for value in [*model.graph.input, *model.graph.output]:
        tensor = by_name.get(value.name)
        if tensor is None:
            continue
        for dim, wanted in zip(value.type.tensor_type.shape.dim, tensor.shape):
            if isinstance(wanted, str):
                dim.dim_param = wanted


def save_onnx(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> None:
    """Save, keeping weights in `<file>.data` when they exceed the threshold."""
    data_path = external_data_path(path)
    for stale in (path, data_path):
        stale.unlink(missing_ok=True)
    external = tensor_bytes(model) > external_data_threshold
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_path.name,
        size_threshold=1024,
    )


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers and Constant nodes of the main graph."""
    tensors = list(model.graph.initializer) + [
        attribute.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.HasField("t")
    ]
    return sum(
        len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes for t in tensors
    )


def export_model(
    bundle, out_dir: Path, options: ExportOptions, log: Callable[[str], None] = print
) -> ExportResult:
    """Export every network of a ModelBundle into `out_dir` and record them in export.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExportResult(bundle.name, out_dir, options)
    specs = bundle.specs(
        options.precision, options.network_precisions, options.max_sequence_length
    )
    for step, (name, spec) in enumerate(specs.items(), start=1):
        path = out_dir / onnx_filename(name, spec.precision)
        prefix = f"[{step}/{len(specs)}] "
        step_log = functools.partial(_prefixed, log, prefix)
        if spec.torch_only:
            path = out_dir / f"{name}{TORCH_WEIGHTS_SUFFIX}"
            exported = save_torch_only(spec, bundle.modules[name], path, options)
        else:
            exported = export_network(spec, bundle.modules[name], path, options, step_log)
        result.networks[name] = exported
        log(f"{prefix}{name}: wrote {path} ({exported.seconds:.1f} s)")
    servable = write_pipeline_files(
        bundle,
        out_dir,
        options.height,
        options.width,
        precisions={name: spec.precision for name, spec in specs.items()},
        max_sequence_length=options.max_sequence_length,
    )
    write_export_index(result, bundle.source, complete=not bundle.selected, servable=servable,
                       loras=bundle.loras)
    return result


def save_torch_only(spec: NetworkSpec, module: nn.Module, path: Path,
                    options: ExportOptions) -> ExportedNetwork:
    """A network served by torch on every backend (`spec.torch_only`): no ONNX, its weights
    (safetensors) stand for it in the export; the engines build saves it as a torch engine."""
    from safetensors.torch import save_model

    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(module, str(path))
    profile = spec.profile(options.batch_range, options.height, options.width)
    return ExportedNetwork(spec, path, onnx_sha256(path), profile,
                           time.perf_counter() - started)


def _prefixed(log: Callable[[str], None], prefix: str, message: str) -> None:
    log(prefix + message)


def write_export_index(result: ExportResult, source: str, *, complete: bool,
                       servable: bool = False, loras: tuple = ()) -> Path:
    """Record this export in `<dir>/export.json`, one entry per precision.

    Networks exported with the same settings as the existing entry are merged into it;
    `complete` says whether every network of the model was exported (no --networks choice);
    `servable` whether pipeline.json and the tokenizers were written beside them.
    """
    index_path = result.directory / EXPORT_INDEX
    index = read_export_index(result.directory) or {"model": result.model, "exports": {}}
    index.update(model=result.model, source=source)
    index["servable"] = servable or index.get("servable", False)
    index["layout"] = EXPORT_LAYOUT
    networks = {name: network.to_json() for name, network in result.networks.items()}
    previous = index["exports"].get(result.options.precision)
    if previous is not None and settings_change(previous, result.options) is None:
        networks = {**previous["networks"], **networks}
        complete = complete or previous.get("complete", False)
    index["exports"][result.options.precision] = {
        "options": {**asdict(result.options), "batch_range": list(result.options.batch_range)},
        "profile_args": result.options.profile_args(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "source_fingerprint": source_fingerprint(source, loras),
        "loras": [lora.to_json() for lora in loras],
        "networks": networks,
    }
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return index_path


def settings_change(entry: dict[str, Any], options: ExportOptions) -> str | None:
    """How `options` differ from a recorded export entry in what shapes the ONNX, if they do."""
    recorded = entry.get("options", {})
    for key in ("opset", "exporter"):
        if recorded.get(key) != getattr(options, key):
            return f"{key} changed ({recorded.get(key)} -> {getattr(options, key)})"
    if entry.get("profile_args") != json.loads(json.dumps(options.profile_args())):
        return "profile ranges changed"
    recorded_networks = {key: recorded.get(key) for key in options.network_args()}
    recorded_networks["network_precisions"] = dict(
        sorted((recorded_networks["network_precisions"] or {}).items())
    )
    if recorded_networks != options.network_args():
        return "network precisions or T5 sequence length changed"
    return None


def read_export_index(directory: Path) -> dict[str, Any] | None:
    """The export.json of an export directory, or None when there is none."""
    index_path = directory / EXPORT_INDEX
    if not index_path.is_file():
        return None
    try:
        return json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{index_path} is not valid JSON ({error}); delete it and export again"
        ) from error
