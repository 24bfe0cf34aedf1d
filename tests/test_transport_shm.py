"""Shared-memory transport (runtime/triton_shm.py) against a real tritonserver with `unet_sim`:
the same bytes as gRPC, regions unregistered and freed after, the fallback where shared memory is
refused, and `driffusion bench transport` on the same server."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc_client
from tiny_models import Conditioned

from bench import transport
from models.reference import SCHEDULER_CONFIG
from models.sim import SimDiffusion
from runtime.device import DeviceError
from runtime.driffusion import sample
from runtime.pool import DevicePool
from runtime.schedulers import make_scheduler
from runtime.triton_http import HttpError
from runtime.triton_shm import SharedMemoryModel, is_loopback, region_bytes
from triton_models.repository import RepositoryOptions, write_repository
from triton_models.serve import EmbeddedServer, free_ports

pytestmark = pytest.mark.triton

SIM = SimDiffusion.from_scheduler_config(SCHEDULER_CONFIG)
CONTEXT = {"encoder_hidden_states": SIM.encode(np.array([3]))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """unet_sim (2 devices) and unet_echo, shared memory open to clients."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    root = tmp_path_factory.mktemp("shm")
    repository = write_repository(root / "repo", RepositoryOptions(model="sim", devices=2,
                                                                   sim_latency_ms=0.0))
    transport.add_echo_model(repository.path, 2)
    grpc_port, http_port, metrics_port = free_ports(3)
    with EmbeddedServer(repository.path, grpc_port=grpc_port, http_port=http_port,
                        metrics_port=metrics_port, log_path=root / "server.log",
                        allow_shared_memory=True) as started:
        yield started


def our_shm_files() -> list[str]:
    return [path.name for path in Path("/dev/shm").glob(f"driffusion-{os.getpid()}-*")]


def registered_regions(server) -> list[str]:
    client = grpc_client.InferenceServerClient(server.grpc_url)
    try:
        return [region["name"] for region in
                client.get_system_shared_memory_status(as_json=True).get("regions", {}).values()]
    finally:
        client.close()


async def sampled(endpoint: str, shared_memory: str) -> tuple[np.ndarray, list[np.ndarray], list]:
    """(a DRiffusion sample over the sim devices (CFG, aggressive, window 2), two direct calls'
    answers, the device clients)."""
    from runtime.triton_clients import TritonEndpoints

    async with TritonEndpoints([endpoint], shared_memory=shared_memory) as connection:
        devices = await connection.devices("unet_sim")
        pool = DevicePool(devices)
        rows = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1)).numpy()
        timesteps = np.array([999.0, 500.0, 20.0], np.float32)
        context = {"encoder_hidden_states": np.repeat(CONTEXT["encoder_hidden_states"], 3, 0)}
        direct = [await devices[0](rows, timesteps, context),
                  await devices[0](rows[:1], timesteps[:1],
                                   {"encoder_hidden_states": context["encoder_hidden_states"][:1]})]
        scheduler = make_scheduler("ddim", 8, SCHEDULER_CONFIG)
        latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        conditioned = Conditioned(pool, CONTEXT["encoder_hidden_states"],
                                  SIM.encode(np.array([10])), 3.0)
        image = await sample(conditioned, scheduler, latents, mode="aggressive", window=2)
        return image.numpy(), direct, [device.model for device in devices]


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_shared_memory_answers_the_bytes_of_grpc_and_frees_its_regions(server, kind):
    endpoint = server.grpc_url if kind == "grpc" else server.http_url
    image, direct, models = asyncio.run(sampled(endpoint, "system"))
    reference_image, reference_direct, plain = asyncio.run(sampled(server.grpc_url, "off"))
    assert all(isinstance(model, SharedMemoryModel) and model.proven and model.refused is None
               for model in models)  # the calls went by region
    assert not any(isinstance(model, SharedMemoryModel) for model in plain)
    assert image.tobytes() == reference_image.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(direct, reference_direct))
    assert our_shm_files() == [] and registered_regions(server) == []


def test_regions_are_registered_while_open_and_grow_for_larger_calls(server):
    from runtime.triton_clients import TritonEndpoints

    async def run() -> tuple[list[str], list[str], list[str]]:
        async with TritonEndpoints([server.grpc_url], shared_memory="system") as connection:
            (device,) = await connection.devices(transport.DEVICE_MODEL)
            timestep, context = np.array([1.0], np.float32), CONTEXT
            small = np.arange(100, dtype=np.float32).reshape(1, 100)
            assert np.array_equal(await device(small, timestep, context), small)
            first = registered_regions(server)
            large = np.arange(60_000, dtype=np.float32).reshape(1, 60_000)  # 240 KB: grows
            assert np.array_equal(await device(large, timestep, context), large)
            return first, registered_regions(server), our_shm_files()

    first, grown, files = asyncio.run(run())
    assert len(first) == 2 and len(grown) == 2 and set(first).isdisjoint(grown)  # replaced
    assert sorted(files) == sorted(grown)
    assert our_shm_files() == [] and registered_regions(server) == []


