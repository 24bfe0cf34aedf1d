"""SD3 with T5, SD3.5 and Flux.1 (dev, schnell) served by `driffusion serve`'s build path on a real
tritonserver: MODE=sequential gives the folder's own diffusers pipeline's image for the same
prompt, negative prompt, seed, steps and guidance (Flux: guidance embedding and true CFG),
over gRPC, HTTP/JSON and the `generate` client; DRiffusion's windows take fewer rounds and
window 1 is bit-identical to sequential. Flux image-to-image matches FluxImg2ImgPipeline."""
from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_folders import flux_folder, load_pipeline, sd3_t5_folder, sd35_folder
from PIL import Image
from servers import serving_folder
from test_text_to_image import Generated, Served, assert_matches, generate, init_image

pytestmark = pytest.mark.triton

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "sd3-t5": sd3_t5_folder,
    "sd35": sd35_folder,
    "flux-dev": flux_folder,
    "flux-schnell": lambda path: flux_folder(path, guidance_embeds=False),
}
STEPS = 6
SIZE = 64
PROMPT = "a red fox in the snow at dawn"
NEGATIVE = "blurry, low quality"
LONG_PROMPT = "a red fox in the snow, " + "a " * 700  # 700+ T5 tokens, under 2048 bytes


# Flux-dev runs in the default suite; SD3-T5, SD3.5 and Flux-schnell with -m slow, to keep
# `make test` short. What still covers them by default: SD3's served parity on the bundled SD3
# folder (test_reference_flow.py), the T5 encoder served here by Flux-dev, SD3 with T5 exported
# and validated (test_export_t5_flux.py), the flow-matching image-to-image rule served here by
# Flux-dev and by Z-Image and Qwen-Image (one Family.image_latents); SD3.5 and schnell are the
# same code paths with another transformer config / no guidance embedding
SLOW_FAMILIES = ("sd3-t5", "sd35", "flux-schnell")


@pytest.fixture(scope="module", params=[
    pytest.param(family, marks=pytest.mark.slow) if family in SLOW_FAMILIES else family
    for family in FAMILIES])
