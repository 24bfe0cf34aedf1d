"""Where the text encoders run: on a GPU of their own (`--encoder-gpu N`) or on an encoder server
(`--encoders-only`) that a front calls (`--encoder-endpoints HOST:PORT`).

In-process: the configs written (instance groups of the encoders, the VAE and the devices),
the refusals, the front's and the encoder server's repositories, discovery errors. On loopback
with real tritonservers (one module-scoped pair on the reference model): an encoder server E
(tokenizer + text encoder, nothing else) and a front F (one device, the VAE, driffusion; no
tokenizer or text encoder): F's image equals the all-local in-process pipeline's and E's text
encoder answered the calls; with E stopped F answers UNAVAILABLE naming E within seconds.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from servers import Cluster, metric
from test_triton_repository import UNET_INPUTS, UNET_OUTPUTS, load_config, parameters

from cli import main as cli_main
from engines.gpu import GpuInfo
from engines.manifest import network_entry, new_manifest, write_manifest
from models.sim import sim_spec
from runtime.triton_clients import DiscoveryError
from triton_models.device_endpoints import config_of_file, signature
from triton_models.encoder_endpoints import (
    ENCODER_ENDPOINTS_PARAMETER,
    ENCODER_SIGNATURES_PARAMETER,
    remote_encoders,
)
from triton_models.repository import RepositoryOptions, device_gpus, write_repository
from triton_models.serve import EmbeddedServer, free_ports, resolve_gpu_layout

PER_REQUEST_NETWORKS = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
PROMPT = "a red circle on a blue square"


@pytest.fixture(scope="module", autouse=True)
def reference_engines():
    """The bundled reference model's ONNX Runtime engines, built if missing: the repositories
    below name the model `reference`, as `driffusion triton-repo` does."""
    from bench.common import ensure_reference_engines

    return ensure_reference_engines(lambda line: None)


def tensorrt_engines(root: Path) -> Path:
    """A fake TensorRT engine set: a UNet plan and the plans run once per request."""
    directory = root / "gpu"
    directory.mkdir(parents=True)
    manifest = new_manifest("tiny", "tensorrt", "test",
                            GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, "GPU-1234"))
    tensor = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    networks = {"unet": (UNET_INPUTS, UNET_OUTPUTS),
                **{name: (tensor, tensor) for name in PER_REQUEST_NETWORKS}}
    for name, (inputs, outputs) in networks.items():
        (directory / f"{name}.plan").write_bytes(b"not a real plan")
        manifest["networks"][name] = network_entry(
            file=f"{name}.plan", onnx_sha256="0" * 64, precision="fp16", inputs=inputs,
            outputs=outputs, profile={}, build_seconds=0.0, optimization_level=3)
    write_manifest(directory, manifest)
    (directory / "pipeline.json").write_text(sim_spec().with_defaults(model="tiny").to_json())
    return root


def gpus_of(repository_path: Path, model: str) -> list[int]:
    (group,) = load_config(repository_path / model).instance_group
    return list(group.gpus)


# ---------------------------------------------------------------------------------------------
# An encoder GPU


@pytest.mark.parametrize(("encoder_gpu", "device_gpu_list"), [(None, [0, 1]), (0, [1, 2]),
                                                              (1, [0, 2]), (2, [0, 1])])
def test_the_encoder_gpu_holds_the_per_request_networks_and_no_device(tmp_path, encoder_gpu,
                                                                       device_gpu_list):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(tensorrt_engines(tmp_path / "engines")), backend="tensorrt", devices=2,
        encoder_gpu=encoder_gpu))
    devices = [f"unet_gpu{gpu}" for gpu in device_gpu_list]  # named after their GPU
    assert [device.name for device in repository.devices] == devices
    assert [gpus_of(repository.path, name) for name in devices] == [[g] for g in device_gpu_list]
    for network in PER_REQUEST_NETWORKS:
        assert gpus_of(repository.path, network) == [encoder_gpu or 0]
    pipeline_devices = json.loads(parameters(load_config(repository.path / "driffusion"))["devices"])
    assert [device["name"] for device in pipeline_devices] == devices


def test_one_gpu_layouts_keep_their_devices_off_the_encoder_gpu():
    assert device_gpus(RepositoryOptions(devices=3, gpu_layout="batched", encoder_gpu=0)) == [1]
    assert device_gpus(RepositoryOptions(devices=2, gpu_layout="instances", encoder_gpu=0)) == \
        [1, 1]
    assert device_gpus(RepositoryOptions(devices=2, gpu_layout="instances", encoder_gpu=1)) == \
        [0, 0]
    # two GPUs, one of them the encoders': the denoiser has one GPU, so auto picks batched
    options = RepositoryOptions(devices=4, backend="tensorrt", gpu_layout="auto", encoder_gpu=1)
    assert resolve_gpu_layout(options, gpu_count=2).gpu_layout == "batched"
    assert resolve_gpu_layout(options, gpu_count=3).gpu_layout is None


def test_triton_repo_takes_encoder_gpu(tmp_path, capsys):
    engines = tensorrt_engines(tmp_path / "engines")
    assert cli_main(["triton-repo", "--model", str(engines), "--backend", "tensorrt",
                     "--devices", "1", "--encoder-gpu", "0",
                     "--repository", str(tmp_path / "repo")]) == 0
    assert gpus_of(tmp_path / "repo", "unet_gpu1") == [1]
    assert gpus_of(tmp_path / "repo", "text_encoder") == [0]


@pytest.mark.parametrize(("options", "message"), [
    ({"model": "sim", "encoder_gpu": 1},
     "--encoder-gpu places the text encoders on a GPU: it needs --backend tensorrt or torch"),
    ({"model": "reference", "backend": "onnxruntime", "encoder_gpu": 1},
     "got --backend onnxruntime, model reference; the onnxruntime backend runs its encoders"),
    ({"model": "sim", "backend": "tensorrt", "encoder_gpu": -1}, "encoder gpu must be in 0..63"),
    ({"model": "sim", "encoders_only": True, "device_endpoints": ("h:1",)},
     "--encoders-only serves no driffusion model"),
    ({"model": "sim", "encoders_only": True, "encoder_endpoints": ("h:1",)},
     "--encoders-only serves no driffusion model"),
    ({"model": "sim", "pipeline_model": False, "encoder_endpoints": ("h:1",)},
     "encoder endpoints feed the driffusion model"),
    ({"model": "sim", "encoder_endpoints": ("h",)}, "must be HOST:PORT"),
])
def test_misplaced_encoders_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        write_repository(tmp_path / "repo", RepositoryOptions(**options))


# ---------------------------------------------------------------------------------------------
# Encoder servers: repositories and discovery


def test_an_encoder_server_serves_the_tokenizer_and_text_encoder_alone(tmp_path):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model="reference", encoders_only=True))
    assert sorted(repository.models) == ["text_encoder", "tokenizer"]
    assert sorted(p.name for p in repository.path.iterdir() if p.is_dir()) == \
        ["text_encoder", "tokenizer"]
    assert repository.devices == []
    label_server = write_repository(tmp_path / "sim", RepositoryOptions(
        model="sim", encoders_only=True, devices=0))
    assert label_server.models == ["text_encoder"]  # the sim's label encoder


def test_a_front_names_its_encoder_servers_and_what_their_models_take(tmp_path):
    encoders = write_repository(tmp_path / "encoders", RepositoryOptions(
        model="reference", encoders_only=True))
    front = write_repository(tmp_path / "front", RepositoryOptions(
        model="reference", devices=1, encoder_endpoints=("10.0.0.5:8001", "10.0.0.6:8001")))
    assert sorted(front.models) == ["driffusion", "unet_cpu0", "vae_decoder", "vae_encoder"]
    found = parameters(load_config(front.path / "driffusion"))
    assert found[ENCODER_ENDPOINTS_PARAMETER] == "10.0.0.5:8001,10.0.0.6:8001"
    expected = json.loads(found[ENCODER_SIGNATURES_PARAMETER])
    assert expected == {name: signature(config_of_file(encoders.path / name / "config.pbtxt"))
                        for name in ("tokenizer", "text_encoder")}
    assert expected["text_encoder"]["inputs"]["input_ids"]["shape"] == [-1, 77]


def test_discovery_of_an_encoder_endpoint_that_is_not_there_names_it():
    (port,) = free_ports(1)
    with pytest.raises(DiscoveryError, match=f"127.0.0.1:{port} does not answer as a Triton"):
        remote_encoders([f"127.0.0.1:{port}"], {"text_encoder": {}}, timeout_s=2.0)


# ---------------------------------------------------------------------------------------------
# Real servers on loopback: an encoder server and a front


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[dict[str, EmbeddedServer]]:
    """E: the reference model's tokenizer and text encoder alone; F: one device, the VAE and
    driffusion, whose prompts go to E."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    root = tmp_path_factory.mktemp("encoder-server")
    cluster = Cluster(root)

    def repository(name: str, **options) -> Path:
        return write_repository(root / name, RepositoryOptions(
            model="reference", pipeline_instances=1, deadline_s=5.0, **options)).path

    try:
        encoder = cluster.start(repository("e", encoders_only=True))
        front = cluster.start(repository("f", devices=1, encoder_endpoints=(encoder.grpc_url,)))
        yield {"E": encoder, "F": front}
    finally:
        cluster.stop()


