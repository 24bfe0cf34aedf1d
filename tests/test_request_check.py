"""The request checker (triton_models/request_check.py), pure: bodies made by tritonclient
round-trip to the same tensors through HTTP (JSON and binary) and gRPC re-encodings; every kind
of hostile or mistaken request is a BadRequest naming the field; arbitrary bodies and bytes
(Hypothesis) never raise anything else; memory stays proportional to the bytes sent."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import _utils as grpc_utils
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype

from triton_models.pipeline_io import DRIFFUSION_IMAGE_INPUTS, DRIFFUSION_INPUTS, DRIFFUSION_OUTPUTS
from triton_models.request_check import (
    BadRequest,
    CheckLimits,
    ModelSpec,
    check_json,
    header_length_value,
    model_of_grpc_infer,
    parse_grpc_infer,
    parse_http_infer,
    to_grpc_request,
    to_http_request,
)

MAX_SIDE = 64
# the driffusion config as Triton's GET /v2/models/driffusion/config gives it
DRIFFUSION_CONFIG = {
    "name": "driffusion", "backend": "python", "max_batch_size": 0,
    "input": [{"name": name, "data_type": dtype, "format": "FORMAT_NONE", "dims": ["1"],
               "optional": True} for name, (dtype, _) in DRIFFUSION_INPUTS.items()]
    + [{"name": name, "data_type": "TYPE_UINT8", "dims": dims, "optional": True}
       for name, (dims, _) in DRIFFUSION_IMAGE_INPUTS.items()],
    "output": [{"name": name, "data_type": dtype, "dims": dims}
               for name, (dtype, dims) in DRIFFUSION_OUTPUTS.items()],
    "parameters": {"max_input_dims": {"string_value": json.dumps(
        {"INIT_IMAGE": [MAX_SIDE, MAX_SIDE, 3], "MASK": [MAX_SIDE, MAX_SIDE]})},
        "deadline_s": {"string_value": "60"}},
}
# a batching device model: FP32 [-1, 4, 8, 8] on the wire
DEVICE_CONFIG = {
    "name": "unet_cpu0", "platform": "onnxruntime_onnx", "max_batch_size": 8,
    "input": [{"name": "SAMPLE", "data_type": "TYPE_FP32", "dims": [4, 8, 8]},
              {"name": "TIMESTEP", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": "NOISE", "data_type": "TYPE_FP32", "dims": [4, 8, 8]}],
}
DRIFFUSION = ModelSpec.from_config(DRIFFUSION_CONFIG)
DEVICE = ModelSpec.from_config(DEVICE_CONFIG)
UNBOUNDED = ModelSpec.from_config({**DRIFFUSION_CONFIG, "parameters": {}})
SPECS = {"driffusion": DRIFFUSION, "unet_cpu0": DEVICE}


def spec_of(name: str) -> ModelSpec:
    if name not in SPECS:
        raise BadRequest(f"model {name!r}: unknown")
    return SPECS[name]


def driffusion_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "PROMPT": np.array([b"a red fox \xe2\x9c\x93"], dtype=object),
        "SEED": np.array([2**63 - 1], dtype=np.int64),
        "STEPS": np.array([-2**31], dtype=np.int32),
        "GUIDANCE": np.array([7.25], dtype=np.float32),
        "INIT_IMAGE": rng.integers(0, 256, (16, 24, 3), dtype=np.uint8),
        "MASK": rng.integers(0, 256, (16, 24), dtype=np.uint8),
    }


def device_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"SAMPLE": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "TIMESTEP": np.array([[999.0], [1.5]], dtype=np.float32)}


def triton_dtype(array: np.ndarray) -> str:
    return np_to_triton_dtype(array.dtype)


def http_body(arrays: dict[str, np.ndarray], binary: bool, outputs: tuple[str, ...] = (),
              **options) -> tuple[bytes, int | None]:
    """A request body as tritonclient.http makes it."""
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), triton_dtype(array))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=requested or None, **options)


def grpc_message(model: str, arrays: dict[str, np.ndarray], outputs: tuple[str, ...] = (),
                 request_id: str = "", parameters: dict | None = None) -> bytes:
    """A serialized ModelInferRequest as tritonclient.grpc makes it."""
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] or None
    request = grpc_utils._get_inference_request(model, inputs, "", request_id, requested, 0,
                                                False, False, 0, None, parameters)
    return request.SerializeToString()


def as_arrays(request) -> dict[str, np.ndarray]:
    """The checked tensors back as numpy arrays (BYTES via tritonclient's own decoder)."""
    arrays = {}
    for tensor in request.inputs:
        if tensor.datatype == "BYTES":
            flat = grpc_utils.deserialize_bytes_tensor(tensor.data)
        else:
            flat = np.frombuffer(tensor.data, grpc_utils.triton_to_np_dtype(tensor.datatype))
        arrays[tensor.name] = flat.reshape(tensor.shape)
    return arrays


def assert_same(arrays: dict[str, np.ndarray], request) -> None:
    parsed = as_arrays(request)
    assert list(parsed) == list(arrays)
    for name, array in arrays.items():
        assert parsed[name].dtype == array.dtype, name
        np.testing.assert_array_equal(parsed[name], array)


def round_trip(request, spec: ModelSpec):
    """The request through both canonical encodings, parsed again each time."""
    via_grpc = parse_grpc_infer(to_grpc_request(request), spec_of)
    body, length = to_http_request(request)
    via_http = parse_http_infer(body, length, request.model, request.version, spec)
    assert via_grpc == request and via_http == request
    return via_grpc


# ---------------------------------------------------------------------------------------------
# Specs and valid requests


def test_specs_from_triton_config():
    assert DRIFFUSION.inputs["SEED"].datatype == "INT64"
    assert DRIFFUSION.inputs["PROMPT"].datatype == "BYTES"
    assert DRIFFUSION.inputs["SEED"].dims == (1,) and DRIFFUSION.inputs["SEED"].max_dims is None
    assert DRIFFUSION.inputs["INIT_IMAGE"].dims == (-1, -1, 3)
    assert DRIFFUSION.inputs["INIT_IMAGE"].max_dims == (MAX_SIDE, MAX_SIDE, 3)
    assert DRIFFUSION.outputs == ("IMAGE", "ROUNDS", "EVALUATIONS")
    assert DEVICE.inputs["SAMPLE"].dims == (-1, 4, 8, 8)
    assert DEVICE.inputs["SAMPLE"].max_dims == (8, 4, 8, 8)
    with pytest.raises(ValueError, match="NOPE"):
        ModelSpec.from_config({**DRIFFUSION_CONFIG, "parameters": {"max_input_dims": {
            "string_value": '{"NOPE": [1]}'}}})


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", ["driffusion", "unet_cpu0"])
def test_http_bodies_round_trip(model, binary):
    arrays = driffusion_inputs() if model == "driffusion" else device_inputs()
    outputs = SPECS[model].outputs[:1]
    body, length = http_body(arrays, binary, outputs, request_id="r-1",
                             parameters={"note": "x"})
    request = parse_http_infer(memoryview(body), length, model, "", SPECS[model])
    assert_same(arrays, request)
    assert (request.id, request.parameters) == ("r-1", {"note": "x"})
    assert [output.name for output in request.outputs] == list(outputs)
    assert request.outputs[0].binary is binary
    assert_same(arrays, round_trip(request, SPECS[model]))


@pytest.mark.parametrize("model", ["driffusion", "unet_cpu0"])
def test_grpc_messages_round_trip(model):
    arrays = driffusion_inputs() if model == "driffusion" else device_inputs()
    message = grpc_message(model, arrays, SPECS[model].outputs[:1], "id-7", {"flag": True})
    assert model_of_grpc_infer(message) == model
    request = parse_grpc_infer(message, spec_of)
    assert_same(arrays, request)
    assert (request.id, request.parameters) == ("id-7", {"flag": True})
    assert_same(arrays, round_trip(request, SPECS[model]))


def test_nested_json_data_equals_flat():
    image = driffusion_inputs()["INIT_IMAGE"]
    flat = {"inputs": [{"name": "INIT_IMAGE", "shape": list(image.shape), "datatype": "UINT8",
                        "data": image.reshape(-1).tolist()}]}
    nested = {"inputs": [{**flat["inputs"][0], "data": image.tolist()}]}
    rows = {"inputs": [{**flat["inputs"][0], "data": image.reshape(16, -1).tolist()}]}
    parsed = [parse_http_infer(json.dumps(body).encode(), None, "driffusion", "", DRIFFUSION)
              for body in (flat, nested, rows)]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0].inputs[0].data == image.tobytes()


