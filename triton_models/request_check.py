"""Checks inference requests from the public ports against a model's config and re-encodes them.

Triton trusts what it is sent: a declared shape is allocated before the data is counted, deep
JSON exhausts its parser, out-of-range values wrap. The request guard therefore parses every
inference request with this module (pure: no I/O), refuses a bad one with BadRequest naming the
field and what is allowed, and sends Triton only the canonical re-encoding of checked data.
Everything is checked before anything proportional to a declared size is allocated: the memory
used is O(bytes sent).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

QUOTE_CHARS = 64  # client text quoted in a message is cut to this many characters
INT64_RANGE = (-(2**63), 2**63 - 1)
# numpy dtypes of the fixed-size datatypes, little-endian (BF16 travels as its 16 raw bits)
DTYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BF16": "<u2",
}
DATATYPES = (*DTYPES, "BYTES")
FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
# gRPC InferTensorContents field that carries each datatype (FP16/BF16: raw contents only)
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "data", "parameters")
OUTPUT_KEYS = ("name", "parameters")
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data", "classification")
DECIMAL = re.compile(r"[0-9]{1,20}")


class BadRequest(ValueError):
    """A client mistake; str(error) names the field (input name, 'inputs[3].shape', header
    name...) and what is allowed. Client-supplied text quoted in messages is cut to 64
    characters."""


@dataclass(frozen=True)
class TensorSpec:
    """An input as clients send it: `dims` with the batch dim (-1) first when the model
    batches, -1 = variable; `max_dims` the largest value per dim (-1: no bound), None: no
    bound beyond the data."""
    name: str
    datatype: str
    dims: tuple[int, ...]
    max_dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes: its inputs, its output names, its batch limit (0: no batching)."""
    name: str
    inputs: dict[str, TensorSpec]
    outputs: tuple[str, ...]
    max_batch_size: int
    decoupled: bool = False  # answers over gRPC streams only (model_transaction_policy)

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        """From Triton's model config JSON (GET /v2/models/{name}/config). The config
        parameter `max_input_dims` (JSON {"INPUT": [d0, d1, ...]}, dims as in the config)
        bounds variable dims; the batch dim is bounded by max_batch_size. ValueError for a
        config this module cannot check against."""
        batch = int(config.get("max_batch_size", 0))
        bounds = _max_input_dims(config)
        inputs = {}
        for entry in config.get("input", []):
            spec = _tensor_spec(entry, batch, bounds.pop(entry["name"], None))
            inputs[spec.name] = spec
        if bounds:
            raise ValueError(f"max_input_dims names inputs the model lacks: {sorted(bounds)}")
        outputs = tuple(entry["name"] for entry in config.get("output", []))
        decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        return cls(config["name"], inputs, outputs, batch, decoupled)


@dataclass
class Tensor:
    """A checked input: `data` holds the canonical raw little-endian contents (BYTES: each
    element as a 4-byte little-endian length and its bytes, Triton's binary form)."""
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class RequestedOutput:
    """A requested output; `binary` is its `binary_data` parameter (None: not given), which
    `parameters` holds too."""
    name: str
    binary: bool | None
    parameters: dict[str, bool | int | str]


@dataclass
class InferRequest:
    """A checked inference request (version "" when none given; outputs [] = all)."""
    model: str
    version: str
    id: str
    parameters: dict[str, bool | int | str]
    inputs: list[Tensor]
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class CheckLimits:
    """Bounds on what a request may hold besides its tensors."""
    max_json_depth: int = 32  # nesting of any JSON the guard parses
    max_parameters: int = 16  # request or tensor parameters
    max_string_bytes: int = 4096  # id, parameter strings, names


# ---------------------------------------------------------------------------------------------
# The model config


def _config_datatype(data_type: str) -> str:
    name = data_type.removeprefix("TYPE_")
    name = "BYTES" if name == "STRING" else name
    if name not in DATATYPES:
        raise ValueError(f"model config data_type {data_type!r} is not one this guard checks")
    return name