def infer(url: str, **fields):
    """(image, None) or (None, the error) of a driffusion request over gRPC, and its seconds."""
    import tritonclient.grpc as grpc_client
    from tritonclient.utils import InferenceServerException

    from bench.common import infer_inputs

    dtypes = {"SEED": np.int64, "STEPS": np.int32, "GUIDANCE": np.float32}
    arrays = {name: np.array([value.encode()], np.object_) if isinstance(value, str)
              else np.array([value], dtypes[name]) for name, value in fields.items()}
    client = grpc_client.InferenceServerClient(url)
    start = time.monotonic()
    try:
        image = client.infer("driffusion", infer_inputs(arrays),
                             client_timeout=120).as_numpy("IMAGE")
        return image, None, time.monotonic() - start
    except InferenceServerException as error:
        return None, error, time.monotonic() - start
    finally:
        client.close()


def all_local_image(seed: int, steps: int, negative: str | None = None) -> np.ndarray:
    """The same request through the reference engines in-process (local text encoder)."""
    from bench.common import ensure_reference_engines
    from bench.speed import local_pipeline
    from runtime.local_devices import LocalDevice
    from runtime.pipeline import GenerationRequest
    from runtime.pool import DevicePool

    engines = ensure_reference_engines(lambda line: None)  # built already: the module's fixture
    pool = DevicePool([LocalDevice.from_onnx(engines.path("unet"), threads=1)])
    request = GenerationRequest(prompt=PROMPT, negative_prompt=negative, seed=seed, steps=steps,
                                mode="sequential", guidance=7.5)
    return asyncio.run(local_pipeline(engines, pool).generate(request)).image