def test_grpc_typed_contents():
    request = service_pb2.ModelInferRequest(model_name="driffusion")
    request.inputs.add(name="MASK", datatype="UINT8", shape=[1, 3]).contents.uint_contents[:] = \
        [0, 7, 255]
    request.inputs.add(name="STEPS", datatype="INT32", shape=[1]).contents.int_contents[:] = [-5]
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents[:] = \
        [b"hi"]
    parsed = parse_grpc_infer(request.SerializeToString(), spec_of)
    arrays = as_arrays(parsed)
    np.testing.assert_array_equal(arrays["MASK"], np.array([[0, 7, 255]], dtype=np.uint8))
    assert arrays["STEPS"].tolist() == [-5] and arrays["PROMPT"].tolist() == [b"hi"]


@pytest.mark.parametrize("datatype, values, expected", [
    ("FP16", [1.5, -2, 65504], np.array([1.5, -2, 65504], np.float16).tobytes()),
    ("BF16", [1.0, -2.0, 1.00390625, 1.01171875],  # ties round to even: 0x3F80, 0x3F82
     np.array([0x3F80, 0xC000, 0x3F80, 0x3F82], "<u2").tobytes()),
    ("FP64", [1e300, 3], np.array([1e300, 3.0]).tobytes()),
    ("UINT64", [2**64 - 1, 0], np.array([2**64 - 1, 0], np.uint64).tobytes()),
    ("INT8", [-128, 127], np.array([-128, 127], np.int8).tobytes()),
    ("BOOL", [True, False], b"\x01\x00"),
])
def test_json_values_convert_exactly(datatype, values, expected):
    spec = ModelSpec.from_config({"name": "m", "input": [
        {"name": "X", "data_type": f"TYPE_{datatype}", "dims": [-1]}], "output": []})
    body = {"inputs": [{"name": "X", "shape": [len(values)], "datatype": datatype,
                        "data": values}]}
    assert parse_http_infer(json.dumps(body).encode(), None, "m", "", spec).inputs[0].data \
        == expected


