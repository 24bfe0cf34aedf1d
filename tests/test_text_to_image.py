"""Text-to-image parity with diffusers: tiny SD (epsilon/PNDM and v-prediction/DDIM), SDXL and
SD3-without-T5 pipeline folders, served by a real tritonserver (ONNX Runtime engines), give
diffusers' own pipeline's image in sequential mode.

Each family's folder is exported, built and served once (a module-scoped fixture parametrized
by family, so one server runs at a time); diffusers' pipeline class loads the same folder in
fp32 on the CPU and runs with the same prompt, negative prompt, steps, guidance and seed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline, sd3_folder, sd_folder, sdxl_folder
from PIL import Image
from servers import serving_folder

pytestmark = pytest.mark.triton

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "sd-epsilon-pndm": sd_folder,
    "sd-v-ddim": lambda path: sd_folder(path, prediction_type="v_prediction",
                                        scheduler="DDIMScheduler"),
    "sdxl": sdxl_folder,
    "sd3": sd3_folder,
}
# served under the slow marker only (make test stays within 15 minutes): SD3 is served by
# tests/test_t5_flux_serving.py (with T5), v-prediction shares SD's path but for the VP formulas
# that tests/test_driffusion.py checks
SLOW_FAMILIES = ("sd-v-ddim", "sd3")
STEPS = 8
GUIDANCE = 5.0
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
LONG_PROMPT = " ".join(["a very detailed photograph of a red fox in a snowy forest,"] * 12)
# parity bounds, in pixel levels of 255
MAX_DIFF = 4
MEAN_DIFF = 0.5
INPUT_TYPES = {
    "PROMPT": ("BYTES", np.object_), "NEGATIVE_PROMPT": ("BYTES", np.object_),
    "MODE": ("BYTES", np.object_), "SCHEDULER": ("BYTES", np.object_),
    "SEED": ("INT64", np.int64), "STEPS": ("INT32", np.int32), "WINDOW": ("INT32", np.int32),
    "DRAFT_ORDER": ("INT32", np.int32), "HEIGHT": ("INT32", np.int32),
    "WIDTH": ("INT32", np.int32), "GUIDANCE": ("FP32", np.float32),
    "TOLERANCE": ("FP32", np.float32), "STRENGTH": ("FP32", np.float32),
    "TRUE_CFG": ("FP32", np.float32),
}


@dataclass
class Served:
    family: str
    folder: Path
    grpc_url: str
    pipeline: object  # the folder's diffusers pipeline
    http_url: str = ""
    log: Path | None = None  # the server's log


@dataclass
class Generated:
    image: np.ndarray
    rounds: int
    evaluations: int


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_FAMILIES else name
    for name in FAMILIES])
def served(request, tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    """One family's folder, exported and served on fp32 ONNX Runtime engines (under a temporary
    DRIFFUSION_HOME): the parity bounds are for fp32, not for fp16 TensorRT plans."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = FAMILIES[family](root / f"tiny-{family}")
    with serving_folder(folder, root) as server:
        yield Served(family, folder, server.grpc_url, load_pipeline(folder), server.http_url,
                     root / "server.log")


