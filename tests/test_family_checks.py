"""Every family refuses the optional `driffusion` inputs it does not serve, naming the field and
what is allowed, and takes every input it serves; image inputs off the engines' sizes are
refused naming INIT_IMAGE (or MASK). Requests are resolved against specs, no server needed."""
from __future__ import annotations

import re

import numpy as np
import pytest

from models.pipeline_spec import PipelineSpec, TextEncoder
from models.reference import SCHEDULER_CONFIG
from models.sim import sim_spec
from runtime.pipeline import GenerationRequest, RequestError, resolve

CLIP = TextEncoder("text_encoder", "tokenizer", "CLIPTextModel")
CLIP_2 = TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")
T5 = TextEncoder("text_encoder_3", "tokenizer_3", "T5EncoderModel", 256, 4096)
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
        "shift": 3.0}
SIDE = 64  # an image size every latent spec's engines take


def latent_spec(family: str, scheduler_config: dict, encoders: tuple[TextEncoder, ...],
                **fields) -> PipelineSpec:
    """A folder of `family` with a VAE encoder, engines for 64..128 pixels on a grid of 16."""
    return PipelineSpec(
        model=f"tiny-{family}", family=family, latent_channels=4, latent_size=(16, 16),
        scheduler_config=scheduler_config, vae_scale_factor=8, decoder="vae", size_multiple=16,
        height_range=(64, 128), width_range=(64, 128), text_encoders=encoders,
        **{"image_encoder": True, **fields})


SPECS = {
    "class": sim_spec(),
    "sd": latent_spec("sd", SCHEDULER_CONFIG, (CLIP,)),
    "sd-inpaint": latent_spec("sd", SCHEDULER_CONFIG, (CLIP,), masked_inputs=True),
    "sd-no-encoder": latent_spec("sd", SCHEDULER_CONFIG, (CLIP,), image_encoder=False),
    "sdxl": latent_spec("sdxl", SCHEDULER_CONFIG, (CLIP, CLIP_2)),
    "sd3": latent_spec("sd3", FLOW, (CLIP, CLIP_2, T5)),
    "flux-dev": latent_spec("flux", FLOW, (CLIP, T5), guidance_embeds=True),
    "flux-schnell": latent_spec("flux", FLOW, (CLIP, T5)),
}
TEXT_MODELS = [key for key in SPECS if key != "class"]
FLOW_MODELS = ["sd3", "flux-dev", "flux-schnell"]
NOT_FLUX = [key for key in SPECS if not key.startswith("flux")]


def image(height: int = SIDE, width: int = SIDE) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


def mask(height: int = SIDE, width: int = SIDE) -> np.ndarray:
    return np.full((height, width), 255, np.uint8)


def condition(key: str) -> dict:
    return {"label": 3} if key == "class" else {"prompt": "a lighthouse"}


def refuse(key: str, **fields) -> RequestError:
    with pytest.raises(RequestError) as refused:
        resolve(GenerationRequest(**condition(key), **fields), SPECS[key], 2)
    return refused.value


IMAGE_FAMILIES = (r"image-to-image is served for SD 1\.x/2\.x, SDXL, SD3/SD3\.5, Flux, "
                  r"Qwen-Image, Z-Image folders")
INPAINTING = r"inpainting is served for SD 1\.x/2\.x folders; .*: send INIT_IMAGE without MASK"
NEEDS_IMAGE = r"needs an INIT_IMAGE \(image-to-image or inpainting\)"
# (spec, the request's optional inputs, the field refused, what the message must say)
REFUSED = [
    ("class", {"init_image": image(8, 8)}, "init_image", IMAGE_FAMILIES),
    ("class", {"init_image": image(8, 8), "mask": mask(8, 8)}, "init_image", IMAGE_FAMILIES),
    ("class", {"mask": mask(8, 8)}, "mask", IMAGE_FAMILIES),
    ("class", {"strength": 0.5}, "strength", IMAGE_FAMILIES),
    ("class", {"height": 16}, "height", r"must be 8 pixels \(the engines are built for that"),
    *[(key, {"true_cfg": 2.0}, "true_cfg", r"TRUE_CFG is for Flux, Qwen-Image models; .*use GUIDANCE")
      for key in NOT_FLUX],
    # the SD family inpaints, yet TRUE_CFG beside a MASK is refused all the same
    ("sd", {"init_image": image(), "mask": mask(), "true_cfg": 2.0}, "true_cfg",
     "TRUE_CFG is for Flux, Qwen-Image models"),
    *[(key, {"label": 3}, "label", "takes a PROMPT, not a LABEL") for key in TEXT_MODELS],
    *[(key, {"strength": 0.5}, "strength", NEEDS_IMAGE) for key in TEXT_MODELS],
    ("sd", {"mask": mask()}, "mask", NEEDS_IMAGE),
    *[(key, {"init_image": image(), "mask": mask()}, "mask", INPAINTING)
      for key in ("sdxl", "sd3", "flux-dev", "flux-schnell")],
    *[(key, {"mask": mask()}, "mask", INPAINTING) for key in ("sdxl", "sd3", "flux-dev")],
    ("sd-inpaint", {"init_image": image()}, "mask", "inpainting model .*send INIT_IMAGE and MASK"),
    ("sd-inpaint", {}, "mask", "send INIT_IMAGE and MASK"),
    ("sd-no-encoder", {"init_image": image()}, "init_image",
     "served without a VAE encoder; rebuild its engines"),
    *[(key, {"draft_order": 2}, "draft_order", "needs a noise-prediction multistep scheduler")
      for key in FLOW_MODELS],
    *[(key, {"tolerance": 0.1}, "tolerance", "applies to mode verified only") for key in SPECS],
    *[(key, {"height": 72}, "height", r"must be 64\.\.128 pixels and a multiple of 16")
      for key in TEXT_MODELS if key != "sd-inpaint"],  # which needs its MASK first
]


