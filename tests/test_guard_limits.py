"""The request guard's time limits, memory budget and connection cap on a real `driffusion
serve` (its own process, so the guard's memory is measured apart from the test's): stalled
bodies, slowloris heads and trickling bodies are closed within their timeouts, bodies beyond the
budget and connections beyond the cap get 503, memory goes back to where it was, and normal
requests are served throughout. Short limits set by the flags keep these quick; the defaults
are checked under the slow marker."""
from __future__ import annotations

import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import ServeCommand

pytestmark = pytest.mark.triton
MIB = 1 << 20
# the short timeouts these tests set; a body may stall 4 s, time enough on a loaded 2-core box
# to send the bodies that fill the memory budget before the first of them is closed
HEADER_S, BODY_S = 2, 4
MIN_RATE = 10_000  # bytes/s
CAP = 32 * MIB
BUDGET = 200 * MIB  # six bodies of CAP bytes fit, a seventh does not
CONNECTIONS = 64
SLACK_S = 1.5  # scheduling on a shared 2-core box
FLAGS = ("--request-guard-header-timeout-s", str(HEADER_S),
         "--request-guard-body-timeout-s", str(BODY_S),
         "--request-guard-min-rate", str(MIN_RATE), "--request-guard-bytes", str(CAP),
         "--request-guard-memory-bytes", str(BUDGET),
         "--request-guard-connections", str(CONNECTIONS),
         # one address (every test here is 127.0.0.1) may use all of it
         "--request-guard-client-memory-bytes", str(BUDGET),
         "--request-guard-client-connections", str(CONNECTIONS))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    with ServeCommand(tmp_path_factory.mktemp("limits"), *FLAGS) as serve:
        yield serve


def connect(serve: ServeCommand) -> socket.socket:
    return socket.create_connection(("127.0.0.1", serve.http_port), timeout=10)


def infer_head(length: int, *extra: bytes) -> bytes:
    return b"\r\n".join([b"POST /v2/models/driffusion/infer HTTP/1.1", b"Host: 127.0.0.1",
                         b"Content-Type: application/json", b"Content-Length: %d" % length,
                         *extra]) + b"\r\n\r\n"


def stalled_body(serve: ServeCommand, length: int, sent: int) -> tuple[socket.socket, float]:
    """A connection that sent the head of a `length`-byte body and `sent` bytes of it, then
    nothing more; and when it sent its last byte (time.monotonic())."""
    connection = connect(serve)
    connection.sendall(infer_head(length) + b" " * sent)
    return connection, time.monotonic()


def until_closed(connection: socket.socket, timeout_s: float = 60) -> tuple[bytes, float]:
    """What the server wrote before it closed the connection, and when (time.monotonic())."""
    connection.settimeout(timeout_s)
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    closed = time.monotonic()
    connection.close()
    return data, closed


def watch_closing(pool: ThreadPoolExecutor, stalled: list[tuple[socket.socket, float]]) -> list:
    """Futures of (answer, seconds from the last byte sent to the close) of each connection,
    each read in a thread of its own so that the close time is when it happened."""
    def one(connection: socket.socket, last_byte: float) -> tuple[bytes, float]:
        answer, closed = until_closed(connection)
        return answer, closed - last_byte

    return [pool.submit(one, connection, last_byte) for connection, last_byte in stalled]