def _max_input_dims(config: dict) -> dict[str, list[int]]:
    parameter = config.get("parameters", {}).get("max_input_dims")
    if parameter is None:
        return {}
    bounds = json.loads(parameter["string_value"])
    if not isinstance(bounds, dict) or not all(
            isinstance(dims, list) and all(isinstance(d, int) for d in dims)
            for dims in bounds.values()):
        raise ValueError(f"max_input_dims must map input names to lists of ints; got {bounds}")
    return bounds


def _tensor_spec(entry: dict, batch: int, bound: list[int] | None) -> TensorSpec:
    dims = tuple(int(d) for d in entry.get("dims", []))
    if bound is not None and len(bound) != len(dims):
        raise ValueError(f"max_input_dims[{entry['name']!r}] has {len(bound)} dims; the input "
                         f"has {len(dims)}")
    if batch > 0:
        tail = tuple(bound) if bound is not None else tuple(d if d >= 0 else -1 for d in dims)
        return TensorSpec(entry["name"], _config_datatype(entry["data_type"]), (-1, *dims),
                          (batch, *tail))
    return TensorSpec(entry["name"], _config_datatype(entry["data_type"]), dims,
                      tuple(bound) if bound is not None else None)


# ---------------------------------------------------------------------------------------------
# Messages and small checks


def _quote(text: str) -> str:
    """Client text for a message: cut to QUOTE_CHARS, quoted so that nothing in it (lone
    surrogates, control characters) survives unescaped."""
    return repr(text[:QUOTE_CHARS]) + ("..." if len(text) > QUOTE_CHARS else "")


def _json_kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _got(value: object) -> str:
    """A scalar the client sent, for a message ('got 300', 'got a string')."""
    if type(value) in (int, float):
        text = str(value)
        return text[:QUOTE_CHARS] + ("..." if len(text) > QUOTE_CHARS else "")
    if isinstance(value, bool):
        return str(value).lower()
    return _json_kind(value)


def _check_text(text: object, label: str, limits: CheckLimits) -> str:
    if not isinstance(text, str):
        raise BadRequest(f"{label}: must be a string; got {_json_kind(text)}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{label}: must be valid Unicode (no lone surrogates like \\ud800); "
                         f"got {_quote(text)}") from None
    if size > limits.max_string_bytes:
        raise BadRequest(f"{label}: must be at most {limits.max_string_bytes} bytes; got {size}")
    return text