# ---------------------------------------------------------------------------------------------
# Refused requests


def tensor(name: str, shape: list, datatype: str, data=None, **extra) -> dict:
    entry = {"name": name, "shape": shape, "datatype": datatype, **extra}
    if data is not None:
        entry["data"] = data
    return entry


SEED = tensor("SEED", [1], "INT64", [1])
HTTP_REFUSED = [
    # JSON itself
    ("not-utf8", b'{"inputs": ["\xff"]}', "not UTF-8"),
    ("not-json", b'{"inputs": [', "not JSON"),
    ("nan", (b'{"inputs": [{"name": "GUIDANCE", "shape": [1], "datatype": "FP32", '
            b'"data": [NaN]}]}'), "NaN is not JSON"),
    ("infinity", b'{"inputs": [], "parameters": {"x": -Infinity}}', "-Infinity is not JSON"),
    ("deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 32"),
    ("top-array", b"[]", "must be a JSON object; got an array"),
    ("unknown-key", {"inputs": [], "shared": 1}, "unknown key 'shared'; allowed: id"),
    ("repeated-key", b'{"inputs": [], "inputs": []}', "'inputs' appears twice"),
    ("inputs-object", {"inputs": {}}, "inputs: must be an array"),
    ("input-not-object", {"inputs": [3]}, "inputs[0]: must be a JSON object"),
    ("name-not-string", {"inputs": [tensor(7, [1], "INT64", [1])]}, "inputs[0].name: must be a"),
    ("shape-string", {"inputs": [tensor("SEED", "1", "INT64", [1])]}, "SEED.shape: must be an"),
    ("datatype-missing", {"inputs": [{"name": "SEED", "shape": [1], "data": [1]}]},
     "SEED.datatype: must be INT64; got null"),
    ("id-number", {"id": 5, "inputs": []}, "id: must be a string"),
    # inputs
    ("unknown-name", {"inputs": [tensor("SEEDS", [1], "INT64", [1])]},
     "inputs[0].name: driffusion has no input 'SEEDS'"),
    ("name-twice", {"inputs": [SEED, SEED]}, "input SEED is given twice"),
    ("too-many-inputs", {"inputs": [tensor(f"X{i}", [1], "INT64", [1]) for i in range(300)]},
     "driffusion has 17 inputs; got 300"),
    ("datatype", {"inputs": [tensor("SEED", [1], "INT32", [1])]}, "must be INT64; got 'INT32'"),
    ("rank", {"inputs": [tensor("INIT_IMAGE", [4, 4], "UINT8", [0] * 16)]},
     "INIT_IMAGE.shape: must have 3 dims [-1, -1, 3]"),
    ("fixed-dim", {"inputs": [tensor("INIT_IMAGE", [2, 2, 4], "UINT8", [0] * 16)]},
     "INIT_IMAGE.shape[2]: must be 3; got 4"),
    ("negative-dim", {"inputs": [tensor("MASK", [-1, 4], "UINT8", [0] * 4)]},
     "MASK.shape[0]: must not be negative; got -1"),
    ("huge-dims", {"inputs": [tensor("INIT_IMAGE", [100000, 100000, 3], "UINT8", [1])]},
     "INIT_IMAGE.shape[0]: must be at most 64 (the model's limit)"),
    ("huge-seed-shape", {"inputs": [tensor("SEED", [100000, 100000], "INT64", [1])]},
     "SEED.shape: must have 1 dims [1]"),
    ("bool-dim", {"inputs": [tensor("SEED", [True], "INT64", [1])]},
     "SEED.shape[0]: must be an integer; got true"),
    ("count", {"inputs": [tensor("MASK", [4, 4], "UINT8", [1] * 15)]},
     "MASK.data: has 15 values; its shape needs 16"),
    ("too-deep-data", {"inputs": [tensor("MASK", [1, 1], "UINT8", [[[1]]])]},
     "nested deeper than the tensor's rank (2)"),
    ("ragged-data", {"inputs": [tensor("MASK", [2, 2], "UINT8", [[1, 2], 3, 4])]},
     "mixes arrays and values"),
    ("data-object", {"inputs": [tensor("SEED", [1], "INT64", {"a": 1})]},
     "SEED.data: must be an array; got an object"),
    ("shared-memory", {"inputs": [tensor("SEED", [1], "INT64", parameters={
        "shared_memory_region": "r", "shared_memory_byte_size": 8})]},
     "shared memory is not served on the public port"),
    ("input-parameter", {"inputs": [tensor("SEED", [1], "INT64", [1], parameters={"x": 1})]},
     "unknown parameter 'x'; allowed: binary_data_size"),
    ("binary-size-negative", {"inputs": [tensor("SEED", [1], "INT64", parameters={
        "binary_data_size": -5})]}, "binary_data_size: must be an integer 0.."),
    ("binary-size-bool", {"inputs": [tensor("SEED", [1], "INT64", parameters={
        "binary_data_size": True})]}, "binary_data_size: must be an integer 0.."),
    ("data-and-binary", {"inputs": [tensor("SEED", [1], "INT64", [1], parameters={
        "binary_data_size": 8})]}, "give data or parameters.binary_data_size, not both"),
    ("no-data", {"inputs": [tensor("SEED", [1], "INT64")]}, "needs data or parameters"),
    ("binary-without-header", {"inputs": [tensor("SEED", [1], "INT64", parameters={
        "binary_data_size": 8})]}, "declare 8 bytes after the JSON header"),
    # values per datatype
    ("uint8-300", {"inputs": [tensor("MASK", [1, 2], "UINT8", [1, 300])]},
     "MASK.data[1]: must be an integer 0..255; got 300"),
    ("uint8-negative", {"inputs": [tensor("MASK", [1, 1], "UINT8", [-1])]}, "got -1"),
    ("uint8-float", {"inputs": [tensor("MASK", [1, 1], "UINT8", [1.0])]},
     "MASK.data[0]: must be an integer 0..255; got 1.0"),
    ("uint8-string", {"inputs": [tensor("MASK", [1, 1], "UINT8", ["1"])]}, "got a string"),
    ("uint8-bool", {"inputs": [tensor("MASK", [1, 2], "UINT8", [1, True])]},
     "MASK.data[1]: must be an integer 0..255; got true"),
    ("int32-overflow", {"inputs": [tensor("STEPS", [1], "INT32", [2147483648])]},
     "must be an integer -2147483648..2147483647; got 2147483648"),
    ("int64-2-63", {"inputs": [tensor("SEED", [1], "INT64", [2**63])]},
     "SEED.data[0]: must be an integer -9223372036854775808..9223372036854775807"),
    ("int64-huge", {"inputs": [tensor("SEED", [1], "INT64", [10**400])]}, "SEED.data[0]"),
    ("fp32-overflow", {"inputs": [tensor("GUIDANCE", [1], "FP32", [1e39])]},
     "GUIDANCE.data[0]: must be a finite FP32 number; got 1e+39"),
    ("fp32-1e400", (b'{"inputs": [{"name": "GUIDANCE", "shape": [1], "datatype": "FP32", '
                   b'"data": [1e400]}]}'), "GUIDANCE.data[0]: must be a finite FP32 number"),
    ("fp32-bool", {"inputs": [tensor("GUIDANCE", [1], "FP32", [False])]}, "got false"),
    ("fp32-huge-int", {"inputs": [tensor("GUIDANCE", [1], "FP32", [10**400])]}, "finite FP32"),
    ("bytes-number", {"inputs": [tensor("PROMPT", [1], "BYTES", [5])]},
     "PROMPT.data[0]: must be a string; got 5"),
    ("bytes-surrogate", (b'{"inputs": [{"name": "PROMPT", "shape": [1], "datatype": "BYTES", '
                        b'"data": ["\\ud800"]}]}'), "no lone surrogates"),
    # parameters and outputs
    ("too-many-parameters", {"inputs": [], "parameters": {str(i): 1 for i in range(17)}},
     "parameters: at most 16 parameters; got 17"),
    ("parameter-float", {"inputs": [], "parameters": {"priority": 1.5}},
     "parameters.priority: must be a boolean, an integer or a string; got 1.5"),
    ("parameter-list", {"inputs": [], "parameters": {"x": [1]}}, "got an array"),
    ("parameter-int-range", {"inputs": [], "parameters": {"x": 2**63}}, "parameters.x"),
    ("parameter-long-string", {"inputs": [], "parameters": {"x": "a" * 4097}},
     "parameters.x: must be at most 4096 bytes; got 4097"),
    ("id-long", {"id": "é" * 2049, "inputs": []}, "id: must be at most 4096 bytes"),
    ("unknown-output", {"inputs": [], "outputs": [{"name": "NOISE"}]},
     "outputs[0].name: driffusion has no output 'NOISE'"),
    ("output-twice", {"inputs": [], "outputs": [{"name": "IMAGE"}, {"name": "IMAGE"}]},
     "output IMAGE is requested twice"),
    ("too-many-outputs", {"inputs": [], "outputs": [{"name": "IMAGE"}] * 4},
     "driffusion has 3 outputs; 4 requested"),
    ("output-parameter", {"inputs": [], "outputs": [{"name": "IMAGE", "parameters": {
        "binary_data": 1}}]}, "outputs[0].parameters.binary_data: must be true or false"),
    ("output-shared-memory", {"inputs": [], "outputs": [{"name": "IMAGE", "parameters": {
        "shared_memory_region": "r"}}]}, "shared memory is not served"),
    ("output-key", {"inputs": [], "outputs": [{"name": "IMAGE", "data": []}]},
     "outputs[0]: unknown key 'data'"),
]


