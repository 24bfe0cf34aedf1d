"""A real tritonserver serving the closed-form sim: discovery, exact sampling through gRPC,
concurrency, the `driffusion` pipeline model, the generate CLI and clean shutdown."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc_client
from PIL import Image
from servers import children_of, wait_for_line
from tiny_models import Conditioned

from cli import main as cli_main
from models.reference import SCHEDULER_CONFIG
from models.sim import SimDiffusion
from models.tensors import ENCODER_HIDDEN_STATES, OUT_SAMPLE, SAMPLE, TIMESTEP
from runtime.device import DeviceError
from runtime.driffusion import sample
from runtime.generate import connect_pipeline
from runtime.local_devices import LocalDevice
from runtime.pipeline import GenerationRequest
from runtime.pool import DevicePool
from runtime.schedulers import make_scheduler
from runtime.triton_clients import DiscoveryError, TritonEndpoints, discover_devices
from triton_models.repository import RepositoryOptions, write_repository
from triton_models.serve import EmbeddedServer, ServerError, group_members

pytestmark = pytest.mark.triton

LATENCY_S = 0.1
SIM = SimDiffusion.from_scheduler_config(SCHEDULER_CONFIG)


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    repository = write_repository(tmp_path_factory.mktemp("sim") / "repo", RepositoryOptions(
        model="sim", devices=2, sim_latency_ms=LATENCY_S * 1000))
    return triton_server(repository.path)


TRANSPORTS = ("grpc", "http")


def endpoint_of(server, transport: str) -> str:
    """The server's gRPC (`HOST:PORT`) or HTTP (`http://HOST:PORT`) endpoint."""
    return server.grpc_url if transport == "grpc" else server.http_url


def conditioned(pool: DevicePool, label: int, guidance: float) -> Conditioned:
    return Conditioned(pool, SIM.encode(np.array([label])), SIM.encode(np.array([10])), guidance)