def _check_int(value: object, label: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{label}: must be an integer {low}..{high}; got {_got(value)}")
    return value


def _parameter_value(value: object, label: str, limits: CheckLimits) -> bool | int | str:
    if isinstance(value, bool):
        return value
    if type(value) is int:
        return _check_int(value, label, *INT64_RANGE)
    if isinstance(value, str):
        return _check_text(value, label, limits)
    raise BadRequest(f"{label}: must be a boolean, an integer or a string; got {_got(value)}")


def _check_parameters(parameters: object, label: str, limits: CheckLimits,
                      allowed: tuple[str, ...] | None) -> dict[str, bool | int | str]:
    """Request (allowed None: any name) or tensor parameters, values checked by type."""
    if not isinstance(parameters, dict):
        raise BadRequest(f"{label}: must be an object; got {_json_kind(parameters)}")
    if len(parameters) > limits.max_parameters:
        raise BadRequest(f"{label}: at most {limits.max_parameters} parameters; "
                         f"got {len(parameters)}")
    checked = {}
    for key, value in parameters.items():
        _check_text(key, f"{label} name", limits)
        if key.startswith("shared_memory"):
            raise BadRequest(f"{label}.{_quote(key)}: shared memory is not served on the public "
                             "port; send the data in the request")
        if allowed is not None and key not in allowed:
            raise BadRequest(f"{label}: unknown parameter {_quote(key)}; allowed: "
                             f"{', '.join(allowed)}")
        checked[key] = _parameter_value(value, f"{label}.{key}", limits)
    if allowed is not None:
        _check_tensor_parameters(checked, label)
    return checked


def _check_tensor_parameters(parameters: dict[str, bool | int | str], label: str) -> None:
    for key in ("binary_data_size", "classification"):
        if key in parameters:
            _check_int(parameters[key], f"{label}.{key}", 0, INT64_RANGE[1])
    if "binary_data" in parameters and not isinstance(parameters["binary_data"], bool):
        raise BadRequest(f"{label}.binary_data: must be true or false; "
                         f"got {_got(parameters['binary_data'])}")


def _check_shape(label: str, shape: object, spec: TensorSpec,
                 batched: bool) -> tuple[int, ...]:
    """The declared shape against the input's dims and bounds (no allocation)."""
    rank = len(spec.dims)
    if not isinstance(shape, list):
        raise BadRequest(f"{label}.shape: must be an array of {rank} integers; "
                         f"got {_json_kind(shape)}")
    if len(shape) != rank:
        raise BadRequest(f"{label}.shape: must have {rank} dims {list(spec.dims)} (-1: any "
                         f"size); got {len(shape)} dims")
    for axis, (dim, want) in enumerate(zip(shape, spec.dims)):
        if type(dim) is not int:
            raise BadRequest(f"{label}.shape[{axis}]: must be an integer; got {_got(dim)}")
        if dim < 0:
            raise BadRequest(f"{label}.shape[{axis}]: must not be negative; got {dim}")
        if want >= 0 and dim != want:
            raise BadRequest(f"{label}.shape[{axis}]: must be {want}; got {_got(dim)}")
        bound = spec.max_dims[axis] if spec.max_dims is not None else -1
        if 0 <= bound < dim:
            what = "max_batch_size" if batched and axis == 0 else "the model's limit"
            raise BadRequest(f"{label}.shape[{axis}]: must be at most {bound} ({what}); "
                             f"got {_got(dim)}")
    return tuple(shape)


def _check_batch(inputs: list[Tensor], spec: ModelSpec) -> None:
    if spec.max_batch_size > 0 and len({tensor.shape[0] for tensor in inputs}) > 1:
        sizes = ", ".join(f"{tensor.name} {tensor.shape[0]}" for tensor in inputs)
        raise BadRequest(f"inputs: all inputs must have the same batch size; got {sizes}")


def _known_input(name: object, label: str, spec: ModelSpec, seen: set[str],
                 limits: CheckLimits) -> TensorSpec:
    _check_text(name, f"{label}.name", limits)
    tensor = spec.inputs.get(name)
    if tensor is None:
        raise BadRequest(f"{label}.name: {spec.name} has no input {_quote(name)}; its inputs: "
                         f"{', '.join(spec.inputs)}")
    if name in seen:
        raise BadRequest(f"{label}.name: input {name} is given twice")
    seen.add(name)
    return tensor


def _checked_outputs(outputs: list[tuple[object, dict]], spec: ModelSpec,
                     limits: CheckLimits) -> list[RequestedOutput]:
    """(name, checked parameters) pairs of requested outputs against the model's outputs."""
    if len(outputs) > len(spec.outputs):
        raise BadRequest(f"outputs: {spec.name} has {len(spec.outputs)} outputs; "
                         f"{len(outputs)} requested")
    checked: list[RequestedOutput] = []
    for index, (name, parameters) in enumerate(outputs):
        _check_text(name, f"outputs[{index}].name", limits)
        if name not in spec.outputs:
            raise BadRequest(f"outputs[{index}].name: {spec.name} has no output {_quote(name)}; "
                             f"its outputs: {', '.join(spec.outputs)}")
        if any(output.name == name for output in checked):
            raise BadRequest(f"outputs[{index}].name: output {name} is requested twice")
        checked.append(RequestedOutput(name, parameters.get("binary_data"), parameters))
    return checked


# ---------------------------------------------------------------------------------------------
# JSON


def _refuse_constant(name: str) -> None:
    raise BadRequest(f"request body: {name} is not JSON; numbers must be finite")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise BadRequest(f"request body: key {_quote(key)} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _load_json(data: bytes | memoryview, limits: CheckLimits, label: str) -> object:
    """UTF-8 JSON without NaN/Infinity or repeated keys; deep nesting is a BadRequest."""
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"{label}: not UTF-8 (byte {error.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest(f"{label}: JSON nested deeper than {limits.max_json_depth} "
                         "levels") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"{label}: not JSON ({error.msg} at char {error.pos})") from None
    except ValueError as error:  # e.g. an integer of over 4300 digits
        raise BadRequest(f"{label}: not JSON ({_quote(str(error))})") from None