def served(request, tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions

    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = FAMILIES[family](root / f"tiny-{family}")
    with serving_folder(folder, root, export=ExportOptions(height=SIZE, width=SIZE)) as server:
        yield Served(family, folder, server.grpc_url, load_pipeline(folder), server.http_url,
                     root / "server.log")


def is_flux(served: Served) -> bool:
    return served.family.startswith("flux")


def t5_tokens(served: Served) -> int:
    return {"sd3-t5": 256, "sd35": 256, "flux-dev": 512, "flux-schnell": 256}[served.family]


def guidance(served: Served) -> float:
    return {"flux-dev": 3.5, "flux-schnell": 0.0}.get(served.family, 5.0)


def reference(served: Served, prompt: str, seed: int, negative: str | None = NEGATIVE,
              true_cfg: float | None = None, image: np.ndarray | None = None,
              strength: float = 0.6) -> np.ndarray:
    """The folder's diffusers pipeline (its Img2Img sibling with `image`), fp32 on the CPU."""
    from diffusers import AutoPipelineForImage2Image

    pipeline, call = served.pipeline, {}
    if image is not None:
        pipeline = AutoPipelineForImage2Image.from_pipe(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        call = {"image": Image.fromarray(image), "strength": strength}
    if is_flux(served):
        call |= {"height": SIZE, "width": SIZE, "true_cfg_scale": true_cfg or 1.0}
    with torch.no_grad():
        images = pipeline(
            prompt, negative_prompt=negative, num_inference_steps=STEPS,
            guidance_scale=guidance(served), max_sequence_length=t5_tokens(served),
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call,
        ).images
    return (images[0] * 255).round().astype(np.uint8)


def served_image(served: Served, prompt: str, seed: int, **fields) -> Generated:
    fields = {"PROMPT": prompt, "STEPS": STEPS, "GUIDANCE": guidance(served), "SEED": seed,
              "MODE": "sequential", **fields}
    return generate(served, **fields)


def test_sequential_matches_diffusers(served):
    """SD3: CFG with the negative prompt, T5 joined to the CLIP states; Flux: GUIDANCE into
    the guidance embedding (dev) or ignored (schnell), no CFG without TRUE_CFG."""
    negative = None if is_flux(served) else NEGATIVE
    expected = reference(served, PROMPT, 41, negative)
    fields = {} if negative is None else {"NEGATIVE_PROMPT": negative}
    result = served_image(served, PROMPT, 41, **fields)
    assert_matches(result.image, expected, f"{served.family} sequential")
    assert (result.rounds, result.evaluations) == (STEPS, STEPS)


def test_the_t5_states_reach_the_transformer(served):
    """The served image is diffusers' with T5, and lies beyond the parity bounds of diffusers'
    image with T5's states zeroed: a server that dropped T5 would fail the parity test."""
    pipeline = served.pipeline
    encoder = pipeline.text_encoder_2 if is_flux(served) else pipeline.text_encoder_3
    served_result = served_image(served, PROMPT, 42).image
    hook = encoder.encoder.final_layer_norm.register_forward_hook(
        lambda module, inputs, output: torch.zeros_like(output))
    try:
        without_t5 = reference(served, PROMPT, 42, None)
    finally:
        hook.remove()
    assert np.abs(served_result.astype(int) - without_t5.astype(int)).max() > 4
    assert_matches(served_result, reference(served, PROMPT, 42, None), f"{served.family} T5")


def test_long_prompt_is_truncated_to_the_t5_tokens_and_logged(served):
    expected = reference(served, LONG_PROMPT, 43, None)
    result = served_image(served, LONG_PROMPT, 43)
    assert_matches(result.image, expected, f"{served.family} long prompt")
    log = served.log.read_text()
    assert f"the prompt was truncated to {t5_tokens(served)} tokens" in log


def test_windows_take_fewer_rounds_and_window_one_is_sequential(served):
    sequential = served_image(served, PROMPT, 44)
    one = served_image(served, PROMPT, 44, MODE="aggressive", WINDOW=1)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = served_image(served, PROMPT, 44, MODE="aggressive", WINDOW=window)
        assert parallel.rounds < sequential.rounds == STEPS
        assert parallel.evaluations == STEPS


def test_http_json_and_the_generate_client_give_the_grpc_image(served, tmp_path):
    from cli import main as driffusion

    by_grpc = served_image(served, PROMPT, 45).image
    body = {"inputs": [
        {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [PROMPT]},
        {"name": "SEED", "shape": [1], "datatype": "INT64", "data": [45]},
        {"name": "STEPS", "shape": [1], "datatype": "INT32", "data": [STEPS]},
        {"name": "GUIDANCE", "shape": [1], "datatype": "FP32", "data": [guidance(served)]},
        {"name": "MODE", "shape": [1], "datatype": "BYTES", "data": ["sequential"]}],
        "outputs": [{"name": "IMAGE"}]}
    request = urllib.request.Request(f"{served.http_url}/v2/models/driffusion/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    np.testing.assert_array_equal(
        np.array(output["data"], np.uint8).reshape(output["shape"]), by_grpc)
    out = tmp_path / "image.png"
    assert driffusion(["generate", "--endpoints", served.http_url, "--prompt", PROMPT,
                       "--seed", "45", "--steps", str(STEPS), "--guidance",
                       str(guidance(served)), "--mode", "sequential", "--out", str(out),
                       "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), by_grpc)


def test_flux_true_cfg_matches_diffusers(served):
    """TRUE_CFG > 1 with a negative prompt mixes neg + s (pos - neg) as FluxPipeline's
    true_cfg_scale does; without a negative prompt it is off, as in diffusers."""
    if not is_flux(served):
        pytest.skip("TRUE_CFG is a Flux input")
    expected = reference(served, PROMPT, 46, NEGATIVE, true_cfg=4.0)
    result = served_image(served, PROMPT, 46, NEGATIVE_PROMPT=NEGATIVE, TRUE_CFG=4.0)
    assert_matches(result.image, expected, f"{served.family} true cfg")
    plain = served_image(served, PROMPT, 46)
    assert np.abs(plain.image.astype(int) - result.image.astype(int)).max() > 4
    no_negative = served_image(served, PROMPT, 46, TRUE_CFG=4.0)
    np.testing.assert_array_equal(no_negative.image, plain.image)
    parallel = served_image(served, PROMPT, 46, NEGATIVE_PROMPT=NEGATIVE, TRUE_CFG=4.0,
                            MODE="aggressive", WINDOW=4)
    assert parallel.rounds < STEPS


def test_flux_and_sd3_image_to_image_match_diffusers(served):
    image = init_image(SIZE)
    expected = reference(served, PROMPT, 47, None, image=image, strength=0.7)
    result = served_image(served, PROMPT, 47, INIT_IMAGE=image, STRENGTH=0.7)
    assert_matches(result.image, expected, f"{served.family} img2img")
    assert result.rounds < STEPS
    one = served_image(served, PROMPT, 47, INIT_IMAGE=image, STRENGTH=0.7, MODE="aggressive",
                       WINDOW=1)
    np.testing.assert_array_equal(one.image, result.image)
    for window in (2, 4):
        parallel = served_image(served, PROMPT, 47, INIT_IMAGE=image, STRENGTH=0.7,
                                MODE="aggressive", WINDOW=window)
        assert parallel.rounds < result.rounds


def test_mask_is_refused_where_only_sd_inpaints(served):
    """MASK on these folders is INVALID_ARGUMENT naming MASK and the family that inpaints, not
    image-to-image that drops the mask."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as refused:
        served_image(served, PROMPT, 48, INIT_IMAGE=init_image(SIZE),
                     MASK=np.full((SIZE, SIZE), 255, np.uint8))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.message().startswith(
        "MASK: inpainting is served for SD 1.x/2.x folders; "), refused.value.message()