@pytest.mark.triton
def test_the_front_encodes_on_the_encoder_server_and_gives_the_all_local_image(pair):
    front, encoder = pair["F"], pair["E"]
    import tritonclient.grpc as grpc_client

    client = grpc_client.InferenceServerClient(front.grpc_url)
    served = {model["name"] for model in client.get_model_repository_index(as_json=True)["models"]}
    client.close()
    assert "text_encoder" not in served and "tokenizer" not in served
    before = metric(encoder, "nv_inference_request_success", model="text_encoder")
    image, error, _ = infer(front.grpc_url, PROMPT=PROMPT, SEED=3, STEPS=6, MODE="sequential",
                            GUIDANCE=7.5)
    assert error is None
    assert metric(encoder, "nv_inference_request_success", model="text_encoder") > before
    np.testing.assert_array_equal(image, all_local_image(seed=3, steps=6))
    # the prompt's states matter: another prompt gives another image
    other, _, _ = infer(front.grpc_url, PROMPT="a green triangle", SEED=3, STEPS=6,
                        MODE="sequential", GUIDANCE=7.5)
    assert not np.array_equal(other, image)
    assert f"remote encoders {encoder.grpc_url}/tokenizer, {encoder.grpc_url}/text_encoder" in \
        front.log_path.read_text()
    # what the role script of a front runs before it starts (deploy/driffusion-role.sh)
    wait = subprocess.run([sys.executable, "-m", "triton_models.device_endpoints", "wait",
                           encoder.grpc_url, "--models", "text_encoder*", "--timeout-s", "10"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert wait.returncode == 0 and "text_encoder* servers ready" in wait.stdout, wait.stderr


@pytest.mark.triton
def test_an_encoder_endpoint_without_the_models_or_of_another_shape_is_refused(pair):
    encoder = pair["E"].grpc_url
    with pytest.raises(DiscoveryError, match=f"encoder endpoint {encoder} serves no ready "
                       "vae_decoder"):
        remote_encoders([encoder], {"vae_decoder": {}}, timeout_s=5.0)
    config = json.loads(parameters(load_config(Path(pair["F"].repository) / "driffusion"))[
        ENCODER_SIGNATURES_PARAMETER])
    config["text_encoder"]["inputs"]["input_ids"]["shape"] = [-1, 64]
    with pytest.raises(DiscoveryError, match=f"encoder endpoint {encoder} serves text_encoder, "
                       r"which does not fit this pipeline: input input_ids has shape \[-1, 77\]"):
        remote_encoders([encoder], config, timeout_s=5.0)


@pytest.mark.triton
def test_a_stopped_encoder_server_fails_the_request_naming_it_not_a_hang(pair):
    # last in the module: stops E
    pair["E"].stop()
    image, error, seconds = infer(pair["F"].grpc_url, PROMPT=PROMPT, SEED=3, STEPS=6)
    assert image is None and error.status() == "StatusCode.UNAVAILABLE"
    assert f"encoder server failure: {pair['E'].grpc_url}/tokenizer" in error.message()
    assert seconds < 5.0  # a refused connection, not the 5 s deadline
