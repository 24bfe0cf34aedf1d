"""Qwen-Image served by `driffusion serve`'s build path on a real tritonserver: MODE=sequential
gives QwenImagePipeline's own image (Qwen2.5-VL's last states of the prompt in the pipeline's
template, its 34 prefix tokens dropped, each prompt at its own length; true CFG with the
NEGATIVE_PROMPT, rescaled to the conditional prediction's norm; latents de-normalised by the
VAE's latents_mean / latents_std; a non-square size) over gRPC, HTTP/JSON and `generate`;
DRiffusion's windows take fewer rounds and window 1 is bit-identical. Dropping the negative
prompt, the norm rescale, the latents statistics or the template's prefix cut would each fail
the parity bound. Image-to-image matches QwenImageImg2ImgPipeline."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline
from llm_folders import qwen_image_folder
from PIL import Image
from servers import generate_image, http_json_image, serving_folder
from test_text_to_image import Served, assert_matches, generate, init_image

pytestmark = pytest.mark.triton

STEPS = 4
HEIGHT, WIDTH = 48, 64
TRUE_CFG = 4.0  # QwenImagePipeline's default true_cfg_scale, which the server defaults to
PROMPT = "a red fox in the snow at dawn"
NEGATIVE = "blurry, low quality"
# past the 512 + 34 tokens the encoder takes in the template (under the 2048-byte limit)
LONG_PROMPT = "a red fox in the snow at dawn, " * 60


@pytest.fixture(scope="module")
def served(tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions

    root = tmp_path_factory.mktemp("qwenimage")
    folder = qwen_image_folder(root / "tiny-qwenimage")
    with serving_folder(folder, root, export=ExportOptions(height=HEIGHT, width=WIDTH)) as server:
        yield Served("qwenimage", folder, server.grpc_url, load_pipeline(folder),
                     server.http_url, root / "server.log")


def reference(served: Served, seed: int, negative: str | None = NEGATIVE,
              prompt: str = PROMPT, **call) -> np.ndarray:
    """QwenImagePipeline's image (fp32, CPU) at the test's size, steps and default true CFG."""
    with torch.no_grad():
        images = served.pipeline(
            prompt=prompt, negative_prompt=negative, height=HEIGHT, width=WIDTH,
            num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np", **call).images
    return (images[0] * 255).round().astype(np.uint8)


def served_image(served: Served, seed: int, **fields):
    fields = {"PROMPT": PROMPT, "NEGATIVE_PROMPT": NEGATIVE, "STEPS": STEPS, "SEED": seed,
              "HEIGHT": HEIGHT, "WIDTH": WIDTH, "MODE": "sequential", **fields}
    return generate(served, **{name: value for name, value in fields.items()
                               if value is not None})


def differs(image: np.ndarray, other: np.ndarray) -> bool:
    """True when `other` lies beyond the parity bound of `image` (max 4/255 or mean 0.5)."""
    diff = np.abs(image.astype(np.int16) - other.astype(np.int16))
    return diff.max() > 4 or diff.mean() > 0.5


def test_sequential_matches_diffusers_with_true_cfg(served):
    """TRUE_CFG defaults to the pipeline's 4.0; the negative prompt is guided against."""
    result = served_image(served, 41)
    expected = reference(served, 41)
    assert_matches(result.image, expected, "qwenimage true CFG")
    assert (result.rounds, result.evaluations) == (STEPS, STEPS)
    assert differs(expected, reference(served, 41, negative=None)), \
        "the negative prompt must matter"


def test_without_a_negative_prompt_or_above_one_there_is_no_cfg(served):
    plain = reference(served, 42, negative=None)
    assert_matches(served_image(served, 42, NEGATIVE_PROMPT=None).image, plain,
                   "qwenimage no negative prompt")
    assert_matches(served_image(served, 42, TRUE_CFG=1.0).image, plain, "qwenimage TRUE_CFG 1")
    stronger = served_image(served, 42, TRUE_CFG=6.0).image
    assert_matches(stronger, reference(served, 42, true_cfg_scale=6.0), "qwenimage TRUE_CFG 6")