@pytest.mark.parametrize("body, phrase", [case[1:] for case in HTTP_REFUSED],
                         ids=[case[0] for case in HTTP_REFUSED])
def test_http_refusals_name_the_field(body, phrase):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(BadRequest) as caught:
        parse_http_infer(raw, None, "driffusion", "", DRIFFUSION)
    assert phrase in str(caught.value)


def test_unknown_names_stop_at_the_first():
    names = [tensor(f"N{i}", [1], "INT64", [1]) for i in range(3)]
    one_input = ModelSpec("m", {"N": DRIFFUSION.inputs["SEED"]}, (), 0)
    more = ModelSpec("m", {f"N{i}": DRIFFUSION.inputs["SEED"] for i in range(5, 9)}, (), 0)
    with pytest.raises(BadRequest, match="m has 1 inputs; got 3"):
        parse_http_infer(json.dumps({"inputs": names}).encode(), None, "m", "", one_input)
    with pytest.raises(BadRequest) as caught:
        parse_http_infer(json.dumps({"inputs": names}).encode(), None, "m", "", more)
    assert str(caught.value).count("N0") == 1 and "N1" not in str(caught.value)


def test_huge_declared_shape_allocates_nothing():
    body = json.dumps({"inputs": [tensor("INIT_IMAGE", [100000, 100000, 3], "UINT8",
                                         [1])]}).encode()
    tracemalloc.start()
    with pytest.raises(BadRequest, match="has 1 values; its shape needs 30000000000"):
        parse_http_infer(body, None, "driffusion", "", UNBOUNDED)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000