def served_normally(serve: ServeCommand) -> float:
    """Seconds one normal HTTP inference took through the guard (asserting its image)."""
    body = json.dumps({"inputs": [
        {"name": "LABEL", "shape": [1], "datatype": "INT32", "data": [3]},
        {"name": "STEPS", "shape": [1], "datatype": "INT32", "data": [4]}]}).encode()
    request = urllib.request.Request(f"{serve.http_url}/v2/models/driffusion/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as reply:
        outputs = json.loads(reply.read())["outputs"]
    assert reply.status == 200
    assert [o["shape"] for o in outputs if o["name"] == "IMAGE"] == [[8, 8, 3]]
    return time.monotonic() - started


def warm_memory(serve: ServeCommand) -> tuple[float, float]:
    """The serving processes' memory once a few requests have warmed Triton's model stubs."""
    for _ in range(3):
        served_normally(serve)
    return serve.memory_mb()


def settled_memory(serve: ServeCommand, baseline: tuple[float, float],
                   wait_s: float = 5.0) -> tuple[float, float]:
    """The serving processes' memory once it is back within 16 MB of `baseline` (or after
    `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        memory = serve.memory_mb()
        if all(now - before < 16 for now, before in zip(memory, baseline)):
            return memory
        if time.monotonic() > deadline:
            return memory
        time.sleep(0.2)


def memory_once(serve: ServeCommand, holds: Callable[[tuple[float, float]], bool],
                wait_s: float) -> tuple[float, float]:
    """The serving processes' memory once `holds(memory)` (or after `wait_s`): the guard reads
    what clients sent at its own pace on a loaded machine."""
    deadline = time.monotonic() + wait_s
    while True:
        memory = serve.memory_mb()
        if holds(memory) or time.monotonic() > deadline:
            return memory
        time.sleep(0.1)


def slowloris(serve: ServeCommand, count: int, interval_s: float,
              give_up_s: float) -> list[tuple[bytes, float]]:
    """Open `count` connections that each send one more byte of a long head every `interval_s`;
    (what the server wrote, seconds until it closed the connection) for each."""
    head = infer_head(0, b"X-Slow: " + b"a" * 4096)
    connections = [connect(serve) for _ in range(count)]
    started = time.monotonic()
    closed: dict[int, tuple[bytes, float]] = {}
    for sent in range(len(head)):
        open_ = {index: c for index, c in enumerate(connections) if index not in closed}
        if not open_ or time.monotonic() - started > give_up_s:
            break
        for connection in open_.values():
            try:
                connection.send(head[sent:sent + 1])
            except OSError:
                pass  # closed by the server: select finds it readable
        readable, _, _ = select.select(list(open_.values()), [], [], interval_s)
        for index, connection in open_.items():
            if connection in readable:
                data, at = until_closed(connection, timeout_s=5)
                closed[index] = (data, at - started)
    for index, connection in enumerate(connections):
        if index not in closed:
            connection.close()
            closed[index] = (b"", float("inf"))
    return [closed[index] for index in range(count)]


def test_bodies_stalled_mid_way_are_closed_after_the_body_timeout_and_give_back_memory(served):
    baseline = warm_memory(served)
    length = 24 * MIB
    with ThreadPoolExecutor(8) as pool:
        stalled = list(pool.map(lambda _: stalled_body(served, length, sent=length - MIB),
                                range(8)))
        closing = watch_closing(pool, stalled)
        held = memory_once(served, lambda memory: memory[0] - baseline[0] > 8 * 20,
                           wait_s=BODY_S / 2)
        assert held[0] - baseline[0] > 8 * 20  # the guard holds the 8 x 23 MiB ...
        assert held[1] - baseline[1] < 16  # ... and Triton has seen none of it
        assert served_normally(served) < 5
        for answer, seconds in (future.result() for future in closing):
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
            assert b"--request-guard-body-timeout-s" in answer
            assert BODY_S - 0.2 < seconds < BODY_S + SLACK_S
    after = settled_memory(served, baseline)
    assert after[0] - baseline[0] < 16 and after[1] - baseline[1] < 16, (baseline, held, after)
    assert served_normally(served) < 5


def test_slowloris_heads_are_closed_after_the_header_timeout_while_others_are_served(served):
    baseline = warm_memory(served)
    with ThreadPoolExecutor(1) as pool:
        attack = pool.submit(slowloris, served, 50, 0.5, 10 * HEADER_S)
        latencies = []
        while not attack.done():
            latencies.append(served_normally(served))
            time.sleep(0.1)
        closed = attack.result()
    assert len(latencies) >= 3 and max(latencies) < 5, latencies
    for answer, seconds in closed:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
        assert b"--request-guard-header-timeout-s" in answer
        assert HEADER_S - 0.2 < seconds < HEADER_S + SLACK_S
    after = settled_memory(served, baseline)
    assert after[0] - baseline[0] < 16, (baseline, after)


def test_a_body_that_trickles_under_the_minimum_rate_is_closed(served):
    connection = connect(served)
    connection.sendall(infer_head(MIB))
    started = time.monotonic()
    connection.setblocking(False)
    try:
        while time.monotonic() - started < 10 * BODY_S:  # 100 bytes/s: never silent for long
            connection.send(b" " * 50)
            if select.select([connection], [], [], 0.5)[0]:
                break
    except OSError:
        pass
    connection.setblocking(True)
    answer, closed = until_closed(connection)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
    assert f"under {MIN_RATE} bytes/s (--request-guard-min-rate)".encode() in answer
    assert BODY_S - 0.2 < closed - started < BODY_S + SLACK_S


def admitted(connection: socket.socket) -> bytes:
    """The guard's first answer to a head that asks `Expect: 100-continue`."""
    return connection.recv(4096)


def test_bodies_beyond_the_memory_budget_get_503_until_memory_is_free(served):
    baseline = warm_memory(served)
    expecting = infer_head(CAP, b"Expect: 100-continue")
    length = CAP - MIB
    held = []
    try:
        with ThreadPoolExecutor(6) as pool:  # what they sent fills the budget (6 x 31 MiB)
            held = [connection for connection, _ in pool.map(
                lambda _: stalled_body(served, length, sent=length - 1), range(BUDGET // length))]
        memory_once(served, lambda memory: memory[0] - baseline[0] > 6 * 28, wait_s=BODY_S / 2)
        refused = connect(served)
        refused.sendall(expecting)  # told before it sends its body
        refused.shutdown(socket.SHUT_WR)
        answer, _ = until_closed(refused)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer[:200]
        assert b"retry-after: 1" in answer.lower() and b"--request-guard-memory-bytes" in answer
        sending = connect(served)  # a body that did not ask is refused when its bytes come
        sending.sendall(infer_head(16 * MIB) + b" " * 16 * MIB)
        answer, _ = until_closed(sending)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer[:200]
        assert served_normally(served) < 5  # a small body still fits
        held.pop().close()  # the guard drops that body: room for one more
        deadline = time.monotonic() + 5
        while True:
            again = connect(served)
            again.sendall(expecting)
            first = admitted(again)
            again.close()
            if first.startswith(b"HTTP/1.1 100") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    finally:
        for connection in held:
            connection.close()


def test_connections_beyond_the_cap_get_503_and_the_rest_are_served(served):
    opened = [connect(served) for _ in range(CONNECTIONS + 1)]
    try:
        time.sleep(0.5)  # all accepted; none sent a byte, so only a refusal answers
        refused, _, _ = select.select(opened, [], [], 0)
        # at least the last one (more if connections of earlier tests were still closing)
        assert 1 <= len(refused) < CONNECTIONS
        for connection in refused:
            answer, _ = until_closed(connection)
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer[:200]
            assert b"--request-guard-connections" in answer
    finally:
        for connection in opened:
            connection.close()
    deadline = time.monotonic() + 5  # the guard notices the 64 closes
    while True:
        try:
            assert served_normally(served) < 5
            break
        except urllib.error.HTTPError as error:
            assert error.code == 503 and time.monotonic() < deadline
            time.sleep(0.2)


@pytest.mark.slow
def test_the_default_limits_close_stalled_and_slowloris_connections_within_45_s(tmp_path):
    from triton_models.guard_limits import GuardLimits

    defaults = GuardLimits()
    # the default time limits; one address (127.0.0.1) may hold the whole default budget
    with ServeCommand(tmp_path, "--request-guard-client-memory-bytes",
                      str(defaults.memory_bytes)) as serve:
        baseline = warm_memory(serve)
        length = 30 * MIB  # 8 fit the default budget of 256 MiB
        with ThreadPoolExecutor(9) as pool:
            closing = watch_closing(pool, [stalled_body(serve, length, sent=length - MIB)
                                           for _ in range(8)])
            attack = pool.submit(slowloris, serve, 50, 1.0, 45)
            while not attack.done():
                assert served_normally(serve) < 5
                time.sleep(0.5)
            heads = attack.result()
            bodies = [future.result() for future in closing]
        for answer, seconds in bodies:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert seconds < defaults.body_timeout_s + SLACK_S
        for answer, seconds in heads:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert seconds < defaults.header_timeout_s + SLACK_S
        after = settled_memory(serve, baseline)
        assert all(now - before < 16 for now, before in zip(after, baseline)), (baseline, after)
        assert served_normally(serve) < 5
