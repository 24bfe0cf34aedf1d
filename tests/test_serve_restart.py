"""`driffusion serve` restarts a tritonserver that died (here: kill -9) on the same ports: the
request guard keeps the public ports open meanwhile and refuses requests without naming
Triton's loopback ports, inference works again after the restart, Ctrl-C still stops every
process; restarts are bounded (RestartBudget)."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
from servers import ServeCommand, wait_for_line
from tritonclient.utils import InferenceServerException

from triton_models.serve import RestartBudget, group_members

pytestmark = pytest.mark.triton
RESTART_TIMEOUT_S = 120.0  # a loaded 2-core box takes 5-30 s to load the models again
# the guard's gRPC channel to Triton retries connecting with a backoff of its own
GRPC_RECONNECT_S = 5.0
SAMPLE = {"sample": [1, 1, 8, 8], "timestep": [1, 1], "encoder_hidden_states": [1, 1, 11]}


def test_the_restart_budget_allows_a_few_restarts_within_its_window():
    now = [0.0]
    budget = RestartBudget(limit=3, window_s=60.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 59.0
    assert not budget.take()
    now[0] = 60.5  # the first three left the window
    assert budget.take()


def triton_ports(pid: int) -> list[int]:
    """The gRPC and HTTP ports on tritonserver's command line."""
    arguments = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return [int(argument.split("=")[1]) for argument in arguments
            if argument.startswith(("--grpc-port=", "--http-port="))]


def infer_http(serve: ServeCommand) -> tuple[int, str]:
    """(status, body) of one unet_sim call over the public HTTP port."""
    body = json.dumps({"inputs": [
        {"name": name, "shape": shape, "datatype": "FP32", "data": [0.5] * int(np.prod(shape))}
        for name, shape in SAMPLE.items()]}).encode()
    request = urllib.request.Request(f"{serve.http_url}/v2/models/unet_sim/infer", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def infer_grpc(serve: ServeCommand) -> InferenceServerException | None:
    """The error of one unet_sim call over the public gRPC port (None: answered)."""
    client = grpc_client.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
    inputs = []
    for name, shape in SAMPLE.items():
        tensor = grpc_client.InferInput(name, shape, "FP32")
        tensor.set_data_from_numpy(np.full(shape, 0.5, np.float32))
        inputs.append(tensor)
    try:
        client.infer("unet_sim", inputs, client_timeout=30)
        return None
    except InferenceServerException as error:
        return error
    finally:
        client.close()


def grpc_answers_within(serve: ServeCommand, seconds: float) -> bool:
    """Whether a unet_sim call over gRPC is answered within `seconds` (retrying)."""
    deadline = time.monotonic() + seconds
    while infer_grpc(serve) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class Restart:
    """What clients and `driffusion serve` showed around a kill -9 of its tritonserver."""

    log_path: Path
    killed: int
    internal_ports: list[int]
    gap_http: tuple[int, str]
    gap_grpc: InferenceServerException | None
    said: str
    restarted: int
    restarted_ports: list[int]
    http_after: int
    grpc_after: bool
    returncode: int
    left_over: list[int]


@pytest.fixture(scope="module")
def restart(tmp_path_factory) -> Restart:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    root = tmp_path_factory.mktemp("restart")
    with ServeCommand(root, "--no-pipeline-model") as serve:
        killed = serve.tritonserver()
        internal_ports = triton_ports(killed)
        assert infer_http(serve)[0] == 200
        os.kill(killed, signal.SIGKILL)
        gap_http, gap_grpc = infer_http(serve), infer_grpc(serve)
        said = wait_for_line(serve.process, "Triton ready again", RESTART_TIMEOUT_S)
        restarted = serve.tritonserver()
        restarted_ports = triton_ports(restarted)
        http_after = infer_http(serve)[0]
        grpc_after = grpc_answers_within(serve, GRPC_RECONNECT_S)
    return Restart(root / "server.log", killed, internal_ports, gap_http, gap_grpc, said,
                   restarted, restarted_ports, http_after, grpc_after,
                   serve.process.returncode, group_members(restarted))


def test_serve_restarts_a_killed_tritonserver_on_its_ports_and_still_stops_cleanly(restart):
    assert "tritonserver killed by SIGKILL; restarting it on the same ports" in restart.said
    assert str(restart.log_path) in restart.said
    assert restart.restarted != restart.killed
    assert restart.restarted_ports == restart.internal_ports
    assert restart.http_after == 200
    assert restart.returncode == 0 and not restart.left_over


def test_in_the_gap_the_guard_answers_naming_none_of_tritons_ports(restart):
    status, text = restart.gap_http
    assert status == 503, text
    error = restart.gap_grpc
    assert error is not None and error.status() == "StatusCode.UNAVAILABLE"
    for answer in (text, error.message()):
        assert "127.0.0.1" not in answer, answer
        assert not any(str(port) in answer for port in restart.internal_ports), answer


def test_grpc_through_the_guard_answers_again_right_after_the_restart(restart):
    assert restart.grpc_after


@pytest.mark.slow
def test_without_the_guard_serve_restarts_triton_and_stops_after_too_many_deaths(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    with ServeCommand(tmp_path, "--no-pipeline-model", "--request-guard-bytes", "0") as serve:
        for restart in range(1, 4):
            killed = serve.tritonserver()
            os.kill(killed, signal.SIGKILL)
            said = wait_for_line(serve.process, "Triton ready again", RESTART_TIMEOUT_S)
            assert f"restart {restart} of at most 3 within 60 s" in said
            assert triton_ports(serve.tritonserver()) == [serve.grpc_port, serve.http_port]
            assert infer_http(serve)[0] == 200
        assert grpc_answers_within(serve, GRPC_RECONNECT_S)
        os.kill(serve.tritonserver(), signal.SIGKILL)
        assert serve.process.wait(30) == 1
    assert f"again after 3 restarts within 60 s; stopping instead of restarting it. " \
        f"Server log: {tmp_path / 'server.log'}" in serve.output
