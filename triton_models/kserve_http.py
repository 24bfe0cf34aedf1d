"""Triton's HTTP/REST answer to an inference request, written from the answer its gRPC frontend gave.

Pure (no I/O): the request guard asks Triton over gRPC (so a client that disconnects cancels its
request) and answers the HTTP client with what Triton's own HTTP endpoint would have sent. What
follows Triton 2.51's src/http_server.cc (InferRequestClass::FinalizeResponse, WriteDataToJson,
HttpCodeFromError), checked against a real server by tests/test_kserve_http.py:
- the body is compact JSON with the fields in Triton's order: id (only when the request gave one),
  model_name, model_version, parameters (only when the response has some), outputs; each output
  has name, datatype, shape, then either "data" (JSON) or parameters.binary_data_size (binary);
- an output's form: the request's `binary_data` for it when it named it (absent means JSON,
  whatever binary_data_output says), else the request's `binary_data_output`;
- binary outputs follow the JSON, in output order, with Content-Type application/octet-stream and
  Inference-Header-Content-Length = the JSON's byte length; when no output has binary bytes the
  answer is application/json without that header;
- BYTES outputs are JSON strings of their raw bytes (not validated as UTF-8, as rapidjson writes
  them) or, in binary, Triton's 4-byte-length-prefixed serialization; FP32/FP64 are doubles,
  NaN and infinities written as NaN/Infinity (rapidjson's kWriteNanAndInfFlag); FP16 and BF16
  cannot be JSON: 400, as Triton answers;
- a gRPC status maps back to the HTTP status Triton's HTTP frontend gives the same
  TRITONSERVER_Error code, with the body {"error": message}.
Response compression (Accept-Encoding) is the caller's: these answers are uncompressed.
"""
from __future__ import annotations

import json
import struct

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

Answer = tuple[int, list[tuple[str, str]], bytes]

JSON_TYPE = ("Content-Type", "application/json")
BINARY_TYPE = ("Content-Type", "application/octet-stream")
HEADER_LENGTH = "Inference-Header-Content-Length"

# TRITONSERVER_Error code -> grpc::StatusCode (src/grpc/grpc_utils.cc) -> HttpCodeFromError's status
TRITON_HTTP_STATUS = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNKNOWN: 400,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.CANCELLED: 400,
}
# Codes Triton's frontend never gives come from the gRPC transport itself (a deadline, a message
# over gRPC's size limit, ...): google.rpc.Code's documented HTTP mapping.
TRANSPORT_HTTP_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.DATA_LOSS: 500,
}

NUMERIC_DTYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
NOT_JSON_TYPES = ("FP16", "BF16")


class OutputError(Exception):
    """An output Triton's HTTP frontend would refuse to write: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def http_answer(response: bytes, requested: list[tuple[str, bool | None]], binary_output: bool
                ) -> Answer:
    """Status, headers and body that Triton's HTTP/REST endpoint gives for this inference answer.
    response: a serialized inference.ModelInferResponse (tritonclient.grpc.service_pb2) with
    raw_output_contents; requested: the outputs the HTTP request named, each with its `binary_data`
    parameter (None: not given), [] when it named none (then every output of the response, in its
    order); binary_output: the request's `binary_data_output` parameter (False when absent)."""
    answer = service_pb2.ModelInferResponse.FromString(response)
    if len(answer.raw_output_contents) != len(answer.outputs):
        raise ValueError(f"the response has {len(answer.outputs)} outputs but "
                         f"{len(answer.raw_output_contents)} raw_output_contents; Triton's gRPC "
                         "frontend gives one raw content per output")
    binary_by_name = {name: bool(binary) for name, binary in requested}
    try:
        outputs, blobs = _outputs(answer, binary_by_name, binary_output)
    except OutputError as error:
        return _error_answer(error.status, str(error))
    header = b"".join((_head(answer), b'"outputs":[', *outputs, b"]}"))
    if not blobs:
        return 200, [JSON_TYPE], header
    return 200, [BINARY_TYPE, (HEADER_LENGTH, str(len(header)))], b"".join((header, *blobs))


def http_error(code: grpc.StatusCode, message: str) -> Answer:
    """Triton's HTTP status and {"error": message} JSON body for a gRPC status code (grpc.StatusCode)
    that Triton's gRPC frontend gave, as its HTTP frontend maps the same TRITONSERVER_Error code.
    (Triton's own HTTP errors say text/plain or application/json depending on the stage that
    failed; the body is JSON in both, so these say application/json.)"""
    status = TRITON_HTTP_STATUS.get(code) or TRANSPORT_HTTP_STATUS.get(code)
    if status is None:
        raise ValueError(f"{code!r} is not an error: http_error takes a failed call's "
                         f"grpc.StatusCode, one of {', '.join(c.name for c in TRITON_HTTP_STATUS)} "
                         f"(Triton's) or {', '.join(c.name for c in TRANSPORT_HTTP_STATUS)}")
    return _error_answer(status, message)