def generate(served: Served, **fields) -> Generated:
    """One request to the `driffusion` model; fields by input name (PROMPT=..., SEED=...)."""
    import tritonclient.grpc as grpc_client

    inputs = []
    for name, value in fields.items():
        if isinstance(value, np.ndarray):  # INIT_IMAGE, MASK
            tensor = grpc_client.InferInput(name, list(value.shape), "UINT8")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
            continue
        triton_type, dtype = INPUT_TYPES[name]
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        tensor = grpc_client.InferInput(name, [1], triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpc_client.InferenceServerClient(served.grpc_url)
    try:
        result = client.infer("driffusion", inputs, client_timeout=120)
    finally:
        client.close()
    return Generated(result.as_numpy("IMAGE"), int(result.as_numpy("ROUNDS").reshape(-1)[0]),
                     int(result.as_numpy("EVALUATIONS").reshape(-1)[0]))


def reference(served: Served, prompt: str, negative: str | None, steps: int, guidance: float,
              seed: int, scheduler=None) -> np.ndarray:
    """diffusers' image for the request, as uint8 [H, W, 3] (with `scheduler` in place of the
    folder's own when given)."""
    pipeline = served.pipeline
    if scheduler is not None:
        pipeline = type(pipeline)(**{**pipeline.components, "scheduler": scheduler})
        pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipeline(
            prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        ).images
    return (images[0] * 255).round().astype(np.uint8)


def evaluations(served: Served) -> int:
    """Model evaluations of a STEPS-step run: one per scheduler timestep (PNDM's PLMS
    schedule repeats one, so it takes STEPS + 1)."""
    scheduler = served.pipeline.scheduler
    scheduler.set_timesteps(STEPS)
    return len(scheduler.timesteps)


def served_sequential(served: Served, prompt: str, negative: str | None, steps: int,
                      guidance: float, seed: int, **extra) -> Generated:
    fields = {"PROMPT": prompt, "STEPS": steps, "GUIDANCE": guidance, "SEED": seed,
              "MODE": "sequential", **extra}
    if negative is not None:
        fields["NEGATIVE_PROMPT"] = negative
    return generate(served, **fields)


def assert_matches(image: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert image.dtype == np.uint8 and image.shape == expected.shape, (image.shape,
                                                                       expected.shape)
    diff = np.abs(image.astype(np.int16) - expected.astype(np.int16))
    print(f"{what}: max |diff| {diff.max()}, mean |diff| {diff.mean():.4f}")
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (
        f"{what}: max |diff| {diff.max()} (<= {MAX_DIFF}), mean {diff.mean():.3f} "
        f"(<= {MEAN_DIFF}) against diffusers")


@pytest.mark.parametrize("negative", [NEGATIVE, None, ""],
                         ids=["negative", "no-negative", "empty-negative"])
def test_sequential_matches_diffusers(served, negative):
    """SDXL tells the two apart: no negative prompt is zeros (force_zeros_for_empty_prompt), an
    empty one is encoded."""
    seed = {NEGATIVE: 7, None: 8, "": 9}[negative]
    expected = reference(served, PROMPT, negative, STEPS, GUIDANCE, seed)
    result = served_sequential(served, PROMPT, negative, STEPS, GUIDANCE, seed)
    assert_matches(result.image, expected, f"{served.family} negative={negative!r}")
    assert (result.rounds, result.evaluations) == (evaluations(served),) * 2


def test_parity_bounds_tell_conditionings_apart(served):
    """The tiny networks are not blind to the text: another prompt, or no negative prompt,
    moves diffusers' image beyond the parity bounds, so the parity tests would catch a
    conditioning built wrong."""
    image = reference(served, PROMPT, NEGATIVE, STEPS, GUIDANCE, 7)
    for prompt, negative in (("an oil painting of a ship in a storm", NEGATIVE), (PROMPT, None)):
        other = reference(served, prompt, negative, STEPS, GUIDANCE, 7)
        diff = np.abs(image.astype(np.int16) - other.astype(np.int16))
        assert diff.max() > MAX_DIFF and diff.mean() > MEAN_DIFF, (prompt, negative,
                                                                   diff.max(), diff.mean())


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_up_to_one_matches_diffusers(served, guidance):
    """guidance <= 1: diffusers evaluates the prompt's rows only, and so does the server."""
    expected = reference(served, PROMPT, NEGATIVE, STEPS, guidance, 9)
    result = served_sequential(served, PROMPT, NEGATIVE, STEPS, guidance, 9)
    assert_matches(result.image, expected, f"{served.family} guidance={guidance}")
    assert result.evaluations == evaluations(served)


def test_long_prompt_is_truncated_like_diffusers(served):
    tokenizer = served.pipeline.tokenizer
    assert len(tokenizer(LONG_PROMPT).input_ids) > tokenizer.model_max_length
    expected = reference(served, LONG_PROMPT, None, STEPS, GUIDANCE, 10)
    result = served_sequential(served, LONG_PROMPT, None, STEPS, GUIDANCE, 10)
    assert_matches(result.image, expected, f"{served.family} long prompt")


def test_aggressive_mode_takes_fewer_rounds(served):
    result = generate(served, PROMPT=PROMPT, NEGATIVE_PROMPT=NEGATIVE, STEPS=STEPS,
                      GUIDANCE=GUIDANCE, SEED=11, MODE="aggressive", WINDOW=4)
    sequential = served_sequential(served, PROMPT, NEGATIVE, STEPS, GUIDANCE, 11)
    assert result.rounds < STEPS
    assert result.evaluations == sequential.evaluations == evaluations(served)
    assert result.image.shape == sequential.image.shape
    assert result.image.dtype == np.uint8



def test_scheduler_choice_matches_diffusers(served):
    """SCHEDULER picks another sampler over the model's config, as swapping the pipeline's
    scheduler in diffusers does (euler_a draws its noise from the request's generator)."""
    if served.family != "sd-epsilon-pndm":
        pytest.skip("checked on one noise-prediction model")
    import diffusers

    from runtime.schedulers import SCHEDULERS

    config = served.pipeline.scheduler.config
    for name in ("euler", "euler_a", "dpmpp2m", "unipc", "ddim", "ddpm"):
        class_name, options = SCHEDULERS[name]
        scheduler = getattr(diffusers, class_name).from_config({**config, **options})
        expected = reference(served, PROMPT, NEGATIVE, STEPS, GUIDANCE, 12, scheduler=scheduler)
        result = served_sequential(served, PROMPT, NEGATIVE, STEPS, GUIDANCE, 12, SCHEDULER=name)
        assert_matches(result.image, expected, f"{served.family} scheduler={name}")


@pytest.mark.parametrize("forced", [True, False])
def test_pipeline_spec_reads_the_folder(tmp_path, forced):
    """What serving needs is derived from the folder: family, latent channels, shift and
    scaling factors, the SDXL zero-negative switch, the SD3 joint attention width."""
    from export.presets import load_bundle, pipeline_spec

    sdxl = pipeline_spec(load_bundle(str(sdxl_folder(tmp_path / "sdxl",
                                                     force_zeros_for_empty_prompt=forced))))
    assert sdxl.family == "sdxl" and sdxl.force_zeros_for_empty_prompt is forced
    assert [e.network for e in sdxl.text_encoders] == ["text_encoder", "text_encoder_2"]
    sd3 = pipeline_spec(load_bundle(str(sd3_folder(tmp_path / "sd3"))))
    assert (sd3.family, sd3.latent_channels, sd3.joint_attention_dim) == ("sd3", 16, 64)
    assert (sd3.shift_factor, sd3.scaling_factor) == (0.0609, 1.5305)
    assert not sd3.force_zeros_for_empty_prompt
    assert sd3.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"


# ---------------------------------------------------------------------------------------------
# Image inputs: img2img on every family, inpainting on SD (here: plain 4-channel UNets; the
# 9-channel inpainting UNet in test_inpainting.py)


def init_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A uint8 RGB picture with structure at every scale: gradients, a disc and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    channels = [x, y, disc * 0.8 + 0.2 * (1 - x)]
    image = np.stack(channels, -1) * 220 + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def half_mask(size: int = 64) -> np.ndarray:
    """Repaint the right half (255), keep the left (0), as diffusers' white-is-repaint."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return mask


def image_reference(served: Served, image: np.ndarray, strength: float, seed: int,
                    mask: np.ndarray | None = None, negative: str | None = NEGATIVE,
                    **call) -> np.ndarray:
    """diffusers' image-to-image (or inpainting) pipeline of the folder, from its components."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipeline_class = AutoPipelineForInpainting if mask is not None else AutoPipelineForImage2Image
    pipeline = pipeline_class.from_pipe(served.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    if mask is not None:
        call["mask_image"] = Image.fromarray(mask)
    with torch.no_grad():
        images = pipeline(
            PROMPT, image=Image.fromarray(image), strength=strength, negative_prompt=negative,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed), **call,
        ).images
    return (images[0] * 255).round().astype(np.uint8)


def served_image(served: Served, image: np.ndarray, strength: float | None, seed: int,
                 mode: str = "sequential", window: int | None = None,
                 mask: np.ndarray | None = None) -> Generated:
    fields = {"PROMPT": PROMPT, "NEGATIVE_PROMPT": NEGATIVE, "STEPS": STEPS,
              "GUIDANCE": GUIDANCE, "SEED": seed, "MODE": mode, "INIT_IMAGE": image}
    if strength is not None:
        fields["STRENGTH"] = strength
    if window is not None:
        fields["WINDOW"] = window
    if mask is not None:
        fields["MASK"] = mask
    return generate(served, **fields)


@pytest.mark.parametrize("strength", [0.6, pytest.param(0.35, marks=pytest.mark.slow)])
def test_image_to_image_matches_diffusers(served, strength):
    """Timesteps cut by strength as the family's Img2Img pipeline cuts them, the init image's
    posterior sampled and noised with the request's generator in diffusers' order."""
    image = init_image()
    expected = image_reference(served, image, strength, 21)
    result = served_image(served, image, strength, 21)
    assert_matches(result.image, expected, f"{served.family} img2img strength={strength}")
    scheduler = served.pipeline.scheduler
    assert result.rounds == len(img2img_timesteps(served, strength)) < len(scheduler.timesteps)


def img2img_timesteps(served: Served, strength: float) -> list:
    """The timesteps diffusers' image-to-image pipeline runs at `strength`."""
    from diffusers import AutoPipelineForImage2Image

    pipeline = AutoPipelineForImage2Image.from_pipe(served.pipeline)
    seen = []
    with torch.no_grad():
        pipeline(PROMPT, image=Image.fromarray(init_image()), strength=strength, output_type="latent",
                 num_inference_steps=STEPS, guidance_scale=1.0,
                 callback_on_step_end=lambda pipe, i, t, kwargs: seen.append(t) or kwargs)
    return seen


def test_image_to_image_init_image_matters(served):
    """The parity bounds tell init images apart: diffusers' result from another picture lies
    beyond them, so the parity test would catch an init image dropped or mis-scaled."""
    one = image_reference(served, init_image(seed=0), 0.6, 22)
    other = image_reference(served, init_image(seed=0)[::-1].copy(), 0.6, 22)
    diff = np.abs(one.astype(np.int16) - other.astype(np.int16))
    assert diff.max() > MAX_DIFF and diff.mean() > MEAN_DIFF


def test_image_to_image_in_parallel(served):
    """DRiffusion runs over the kept steps: window 1 is the sequential image bit for bit,
    windows 2 and 4 take fewer rounds for the same evaluations."""
    image, strength = init_image(), 0.75
    sequential = served_image(served, image, strength, 23)
    one = served_image(served, image, strength, 23, "aggressive", 1)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = served_image(served, image, strength, 23, "aggressive", window)
        assert parallel.rounds < sequential.rounds
        assert parallel.evaluations == sequential.evaluations == sequential.rounds


def test_inpainting_a_plain_model_matches_diffusers(served):
    """A 4-channel SD UNet inpaints as StableDiffusionInpaintPipeline does: after each step the
    kept half is the init image noised to the next timestep; other families refuse MASK."""
    image, mask = init_image(), half_mask()
    if not served.family.startswith("sd-"):
        with pytest.raises(Exception, match="MASK: inpainting is served for SD 1.x/2.x"):
            served_image(served, image, None, 24, mask=mask)
        return
    for strength in (1.0, 0.7):
        expected = image_reference(served, image, strength, 24, mask=mask)
        result = served_image(served, image, strength, 24, mask=mask)
        assert_matches(result.image, expected, f"{served.family} inpaint strength={strength}")
    one = served_image(served, image, None, 25, "aggressive", 1, mask=mask)
    np.testing.assert_array_equal(one.image, served_image(served, image, None, 25,
                                                          mask=mask).image)
    assert served_image(served, image, None, 25, "aggressive", 4, mask=mask).rounds < STEPS
