"""Inpainting with a 9-channel inpainting UNet, served by a real tritonserver: the mask and the
masked image's latents join every device call, and sequential mode gives diffusers'
StableDiffusionInpaintPipeline image; DRiffusion's windows work on it. Bad image inputs are
refused naming the field."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline, sd_inpaint_folder
from PIL import Image
from servers import serving_folder
from test_text_to_image import (
    GUIDANCE,
    NEGATIVE,
    PROMPT,
    STEPS,
    Served,
    assert_matches,
    generate,
    half_mask,
    init_image,
)

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def served(tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    root = tmp_path_factory.mktemp("inpaint")
    folder = sd_inpaint_folder(root / "tiny-sd-inpaint")
    with serving_folder(folder, root) as server:
        yield Served("sd-inpaint", folder, server.grpc_url, load_pipeline(folder))


def diffusers_inpaint(served: Served, image: np.ndarray, mask: np.ndarray, strength: float,
                      seed: int) -> np.ndarray:
    with torch.no_grad():
        images = served.pipeline(
            PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
            strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images
    return (images[0] * 255).round().astype(np.uint8)


def inpaint(served: Served, seed: int, **fields):
    return generate(served, PROMPT=PROMPT, NEGATIVE_PROMPT=NEGATIVE, STEPS=STEPS,
                    GUIDANCE=GUIDANCE, SEED=seed, **fields)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_inpainting_matches_diffusers(served, strength):
    image, mask = init_image(), half_mask()
    expected = diffusers_inpaint(served, image, mask, strength, 31)
    result = inpaint(served, 31, MODE="sequential", INIT_IMAGE=image, MASK=mask,
                     STRENGTH=strength)
    assert_matches(result.image, expected, f"9-channel inpaint strength={strength}")


def test_the_mask_and_the_masked_image_matter(served):
    """Another mask moves diffusers' image beyond the parity bounds, so the parity test would
    catch a mask (or masked-image latents) dropped on the way to the UNet."""
    image = init_image()
    one = diffusers_inpaint(served, image, half_mask(), 1.0, 32)
    other = diffusers_inpaint(served, image, half_mask()[::-1, ::-1].copy(), 1.0, 32)
    diff = np.abs(one.astype(np.int16) - other.astype(np.int16))
    assert diff.max() > 4 and diff.mean() > 0.5


def test_nine_channel_inpainting_in_parallel(served):
    image, mask = init_image(), half_mask()
    sequential = inpaint(served, 33, MODE="sequential", INIT_IMAGE=image, MASK=mask)
    one = inpaint(served, 33, MODE="aggressive", WINDOW=1, INIT_IMAGE=image, MASK=mask)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = inpaint(served, 33, MODE="aggressive", WINDOW=window, INIT_IMAGE=image,
                           MASK=mask)
        assert parallel.rounds < sequential.rounds == STEPS
        assert parallel.evaluations == STEPS


def bad_image_error(served: Served, **fields) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        inpaint(served, 0, **fields)
    assert "StatusCode.INVALID_ARGUMENT" in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("fields, expected", [
    ({}, "MASK: .*inpainting model.*send INIT_IMAGE and MASK"),
    # Triton itself refuses a shape off the config's dims, before the model sees it
    ({"INIT_IMAGE": init_image()[:, :, :2].copy(), "MASK": half_mask()},
     r"input 'INIT_IMAGE'.*Expected \[-1,-1,3\], got \[64,64,2\]"),
    ({"INIT_IMAGE": init_image()[0].copy(), "MASK": half_mask()},
     r"input 'INIT_IMAGE'.*Expected \[-1,-1,3\], got \[64,3\]"),
    ({"INIT_IMAGE": init_image(), "MASK": half_mask()[:32].copy()},
     r"MASK: must be the size of INIT_IMAGE \[64, 64\]; got \[32, 64\]"),
    ({"MASK": half_mask()}, "MASK: needs an INIT_IMAGE"),
    ({"INIT_IMAGE": init_image(), "MASK": half_mask(), "STRENGTH": 0.0},
     r"STRENGTH: must be in \(0, 1\]; got 0.0"),
    ({"INIT_IMAGE": init_image(), "MASK": half_mask(), "STRENGTH": 1.5},
     r"STRENGTH: must be in \(0, 1\]"),
    ({"INIT_IMAGE": init_image(), "MASK": half_mask(), "STRENGTH": 0.05},
     r"STRENGTH: 0.05 keeps none of the 8 steps; use at least 0.125"),
    ({"INIT_IMAGE": init_image(48), "MASK": half_mask(48)},
     r"INIT_IMAGE: is 48x48 pixels \(height x width\); .*engines take 64x64 pixels only"),
    ({"INIT_IMAGE": init_image(), "MASK": half_mask(), "HEIGHT": 128},
     "HEIGHT: must equal INIT_IMAGE's height 64"),
    ({"INIT_IMAGE": np.zeros((4000, 8, 3), np.uint8), "MASK": half_mask()},
     r"INIT_IMAGE: must be 1..2048 pixels a side \(--max-resolution\); got \[4000, 8\]"),
], ids=["no-image", "two-channels", "rank-2-image", "mask-size", "mask-without-image",
        "strength-zero", "strength-above-one", "strength-keeps-no-step", "off-profile-size",
        "height-not-image", "beyond-max-resolution"])
def test_bad_image_inputs_are_refused_naming_the_field(served, fields, expected):
    import re

    assert re.search(expected, bad_image_error(served, **fields))