def test_device_batch_limit_and_batch_agreement():
    sample = device_inputs()["SAMPLE"]
    big = np.zeros((9, 4, 8, 8), np.float32)
    body, length = http_body({"SAMPLE": big}, binary=True)
    with pytest.raises(BadRequest, match=r"SAMPLE.shape\[0\]: must be at most 8 \(max_batch_"):
        parse_http_infer(body, length, "unet_cpu0", "", DEVICE)
    body, length = http_body({"SAMPLE": sample, "TIMESTEP": np.zeros((3, 1), np.float32)},
                             binary=True)
    with pytest.raises(BadRequest, match="same batch size; got SAMPLE 2, TIMESTEP 3"):
        parse_http_infer(body, length, "unet_cpu0", "", DEVICE)


def binary_request(entries: list[dict], payload: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": entries}).encode()
    return header + payload, len(header)


def sized(name: str, shape: list, datatype: str, size: int) -> dict:
    return tensor(name, shape, datatype, parameters={"binary_data_size": size})


@pytest.mark.parametrize("entries, payload, phrase", [
    ([sized("SEED", [1], "INT64", 8)], b"\0" * 7, "the inputs declare 8 bytes after the JSON"),
    ([sized("SEED", [1], "INT64", 8)], b"\0" * 9, "the body has 9"),
    ([sized("SEED", [1], "INT64", 4)], b"\0" * 4, "SEED: INT64 shape [1] needs 8 bytes"),
    ([sized("MASK", [100000, 100000], "UINT8", 4)], b"\0" * 4, "MASK.shape[0]: must be at"),
    ([sized("PROMPT", [1], "BYTES", 3)], b"abc", "needs 1 elements of at least 4 bytes"),
    ([sized("PROMPT", [1], "BYTES", 6)], b"\x05\0\0\0ab", "element 0 runs past the end"),
    ([sized("PROMPT", [1], "BYTES", 7)], b"\x01\0\0\0a\0\0", "fill 5 of its 7 bytes"),
    ([sized("PROMPT", [2], "BYTES", 5)], b"\x01\0\0\0a", "PROMPT.shape[0]: must be 1; got 2"),
], ids=["short", "long", "size", "dims", "bytes-short", "bytes-past", "bytes-extra",
        "bytes-shape"])
def test_binary_refusals(entries, payload, phrase):
    body, length = binary_request(entries, payload)
    with pytest.raises(BadRequest) as caught:
        parse_http_infer(body, length, "driffusion", "", DRIFFUSION)
    assert phrase in str(caught.value)


def test_binary_bool_bytes_and_header_length():
    spec = ModelSpec("m", {"B": ModelSpec.from_config({"name": "m", "input": [
        {"name": "B", "data_type": "TYPE_BOOL", "dims": [2]}]}).inputs["B"]}, (), 0)
    body, length = binary_request([sized("B", [2], "BOOL", 2)], b"\x01\x02")
    with pytest.raises(BadRequest, match="BOOL bytes must be 0 or 1"):
        parse_http_infer(body, length, "m", "", spec)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length: must be 1..6"):
        parse_http_infer(b"{}    ", 7, "m", "", spec)
    assert header_length_value("12", 12) == 12
    for text in ("0", "13", "-1", "1e3", " 12", "٣", "9" * 30):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length: must be a dec"):
            header_length_value(text, 12)


def test_check_json_limits():
    assert check_json(b'{"a": [[1]]}') == {"a": [[1]]}
    with pytest.raises(BadRequest, match="nested deeper than 32 levels"):
        check_json(b"[" * 33 + b"]" * 33)
    check_json(b"[" * 32 + b"]" * 32)
    with pytest.raises(BadRequest, match="nested deeper than 2 levels"):
        check_json(b'{"a": [[1]]}', CheckLimits(max_json_depth=2))
    with pytest.raises(BadRequest, match="nested deeper than 32"):
        check_json(memoryview(b"{\"a\":" * 200_000))
    with pytest.raises(BadRequest, match="not UTF-8"):
        check_json("[\"é\"]".encode("utf-16"))


# ---------------------------------------------------------------------------------------------
# gRPC refusals


def grpc_with(**fields) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name="driffusion", **fields)


