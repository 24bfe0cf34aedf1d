"""The request guard (`serve --request-guard-bytes`) on a real tritonserver: requests go through
unchanged; oversized, compressed, chunked, smuggled and malformed ones (a control byte in a
header name, a doubled coding header) are refused before Triton reads them; admin APIs stay
closed; every answer has its reason phrase; an overload says the server is busy. Time limits and
the memory budget: tests/test_guard_limits.py."""
from __future__ import annotations

import json
import queue
import re
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
from triton_models.guard_limits import GuardLimits
from triton_models.repository import RepositoryOptions, write_repository

pytestmark = pytest.mark.triton
CAP = 1 << 20  # the guard's byte cap in these tests


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from triton_models.serve import EmbeddedServer, free_ports

    options = RepositoryOptions(model="sim", devices=2, sim_latency_ms=20.0,
                                pipeline_instances=1, max_queue_size=2, stream_model=True)
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
    # Triton's compressed answers keep their coding
    request = urllib.request.Request(f"{guarded.http_url}/v2/models/driffusion/infer", data=body,
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Encoding"] == "gzip"
        assert json.loads(zlib.decompress(reply.read(), 31))["outputs"]
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


def test_a_bad_request_on_a_stream_is_answered_and_the_stream_goes_on(guarded):
    """As Triton answers: the refused request gets an error response naming its field, and the
    next request on the same stream is served."""
    answers: queue.Queue = queue.Queue()
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        wrong = grpc_client.InferInput("STEPS", [1], "FP32")  # STEPS is INT32
        wrong.set_data_from_numpy(np.array([4], np.float32))
        client.async_stream_infer("driffusion", [*tensors(LABEL=3), wrong], request_id="bad")
        client.async_stream_infer("driffusion", tensors(LABEL=3, STEPS=4), request_id="good")
        (refused, error), (result, second_error) = answers.get(timeout=30), answers.get(timeout=30)
        client.stop_stream()
    finally:
        client.close()
    assert refused is None and "STEPS" in str(error) and "INT32" in str(error)
    assert second_error is None and result.get_response().id == "good"
    assert result.as_numpy("IMAGE").shape == (8, 8, 3)


def test_an_image_models_stream_model_reports_each_round_then_gives_the_image(guarded):
    """`--stream-model` on an image model: one progress response a round, then the IMAGE that
    `driffusion` gives the same request."""
    answers: queue.Queue = queue.Queue()
    fields = {"LABEL": 3, "STEPS": 6, "SEED": 2, "MODE": "sequential"}
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("driffusion_stream", tensors(**fields),
                                  enable_empty_final_response=True)
        responses = []
        while not responses or not responses[-1].get_response().parameters[
                "triton_final_response"].bool_param:
            result, error = answers.get(timeout=30)
            assert error is None, error
            responses.append(result)
        client.stop_stream()
    finally:
        client.close()
    *progress, final = responses
    assert [int(r.as_numpy("ROUNDS")[0]) for r in progress] == list(range(1, 7))
    assert [int(r.as_numpy("STEPS_DONE")[0]) for r in progress] == list(range(1, 7))
    np.testing.assert_array_equal(final.as_numpy("IMAGE"), image(guarded.grpc_url, **fields))


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_an_oversized_grpc_request_is_refused_before_triton_reads_it(guarded, compression):
    before = group_rss_mb(guarded)
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as caught:  # 100 MB, the cap is 1 MB
            client.infer("driffusion", tensors(PROMPT=b"x" * (100 << 20)),
                         compression_algorithm=compression)
    finally:
        client.close()
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


def exchange(server, request: bytes) -> bytes:
    """All the guard's HTTP port answers to `request` (raw bytes) until it closes."""
    with socket.create_connection(("127.0.0.1", server.ports["http"]), timeout=10) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: connection.recv(1 << 16), b""))


def answers(raw: bytes) -> int:
    """How many HTTP answers `raw` holds."""
    return len(re.findall(rb"HTTP/1\.1 \d{3} ", raw))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zlib.compress(b" " * (256 << 20))  # 256 MB of JSON whitespace in 260 KB


