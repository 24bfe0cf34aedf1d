"""Flux.2 Klein served by `driffusion serve`'s build path on a real tritonserver: MODE=sequential
gives Flux2KleinPipeline's own image (Qwen3 layers 9/18/27 through the chat template, CFG with
NEGATIVE_PROMPT in the empty prompt's place, a non-square size); DRiffusion's windows take
fewer rounds and window 1 is bit-identical; the wrong layers or an ignored negative prompt
would fail the parity bound. Flux.2 dev (Mistral3, embedded guidance) is served by a second
server behind the slow marker: its encoder path is covered by tests/test_llm_encoder.py and
the rest of its path is Klein's."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline
from llm_folders import KLEIN_LAYERS, flux2_dev_folder, flux2_klein_folder
from servers import generate_image, http_json_image, serving_folder
from test_text_to_image import Served, assert_matches, generate

pytestmark = pytest.mark.triton

STEPS = 4
HEIGHT, WIDTH = 64, 96
GUIDANCE = 4.0
PROMPT = "a red fox in the snow at dawn"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def served(tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions

    root = tmp_path_factory.mktemp("flux2-klein")
    folder = flux2_klein_folder(root / "tiny-flux2-klein")
    with serving_folder(folder, root, export=ExportOptions(height=HEIGHT, width=WIDTH)) as server:
        yield Served("flux2-klein", folder, server.grpc_url, load_pipeline(folder),
                     server.http_url, root / "server.log")


def reference(served: Served, seed: int, negative: str | None = None,
              layers: tuple[int, ...] = KLEIN_LAYERS) -> np.ndarray:
    """Flux2KleinPipeline's image; `negative` is encoded as the pipeline encodes its prompts
    and passed as negative_prompt_embeds (the pipeline's only way to take one)."""
    pipeline = served.pipeline
    call = {}
    if negative is not None:
        call["negative_prompt_embeds"] = pipeline.encode_prompt(
            negative, text_encoder_out_layers=layers)[0]
    with torch.no_grad():
        images = pipeline(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, text_encoder_out_layers=layers,
                          generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np", **call).images
    return (images[0] * 255).round().astype(np.uint8)


def served_image(served: Served, seed: int, **fields):
    fields = {"PROMPT": PROMPT, "STEPS": STEPS, "GUIDANCE": GUIDANCE, "SEED": seed,
              "HEIGHT": HEIGHT, "WIDTH": WIDTH, "MODE": "sequential", **fields}
    return generate(served, **fields)


def differs(image: np.ndarray, other: np.ndarray) -> bool:
    """True when `other` lies beyond the parity bound of `image` (max 4/255 or mean 0.5)."""
    diff = np.abs(image.astype(np.int16) - other.astype(np.int16))
    return diff.max() > 4 or diff.mean() > 0.5


def test_sequential_matches_klein_with_the_empty_negative(served):
    result = served_image(served, 41)
    assert_matches(result.image, reference(served, 41), "klein sequential")
    assert (result.rounds, result.evaluations) == (STEPS, STEPS)


def test_negative_prompt_takes_the_empty_prompts_place(served):
    result = served_image(served, 42, NEGATIVE_PROMPT=NEGATIVE).image
    assert_matches(result, reference(served, 42, NEGATIVE), "klein negative prompt")
    assert differs(result, reference(served, 42)), "the negative prompt must matter"


def test_the_wrong_layers_would_fail_parity(served):
    result = served_image(served, 43).image
    assert differs(result, reference(served, 43, layers=tuple(reversed(KLEIN_LAYERS))))


def test_windows_take_fewer_rounds_and_window_one_is_sequential(served):
    sequential = served_image(served, 44)
    one = served_image(served, 44, MODE="aggressive", WINDOW=1)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = served_image(served, 44, MODE="aggressive", WINDOW=window)
        assert parallel.rounds < sequential.rounds == STEPS
        assert parallel.evaluations == STEPS


def test_http_json_and_the_generate_client_give_the_grpc_image(served, tmp_path):
    by_grpc = served_image(served, 45, NEGATIVE_PROMPT=NEGATIVE).image
    values = {"PROMPT": ("BYTES", PROMPT), "NEGATIVE_PROMPT": ("BYTES", NEGATIVE),
              "SEED": ("INT64", 45), "STEPS": ("INT32", STEPS), "GUIDANCE": ("FP32", GUIDANCE),
              "HEIGHT": ("INT32", HEIGHT), "WIDTH": ("INT32", WIDTH),
              "MODE": ("BYTES", "sequential")}
    np.testing.assert_array_equal(http_json_image(served.http_url, values), by_grpc)
    np.testing.assert_array_equal(generate_image(
        served.http_url, tmp_path / "image.png", "--prompt", PROMPT, "--negative-prompt",
        NEGATIVE, "--seed", "45", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--mode", "sequential"), by_grpc)


@pytest.fixture(scope="module")
def served_dev(tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions

    root = tmp_path_factory.mktemp("flux2-dev")
    folder = flux2_dev_folder(root / "tiny-flux2-dev")
    with serving_folder(folder, root, export=ExportOptions(height=HEIGHT, width=WIDTH)) as server:
        yield Served("flux2-dev", folder, server.grpc_url, load_pipeline(folder),
                     server.http_url, root / "server.log")


@pytest.mark.slow
def test_flux2_dev_embeds_guidance_like_flux2_pipeline(served_dev):
    with torch.no_grad():
        expected = served_dev.pipeline(
            prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(46),
            output_type="np").images[0]
    result = served_image(served_dev, 46)
    assert_matches(result.image, (expected * 255).round().astype(np.uint8), "flux2 dev")
    assert (result.rounds, result.evaluations) == (STEPS, STEPS)
    other = served_image(served_dev, 46, GUIDANCE=1.5).image
    assert differs(result.image, other), "GUIDANCE must reach the guidance embedding"