class RefusingHttp:
    """An HTTP endpoint whose shared-memory API is closed (as `serve` leaves it by default)."""

    def __init__(self, refuse_infer: bool = False) -> None:
        self.refuse_infer = refuse_infer
        self.paths: list[str] = []

    async def post_json(self, path, payload, timeout_s=None):
        self.paths.append(path)
        if "sharedmemory" in path and not self.refuse_infer:
            raise HttpError(403, "This API is restricted")
        if path.endswith("/infer"):
            raise HttpError(400, "shared memory is not served on the public port")
        return {}


class PlainModel:
    """The wrapped transport: answers `out_sample` = `sample` and counts its calls."""

    name = "http://127.0.0.1:1/unet_x"
    model_name = "unet_x"

    def __init__(self, http) -> None:
        self.http = http
        self.calls = 0

    async def infer(self, inputs, outputs, timeout_s=None):
        self.calls += 1
        return {"out_sample": inputs["sample"]}


@pytest.mark.parametrize("refuse_infer", [False, True], ids=["register", "first-call"])
def test_a_refused_server_is_called_over_the_network_in_auto_mode_only(refuse_infer):
    inputs = {"sample": np.ones((1, 4), np.float32), "timestep": np.ones(1, np.float32)}

    async def call(fallback: bool) -> tuple[PlainModel, SharedMemoryModel, list, int]:
        plain = PlainModel(RefusingHttp(refuse_infer))
        model = SharedMemoryModel(plain, fallback=fallback)
        try:
            answers = [await model.infer(inputs, ["out_sample"])]
            tried = len(plain.http.paths)
            answers.append(await model.infer(inputs, ["out_sample"]))
        finally:
            await model.close()  # as TritonEndpoints does on exit
        return plain, model, answers, len(plain.http.paths) - tried

    plain, model, answers, tried_again = asyncio.run(call(fallback=True))
    assert model.refused and plain.calls == 2 and tried_again == 0  # refused once for all
    assert all(np.array_equal(answer["out_sample"], inputs["sample"]) for answer in answers)
    assert our_shm_files() == []
    with pytest.raises(DeviceError, match="restricted|not served"):
        asyncio.run(call(fallback=False))
    assert our_shm_files() == []


def test_only_loopback_endpoints_and_sizes_in_powers_of_two():
    assert is_loopback("127.0.0.1:8001") and is_loopback("http://localhost:8000")
    assert is_loopback("http://[::1]:8000") and not is_loopback("10.0.0.2:8001")
    assert region_bytes(10) == 1 << 16 and region_bytes((1 << 20) + 1) == 1 << 21
    from runtime.triton_clients import TritonEndpoints

    with pytest.raises(ValueError, match="shared_memory must be one of"):
        TritonEndpoints(["127.0.0.1:1"], shared_memory="yes")


def test_bench_transport_measures_every_path_on_the_echo_devices(server):
    setup = transport.TransportSetup(sizes=("sd15-512",), devices=(2,), rounds=1, repeat=1)
    endpoints = {"grpc": server.grpc_url, "http": server.http_url}
    records = asyncio.run(transport.measure(endpoints, setup))
    assert [record.path for record in records] == list(transport.PATHS)
    assert all(record.ms_per_round > 0 and record.devices == 2 for record in records)
    report = {"setup": {"paths": setup.paths, "repeat": 1, "rounds": 1},
              "records": [record.__dict__ for record in records]}
    assert "sd15-512" in transport.format_report(report)
    assert our_shm_files() == [] and registered_regions(server) == []


def test_cuda_shared_memory_needs_a_gpu():
    """CUDA regions are written against tritonclient.utils.cuda_shared_memory; this box has no
    GPU and no cuda-python, so the path runs only where both are (with a GPU tritonserver)."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="needs cuda-python and a GPU")
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        pytest.skip(f"no CUDA GPU here ({error})")
    from tritonclient.utils import cuda_shared_memory

    from runtime.triton_shm import CudaRegion

    region = CudaRegion("driffusion-cuda-test", 1 << 16)
    try:
        value = np.arange(16, dtype=np.float32)
        region.write([value])
        assert np.array_equal(region.read(np.dtype(np.float32), [16]), value)
    finally:
        region.destroy()
    assert cuda_shared_memory.allocated_shared_memory_regions() == []
