"""The request guard (`serve --request-guard-bytes`) on a real tritonserver: requests go through
unchanged, oversized, compressed and chunked ones are refused before Triton reads them, and an
overload says the server is busy."""
from __future__ import annotations

import json
import queue
import socket
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
from servers import group_rss_mb
from tritonclient.utils import InferenceServerException

from cli import main as driffusion
from triton_models.guard import GuardLimits
from triton_models.repository import RepositoryOptions, write_repository

pytestmark = pytest.mark.triton
CAP = 1 << 20  # the guard's byte cap in these tests


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from triton_models.serve import EmbeddedServer, free_ports

    options = RepositoryOptions(model="sim", devices=2, sim_latency_ms=20.0,
                                pipeline_instances=1, max_queue_size=2)
    repository = write_repository(tmp_path_factory.mktemp("guard") / "repo", options)
    grpc_port, http_port, metrics_port = free_ports(3)
    server = EmbeddedServer(repository.path, grpc_port=grpc_port, http_port=http_port,
                            metrics_port=metrics_port,
                            request_guard=GuardLimits(max_request_bytes=CAP),
                            log_path=tmp_path_factory.mktemp("log") / "server.log")
    with server:
        yield server


def triton_grpc(server) -> str:
    """Triton's own gRPC port behind the guard (loopback)."""
    return f"127.0.0.1:{server.triton_ports['grpc']}"


def tensors(**fields) -> list:
    types = {"LABEL": ("INT32", np.int32), "STEPS": ("INT32", np.int32),
             "SEED": ("INT64", np.int64), "PROMPT": ("BYTES", object),
             "MODE": ("BYTES", object)}
    inputs = []
    for name, value in fields.items():
        datatype, dtype = types[name]
        item = grpc_client.InferInput(name, [1], datatype)
        item.set_data_from_numpy(np.array([value], dtype=dtype))
        inputs.append(item)
    return inputs


def image(url: str, **fields) -> np.ndarray:
    client = grpc_client.InferenceServerClient(url)
    try:
        return client.infer("driffusion", tensors(**fields)).as_numpy("IMAGE")
    finally:
        client.close()


def post(server, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    request = urllib.request.Request(f"{server.http_url}/v2/models/driffusion/infer",
                                     data=body, headers=headers, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, error.read(), time.monotonic() - started


def test_requests_through_the_guard_are_answered_as_by_triton_itself(guarded, tmp_path):
    expected = image(triton_grpc(guarded), LABEL=3, STEPS=6, SEED=2)
    np.testing.assert_array_equal(image(guarded.grpc_url, LABEL=3, STEPS=6, SEED=2), expected)
    body = json.dumps({"inputs": [
        {"name": "LABEL", "shape": [1], "datatype": "INT32", "data": [3]},
        {"name": "STEPS", "shape": [1], "datatype": "INT32", "data": [6]},
        {"name": "SEED", "shape": [1], "datatype": "INT64", "data": [2]}]}).encode()
    status, answer, _ = post(guarded, body, {"Content-Type": "application/json"})
    (output,) = [o for o in json.loads(answer)["outputs"] if o["name"] == "IMAGE"]
    assert status == 200
    np.testing.assert_array_equal(np.array(output["data"], np.uint8).reshape(output["shape"]),
                                  expected)
    # the generate client: discovery, configs and every device call through the guard
    out = tmp_path / "three.png"
    assert driffusion(["generate", "--endpoints", guarded.http_url, "--label", "3", "--steps",
                       "6", "--seed", "2", "--mode", "sequential", "--quiet",
                       "--out", str(out)]) == 0
    # errors keep their status and text
    with pytest.raises(InferenceServerException, match="STEPS") as caught:
        image(guarded.grpc_url, LABEL=3, STEPS=0)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_streamed_request_goes_through(guarded):
    answers: queue.Queue = queue.Queue()
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("driffusion", tensors(LABEL=3, STEPS=4))
        result, error = answers.get(timeout=30)
        client.stop_stream()
    finally:
        client.close()
    assert error is None and result.as_numpy("IMAGE").shape == (8, 8, 3)


def test_an_oversized_grpc_request_is_refused_before_triton_reads_it(guarded):
    before = group_rss_mb(guarded)
    with pytest.raises(InferenceServerException) as caught:
        image(guarded.grpc_url, PROMPT=b"x" * (100 << 20))  # 100 MB, the cap is 1 MB
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in caught.value.message()
    assert group_rss_mb(guarded) - before < 100  # Triton never saw it
    assert image(guarded.grpc_url, LABEL=1, STEPS=4).shape == (8, 8, 3)


def test_compressed_oversized_and_chunked_http_bodies_are_refused_from_their_headers(guarded):
    before = group_rss_mb(guarded)
    bomb = zlib.compress(b" " * (256 << 20))  # 256 MB of JSON whitespace in 260 KB
    status, answer, seconds = post(guarded, bomb, {"Content-Encoding": "deflate"})
    assert status == 415 and b"uncompressed" in answer and seconds < 0.5
    status, answer, seconds = post(guarded, b" " * (2 * CAP), {})
    assert status == 413 and f"at most {CAP}".encode() in answer and seconds < 0.5
    host, port = guarded.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(b"POST /v2/models/driffusion/infer HTTP/1.1\r\nHost: x\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert connection.recv(64).startswith(b"HTTP/1.1 411")
    assert group_rss_mb(guarded) - before < 100


def test_an_overload_burst_says_the_server_is_busy(guarded):
    def one(_) -> str:
        try:
            image(guarded.grpc_url, LABEL=3, STEPS=30, MODE="sequential")
            return "ok"
        except InferenceServerException as error:
            return f"{error.status()}: {error.message()}"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    refused = [said for said in outcomes if said != "ok"]
    assert len(refused) >= 2, outcomes  # 1 running + 2 queued at most
    for said in refused:
        assert said.startswith("StatusCode.UNAVAILABLE") and "server busy" in said, said
    assert image(guarded.grpc_url, LABEL=3, STEPS=4).shape == (8, 8, 3)


def test_serve_puts_the_guard_on_by_default():
    from cli import build_parser
    from triton_models.serve import guard_limits_from_args

    args = build_parser("serve").parse_args(["serve", "--model", "sim"])
    assert guard_limits_from_args(args) == GuardLimits()
    assert GuardLimits().max_request_bytes == 64 << 20
    off = build_parser("serve").parse_args(["serve", "--model", "sim",
                                            "--request-guard-bytes", "0"])
    assert guard_limits_from_args(off) is None


def test_a_client_that_gives_up_through_the_guard_stops_its_request(guarded):
    from servers import metric

    def cancelled() -> float:
        return metric(guarded, "driffusion_requests_total", outcome="cancelled")

    before = cancelled()
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("driffusion", tensors(LABEL=3, STEPS=1000, MODE="sequential"),
                         client_timeout=1.0)
    finally:
        client.close()
    gave_up = time.monotonic()
    while cancelled() == before and time.monotonic() - gave_up < 5.0:
        time.sleep(0.02)
    assert cancelled() == before + 1  # the guard passed the cancellation on to Triton