@pytest.mark.parametrize("key, fields, field, says", REFUSED,
                         ids=[f"{key}-{'+'.join(fields) or 'none'}" for key, fields, *_ in REFUSED])
def test_an_input_the_family_does_not_serve_is_refused_naming_it(key, fields, field, says):
    error = refuse(key, **fields)
    assert error.field == field
    assert re.search(says, error.detail), error.detail


def served_request(key: str) -> GenerationRequest:
    """A request with every optional input the model of `key` serves."""
    flow = key in FLOW_MODELS
    fields = {**condition(key), "negative_prompt": "five" if key == "class" else "blurry",
              "seed": 7, "steps": 10, "mode": "verified", "tolerance": 0.1, "window": 2,
              "guidance": 2.0, "scheduler": "flow_euler" if flow else "ddim",
              "draft_order": 1 if flow else 2}
    if key != "class":
        fields |= {"height": SIDE, "width": SIDE, "init_image": image(), "strength": 0.5}
    if key.startswith("sd-"):
        fields["mask"] = mask()
    if key.startswith("flux"):
        fields["true_cfg"] = 3.0
    return GenerationRequest(**fields)


@pytest.mark.parametrize("key", [key for key in SPECS if key != "sd-no-encoder"])
def test_every_input_the_family_serves_is_taken(key):
    request = served_request(key)
    resolved = resolve(request, SPECS[key], 2)
    assert (resolved.seed, resolved.steps, resolved.window) == (7, 10, 2)
    assert (resolved.mode, resolved.tolerance, resolved.guidance) == ("verified", 0.1, 2.0)
    assert resolved.draft_order == request.draft_order
    assert resolved.strength == (1.0 if key == "class" else 0.5)
    assert (resolved.mask is not None) == key.startswith("sd-")
    assert resolved.true_cfg == (3.0 if key.startswith("flux") else 1.0)
    if key == "class":
        assert (resolved.label, resolved.negative_label) == (3, 5)
    else:
        assert resolved.negative_prompt == "blurry" and resolved.height == SIDE


def test_an_init_image_off_the_fixed_engine_size_names_init_image():
    """Engines built for 8x8 images only (the reference model's): a 16x16 INIT_IMAGE with no
    HEIGHT sent is refused as INIT_IMAGE, with its size and the size allowed."""
    spec = SPECS["sd"].with_defaults(model="reference", latent_size=(1, 1), height_range=None,
                                     width_range=None, size_multiple=8)
    with pytest.raises(RequestError) as refused:
        resolve(GenerationRequest(prompt="x", init_image=image(16, 16)), spec, 1)
    assert refused.value.field == "init_image"
    assert refused.value.detail == ("is 16x16 pixels (height x width); reference's engines "
                                    "take 8x8 pixels only (images are not resized)")
    assert resolve(GenerationRequest(prompt="x", init_image=image(8, 8)), spec, 1).height == 8


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3", "flux-dev"])
def test_an_init_image_off_the_engine_profile_names_init_image_and_the_sizes(key):
    error = refuse(key, init_image=image(72, 64))
    assert error.field == "init_image"
    assert error.detail.startswith("is 72x64 pixels (height x width); ")
    assert ("engines take heights 64..128 and widths 64..128 pixels, multiples of 16"
            in error.detail)


def test_a_mask_off_the_init_images_size_names_mask():
    error = refuse("sd", init_image=image(), mask=mask(32, 64))
    assert error.field == "mask"
    assert error.detail == "must be the size of INIT_IMAGE [64, 64]; got [32, 64]"


def test_height_sent_beside_an_init_image_must_be_its_height():
    error = refuse("sd", init_image=image(), height=128)
    assert error.field == "height" and "must equal INIT_IMAGE's height 64" in error.detail
