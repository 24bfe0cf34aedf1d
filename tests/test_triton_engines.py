"""CPU engines served by a real tritonserver: unet_cpu<i> (ONNX Runtime in the python backend)
and an ONNX text encoder, against the same ONNX run in-process."""
from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc_client
from test_devices import TinyUNet, export_tiny_unet
from tiny_models import Conditioned
from tritonclient.utils import np_to_triton_dtype

from engines.manifest import network_entry, new_manifest, write_manifest
from models.reference import SCHEDULER_CONFIG
from models.sim import sim_spec
from runtime.driffusion import sample
from runtime.generate import connect_pipeline
from runtime.local_devices import LocalDevice
from runtime.pipeline import GenerationRequest
from runtime.pool import DevicePool
from runtime.schedulers import make_scheduler
from runtime.triton_clients import TritonEndpoints
from triton_models.repository import RepositoryOptions, write_repository

pytestmark = pytest.mark.triton

EMBED_DIM = 11
UNET_IO = {
    "inputs": [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 1, 8, 8]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 1, EMBED_DIM]},
    ],
    "outputs": [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
}
ENCODER_IO = {
    "inputs": [{"name": "label", "dtype": "int64", "shape": ["batch"]}],
    "outputs": [{"name": "text_embeddings", "dtype": "float32", "shape": ["batch", 1, EMBED_DIM]}],
}


class TinyLabelEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding = torch.nn.Embedding(11, EMBED_DIM)

    def forward(self, label):
        return self.embedding(label).unsqueeze(1)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines") / "tiny"
    cpu = root / "cpu"
    cpu.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        export_tiny_unet(TinyUNet().eval(), cpu / "unet.onnx")
        torch.onnx.export(TinyLabelEncoder().eval(), (torch.tensor([1, 2]),),
                          str(cpu / "text_encoder.onnx"), dynamo=False, opset_version=17,
                          input_names=["label"], output_names=["text_embeddings"],
                          dynamic_axes={"label": {0: "batch"}, "text_embeddings": {0: "batch"}})
    manifest = new_manifest("tiny", "onnxruntime", "test", None)
    for name, io in (("unet", UNET_IO), ("text_encoder", ENCODER_IO)):
        manifest["networks"][name] = network_entry(
            file=f"{name}.onnx", onnx_sha256="0" * 64, precision="fp32", profile={},
            build_seconds=0.0, optimization_level=1, **io)
    write_manifest(cpu, manifest)
    (cpu / "pipeline.json").write_text(sim_spec().with_defaults(model="tiny").to_json())
    return root


@pytest.fixture(scope="module")
def server(triton_server, engines, tmp_path_factory):
    repository = write_repository(tmp_path_factory.mktemp("ort") / "repo", RepositoryOptions(
        model=str(engines), devices=2, cpu_threads=1))
    return triton_server(repository.path)


def conditioned(pool: DevicePool, guidance: float) -> Conditioned:
    encoder = TinyLabelEncoder().eval()
    with torch.no_grad():
        return Conditioned(pool, encoder(torch.tensor([4])), encoder(torch.tensor([10])),
                           guidance)


async def sample_with(pool: DevicePool, mode: str) -> torch.Tensor:
    scheduler = make_scheduler("ddim", 8, SCHEDULER_CONFIG)
    latents = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    return await sample(pool, scheduler, latents, mode=mode, window=2)


@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_onnxruntime_devices_through_triton_match_in_process(server, engines, mode):
    async def through_triton():
        async with TritonEndpoints([server.grpc_url]) as endpoints:
            devices = await endpoints.devices()
            assert [d.name.split("/")[1] for d in devices] == ["unet_cpu0", "unet_cpu1"]
            return await sample_with(conditioned(DevicePool(devices), 2.0), mode)

    local = LocalDevice.from_onnx(engines / "cpu" / "unet.onnx")
    expected = asyncio.run(sample_with(conditioned(DevicePool([local]), 2.0), mode))
    torch.testing.assert_close(asyncio.run(through_triton()), expected, rtol=1e-5, atol=1e-5)


def test_driffusion_model_over_onnx_encoder_and_devices_matches_the_client(server):
    fields = {"LABEL": np.array([4], np.int32), "SEED": np.array([2], np.int64),
              "STEPS": np.array([6], np.int32), "GUIDANCE": np.array([2.0], np.float32)}
    inputs = []
    for name, value in fields.items():
        tensor = grpc_client.InferInput(name, [1], np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpc_client.InferenceServerClient(server.grpc_url)
    image = client.infer("driffusion", inputs).as_numpy("IMAGE")
    client.close()

    async def client_side():
        async with TritonEndpoints([server.grpc_url]) as endpoints:
            pipeline = await connect_pipeline(endpoints)
            request = GenerationRequest(label=4, seed=2, steps=6, guidance=2.0)
            return (await pipeline.generate(request)).image

    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, asyncio.run(client_side()))
