"""The three clients the README shows give the same image of a served text-to-image model:
`driffusion generate --prompt` (over gRPC and over HTTP), a plain tritonclient call, and
HTTP/JSON (what curl sends)."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
from PIL import Image

from cli import main as driffusion
from models.pipeline_spec import PipelineSpec
from runtime.pipeline import GenerationRequest, RequestError, resolve
from triton_models.repository import write_repository

pytestmark = pytest.mark.triton
PROMPT, SEED, STEPS = "a photo of a cat", 7, 6


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory, tiny_sd_engines):
    repository = tmp_path_factory.mktemp("home") / "repo"
    return triton_server(write_repository(repository, tiny_sd_engines).path)


def grpc_image(url: str) -> np.ndarray:
    def field(name, value, datatype, dtype):
        tensor = grpc_client.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        return tensor

    client = grpc_client.InferenceServerClient(url)
    try:
        result = client.infer("driffusion", [
            field("PROMPT", PROMPT.encode(), "BYTES", object),
            field("SEED", SEED, "INT64", np.int64), field("STEPS", STEPS, "INT32", np.int32)])
        return result.as_numpy("IMAGE")
    finally:
        client.close()


def http_image(url: str) -> np.ndarray:
    body = {"inputs": [
        {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [PROMPT]},
        {"name": "SEED", "shape": [1], "datatype": "INT64", "data": [SEED]},
        {"name": "STEPS", "shape": [1], "datatype": "INT32", "data": [STEPS]}],
        "outputs": [{"name": "IMAGE"}]}
    request = urllib.request.Request(f"{url}/v2/models/driffusion/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    return np.array(output["data"], dtype=np.uint8).reshape(output["shape"])


def test_grpc_http_and_the_generate_command_give_the_same_image(server, tmp_path):
    by_grpc = grpc_image(server.grpc_url)
    assert by_grpc.shape == (64, 64, 3) and by_grpc.dtype == np.uint8
    np.testing.assert_array_equal(http_image(server.http_url), by_grpc)
    # the generate client over either transport: tokenizer (BYTES), text encoder, UNet, VAE
    for endpoint in (server.grpc_url, server.http_url):
        out = tmp_path / "cat.png"
        assert driffusion(["generate", "--endpoints", endpoint, "--prompt", PROMPT,
                           "--seed", str(SEED), "--steps", str(STEPS), "--out", str(out),
                           "--quiet"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out)), by_grpc)


def test_image_sizes_must_lie_in_the_profile_and_on_the_latent_grid():
    spec = PipelineSpec(model="m", family="sd", latent_channels=4, latent_size=(8, 8),
                        scheduler_config={"_class_name": "DDIMScheduler"}, vae_scale_factor=8,
                        decoder="vae", height_range=(32, 128), width_range=(32, 128),
                        size_multiple=16)
    resolved = resolve(GenerationRequest(prompt="a", height=96, width=32), spec, 2)
    assert (resolved.height, resolved.width) == (96, 32)
    for field, value, says in (("height", 72, "multiple of 16"), ("width", 144, "32..128"),
                               ("height", 16, "32..128")):
        with pytest.raises(RequestError, match=says) as caught:
            resolve(GenerationRequest(prompt="a", **{field: value}), spec, 2)
        assert caught.value.field == field


def image_inputs() -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 init image and a mask repainting its lower half."""
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[32:] = 255
    return image, mask


def test_image_inputs_through_every_client(server, tmp_path):
    """INIT_IMAGE, MASK and STRENGTH sent by tritonclient (UINT8 tensors), by HTTP/JSON (what
    curl sends) and by `generate --image --mask --strength` give the same inpainted image."""
    image, mask = image_inputs()
    client = grpc_client.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, value, datatype in (("PROMPT", np.array([PROMPT.encode()], object), "BYTES"),
                                  ("SEED", np.array([SEED], np.int64), "INT64"),
                                  ("STEPS", np.array([STEPS], np.int32), "INT32"),
                                  ("MODE", np.array([b"sequential"], object), "BYTES"),
                                  ("STRENGTH", np.array([0.7], np.float32), "FP32"),
                                  ("INIT_IMAGE", image, "UINT8"), ("MASK", mask, "UINT8")):
        tensor = grpc_client.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    try:
        by_grpc = client.infer("driffusion", inputs).as_numpy("IMAGE")
    finally:
        client.close()
    assert by_grpc.shape == (64, 64, 3)
    body = {"inputs": [
        {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [PROMPT]},
        {"name": "SEED", "shape": [1], "datatype": "INT64", "data": [SEED]},
        {"name": "STEPS", "shape": [1], "datatype": "INT32", "data": [STEPS]},
        {"name": "MODE", "shape": [1], "datatype": "BYTES", "data": ["sequential"]},
        {"name": "STRENGTH", "shape": [1], "datatype": "FP32", "data": [0.7]},
        {"name": "INIT_IMAGE", "shape": [64, 64, 3], "datatype": "UINT8",
         "data": image.reshape(-1).tolist()},
        {"name": "MASK", "shape": [64, 64], "datatype": "UINT8", "data": mask.reshape(-1).tolist()},
    ], "outputs": [{"name": "IMAGE"}]}
    request = urllib.request.Request(f"{server.http_url}/v2/models/driffusion/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    by_json = np.array(output["data"], dtype=np.uint8).reshape(output["shape"])
    np.testing.assert_array_equal(by_json, by_grpc)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert driffusion(["generate", "--endpoints", server.http_url, "--prompt", PROMPT,
                       "--seed", str(SEED), "--steps", str(STEPS), "--mode", "sequential",
                       "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                       "--strength", "0.7", "--out", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), by_grpc)