async def sample_with(pool: DevicePool, mode: str, steps: int = 8) -> torch.Tensor:
    scheduler = make_scheduler("ddim", steps, SCHEDULER_CONFIG)
    latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    return await sample(pool, scheduler, latents, mode=mode, window=2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_discovery_finds_each_sim_instance_as_a_lane(server, transport):
    endpoint = endpoint_of(server, transport)

    async def discover():
        async with discover_devices([endpoint]) as devices:
            return devices, [await device.healthy() for device in devices]

    (device,), health = asyncio.run(discover())
    assert device.name == f"{endpoint}/unet_sim" and device.instances == 2
    assert health == [True]


def test_discovery_errors_name_the_endpoint(server):
    async def discover(endpoint, pattern="unet_*"):
        async with TritonEndpoints([endpoint]) as endpoints:
            return await endpoints.devices(pattern)

    with pytest.raises(DiscoveryError, match="serves no ready unet_gpu\\* model"):
        asyncio.run(discover(server.grpc_url, "unet_gpu*"))
    http_endpoint = server.http_url.removeprefix("http://")
    with pytest.raises(DiscoveryError, match=f"{http_endpoint} does not answer as a Triton gRPC"):
        asyncio.run(discover(http_endpoint))
    grpc_as_http = f"http://{server.grpc_url}"
    with pytest.raises(DiscoveryError, match=f"{grpc_as_http} does not answer as a Triton HTTP"):
        asyncio.run(discover(grpc_as_http))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_sampling_through_triton_matches_in_process(server, mode, transport):
    async def through_triton():
        async with TritonEndpoints([endpoint_of(server, transport)]) as endpoints:
            pool = conditioned(DevicePool(await endpoints.devices()), label=5, guidance=2.0)
            return await sample_with(pool, mode)

    local = [LocalDevice.from_function(f"sim{i}", SIM.denoise) for i in range(2)]
    expected = asyncio.run(sample_with(conditioned(DevicePool(local), label=5, guidance=2.0), mode))
    torch.testing.assert_close(asyncio.run(through_triton()), expected, rtol=0, atol=0)


def test_a_round_takes_one_device_latency_not_one_per_item(server):
    async def timed_round(items: int) -> float:
        async with TritonEndpoints([server.grpc_url]) as endpoints:
            pool = conditioned(DevicePool(await endpoints.devices()), label=1, guidance=2.0)
            x, t = torch.zeros((items, 1, 8, 8)), torch.full((items,), 500.0)
            await pool(x, t)  # warm the channel
            start = time.perf_counter()
            await pool(x, t)
            return time.perf_counter() - start

    elapsed = asyncio.run(timed_round(2))
    assert LATENCY_S <= elapsed < 1.6 * LATENCY_S, f"round of 2 items took {elapsed:.3f} s"


def infer_driffusion(url: str, **fields) -> np.ndarray:
    types = {"PROMPT": ("BYTES", object), "NEGATIVE_PROMPT": ("BYTES", object),
             "MODE": ("BYTES", object), "SCHEDULER": ("BYTES", object),
             "LABEL": ("INT32", np.int32), "STEPS": ("INT32", np.int32),
             "WINDOW": ("INT32", np.int32), "SEED": ("INT64", np.int64),
             "GUIDANCE": ("FP32", np.float32), "TOLERANCE": ("FP32", np.float32)}
    inputs = []
    for name, value in fields.items():
        triton_type, dtype = types[name]
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        tensor = grpc_client.InferInput(name, [1], triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpc_client.InferenceServerClient(url)
    try:
        return client.infer("driffusion", inputs).as_numpy("IMAGE")
    finally:
        client.close()


def test_driffusion_model_runs_the_same_pipeline_as_the_client(server):
    image = infer_driffusion(server.grpc_url, LABEL=7, SEED=11, STEPS=8, MODE="aggressive",
                             GUIDANCE=2.0)
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert image.min() < image.max()

    async def client_side():
        async with TritonEndpoints([server.grpc_url]) as endpoints:
            pipeline = await connect_pipeline(endpoints)
            request = GenerationRequest(label=7, seed=11, steps=8, mode="aggressive", guidance=2.0)
            return (await pipeline.generate(request)).image

    np.testing.assert_array_equal(image, asyncio.run(client_side()))
    by_prompt = infer_driffusion(server.grpc_url, PROMPT="a handwritten seven", SEED=11, STEPS=8,
                                 MODE="aggressive", GUIDANCE=2.0)
    np.testing.assert_array_equal(by_prompt, image)


def test_driffusion_model_fans_each_round_out_over_the_devices(server):
    # 8 steps: sequential = 8 rounds of one call; aggressive window 2 = 5 rounds of 2 calls
    def timed(mode: str) -> float:
        start = time.perf_counter()
        infer_driffusion(server.grpc_url, LABEL=2, STEPS=8, MODE=mode, GUIDANCE=1.0)
        return time.perf_counter() - start

    sequential, aggressive = timed("sequential"), timed("aggressive")
    assert sequential >= 8 * LATENCY_S
    assert aggressive < 6.5 * LATENCY_S, f"5 rounds of 2 concurrent calls took {aggressive:.2f} s"


@pytest.mark.slow  # 21 s; concurrent rounds of 2: the test above
def test_a_round_of_eight_device_calls_starts_them_all_at_once(triton_server, tmp_path):
    """8 devices, window 8: the `driffusion` model's BLS calls all start together. (Python's
    default executor has CPU count + 4 threads, 6 here: the last 2 calls of a round used to
    wait for the first 6, and the round took two device times.)"""
    latency_s = 0.6
    wide = triton_server(write_repository(tmp_path / "repo", RepositoryOptions(
        model="sim", devices=8, sim_latency_ms=latency_s * 1000)).path)
    infer_driffusion(wide.grpc_url, LABEL=2, STEPS=2, MODE="sequential")  # warm
    start = time.perf_counter()
    infer_driffusion(wide.grpc_url, LABEL=2, STEPS=9, MODE="aggressive", WINDOW=8)
    elapsed = time.perf_counter() - start  # rounds of 1 and 8 calls: two device times
    assert elapsed < 2.75 * latency_s, f"rounds of 1 and 8 calls took {elapsed:.2f} s"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_checks_answer_per_device(server, transport):
    endpoint = endpoint_of(server, transport)

    async def health():
        async with TritonEndpoints([endpoint]) as endpoints:
            devices = await endpoints.devices()
            missing = endpoints.model(endpoint, "unet_gpu7")
            return await DevicePool(devices).health(), await missing.is_ready()

    answers, missing_ready = asyncio.run(health())
    assert answers == {f"{endpoint}/unet_sim": True} and missing_ready is False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_bad_request_is_not_a_lost_device_but_a_missing_model_is(server, transport):
    context = SIM.encode(np.array([3]))
    endpoint = endpoint_of(server, transport)

    async def call(model_name: str, side: int):
        async with TritonEndpoints([endpoint]) as endpoints:
            model = endpoints.model(endpoint, model_name)
            inputs = {
                SAMPLE: np.zeros((1, 1, side, side), np.float32),
                TIMESTEP: np.full((1, 1), 500.0, np.float32),
                ENCODER_HIDDEN_STATES: context.astype(np.float32),
            }
            with pytest.raises(DeviceError) as caught:
                await model.infer(inputs, [OUT_SAMPLE], 10.0)
            return caught.value

    bad_shape = asyncio.run(call("unet_sim", 3))
    assert bad_shape.lost is False and "unet_sim" in str(bad_shape)
    missing = asyncio.run(call("unet_gpu7", 8))
    assert missing.lost is True


def test_generate_command_compares_parallel_with_sequential(server, tmp_path, capsys):
    out = tmp_path / "digit.png"
    code = cli_main(["generate", "--endpoints", server.grpc_url, "--label", "3", "--steps", "6",
                     "--guidance", "1.5", "--compare", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "speedup" in printed and "max pixel difference" in printed
    assert "sequential window 1" in printed and "aggressive window 2" in printed
    assert Image.open(out).size == (8, 8)


def test_generate_command_explains_an_unreachable_endpoint(capsys, free_ports):
    (port,) = free_ports(1)
    assert cli_main(["generate", "--endpoints", f"127.0.0.1:{port}", "--label", "3"]) == 2
    assert f"127.0.0.1:{port} does not answer as a Triton gRPC server" in capsys.readouterr().err
    assert cli_main(["generate", "--endpoints", f"http://127.0.0.1:{port}", "--label", "3"]) == 2
    assert (f"http://127.0.0.1:{port} does not answer as a Triton HTTP server"
            in capsys.readouterr().err)


def test_a_model_that_fails_to_load_is_named_in_the_start_error(tmp_path, free_ports):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model="sim", devices=1, pipeline_model=False))
    (repository.path / "text_encoder" / "1" / "model.py").write_text("import no_such_module\n")
    grpc_port, http_port, metrics_port = free_ports(3)
    server = EmbeddedServer(repository.path, grpc_port=grpc_port, http_port=http_port,
                            metrics_port=metrics_port, log_path=tmp_path / "server.log")
    with pytest.raises(ServerError, match="failed to load 'text_encoder'.*no_such_module"):
        server.start()
    assert server.process is None


@pytest.mark.slow  # serve's clean stop is also asserted by tests/test_serve_restart.py (SIGINT)
def test_serve_command_stops_on_sigterm_without_orphans(tmp_path, free_ports):
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "cli", "serve", "--model", "sim", "--devices", "2",
               "--no-pipeline-model", "--repository", str(tmp_path / "repo"),
               "--log-file", str(tmp_path / "server.log"),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--metrics-port", str(metrics_port)]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output = wait_for_line(serve, "Triton ready", timeout_s=240)
        assert f"gRPC 127.0.0.1:{grpc_port}" in output
        (server_pid,) = children_of(serve.pid)
        # tritonserver + 2 unet_sim stubs + text_encoder stub, in the server's own group
        assert len(group_members(server_pid)) >= 4
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert group_members(server_pid) == [] and group_members(serve.pid) == []
