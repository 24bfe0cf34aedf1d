"""Scale out: a front server's `driffusion` model fans out to device servers on other hosts.

In-process: device signatures (what a device model takes), endpoint parsing, the repository
of a front server (`--devices 0 --device-endpoints ...`). On loopback with real tritonservers:
device servers A (2 sim devices) and B (1) with `--no-pipeline-model`, a front F with no
device of its own (`--devices 0 --device-endpoints A,B`), a mixed front M (2 local devices +
B) and an all-local server L (3 devices): the image is the same on all three; B is SIGKILLed
mid-image and the image does not change; B restarted on its ports takes work again; a frozen A
is replaced after the deadline; fronts whose endpoints are down, serve no device or serve
another shape refuse to start, naming the endpoint.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from servers import Cluster, metric, signal_group

from cli import main as cli_main
from runtime.triton_clients import DiscoveryError
from triton_models.device_endpoints import (
    ENDPOINTS_PARAMETER,
    SIGNATURE_PARAMETER,
    config_of_file,
    parse_endpoints,
    remote_devices,
    signature,
    signature_problems,
)
from triton_models.repository import RepositoryOptions, write_repository
from triton_models.serve import EmbeddedServer, ServerError, free_ports

LATENCY_MS = 20.0
DEADLINE_S = 1.0
SIM_SIGNATURE = {
    "inputs": {"sample": {"dtype": "TYPE_FP32", "shape": [-1, 1, 8, 8]},
               "timestep": {"dtype": "TYPE_FP32", "shape": [-1]},
               "encoder_hidden_states": {"dtype": "TYPE_FP32", "shape": [-1, 1, 11]}},
    "outputs": {"out_sample": {"dtype": "TYPE_FP32", "shape": [-1, 1, 8, 8]}},
}


def parameters(model_dir: Path) -> dict[str, str]:
    config = config_of_file(model_dir / "config.pbtxt")
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


# ---------------------------------------------------------------------------------------------
# In-process


@pytest.mark.parametrize("batching", [True, False])
def test_a_device_signature_does_not_depend_on_batching(tmp_path, batching):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model="sim", devices=1, dynamic_batching=batching))
    assert signature(config_of_file(repository.path / "unet_sim" / "config.pbtxt")) == \
        SIM_SIGNATURE


def test_signature_problems_name_shapes_dtypes_and_conditioning():
    def changed(kind, name, **fields):
        found = json.loads(json.dumps(SIM_SIGNATURE))
        found[kind][name].update(fields)
        return found

    assert signature_problems(SIM_SIGNATURE, SIM_SIGNATURE) == []
    # a dynamic dimension on the device accepts the size the pipeline uses
    assert signature_problems(SIM_SIGNATURE, changed("inputs", "sample",
                                                     shape=[-1, 1, -1, -1])) == []
    (problem,) = signature_problems(SIM_SIGNATURE, changed("inputs", "sample",
                                                           shape=[-1, 4, 8, 8]))
    assert "sample has shape [-1, 4, 8, 8], expected [-1, 1, 8, 8] (latent channels" in problem
    (problem,) = signature_problems(SIM_SIGNATURE, changed("outputs", "out_sample",
                                                           dtype="TYPE_FP16"))
    assert problem == "output out_sample is TYPE_FP16, expected TYPE_FP32"
    # the pipeline varies the size (dynamic): a device fixed to one size cannot serve it
    dynamic = changed("inputs", "sample", shape=[-1, 1, -1, -1])
    assert signature_problems(dynamic, SIM_SIGNATURE)
    renamed = json.loads(json.dumps(SIM_SIGNATURE))
    renamed["inputs"]["text_embeds"] = renamed["inputs"].pop("encoder_hidden_states")
    assert signature_problems(SIM_SIGNATURE, renamed) == [
        "no input encoder_hidden_states",
        ("unexpected input text_embeds (the pipeline's conditioning is sample, timestep, "
         "encoder_hidden_states)")]
    assert "(conditioning)" in signature_problems(SIM_SIGNATURE, changed(
        "inputs", "encoder_hidden_states", shape=[-1, 77, 768]))[0]


def test_endpoints_are_host_port_without_repeats():
    assert parse_endpoints(" a:1, b.example:8001 ,") == ("a:1", "b.example:8001")
    assert parse_endpoints(["[::1]:8001"]) == ("[::1]:8001",)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_endpoints("a:1,b")
    with pytest.raises(ValueError, match="port in 1..65535"):
        parse_endpoints("a:70000")
    with pytest.raises(ValueError, match="given twice: a:1"):
        parse_endpoints("a:1,a:1")


def test_a_front_server_repository_has_no_device_and_names_its_endpoints(tmp_path):
    repository = write_repository(tmp_path / "front", RepositoryOptions(
        model="sim", devices=0, device_endpoints=("10.0.0.2:8001", "10.0.0.3:8001")))
    assert repository.models == ["text_encoder", "driffusion"] and repository.devices == []
    assert not (repository.path / "unet_sim").exists()
    found = parameters(repository.path / "driffusion")
    assert found[ENDPOINTS_PARAMETER] == "10.0.0.2:8001,10.0.0.3:8001"
    assert json.loads(found[SIGNATURE_PARAMETER]) == SIM_SIGNATURE
    assert json.loads(found["devices"]) == []

    mixed = write_repository(tmp_path / "mixed", RepositoryOptions(
        model="sim", devices=2, device_endpoints=("10.0.0.2:8001",)))
    assert [device.name for device in mixed.devices] == ["unet_sim"]
    assert parameters(mixed.path / "driffusion")[ENDPOINTS_PARAMETER] == "10.0.0.2:8001"
    plain = write_repository(tmp_path / "plain", RepositoryOptions(model="sim", devices=1))
    assert ENDPOINTS_PARAMETER not in parameters(plain.path / "driffusion")


def test_zero_devices_needs_endpoints_and_endpoints_need_the_pipeline_model(tmp_path):
    with pytest.raises(ValueError, match="devices must be in 1..64 .0 only with device endp"):
        write_repository(tmp_path / "a", RepositoryOptions(model="sim", devices=0))
    with pytest.raises(ValueError, match="cannot go with --no-pipeline-model"):
        write_repository(tmp_path / "b", RepositoryOptions(
            model="sim", devices=0, pipeline_model=False, device_endpoints=("h:1",)))


def test_triton_repo_takes_device_endpoints(tmp_path, capsys):
    target = tmp_path / "repo"
    assert cli_main(["triton-repo", "--model", "sim", "--devices", "0", "--device-endpoints",
                     "gpu-a:8001,gpu-b:8001", "--repository", str(target)]) == 0
    assert parameters(target / "driffusion")[ENDPOINTS_PARAMETER] == "gpu-a:8001,gpu-b:8001"
    assert cli_main(["triton-repo", "--model", "sim", "--devices", "0",
                     "--repository", str(tmp_path / "none")]) == 2
    assert "0 only with device endpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--model", "sim", "--device-endpoints", "gpu-a"])
    assert exited.value.code == 2
    assert "must be HOST:PORT" in capsys.readouterr().err


def test_a_server_binds_only_the_address_it_is_given(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(model="sim", devices=1,
                                                                       pipeline_model=False))
    command = EmbeddedServer(repository.path, host="10.1.2.3").command()
    for flag in ("--grpc-address", "--http-address", "--metrics-address"):
        assert f"{flag}=10.1.2.3" in command


def test_discovery_of_an_endpoint_that_is_not_there_names_it():
    (port,) = free_ports(1)
    with pytest.raises(DiscoveryError, match=f"127.0.0.1:{port} does not answer as a Triton"):
        remote_devices([f"127.0.0.1:{port}"], SIM_SIGNATURE, DEADLINE_S, timeout_s=2.0)


# ---------------------------------------------------------------------------------------------
# Real servers on loopback


class ScaleOutCluster(Cluster):
    """The module's servers, with sim repositories at the module's latency and deadline."""

    def repository(self, name: str, **options) -> Path:
        options = {"model": "sim", "sim_latency_ms": LATENCY_MS, "pipeline_instances": 1,
                   "deadline_s": DEADLINE_S, **options}
        return write_repository(self.root / name, RepositoryOptions(**options)).path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ScaleOutCluster]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    cluster = ScaleOutCluster(tmp_path_factory.mktemp("scale-out"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def servers(cluster) -> dict[str, EmbeddedServer]:
    """A, B: device servers; F: front with no device (A, B over gRPC); M: 2 local devices + B
    over HTTP; L: 3 local devices. Every pool has 3 lanes."""
    started = {
        "A": cluster.start(cluster.repository("a", devices=2, pipeline_model=False)),
        "B": cluster.start(cluster.repository("b", devices=1, pipeline_model=False)),
    }
    endpoints = (started["A"].grpc_url, started["B"].grpc_url)
    started["F"] = cluster.start(cluster.repository("f", devices=0, device_endpoints=endpoints))
    started["M"] = cluster.start(cluster.repository("m", devices=2,
                                                    device_endpoints=(started["B"].http_url,)))
    started["L"] = cluster.start(cluster.repository("l", devices=3))
    return started


def infer(url: str, steps: int, seed: int = 5, timeout_s: float = 120) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpc_client

    fields = {"LABEL": np.array([3], np.int32), "SEED": np.array([seed], np.int64),
              "STEPS": np.array([steps], np.int32), "GUIDANCE": np.array([2.0], np.float32)}
    inputs = []
    for name, value in fields.items():
        datatype = str(value.dtype).upper().replace("FLOAT", "FP")
        tensor = grpc_client.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpc_client.InferenceServerClient(url)
    try:
        result = client.infer("driffusion", inputs, client_timeout=timeout_s)
        return {name: result.as_numpy(name) for name in ("IMAGE", "ROUNDS", "EVALUATIONS")}
    finally:
        client.close()


def device_calls(server: EmbeddedServer) -> float:
    """Requests the server's unet_sim answered (gRPC calls of a front's pool)."""
    return metric(server, "nv_inference_request_success", model="unet_sim")


LONG_STEPS = 300  # ~100 rounds of >= 20 ms: a second or more, to kill a server in the middle
SHORT_STEPS = 40


@pytest.mark.triton
def test_the_image_is_the_same_whichever_mix_of_local_and_remote_devices(servers):
    front, mixed, local = (infer(servers[name].grpc_url, SHORT_STEPS) for name in "FML")
    for other in (mixed, local):
        np.testing.assert_array_equal(front["IMAGE"], other["IMAGE"])
        assert front["ROUNDS"][0] == other["ROUNDS"][0] < SHORT_STEPS  # the same 3-lane window
    log = servers["F"].log_path.read_text()
    a, b = servers["A"].grpc_url, servers["B"].grpc_url
    assert f"local devices none; remote devices {a}/unet_sim x2, {b}/unet_sim x1" in log
    assert f"remote devices {servers['B'].http_url}/unet_sim x1" in servers["M"].log_path.read_text()
    assert device_calls(servers["A"]) > 0 and device_calls(servers["B"]) > 0


@pytest.mark.triton
@pytest.mark.slow  # failover mid image: tests/test_reliability.py; remote devices: the test above
def test_a_device_server_killed_mid_image_leaves_the_image_unchanged_and_rejoins(servers,
                                                                                 cluster):
    front, server_b = servers["F"], servers["B"]
    device_b = f"{server_b.grpc_url}/unet_sim"
    expected = infer(front.grpc_url, LONG_STEPS)
    failovers = metric(front, "driffusion_device_failovers_total", device=device_b)

    result: dict = {}
    request = threading.Thread(target=lambda: result.update(infer(front.grpc_url, LONG_STEPS)))
    calls = device_calls(server_b)
    start = time.monotonic()
    request.start()
    while device_calls(server_b) < calls + 5:  # B is serving this image's rounds
        assert time.monotonic() < start + 30, "B never took work for the request"
        time.sleep(0.02)
    signal_group(server_b, signal.SIGKILL)
    killed_mid_image = request.is_alive()
    request.join(120)
    assert killed_mid_image and "IMAGE" in result
    np.testing.assert_array_equal(result["IMAGE"], expected["IMAGE"])
    assert metric(front, "driffusion_device_failovers_total", device=device_b) > failovers
    assert f"device {device_b} lost" in front.log_path.read_text()
    # M reaches B over HTTP: its kept-alive connections to B are dead now; the image holds
    local = infer(servers["L"].grpc_url, SHORT_STEPS, seed=11)["IMAGE"]
    np.testing.assert_array_equal(infer(servers["M"].grpc_url, SHORT_STEPS, seed=11)["IMAGE"],
                                  local)
    assert f"device {server_b.http_url}/unet_sim lost" in servers["M"].log_path.read_text()

    # B again on its ports, started from this (main) thread: it answers a health check and
    # the front's pool gives it work again (its fresh counters start at 0)
    servers["B"] = restarted = cluster.start(server_b.repository, dict(server_b.ports))
    expected = infer(servers["L"].grpc_url, SHORT_STEPS, seed=9)["IMAGE"]
    deadline = time.monotonic() + 60
    images = 0
    while device_calls(restarted) == 0:
        assert time.monotonic() < deadline, "the restarted device server never took work"
        np.testing.assert_array_equal(infer(front.grpc_url, SHORT_STEPS, seed=9)["IMAGE"],
                                      expected)
        images += 1
    assert f"device {device_b} answered its health check: back in service" in \
        front.log_path.read_text()
    print(f"\nB killed mid-image: same image; restarted B took work again after {images} "
          "image(s)")


@pytest.mark.triton
@pytest.mark.slow  # a frozen server's deadline: tests/test_reliability.py
def test_a_frozen_device_server_is_replaced_after_the_deadline(servers):
    front, server_a = servers["F"], servers["A"]
    device_a = f"{server_a.grpc_url}/unet_sim"
    expected = infer(servers["L"].grpc_url, LONG_STEPS)
    result: dict = {}
    request = threading.Thread(target=lambda: result.update(infer(front.grpc_url, LONG_STEPS)))
    calls = device_calls(server_a)
    start = time.monotonic()
    request.start()
    try:
        while device_calls(server_a) < calls + 5:
            assert time.monotonic() < start + 30, "A never took work for the request"
            time.sleep(0.02)
        signal_group(server_a, signal.SIGSTOP)
        request.join(120)
    finally:
        signal_group(server_a, signal.SIGCONT)
    np.testing.assert_array_equal(result["IMAGE"], expected["IMAGE"])
    lost = re.findall(rf"device {re.escape(device_a)} lost after ([0-9.]+) s \(([^)]*)",
                      front.log_path.read_text())
    assert lost, "the frozen server's calls were never re-issued"
    seconds = [float(found) for found, error in lost if "Deadline" in error]
    assert seconds and all(DEADLINE_S <= s < DEADLINE_S + 1.0 for s in seconds), lost
    print(f"\nfrozen device server replaced {max(seconds):.2f} s into its call "
          f"(deadline {DEADLINE_S} s)")


def front_refuses(cluster: Cluster, name: str, endpoint: str) -> str:
    with pytest.raises(ServerError) as refused:
        cluster.start(cluster.repository(name, devices=0, device_endpoints=(endpoint,)))
    return str(refused.value)


@pytest.mark.triton
@pytest.mark.slow  # 26 s: three fronts that fail to start
def test_a_front_refuses_to_start_on_an_endpoint_down_empty_or_of_another_shape(servers,
                                                                               cluster):
    (port,) = free_ports(1)
    assert f"127.0.0.1:{port} does not answer as a Triton gRPC server" in \
        front_refuses(cluster, "down", f"127.0.0.1:{port}")
    # the front F serves no device model itself (the same discovery, in-process)
    with pytest.raises(DiscoveryError, match=f"device endpoint {servers['F'].grpc_url} serves "
                       "no ready unet_\\* model .ready models: driffusion, text_encoder"):
        remote_devices([servers["F"].grpc_url], SIM_SIGNATURE, DEADLINE_S)
    # a device server whose unet_sim takes 16x16 latents and another conditioning name
    repository = cluster.repository("other", devices=1, pipeline_model=False)
    config = repository / "unet_sim" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 1, 8, 8 ]", "dims: [ 1, 16, 16 ]")
                      .replace("encoder_hidden_states", "class_labels"))
    other = cluster.start(repository)
    message = front_refuses(cluster, "shape", other.grpc_url)
    assert f"device endpoint {other.grpc_url} serves unet_sim, which does not fit" in message
    assert "input sample has shape [-1, 1, 16, 16], expected [-1, 1, 8, 8]" in message
    assert "unexpected input class_labels" in message