def typed(request, name: str, datatype: str, shape: list, field: str, values: list):
    getattr(request.inputs.add(name=name, datatype=datatype, shape=shape).contents,
            field)[:] = values
    return request


def grpc_cases() -> list[tuple[str, service_pb2.ModelInferRequest, str]]:
    raw_and_typed = typed(grpc_with(raw_input_contents=[b"\0" * 8]), "SEED", "INT64", [1],
                          "int64_contents", [1])
    extra_raw = grpc_with(raw_input_contents=[b"\0" * 8, b"\0" * 8])
    extra_raw.inputs.add(name="SEED", datatype="INT64", shape=[1])
    shm = grpc_with()
    shm.inputs.add(name="SEED", datatype="INT64", shape=[1]) \
        .parameters["shared_memory_region"].string_param = "r"
    double = grpc_with()
    double.parameters["priority"].double_param = 1.5
    bad_output = grpc_with()
    bad_output.outputs.add(name="NOISE")
    return [
        ("uint8-300", typed(grpc_with(), "MASK", "UINT8", [1, 2], "uint_contents", [1, 300]),
         "MASK.contents.uint_contents[1]: must be an integer 0..255; got 300"),
        ("int16-range", typed(grpc_with(), "STEPS", "INT32", [1], "int_contents", [1]), ""),
        ("wrong-field", typed(grpc_with(), "SEED", "INT64", [1], "int_contents", [1]),
         "SEED.contents: INT64 takes contents.int64_contents; got int_contents"),
        ("count", typed(grpc_with(), "SEED", "INT64", [1], "int64_contents", [1, 2]),
         "has 2 values; its shape needs 1"),
        ("mixed", raw_and_typed, "raw_input_contents and typed contents cannot be mixed"),
        ("raw-count", extra_raw, "one entry per input (1); got 2"),
        ("shape", typed(grpc_with(), "SEED", "INT64", [-3], "int64_contents", [1]),
         "SEED.shape[0]: must not be negative"),
        ("shared-memory", shm, "shared memory is not served on the public port"),
        ("double-parameter", double, "parameters.'priority': must be a bool, int64 or string"),
        ("unknown-output", bad_output, "driffusion has no output 'NOISE'"),
        ("unknown-input", typed(grpc_with(), "X", "INT64", [1], "int64_contents", [1]),
         "inputs[0].name: driffusion has no input 'X'"),
        ("datatype", typed(grpc_with(), "SEED", "INT32", [1], "int_contents", [1]),
         "SEED.datatype: must be INT64; got 'INT32'"),
        ("unknown-model", service_pb2.ModelInferRequest(model_name="nope"), "model 'nope'"),
    ]


