"""Z-Image served by `driffusion serve`'s build path on a real tritonserver: MODE=sequential gives
ZImagePipeline's own image (Qwen3's second-to-last states of the chat template with thinking,
cut to each prompt's tokens; guidance pos + g (pos - neg) with the negative prompt, also below
1; none at 0, as Z-Image-Turbo runs; a non-square size; the scheduler shifted by `mu`) over
gRPC, HTTP/JSON and the `generate` client; DRiffusion's windows take fewer rounds and window 1
is bit-identical; image-to-image matches ZImageImg2ImgPipeline. Each conditioning mistake a
server could make (ignoring the negative prompt, the last hidden state, states padded to 512
tokens, no chat template) moves diffusers' own image beyond the parity bound."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline
from llm_folders import zimage_folder
from PIL import Image
from servers import generate_image, http_json_image, serving_folder
from test_flux2_serving import differs
from test_text_to_image import Served, assert_matches, generate, init_image

pytestmark = pytest.mark.triton

STEPS = 4
HEIGHT, WIDTH = 64, 96
GUIDANCE = 5.0  # ZImagePipeline's default
PROMPT = "a red fox in the snow at dawn"
NEGATIVE = "blurry, low quality"
FOLDERS: dict[str, Callable[[Path], Path]] = {
    "zimage": zimage_folder,  # its scheduler shifts by resolution (mu)
    "zimage-turbo": lambda path: zimage_folder(path, turbo=True),  # fixed shift 3.0
}


# Z-Image-Turbo's folder differs only in its scheduler (a fixed shift, which the scheduler
# applies itself): with -m slow, to keep `make test` short; guidance 0 is served on both
@pytest.fixture(scope="module", params=[
    "zimage", pytest.param("zimage-turbo", marks=pytest.mark.slow)])
def served(request, tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from export.onnx_export import ExportOptions

    root = tmp_path_factory.mktemp(request.param)
    folder = FOLDERS[request.param](root / f"tiny-{request.param}")
    with serving_folder(folder, root, export=ExportOptions(height=HEIGHT, width=WIDTH)) as server:
        yield Served(request.param, folder, server.grpc_url, load_pipeline(folder),
                     server.http_url, root / "server.log")


def reference(served: Served, seed: int, negative: str | None = NEGATIVE,
              guidance: float = GUIDANCE, image: np.ndarray | None = None,
              strength: float = 0.6) -> np.ndarray:
    """ZImagePipeline's image (ZImageImg2ImgPipeline's with `image`), fp32 on the CPU."""
    from diffusers import ZImageImg2ImgPipeline

    pipeline, call = served.pipeline, {}
    if image is not None:
        pipeline = ZImageImg2ImgPipeline(**served.pipeline.components)
        pipeline.set_progress_bar_config(disable=True)
        call = {"image": Image.fromarray(image), "strength": strength}
    with torch.no_grad():
        images = pipeline(PROMPT, negative_prompt=negative, height=HEIGHT, width=WIDTH,
                          num_inference_steps=STEPS, guidance_scale=guidance,
                          generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np", **call).images
    return (images[0] * 255).round().astype(np.uint8)


def served_image(served: Served, seed: int, **fields):
    fields = {"PROMPT": PROMPT, "STEPS": STEPS, "SEED": seed, "HEIGHT": HEIGHT, "WIDTH": WIDTH,
              "MODE": "sequential", **fields}
    return generate(served, **fields)


def test_sequential_matches_zimage_with_the_negative_prompt(served):
    result = served_image(served, 41, NEGATIVE_PROMPT=NEGATIVE, GUIDANCE=GUIDANCE)
    assert_matches(result.image, reference(served, 41), f"{served.family} sequential")
    assert (result.rounds, result.evaluations) == (STEPS, STEPS)
    assert differs(result.image, reference(served, 41, negative=None)), \
        "the negative prompt must matter"


@pytest.mark.parametrize("guidance", [None, 0.5, 0.0], ids=["default", "half", "turbo"])
def test_guidance_as_zimage_applies_it(served, guidance):
    """No GUIDANCE: the pipeline's 5.0 with the empty negative prompt; 0.5: pos + 0.5 (pos -
    neg), guided although below 1; 0: one evaluation per step, the negative prompt unused."""
    fields = {} if guidance is None else {"GUIDANCE": guidance}
    result = served_image(served, 42, **fields)
    expected = reference(served, 42, None, GUIDANCE if guidance is None else guidance)
    assert_matches(result.image, expected, f"{served.family} guidance {guidance}")
    if guidance == 0.0:
        with_negative = served_image(served, 42, NEGATIVE_PROMPT=NEGATIVE, **fields)
        np.testing.assert_array_equal(with_negative.image, result.image)


def test_conditioning_mistakes_would_fail_parity(served, monkeypatch):
    """Diffusers' own image with the last hidden state, with the states padded to 512 tokens,
    or without the chat template lies beyond the bound of the served image (which matches the
    right one: test_sequential_matches_zimage_with_the_negative_prompt)."""
    pipeline = served.pipeline
    result = served_image(served, 43, NEGATIVE_PROMPT=NEGATIVE, GUIDANCE=GUIDANCE).image
    assert_matches(result, reference(served, 43), f"{served.family} conditioning")
    encode = pipeline.text_encoder.forward

    def last_state(*args, **kwargs):
        output = encode(*args, **kwargs)
        output.hidden_states = (*output.hidden_states[:-2], output.hidden_states[-1],
                                output.hidden_states[-1])
        return output

    def untrimmed(prompt, device=None, prompt_embeds=None, max_sequence_length=512):
        texts = [pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=True) for text in ([prompt] if isinstance(prompt, str) else prompt)]
        tokens = pipeline.tokenizer(texts, padding="max_length", truncation=True,
                                    max_length=max_sequence_length, return_tensors="pt")
        states = pipeline.text_encoder(input_ids=tokens.input_ids,
                                       attention_mask=tokens.attention_mask.bool(),
                                       output_hidden_states=True).hidden_states[-2]
        return list(states)

    mistakes = {
        "last hidden state": (pipeline.text_encoder, "forward", last_state),
        "padded states": (pipeline, "_encode_prompt", untrimmed),
        "no chat template": (pipeline.tokenizer, "apply_chat_template",
                             lambda messages, **options: messages[0]["content"]),
    }
    for mistake, (owner, name, replacement) in mistakes.items():
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, replacement)
            assert differs(result, reference(served, 43)), f"{mistake} must be told apart"


def test_a_long_prompt_is_cut_at_512_tokens_and_logged(served):
    """The templated prompt past 512 tokens is truncated as diffusers' tokenizer call does, and
    the transformer takes the longest text length of its profile."""
    long_prompt = PROMPT + ", " + "a " * 600  # 626 tokens in 1231 bytes
    result = served_image(served, 47, PROMPT=long_prompt, GUIDANCE=0.0)
    with torch.no_grad():
        images = served.pipeline(long_prompt, height=HEIGHT, width=WIDTH,
                                 num_inference_steps=STEPS, guidance_scale=0.0,
                                 generator=torch.Generator("cpu").manual_seed(47),
                                 output_type="np").images
    assert_matches(result.image, (images[0] * 255).round().astype(np.uint8),
                   f"{served.family} long prompt")
    assert "the prompt was truncated to 512 tokens" in served.log.read_text()


def test_windows_take_fewer_rounds_and_window_one_is_sequential(served):
    fields = {"NEGATIVE_PROMPT": NEGATIVE, "GUIDANCE": GUIDANCE}
    sequential = served_image(served, 44, **fields)
    one = served_image(served, 44, MODE="aggressive", WINDOW=1, **fields)
    np.testing.assert_array_equal(one.image, sequential.image)
    for window in (2, 4):
        parallel = served_image(served, 44, MODE="aggressive", WINDOW=window, **fields)
        assert parallel.rounds < sequential.rounds == STEPS
        assert parallel.evaluations == STEPS


def test_http_json_and_the_generate_client_give_the_grpc_image(served, tmp_path):
    by_grpc = served_image(served, 45, NEGATIVE_PROMPT=NEGATIVE, GUIDANCE=GUIDANCE).image
    values = {"PROMPT": ("BYTES", PROMPT), "NEGATIVE_PROMPT": ("BYTES", NEGATIVE),
              "SEED": ("INT64", 45), "STEPS": ("INT32", STEPS), "GUIDANCE": ("FP32", GUIDANCE),
              "HEIGHT": ("INT32", HEIGHT), "WIDTH": ("INT32", WIDTH),
              "MODE": ("BYTES", "sequential")}
    np.testing.assert_array_equal(http_json_image(served.http_url, values), by_grpc)
    np.testing.assert_array_equal(generate_image(
        served.http_url, tmp_path / "image.png", "--prompt", PROMPT, "--negative-prompt",
        NEGATIVE, "--seed", "45", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--mode", "sequential"), by_grpc)


def test_image_to_image_matches_zimage_img2img(served):
    image = np.ascontiguousarray(init_image(WIDTH)[:HEIGHT])
    fields = {"INIT_IMAGE": image, "STRENGTH": 0.7, "NEGATIVE_PROMPT": NEGATIVE,
              "GUIDANCE": GUIDANCE}
    result = served_image(served, 46, **fields)
    assert_matches(result.image, reference(served, 46, image=image, strength=0.7),
                   f"{served.family} img2img")
    assert result.rounds < STEPS
    one = served_image(served, 46, MODE="aggressive", WINDOW=1, **fields)
    np.testing.assert_array_equal(one.image, result.image)