def _json_depth(value: object) -> int:
    """Nesting of arrays and objects (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (list, dict)))
    return deepest


def check_json(body: bytes | memoryview, limits: CheckLimits = CheckLimits()) -> object:
    """Any other JSON body (e.g. POST /v2/repository/index): parsed within the limits."""
    value = _load_json(body, limits, "request body")
    if _json_depth(value) > limits.max_json_depth:
        raise BadRequest(f"request body: JSON nested deeper than {limits.max_json_depth} levels")
    return value


def header_length_value(text: str, body_length: int) -> int:
    """The Inference-Header-Content-Length header: a decimal integer in 1..body_length."""
    if not DECIMAL.fullmatch(text) or not 1 <= int(text) <= body_length:
        raise BadRequest(f"Inference-Header-Content-Length: must be a decimal integer in "
                         f"1..{body_length} (the body's length); got {_quote(text)}")
    return int(text)


def parse_http_infer(body: bytes | memoryview, header_length: int | None, model: str,
                     version: str, spec: ModelSpec,
                     limits: CheckLimits = CheckLimits()) -> InferRequest:
    """The body of POST /v2/models/{model}[/versions/{version}]/infer, checked; header_length
    is the Inference-Header-Content-Length (None: the whole body is JSON)."""
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    elif not 1 <= header_length <= len(view):
        raise BadRequest(f"Inference-Header-Content-Length: must be 1..{len(view)} (the body's "
                         f"length); got {header_length}")
    header = _load_json(view[:header_length], limits, "request body")
    _check_keys("request body", header, REQUEST_KEYS)
    request_id = _check_text(header.get("id", ""), "id", limits)
    parameters = _check_parameters(header.get("parameters", {}), "parameters", limits, None)
    inputs = _http_inputs(header.get("inputs"), view[header_length:], spec, limits)
    outputs = _http_outputs(header.get("outputs", []), spec, limits)
    return InferRequest(model, version, request_id, parameters, inputs, outputs)


def _http_inputs(entries: object, binary: memoryview, spec: ModelSpec,
                 limits: CheckLimits) -> list[Tensor]:
    if not isinstance(entries, list):
        raise BadRequest(f"inputs: must be an array of input objects; got {_json_kind(entries)}")
    if len(entries) > len(spec.inputs):
        raise BadRequest(f"inputs: {spec.name} has {len(spec.inputs)} inputs; got {len(entries)}")
    seen: set[str] = set()
    tensors: list[Tensor] = []
    binary_inputs: list[tuple[int, TensorSpec, tuple[int, ...], int]] = []
    for index, entry in enumerate(entries):
        tensor_spec, shape, data = _http_input(index, entry, spec, seen, limits)
        if isinstance(data, int):
            binary_inputs.append((len(tensors), tensor_spec, shape, data))
            data = b""
        tensors.append(Tensor(tensor_spec.name, tensor_spec.datatype, shape, data))
    declared = sum(size for *_, size in binary_inputs)
    if declared != len(binary):
        raise BadRequest(f"binary_data_size: the inputs declare {declared} bytes after the JSON "
                         f"header (Inference-Header-Content-Length); the body has {len(binary)}")
    offset = 0
    for position, tensor_spec, shape, size in binary_inputs:
        tensors[position].data = _raw_data(tensor_spec.name, tensor_spec.datatype, shape,
                                           binary[offset:offset + size])
        offset += size
    _check_batch(tensors, spec)
    return tensors


def _check_keys(label: str, entry: object, allowed: tuple[str, ...]) -> None:
    """BadRequest unless `entry` is a JSON object with only `allowed` keys."""
    if not isinstance(entry, dict):
        raise BadRequest(f"{label}: must be a JSON object; got {_json_kind(entry)}")
    unknown = next((key for key in entry if key not in allowed), None)
    if unknown is not None:
        raise BadRequest(f"{label}: unknown key {_quote(unknown)}; allowed: "
                         f"{', '.join(allowed)}")


def _http_input(index: int, entry: object, spec: ModelSpec, seen: set[str],
                limits: CheckLimits) -> tuple[TensorSpec, tuple[int, ...], bytes | int]:
    """One input object: its spec, shape, and data (bytes) or binary_data_size (int)."""
    label = f"inputs[{index}]"
    _check_keys(label, entry, INPUT_KEYS)
    tensor_spec = _known_input(entry.get("name"), label, spec, seen, limits)
    label = tensor_spec.name
    if entry.get("datatype") != tensor_spec.datatype:
        given = entry.get("datatype")
        raise BadRequest(f"{label}.datatype: must be {tensor_spec.datatype}; got "
                         f"{_quote(given) if isinstance(given, str) else _json_kind(given)}")
    shape = _check_shape(label, entry.get("shape"), tensor_spec, spec.max_batch_size > 0)
    parameters = _check_parameters(entry.get("parameters", {}), f"{label}.parameters", limits,
                                   INPUT_PARAMETERS)
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise BadRequest(f"{label}: give data or parameters.binary_data_size, not both")
        return tensor_spec, shape, size
    if "data" not in entry:
        raise BadRequest(f"{label}: needs data or parameters.binary_data_size")
    depth = min(max(len(shape), 1), limits.max_json_depth - 4)
    data = _json_data(label, tensor_spec.datatype, math.prod(shape), entry["data"], depth)
    return tensor_spec, shape, data


def _http_outputs(entries: object, spec: ModelSpec,
                  limits: CheckLimits) -> list[RequestedOutput]:
    if not isinstance(entries, list):
        raise BadRequest(f"outputs: must be an array of output objects; got "
                         f"{_json_kind(entries)}")
    if len(entries) > len(spec.outputs):
        raise BadRequest(f"outputs: {spec.name} has {len(spec.outputs)} outputs; "
                         f"{len(entries)} requested")
    pairs = []
    for index, entry in enumerate(entries):
        label = f"outputs[{index}]"
        _check_keys(label, entry, OUTPUT_KEYS)
        pairs.append((entry.get("name"), _check_parameters(
            entry.get("parameters", {}), f"{label}.parameters", limits, OUTPUT_PARAMETERS)))
    return _checked_outputs(pairs, spec, limits)


# ---------------------------------------------------------------------------------------------
# Tensor data


def _flatten(label: str, data: object, max_depth: int) -> list:
    """A flat list of `data`'s values: a flat array, or arrays nested level by level up to
    `max_depth` (the tensor's rank), as Triton accepts them."""
    if not isinstance(data, list):
        raise BadRequest(f"{label}.data: must be an array; got {_json_kind(data)}")
    level, depth = data, 1
    while True:
        kinds = set(map(type, level))
        if list not in kinds:
            return level
        if kinds != {list}:
            raise BadRequest(f"{label}.data: mixes arrays and values at nesting level {depth}")
        depth += 1
        if depth > max_depth:
            raise BadRequest(f"{label}.data: arrays nested deeper than the tensor's rank "
                             f"({max_depth})")
        level = list(chain.from_iterable(level))


def _first_bad(values: list, good: Callable[[object], bool]) -> tuple[int, object]:
    return next((index, value) for index, value in enumerate(values) if not good(value))


def _json_data(label: str, datatype: str, count: int, data: object, max_depth: int) -> bytes:
    """JSON tensor data, checked value by value for `datatype`, as canonical raw bytes."""
    values = _flatten(label, data, max_depth)
    if len(values) != count:
        raise BadRequest(f"{label}.data: has {len(values)} values; its shape needs {count}")
    if datatype == "BYTES":
        return _json_strings(label, values)
    if datatype == "BOOL":
        allowed, wanted = {bool}, "true or false"
    elif datatype in FLOAT_TYPES:
        allowed, wanted = {int, float}, f"a finite {datatype} number"
    else:
        allowed, wanted = {int}, f"an integer {_range(datatype)}"
    if not set(map(type, values)) <= allowed:
        index, value = _first_bad(values, lambda value: type(value) in allowed)
        raise BadRequest(f"{label}.data[{index}]: must be {wanted}; got {_got(value)}")
    if datatype in FLOAT_TYPES:
        return _float_bytes(label, datatype, values)
    if datatype != "BOOL" and values:
        low, high = _int_range(datatype)
        if not low <= min(values) or not max(values) <= high:
            index, value = _first_bad(values, lambda value: low <= value <= high)
            raise BadRequest(f"{label}.data[{index}]: must be an integer {low}..{high}; "
                             f"got {_got(value)}")
    return np.array(values, dtype=DTYPES[datatype]).tobytes()


def _int_range(datatype: str) -> tuple[int, int]:
    info = np.iinfo(DTYPES[datatype])
    return int(info.min), int(info.max)


def _range(datatype: str) -> str:
    return "{}..{}".format(*_int_range(datatype))


def _float_bytes(label: str, datatype: str, values: list) -> bytes:
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        index, value = _first_bad(values, _fits_float)
        raise BadRequest(f"{label}.data[{index}]: must be a finite {datatype} number; "
                         f"got {_got(value)}") from None
    with np.errstate(over="ignore", invalid="ignore"):
        if datatype == "BF16":
            narrow = _bfloat16_bits(wide.astype(np.float32))
            finite = (narrow & 0x7F80) != 0x7F80
        else:
            narrow = wide.astype(DTYPES[datatype])
            finite = np.isfinite(narrow)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise BadRequest(f"{label}.data[{index}]: must be a finite {datatype} number; "
                         f"got {_got(values[index])}")
    return narrow.tobytes()


def _fits_float(value: float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of float32 values, rounded to nearest even."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def _json_strings(label: str, values: list) -> bytes:
    if not set(map(type, values)) <= {str}:
        index, value = _first_bad(values, lambda value: isinstance(value, str))
        raise BadRequest(f"{label}.data[{index}]: must be a string; got {_got(value)}")
    try:
        encoded = [value.encode("utf-8") for value in values]
    except UnicodeEncodeError:
        index, value = _first_bad(values, _encodable)
        raise BadRequest(f"{label}.data[{index}]: must be valid Unicode (no lone surrogates "
                         f"like \\ud800); got {_quote(value)}") from None
    return _bytes_elements(encoded)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bytes_elements(elements: list[bytes]) -> bytes:
    """Triton's binary BYTES form: each element as a 4-byte little-endian length + bytes."""
    return b"".join(chain.from_iterable(
        (len(element).to_bytes(4, "little"), element) for element in elements))


def _raw_data(label: str, datatype: str, shape: tuple[int, ...],
              raw: bytes | memoryview) -> bytes:
    """Binary tensor contents checked against the shape: exact size, BYTES lengths that
    exactly fill it, BOOL bytes 0 or 1."""
    count = math.prod(shape)
    if datatype == "BYTES":
        _check_byte_elements(label, count, raw)
        return bytes(raw)
    size = count * np.dtype(DTYPES[datatype]).itemsize
    if len(raw) != size:
        raise BadRequest(f"{label}: {datatype} shape {list(shape)} needs {size} bytes of data; "
                         f"got {len(raw)}")
    if datatype == "BOOL" and size and np.frombuffer(raw, np.uint8).max() > 1:
        raise BadRequest(f"{label}: BOOL bytes must be 0 or 1")
    return bytes(raw)


def _check_byte_elements(label: str, count: int, raw: bytes | memoryview) -> None:
    if count * 4 > len(raw):
        raise BadRequest(f"{label}: BYTES shape needs {count} elements of at least 4 bytes "
                         f"(length prefix) each; got {len(raw)} bytes")
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise BadRequest(f"{label}: BYTES element {index} has no 4-byte length; the data "
                             f"ends at byte {len(raw)}")
        offset += 4 + int.from_bytes(raw[offset:offset + 4], "little")
        if offset > len(raw):
            raise BadRequest(f"{label}: BYTES element {index} runs past the end of its data "
                             f"({len(raw)} bytes)")
    if offset != len(raw):
        raise BadRequest(f"{label}: BYTES elements fill {offset} of its {len(raw)} bytes; "
                         f"its shape needs exactly {count} elements")


# ---------------------------------------------------------------------------------------------
# gRPC


GrpcInfer = bytes | memoryview | service_pb2.ModelInferRequest  # serialized, or decoded once


def decode_grpc_infer(message: GrpcInfer) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest a gRPC message holds (decoded as given); BadRequest if none."""
    if isinstance(message, service_pb2.ModelInferRequest):
        return message
    try:
        return service_pb2.ModelInferRequest.FromString(bytes(message))
    except (DecodeError, ValueError, RuntimeError):
        raise BadRequest("request: not a serialized inference.ModelInferRequest") from None


def model_of_grpc_infer(message: GrpcInfer) -> str:
    """The model_name of a ModelInferRequest."""
    return _check_text(decode_grpc_infer(message).model_name, "model_name", CheckLimits())


def parse_grpc_infer(message: GrpcInfer, spec_of: Callable[[str], ModelSpec],
                     limits: CheckLimits = CheckLimits()) -> InferRequest:
    """An inference.ModelInferRequest (serialized, or decoded by decode_grpc_infer), checked;
    spec_of(model_name) gives the spec (it may raise BadRequest for an unknown model)."""
    request = decode_grpc_infer(message)
    spec = spec_of(_check_text(request.model_name, "model_name", limits))
    version = _check_text(request.model_version, "model_version", limits)
    request_id = _check_text(request.id, "id", limits)
    parameters = _check_parameters(_grpc_parameters(request.parameters, "parameters", limits),
                                   "parameters", limits, None)
    inputs = _grpc_inputs(request, spec, limits)
    outputs = _checked_outputs(_grpc_outputs(request, spec, limits), spec, limits)
    return InferRequest(request.model_name, version, request_id, parameters, inputs, outputs)


def _grpc_parameters(parameters, label: str,
                     limits: CheckLimits) -> dict[str, bool | int | str]:
    """InferParameter values as Python values (uint64 as int; double refused)."""
    if len(parameters) > limits.max_parameters:
        raise BadRequest(f"{label}: at most {limits.max_parameters} parameters; "
                         f"got {len(parameters)}")
    values: dict[str, bool | int | str] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice in (None, "double_param"):
            raise BadRequest(f"{label}.{_quote(key)}: must be a bool, int64 or string parameter; "
                             f"got {choice or 'no value'}")
        values[key] = getattr(parameter, choice)
    return values


def _grpc_outputs(request, spec: ModelSpec, limits: CheckLimits) -> list[tuple[str, dict]]:
    if len(request.outputs) > len(spec.outputs):
        raise BadRequest(f"outputs: {spec.name} has {len(spec.outputs)} outputs; "
                         f"{len(request.outputs)} requested")
    pairs = []
    for index, output in enumerate(request.outputs):
        label = f"outputs[{index}].parameters"
        pairs.append((output.name, _check_parameters(
            _grpc_parameters(output.parameters, label, limits), label, limits,
            OUTPUT_PARAMETERS)))
    return pairs


def _grpc_inputs(request, spec: ModelSpec, limits: CheckLimits) -> list[Tensor]:
    if len(request.inputs) > len(spec.inputs):
        raise BadRequest(f"inputs: {spec.name} has {len(spec.inputs)} inputs; "
                         f"got {len(request.inputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents: must hold one entry per input "
                         f"({len(request.inputs)}); got {len(raw)}")
    seen: set[str] = set()
    tensors = []
    for index, entry in enumerate(request.inputs):
        tensor_spec = _known_input(entry.name, f"inputs[{index}]", spec, seen, limits)
        label = tensor_spec.name
        if entry.datatype != tensor_spec.datatype:
            raise BadRequest(f"{label}.datatype: must be {tensor_spec.datatype}; "
                             f"got {_quote(entry.datatype)}")
        shape = _check_shape(label, list(entry.shape), tensor_spec, spec.max_batch_size > 0)
        if entry.parameters:
            key = next(iter(entry.parameters))
            reason = ("shared memory is not served on the public port"
                      if key.startswith("shared_memory") else "gRPC inputs take no parameters")
            raise BadRequest(f"{label}.parameters.{_quote(key)}: {reason}")
        typed = entry.contents.ListFields()
        if raw and typed:
            raise BadRequest(f"{label}.contents: raw_input_contents and typed contents cannot "
                             "be mixed; send every input one way")
        data = (_raw_data(label, tensor_spec.datatype, shape, raw[index]) if raw
                else _typed_data(label, tensor_spec.datatype, math.prod(shape), typed))
        tensors.append(Tensor(tensor_spec.name, tensor_spec.datatype, shape, data))
    _check_batch(tensors, spec)
    return tensors


def _typed_data(label: str, datatype: str, count: int, fields: list) -> bytes:
    """InferTensorContents: only the datatype's field, count and range checked."""
    wanted = TYPED_FIELDS.get(datatype)
    for descriptor, _ in fields:
        if descriptor.name != wanted:
            allowed = f"contents.{wanted}" if wanted else "raw_input_contents only"
            raise BadRequest(f"{label}.contents: {datatype} takes {allowed}; "
                             f"got {descriptor.name}")
    values = fields[0][1] if fields else []
    if len(values) != count:
        raise BadRequest(f"{label}.contents.{wanted}: has {len(values)} values; "
                         f"its shape needs {count}")
    if datatype == "BYTES":
        return _bytes_elements(list(values))
    carried = np.array(values, dtype={"uint_contents": "<u4", "int_contents": "<i4"}.get(
        wanted, DTYPES[datatype]))
    if carried.dtype != np.dtype(DTYPES[datatype]) and carried.size:
        low, high = _int_range(datatype)
        if carried.min() < low or carried.max() > high:
            index = int(np.flatnonzero((carried < low) | (carried > high))[0])
            raise BadRequest(f"{label}.contents.{wanted}[{index}]: must be an integer "
                             f"{low}..{high}; got {int(carried[index])}")
    return carried.astype(DTYPES[datatype]).tobytes()


# ---------------------------------------------------------------------------------------------
# Canonical re-encoding


def _set_parameter(parameter, value: bool | int | str) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    else:
        parameter.string_param = value


def to_grpc_request(request: InferRequest) -> bytes:
    """The request as a ModelInferRequest with raw_input_contents."""
    message = service_pb2.ModelInferRequest(model_name=request.model,
                                            model_version=request.version, id=request.id)
    for key, value in request.parameters.items():
        _set_parameter(message.parameters[key], value)
    for tensor in request.inputs:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_input_contents.append(tensor.data)
    for output in request.outputs:
        requested = message.outputs.add(name=output.name)
        for key, value in output.parameters.items():
            _set_parameter(requested.parameters[key], value)
    return message.SerializeToString()


def grpc_stream_error(message: GrpcInfer, error: str) -> bytes:
    """A ModelStreamInferResponse refusing one request of a stream with `error`, naming the
    request's model and id where the message holds them, as Triton answers a bad request on a
    stream it keeps open."""
    try:
        request = decode_grpc_infer(message)
    except BadRequest:
        request = service_pb2.ModelInferRequest()
    answer = service_pb2.ModelStreamInferResponse(error_message=error)
    answer.infer_response.model_name = request.model_name
    answer.infer_response.model_version = request.model_version
    answer.infer_response.id = request.id
    return answer.SerializeToString()


def to_http_request(request: InferRequest) -> tuple[bytes, int]:
    """Triton's binary-tensor HTTP body and its Inference-Header-Content-Length."""
    header: dict[str, object] = {}
    if request.id:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = request.parameters
    header["inputs"] = [{"name": tensor.name, "shape": list(tensor.shape),
                         "datatype": tensor.datatype,
                         "parameters": {"binary_data_size": len(tensor.data)}}
                        for tensor in request.inputs]
    if request.outputs:
        header["outputs"] = [{"name": output.name, "parameters": output.parameters}
                             if output.parameters else {"name": output.name}
                             for output in request.outputs]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b"".join(tensor.data for tensor in request.inputs), len(encoded)