@pytest.mark.parametrize("case", grpc_cases(), ids=lambda case: case[0])
def test_grpc_refusals_name_the_field(case):
    _, request, phrase = case
    if not phrase:  # a valid typed request, for contrast
        assert parse_grpc_infer(request.SerializeToString(), spec_of).inputs[0].data == \
            np.int32(1).tobytes()
        return
    with pytest.raises(BadRequest) as caught:
        parse_grpc_infer(request.SerializeToString(), spec_of)
    assert phrase in str(caught.value)


def test_grpc_fp16_needs_raw_and_garbage_is_refused():
    spec = ModelSpec.from_config({"name": "half", "input": [
        {"name": "H", "data_type": "TYPE_FP16", "dims": [1]}]})
    request = typed(service_pb2.ModelInferRequest(model_name="half"), "H", "FP16", [1],
                    "fp32_contents", [1.0])
    with pytest.raises(BadRequest, match="FP16 takes raw_input_contents only"):
        parse_grpc_infer(request.SerializeToString(), lambda name: spec)
    for garbage in (b"\xff\xff\xff", b"\x0a\x05ab"):
        with pytest.raises(BadRequest, match="not a serialized inference.ModelInferRequest"):
            model_of_grpc_infer(garbage)


# ---------------------------------------------------------------------------------------------
# Hostile pass: Hypothesis


JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, width=64) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=6), children, max_size=4),
                           max_leaves=8)
NAMES = st.sampled_from([*DRIFFUSION.inputs, "X", ""]) | st.text(max_size=4)
DATATYPES = st.sampled_from(["UINT8", "INT32", "INT64", "FP32", "BYTES", "BOOL", "FP16", "X"])
SHAPES = st.lists(st.integers(-2, 5) | JSON_SCALARS, max_size=4)
DATA = st.lists(JSON_SCALARS, max_size=12) | st.lists(st.lists(JSON_SCALARS, max_size=3),
                                                      max_size=4) | JSON_VALUES
INPUTS = st.fixed_dictionaries(
    {"name": NAMES, "datatype": DATATYPES, "shape": SHAPES},
    optional={"data": DATA, "parameters": st.dictionaries(
        st.sampled_from(["binary_data_size", "x", "shared_memory_region"]), JSON_SCALARS)})


@st.composite
def near_valid_inputs(draw) -> dict:
    """An input of the driffusion model with its datatype and rank, small dims, and data
    of about the right count (values of any JSON kind, often in range)."""
    spec = DRIFFUSION.inputs[draw(st.sampled_from(sorted(DRIFFUSION.inputs)))]
    shape = [dim if dim >= 0 else draw(st.integers(0, 2)) for dim in spec.dims]
    count = int(np.prod(shape)) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    value = {"BYTES": st.text(max_size=4), "FP32": st.floats(width=64, allow_nan=False)}.get(
        spec.datatype, st.integers(-2, 300)) | JSON_SCALARS
    return tensor(spec.name, shape, spec.datatype, draw(st.lists(value, min_size=max(count, 0),
                                                                max_size=max(count, 0))))


BODIES = st.fixed_dictionaries({"inputs": st.lists(near_valid_inputs(), max_size=3)
                                          | st.lists(INPUTS | near_valid_inputs(), max_size=4)},
                               optional={
    "id": JSON_SCALARS, "parameters": st.dictionaries(st.text(max_size=4), JSON_SCALARS
                                                      | st.lists(JSON_SCALARS, max_size=2),
                                                      max_size=3),
    "outputs": st.lists(st.fixed_dictionaries({"name": NAMES}), max_size=3),
    "extra": JSON_SCALARS}) | JSON_VALUES
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def only_bad_requests(call) -> None:
    try:
        call()
    except BadRequest:
        pass


@FUZZ
@given(body=BODIES, tail=st.binary(max_size=16), split=st.booleans())
def test_fuzz_http_bodies_raise_only_bad_request(body, tail, split):
    header = json.dumps(body).encode()
    only_bad_requests(lambda: round_trip(parse_http_infer(
        header + tail, len(header) if split else None, "driffusion", "", DRIFFUSION),
        DRIFFUSION))


@FUZZ
@given(data=st.binary(max_size=64), length=st.integers(-1, 70))
def test_fuzz_bytes_raise_only_bad_request(data, length):
    only_bad_requests(lambda: parse_http_infer(data, length, "driffusion", "", DRIFFUSION))
    only_bad_requests(lambda: check_json(data))
    only_bad_requests(lambda: header_length_value(data.decode("latin-1"), length))
    only_bad_requests(lambda: round_trip(parse_grpc_infer(data, spec_of), DRIFFUSION))
    only_bad_requests(lambda: model_of_grpc_infer(data))


VALID_GRPC_MESSAGE = grpc_message("driffusion", driffusion_inputs(), ("IMAGE",), "id",
                                  {"flag": 3})


@FUZZ
@given(mutation=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_grpc_messages_raise_only_bad_request(mutation):
    message = bytearray(VALID_GRPC_MESSAGE)
    for position, value in mutation:
        message[position % len(message)] = value
    only_bad_requests(lambda: round_trip(parse_grpc_infer(bytes(message), spec_of), DRIFFUSION))


# ---------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_parse_memory_is_proportional_to_the_body(binary):
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    body, length = http_body({"INIT_IMAGE": image}, binary)
    tracemalloc.start()
    request = parse_http_infer(body, length, "driffusion", "", DRIFFUSION)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert request.inputs[0].data == image.tobytes()
    assert peak < (16 if not binary else 2) * len(body) + 20_000