@pytest.mark.parametrize("headers, status", [
    (b"Content-Encoding\0: deflate", 400),  # Triton reads this name up to the NUL
    (b"Content-Encoding\0zz: deflate", 400),
    (b"Content-Encoding\x01: deflate", 400),
    (b"Content-Encoding\x7f: deflate", 400),
    (b"Content-Encoding\xe9: deflate", 400),
    (b"Content-Encoding : deflate", 400),
    (b"Content-Encoding\t: deflate", 400),
    (b"Content(Encoding): deflate", 400),
    (b"X-Note\0: 1\r\nContent-Encoding: identity", 400),  # a control byte in another name
    (b"Content-Encoding: identity\r\nContent-Encoding: deflate", 400),
    (b"Content-Encoding: deflate\r\ncontent-encoding: deflate", 400),
    (b"Content_Encoding: deflate", 400),
    (b"ContentEncoding: deflate", 400),
    (b"Content-Encoding: DEFLATE", 415),
    (b"Content-Encoding: identity, deflate", 415),
])
def test_a_bomb_under_any_malformed_or_doubled_coding_header_never_reaches_triton(
        guarded, bomb, headers, status):
    before = group_rss_mb(guarded)
    answer = exchange(guarded, b"POST /v2/models/driffusion/infer HTTP/1.1\r\nHost: x\r\n"
                      + headers + b"\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)
    phrase = {400: b"Bad Request", 415: b"Unsupported Media Type"}[status]
    assert answer.startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase)), answer[:300]
    assert answers(answer) == 1
    assert group_rss_mb(guarded) - before < 50  # Triton inflated nothing


SMUGGLED = b"POST /v2/repository/models/driffusion/unload HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("framing, status", [
    (b"Content-Length: %d\r\nTransfer-Encoding: chunked" % (5 + len(SMUGGLED)), 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: %d" % (5 + len(SMUGGLED)), 400),
    (b"Content-Length: 5\r\nContent-Length: 5", 400),
    (b"Content-Length: 5\r\nContent-Length: 50", 400),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 400),
    (b"Transfer-Encoding: gzip, chunked", 400),
    (b"Transfer_Encoding: chunked", 400),
    (b"Transfer-Encoding: chunked", 411),
])
def test_ambiguous_or_chunked_framing_is_refused_and_nothing_is_smuggled(guarded, framing,
                                                                         status):
    answer = exchange(guarded, b"POST /v2/models/driffusion/infer HTTP/1.1\r\nHost: x\r\n"
                      + framing + b"\r\n\r\n0\r\n\r\n" + SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert answers(answer) == 1  # one answer: the smuggled request never ran
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        assert client.is_model_ready("driffusion")
    finally:
        client.close()


@pytest.mark.parametrize("request_line, status, phrase", [
    (b"GET /v2/logging HTTP/1.1", 403, b"Forbidden"),  # Triton's answers keep their phrase
    (b"GET /v2/trace/setting HTTP/1.1", 403, b"Forbidden"),
    (b"GET /v2/systemsharedmemory/status HTTP/1.1", 403, b"Forbidden"),
    (b"GET /v2/models/driffusion/infer HTTP/1.1", 405, b"Method Not Allowed"),
    (b"POST /v2/repository/models/driffusion/unload HTTP/1.1", 503, b"Service Unavailable"),
    (b"DELETE /v2/models/driffusion HTTP/1.1", 405, b"Method Not Allowed"),  # the guard's own
    (b"GET /v2/health/ready HTTP/2.0", 505, b"HTTP Version Not Supported"),
    (b"GET /v2/health/ready", 400, b"Bad Request"),
    (b"GET /v2/health/ready HTTP/1.1\r\nX-Pad: " + b"a" * 20_000, 431,  # heads: 16 KiB
     b"Request Header Fields Too Large"),
    (b"GET /v2/health/ready HTTP/1.1", 200, b"OK"),
])
def test_every_answer_has_its_reason_phrase_and_admin_apis_stay_closed(guarded, request_line,
                                                                       status, phrase):
    answer = exchange(guarded, request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n"
                      b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase)), answer[:300]


def test_unload_is_refused_over_grpc_through_the_guard(guarded):
    client = grpc_client.InferenceServerClient(guarded.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            client.unload_model("driffusion")
        with pytest.raises(InferenceServerException):
            client.get_log_settings()
        assert client.is_model_ready("driffusion")
    finally:
        client.close()


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


def test_stopping_the_guard_with_connections_open_leaves_no_pending_task(caplog):
    import gc
    import logging

    from triton_models.guard import RequestGuard
    from triton_models.serve import free_ports

    grpc_port, http_port, triton_grpc_port, triton_http_port = free_ports(4)
    guard = RequestGuard(host="127.0.0.1", grpc_port=grpc_port, http_port=http_port,
                         upstream_grpc_port=triton_grpc_port,
                         upstream_http_port=triton_http_port, limits=GuardLimits())
    guard.start()
    openings = [b"", b"GET /v2/health/ready HTTP/1.1\r\nHo",
                b"POST /v2/models/driffusion/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 9"
                + b"\r\n\r\n{"]
    connections = []
    for opening in openings:
        connections.append(socket.create_connection(("127.0.0.1", http_port), timeout=5))
        connections[-1].sendall(opening)
    time.sleep(0.3)  # each is being served
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        guard.stop()
        gc.collect()
    for connection in connections:
        assert connection.recv(1) == b""  # closed by the guard
        connection.close()
    assert not [record for record in caplog.records if record.name == "asyncio"], caplog.text

