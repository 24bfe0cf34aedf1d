"""Triton's HTTP answers written from its gRPC answers (triton_models/kserve_http.py) equal what
Triton 2.51's own HTTP endpoint answers: the same request is sent to a real tritonserver's HTTP
port and, as a canonical ModelInferRequest with raw_input_contents, to its gRPC port; status,
headers, JSON and binary bytes are compared, and tritonclient.http parses both alike. Outputs the
sim repository has no model for (BYTES, FP16, BOOL, INT8, a zero-byte output) are checked against
the rules of Triton's http_server.cc."""
from __future__ import annotations

import http.client
import json
import struct
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.http import InferResult

from triton_models.kserve_http import TRITON_HTTP_STATUS, http_answer, http_error
from triton_models.repository import RepositoryOptions, write_repository

DATATYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8,
             "BYTES": np.object_}


@dataclass
class Inference:
    """One inference request, sendable as Triton's JSON over HTTP and as a gRPC ModelInferRequest."""

    model: str
    inputs: dict[str, tuple[str, np.ndarray]]
    outputs: list[tuple[str, bool | None]] = field(default_factory=list)
    binary_output: bool | None = None
    id: str = ""

    def json_body(self) -> bytes:
        body: dict = {"inputs": [
            {"name": name, "shape": list(values.shape), "datatype": datatype,
             "data": [item.decode() if isinstance(item, bytes) else item
                      for item in values.ravel().tolist()]}
            for name, (datatype, values) in self.inputs.items()]}
        if self.id:
            body["id"] = self.id
        if self.outputs:
            body["outputs"] = [{"name": name} if binary is None else
                               {"name": name, "parameters": {"binary_data": binary}}
                               for name, binary in self.outputs]
        if self.binary_output is not None:
            body["parameters"] = {"binary_data_output": self.binary_output}
        return json.dumps(body).encode()

    def grpc_request(self) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=self.model, id=self.id)
        for name, (datatype, values) in self.inputs.items():
            request.inputs.add(name=name, datatype=datatype, shape=values.shape)
            request.raw_input_contents.append(raw_contents(datatype, values))
        for name, _ in self.outputs:
            request.outputs.add(name=name)
        return request


def raw_contents(datatype: str, values: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in values.ravel())
    return np.ascontiguousarray(values, DATATYPES[datatype]).tobytes()


def scalar(datatype: str, value) -> tuple[str, np.ndarray]:
    return datatype, np.array([value], dtype=DATATYPES[datatype])


def image_request(**extra) -> Inference:
    return Inference("driffusion", {"LABEL": scalar("INT32", 3), "STEPS": scalar("INT32", 3),
                                    "SEED": scalar("INT64", 5)}, **extra)


def device_request(**extra) -> Inference:
    rng = np.random.default_rng(0)
    return Inference("unet_sim", {
        "sample": ("FP32", rng.standard_normal((2, 1, 8, 8), dtype=np.float32)),
        "timestep": ("FP32", np.array([[501.0], [999.0]], np.float32)),
        "encoder_hidden_states": ("FP32", np.eye(11, dtype=np.float32)[[3, 10]][:, None])},
        **extra)


@dataclass
class Triton:
    """A real tritonserver's HTTP port (raw HTTP/1.1) and gRPC port (a raw channel whose answers
    stay serialized, as the guard receives them)."""

    http_port: int
    channel: grpc.Channel

    def over_http(self, request: Inference) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            connection.request("POST", f"/v2/models/{request.model}/infer",
                               body=request.json_body(),
                               headers={"Content-Type": "application/json"})
            reply = connection.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            connection.close()

    def over_grpc(self, request: Inference) -> tuple[int, dict[str, str], bytes]:
        """The HTTP answer kserve_http writes from Triton's gRPC answer."""
        infer = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                         request_serializer=service_pb2.ModelInferRequest
                                         .SerializeToString)
        try:
            response = infer(request.grpc_request(), timeout=30)
        except grpc.RpcError as error:
            status, headers, body = http_error(error.code(), error.details())
        else:
            status, headers, body = http_answer(response, request.outputs,
                                                request.binary_output is True)
        return status, dict(headers), body