def _error_answer(status: int, message: str) -> Answer:
    return status, [JSON_TYPE], _json({"error": message})


def _head(answer: service_pb2.ModelInferResponse) -> bytes:
    """The response's JSON up to its "outputs" member, as `{"id":...,` in Triton's field order."""
    head: dict[str, object] = {}
    if answer.id:
        head["id"] = answer.id
    head["model_name"] = answer.model_name
    head["model_version"] = answer.model_version
    if answer.parameters:
        head["parameters"] = {name: getattr(value, value.WhichOneof("parameter_choice"))
                              for name, value in answer.parameters.items()}
    return _json(head)[:-1] + b","


def _outputs(answer: service_pb2.ModelInferResponse, binary_by_name: dict[str, bool],
             binary_output: bool) -> tuple[list[bytes], list[bytes]]:
    """The pieces of the outputs' JSON (comma-separated objects, joined once: a JSON image is
    megabytes), and the binary bytes that follow the JSON, in output order."""
    pieces, blobs = [], []
    for output, raw in zip(answer.outputs, answer.raw_output_contents):
        pieces.append(b'%s{"name":%s,"datatype":%s,"shape":%s,' % (
            b"," if pieces else b"", _json(output.name), _json(output.datatype),
            _json(list(output.shape))))
        if binary_by_name.get(output.name, binary_output):
            pieces.append(b'"parameters":{"binary_data_size":%d}}' % len(raw))
            if raw:
                blobs.append(raw)
        else:
            pieces.extend((b'"data":[', _json_data(output, raw), b"]}"))
    return pieces, blobs


def _json_data(output: service_pb2.ModelInferResponse.InferOutputTensor, raw: bytes) -> bytes:
    """The elements of an output as the inside of a JSON array, as Triton's WriteDataToJson."""
    count = int(np.prod(output.shape, dtype=np.int64))
    datatype = output.datatype
    if datatype == "BYTES":
        return b",".join(_json(item) for item in _bytes_elements(output.name, raw, count))
    if datatype in NOT_JSON_TYPES:
        raise OutputError(400, f"sending {datatype} data via JSON is not supported. "
                               "Please use the binary data format for output")
    dtype = NUMERIC_DTYPES.get(datatype)
    if dtype is None:
        raise OutputError(400, "Invalid data type for output tensor")
    if len(raw) != count * dtype.itemsize:
        raise OutputError(500, _size_mismatch(output.name))
    if datatype in DIGIT_TABLES:
        return _small_integers(datatype, raw)
    values = np.frombuffer(raw, dtype)
    if dtype.kind == "f":
        values = values.astype(np.float64)  # Triton writes floats as doubles
    return _json(values.tolist())[1:-1]


def _bytes_elements(name: str, raw: bytes, count: int) -> list[bytes]:
    """The `count` strings of Triton's BYTES serialization (uint32 length, then the bytes)."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise OutputError(500, _size_mismatch(name))
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise OutputError(500, _size_mismatch(name))
        items.append(raw[offset:offset + length])
        offset += length
    return items


def _size_mismatch(name: str) -> str:
    return f"output tensor shape does not match size of output for '{name}'"


def _digit_table(texts: list[bytes]) -> np.ndarray:
    """Each text and a comma, NUL-padded to 4 or 8 bytes, as one uint32 or uint64 cell."""
    width = 4 if max(len(text) for text in texts) < 4 else 8
    padded = b"".join((text + b",").ljust(width, b"\0") for text in texts)
    return np.frombuffer(padded, np.uint32 if width == 4 else np.uint64)


# A one-byte datatype's table, and the table row of each raw byte (Triton writes any nonzero
# BOOL byte as true)
DIGIT_TABLES = {
    "BOOL": (_digit_table([b"false", b"true"]),
             lambda raw: (np.frombuffer(raw, np.uint8) != 0).view(np.uint8)),
    "UINT8": (_digit_table([b"%d" % v for v in range(256)]),
              lambda raw: np.frombuffer(raw, np.uint8)),
    "INT8": (_digit_table([b"%d" % v for v in range(-128, 128)]),
             lambda raw: np.frombuffer(raw, np.int8).astype(np.int16) + 128),
}


def _small_integers(datatype: str, raw: bytes) -> bytes:
    """One-byte values as JSON text, by table: a 1024x1024x3 image in ~70 ms, json.dumps of its
    list in ~2 s."""
    table, rows_of = DIGIT_TABLES[datatype]
    text = table.take(rows_of(raw)).view(np.uint8)
    return text[text != 0].tobytes()[:-1]


def _json(value: object) -> bytes:
    """Compact JSON, strings of any bytes written as given (rapidjson validates no UTF-8)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogateescape")