def test_the_norm_rescale_the_latents_statistics_and_the_prefix_cut_matter(served, monkeypatch):
    """diffusers' image without each of the three lies beyond the parity bound of the served
    one (which test_sequential_matches_diffusers_with_true_cfg holds to diffusers' own)."""
    result = served_image(served, 43).image
    assert_matches(result, reference(served, 43), "qwenimage")
    pipeline = served.pipeline
    norm = torch.norm

    def without_rescale(x, *args, **kwargs):
        """torch.norm, but 1 for true CFG's norms per packed token ([B, tokens, 4C], last dim)."""
        if x.ndim == 3 and kwargs.get("dim") == -1 and kwargs.get("keepdim"):
            return torch.ones_like(x[..., :1])
        return norm(x, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "norm", without_rescale)
        assert differs(result, reference(served, 43)), "the norm rescale must matter"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "prompt_template_encode_start_idx", 0)
        assert differs(result, reference(served, 43)), "the template's prefix cut must matter"
    config = dict(pipeline.vae.config)
    try:
        pipeline.vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        assert differs(result, reference(served, 43)), "the latents statistics must matter"
    finally:
        pipeline.vae.register_to_config(latents_mean=config["latents_mean"],
                                        latents_std=config["latents_std"])


def test_windows_take_fewer_rounds_and_window_one_is_sequential(served):
    sequential = served_image(served, 44)
    one = served_image(served, 44, MODE="aggressive", WINDOW=1)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = served_image(served, 44, MODE="aggressive", WINDOW=window)
        assert parallel.rounds < sequential.rounds == STEPS
        assert parallel.evaluations == STEPS


def test_http_json_and_the_generate_client_give_the_grpc_image(served, tmp_path):
    by_grpc = served_image(served, 45).image
    values = {"PROMPT": ("BYTES", PROMPT), "NEGATIVE_PROMPT": ("BYTES", NEGATIVE),
              "SEED": ("INT64", 45), "STEPS": ("INT32", STEPS), "HEIGHT": ("INT32", HEIGHT),
              "WIDTH": ("INT32", WIDTH), "MODE": ("BYTES", "sequential")}
    np.testing.assert_array_equal(http_json_image(served.http_url, values), by_grpc)
    np.testing.assert_array_equal(generate_image(
        served.http_url, tmp_path / "image.png", "--prompt", PROMPT, "--negative-prompt",
        NEGATIVE, "--seed", "45", "--steps", str(STEPS), "--height", str(HEIGHT), "--width",
        str(WIDTH), "--mode", "sequential"), by_grpc)


def test_image_to_image_matches_the_img2img_pipeline(served):
    """INIT_IMAGE through the one-frame VAE encoder, a posterior sample normalised by the
    latents statistics, noised to the first kept step (STRENGTH 0.6 by default, as
    QwenImageImg2ImgPipeline)."""
    from diffusers import QwenImageImg2ImgPipeline

    image = init_image(WIDTH)[:HEIGHT]
    result = served_image(served, 46, INIT_IMAGE=image, HEIGHT=None, WIDTH=None)
    pipeline = QwenImageImg2ImgPipeline.from_pipe(served.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipeline(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(image),
                            strength=0.6, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                            generator=torch.Generator("cpu").manual_seed(46),
                            output_type="np").images
    assert_matches(result.image, (expected[0] * 255).round().astype(np.uint8),
                   "qwenimage image-to-image")
    assert result.evaluations == STEPS - int(STEPS - STEPS * 0.6)


def test_a_long_prompt_is_cut_as_the_pipeline_cuts_it_and_logged(served):
    """The pipeline tokenizes up to 1024 + 34 tokens and keeps 512 states after the prefix; the
    encoder takes 512 + 34 (a causal model's first states do not depend on later tokens)."""
    result = served_image(served, 47, PROMPT=LONG_PROMPT, NEGATIVE_PROMPT=None)
    assert_matches(result.image, reference(served, 47, None, LONG_PROMPT), "qwenimage long")
    assert "the prompt was truncated to 546 tokens" in served.log.read_text()