@pytest.fixture(scope="module")
def triton(triton_server, tmp_path_factory):
    options = RepositoryOptions(model="sim", devices=1, pipeline_instances=1)
    repository = write_repository(tmp_path_factory.mktemp("kserve") / "repo", options)
    server = triton_server(repository.path)
    channel = grpc.insecure_channel(server.grpc_url)
    yield Triton(int(server.http_url.rsplit(":", 1)[1]), channel)
    channel.close()


def split(headers: dict[str, str], body: bytes) -> tuple[dict, bytes]:
    """An answer's JSON (parsed) and its binary tail, as Inference-Header-Content-Length says."""
    length = int(headers.get("Inference-Header-Content-Length", len(body)))
    return json.loads(body[:length]), body[length:]


def parsed(headers: dict[str, str], body: bytes) -> dict[str, np.ndarray]:
    length = headers.get("Inference-Header-Content-Length")
    result = InferResult.from_response_body(body, header_length=None if length is None
                                            else int(length))
    return {output["name"]: result.as_numpy(output["name"])
            for output in result.get_response()["outputs"]}


SUCCESSES = {
    "image, outputs named binary, JSON and not said": image_request(
        outputs=[("IMAGE", True), ("ROUNDS", False), ("EVALUATIONS", None)]),
    "image, every output JSON by default": image_request(),
    "image, binary_data_output true": image_request(binary_output=True, id="req-7"),
    "image, binary_data_output true but named outputs JSON": image_request(
        binary_output=True, outputs=[("EVALUATIONS", None), ("IMAGE", False)]),
    "image, binary_data_output false, one named binary": image_request(
        binary_output=False, outputs=[("ROUNDS", True)]),
    "device call, FP32 as JSON": device_request(id="d1"),
    "device call, FP32 binary": device_request(outputs=[("out_sample", True)]),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", SUCCESSES)
def test_an_answer_is_written_as_tritons_http_endpoint_writes_it(triton, case):
    request = SUCCESSES[case]
    status, headers, body = triton.over_http(request)
    converted_status, converted_headers, converted = triton.over_grpc(request)
    assert (status, converted_status) == (200, 200), body
    assert converted_headers["Content-Type"] == headers["Content-Type"]
    assert (converted_headers.get("Inference-Header-Content-Length")
            == headers.get("Inference-Header-Content-Length"))
    assert split(converted_headers, converted) == split(headers, body)
    if request.model == "driffusion":  # no floats: even the JSON text is Triton's, byte for byte
        assert converted == body
    ours, theirs = parsed(converted_headers, converted), parsed(headers, body)
    assert ours.keys() == theirs.keys() and ours
    for name, values in theirs.items():
        assert ours[name].dtype == values.dtype
        np.testing.assert_array_equal(ours[name], values)


FAILURES = {
    "bad STEPS": (400, Inference("driffusion", {"LABEL": scalar("INT32", 3),
                                                "STEPS": scalar("INT32", 0)})),
    "unknown model": (404, Inference("no_such_model", {"LABEL": scalar("INT32", 3)})),
    "unknown input": (400, Inference("driffusion", {"LABEL": scalar("INT32", 3),
                                                    "NOT_AN_INPUT": scalar("INT32", 1)})),
    "unknown output": (400, image_request(outputs=[("NOT_AN_OUTPUT", None)])),
    "prompt, no label": (400, Inference("driffusion", {"PROMPT": ("BYTES", np.array(
        [b"a prompt the sim has no label for"], np.object_))})),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", FAILURES)
def test_an_error_has_tritons_http_status_and_json(triton, case):
    expected_status, request = FAILURES[case]
    status, _, body = triton.over_http(request)
    converted_status, converted_headers, converted = triton.over_grpc(request)
    assert status == converted_status == expected_status
    # Triton's own HTTP errors say text/plain (model and execution errors) or application/json
    # (request parsing errors) for the same JSON body; no client can rely on that header.
    assert converted_headers["Content-Type"] == "application/json"
    assert json.loads(converted) == json.loads(body)


def answer_of(*outputs: tuple[str, str, list[int], bytes], **fields) -> bytes:
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1", **fields)
    for name, datatype, shape, raw in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response.SerializeToString()


def serialized_strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_outputs_the_sim_has_none_of_follow_tritons_writer():
    strings = (b"a \"quoted\"\nline", "dé".encode(), b"", b"\xff\xfe raw")
    answer = answer_of(("TEXT", "BYTES", [2, 2], serialized_strings(*strings)),
                       ("FLAGS", "BOOL", [3], bytes([0, 1, 7])),
                       ("SIGNED", "INT8", [3], np.array([-128, 0, 127], np.int8).tobytes()),
                       ("HALF", "FP16", [2], np.array([1.5, -2], np.float16).tobytes()),
                       ("EMPTY", "FP32", [0], b""),
                       parameters={"seed": service_pb2.InferParameter(int64_param=4)})
    # JSON: BYTES as strings of their raw bytes (rapidjson writes them unvalidated), any nonzero
    # BOOL byte as true; HALF, not named, takes binary_data_output
    status, headers, body = http_answer(answer, [(name, False) for name in
                                                 ("TEXT", "FLAGS", "SIGNED", "EMPTY")], True)
    header_length = int(dict(headers)["Inference-Header-Content-Length"])
    assert (status, body[header_length:]) == (200, np.array([1.5, -2], np.float16).tobytes())
    document = json.loads(body[:header_length].decode("utf-8", "surrogateescape"))
    assert list(document) == ["model_name", "model_version", "parameters", "outputs"]
    assert document["parameters"] == {"seed": 4}
    text, flags, signed, half, empty = document["outputs"]
    assert [item.encode("utf-8", "surrogateescape") for item in text["data"]] == list(strings)
    assert (flags["data"], signed["data"], empty["data"]) == ([False, True, True],
                                                             [-128, 0, 127], [])
    assert half == {"name": "HALF", "datatype": "FP16", "shape": [2],
                    "parameters": {"binary_data_size": 4}}
    # FP16 cannot be JSON
    assert http_answer(answer, [], False) == (400, [("Content-Type", "application/json")], (
        b'{"error":"sending FP16 data via JSON is not supported. Please use the binary data '
        b'format for output"}'))
    # binary: BYTES as Triton's serialization; a zero-byte output adds no bytes
    status, headers, body = http_answer(answer, [], True)
    header_length = int(dict(headers)["Inference-Header-Content-Length"])
    assert body[header_length:] == b"".join(
        service_pb2.ModelInferResponse.FromString(answer).raw_output_contents)
    result = InferResult.from_response_body(body, header_length=header_length)
    assert result.as_numpy("TEXT").ravel().tolist() == list(strings)
    np.testing.assert_array_equal(result.as_numpy("HALF"), np.array([1.5, -2], np.float16))


def test_only_zero_byte_binary_outputs_make_a_json_answer():
    answer = answer_of(("EMPTY", "FP32", [0, 4], b""))
    status, headers, body = http_answer(answer, [("EMPTY", True)], False)
    assert (status, headers) == (200, [("Content-Type", "application/json")])
    assert json.loads(body)["outputs"][0]["parameters"] == {"binary_data_size": 0}


def test_an_output_whose_bytes_do_not_fit_its_shape_is_tritons_500():
    answer = answer_of(("IMAGE", "UINT8", [2, 2], b"\0\0\0"))
    assert http_answer(answer, [], False) == (500, [("Content-Type", "application/json")], (
        b'{"error":"output tensor shape does not match size of output for \'IMAGE\'"}'))


def test_a_large_image_is_exact_in_json_and_binary():
    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    answer = answer_of(("IMAGE", "UINT8", list(image.shape), image.tobytes()))
    for binary in (False, True):
        status, headers, body = http_answer(answer, [("IMAGE", binary)], False)
        assert status == 200
        np.testing.assert_array_equal(parsed(dict(headers), body)["IMAGE"], image)


def test_grpc_codes_map_to_tritons_http_statuses():
    assert {code.name: status for code, status in TRITON_HTTP_STATUS.items()} == {
        "INTERNAL": 500, "NOT_FOUND": 404, "UNAVAILABLE": 503, "UNIMPLEMENTED": 501,
        "UNKNOWN": 400, "INVALID_ARGUMENT": 400, "ALREADY_EXISTS": 400, "CANCELLED": 400}
    assert http_error(grpc.StatusCode.UNAVAILABLE, 'gone "now"') == (
        503, [("Content-Type", "application/json")], b'{"error":"gone \\"now\\""}')
    assert http_error(grpc.StatusCode.DEADLINE_EXCEEDED, "late")[0] == 504
    with pytest.raises(ValueError, match="OK.*not an error"):
        http_error(grpc.StatusCode.OK, "fine")
