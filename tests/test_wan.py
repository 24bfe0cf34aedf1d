"""Wan 2.1 / 2.2 text-to-video in process: the runtime family over local devices built from the
export wrappers (export/wan.py) against diffusers' own WanPipeline.

Sequential mode gives WanPipeline's frames (non-square, CFG with a negative prompt, the flow
UniPC scheduler, latents_mean / latents_std); dropping the negative prompt, the prompt cleaning,
the state zeroing, routing every evaluation to one expert or ignoring GUIDANCE_2 each move the
frames beyond the bound; DRiffusion windows 2 and 4 take fewer rounds, window 1 is
bit-identical. The same folders served through Triton: tests/test_wan_serving.py.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from export.specs import UMT5EncoderSpec, WanTransformerSpec, WanVAEDecoderSpec
from export.wan import WanExperts
from models import tensors
from models.pipeline_spec import WAN, PipelineSpec, TextEncoder
from models.prompt_tokens import tokenize
from runtime.families import prompt_rows, split_rows
from runtime.families import wan as wan_family
from runtime.local_devices import LocalDevice, LocalModel
from runtime.pipeline import GenerationRequest, Pipeline, RequestError
from runtime.pool import DevicePool
from tests.diffusers_folders import load_pipeline
from tests.video_folders import FRAMES, HEIGHT, WIDTH, wan_folder

STEPS = 6
PROMPT = "a red  fox &amp; a  dog in the snowy forest "
NEGATIVE = "blurry low quality"
GUIDANCE, GUIDANCE_2 = 5.0, 2.0
BOUNDARY_RATIO = 0.8  # timesteps 999, 937, 857 by the high-noise expert; 750, 600, 376 low
TOKENS = 512


def within_bound(frames: np.ndarray, reference: np.ndarray) -> bool:
    difference = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    return bool(difference.max() <= 4 and difference.mean() <= 0.5)


def diffusers_frames(pipeline, **options) -> np.ndarray:
    """WanPipeline's uint8 frames [F, H, W, 3] for the test's request."""
    arguments = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": HEIGHT,
                 "width": WIDTH, "num_frames": FRAMES, "num_inference_steps": STEPS,
                 "guidance_scale": GUIDANCE, "generator": torch.Generator().manual_seed(3),
                 "output_type": "np"}
    frames = pipeline(**{**arguments, **options}).frames[0]
    return (frames * 255).round().astype(np.uint8)


def served_spec(pipeline, folder_name: str) -> PipelineSpec:
    """The pipeline spec of a Wan folder, as export derives it."""
    vae = pipeline.vae.config
    encoder = TextEncoder("text_encoder", "tokenizer", "UMT5EncoderModel", TOKENS,
                          pipeline.text_encoder.config.d_model)
    return PipelineSpec(
        model=folder_name, family=WAN, latent_channels=vae.z_dim, latent_size=(60, 104),
        scheduler_config=dict(pipeline.scheduler.config), vae_scale_factor=8, decoder="vae",
        latents_mean=tuple(vae.latents_mean), latents_std=tuple(vae.latents_std),
        text_encoders=(encoder,), height_range=(16, 1024), width_range=(16, 1024),
        size_multiple=16, default_steps=50, default_guidance=5.0, temporal_scale_factor=4,
        default_frames=81, boundary_ratio=pipeline.config.boundary_ratio)


def in_process(pipeline, spec: PipelineSpec, denoiser: torch.nn.Module,
               devices: int = 4) -> Pipeline:
    """A runtime Pipeline whose tokenizer, encoder, decoder and devices run the export
    wrappers of the folder's networks in this process."""
    encoder = UMT5EncoderSpec.from_model(pipeline.text_encoder, sequence_length=TOKENS)
    encode = encoder.wrap(pipeline.text_encoder)
    transformer = WanTransformerSpec.from_model(denoiser).wrap(denoiser)
    decode = WanVAEDecoderSpec.from_model(pipeline.vae).wrap(pipeline.vae)

    def tokens(TEXT):
        texts = [row[0].decode() for row in TEXT]
        result = tokenize(pipeline.tokenizer, texts, TOKENS)
        return {tensors.INPUT_IDS: result.input_ids, tensors.ATTENTION_MASK: result.attention_mask,
                "DROPPED": result.dropped[:, None]}

    @torch.no_grad()
    def text(input_ids, attention_mask):
        states = encode(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return {tensors.TEXT_EMBEDDINGS: states.numpy()}

    @torch.no_grad()
    def images(latent):
        return {tensors.IMAGES: decode(torch.from_numpy(latent)).numpy()}

    @torch.no_grad()
    def denoise(sample, timestep, states):
        return transformer(torch.from_numpy(sample), torch.from_numpy(timestep),
                           torch.from_numpy(states)).numpy()

    pool = DevicePool([LocalDevice.from_function(f"wan{i}", denoise) for i in range(devices)])
    models = {"tokenizer": LocalModel("tokenizer", tokens),
              "text_encoder": LocalModel("text_encoder", text),
              "vae_decoder": LocalModel("vae_decoder", images)}
    return Pipeline(spec, pool, models)


def generate(runtime: Pipeline, **fields):
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=STEPS,
                                mode="sequential", guidance=GUIDANCE, height=HEIGHT,
                                width=WIDTH, frames=FRAMES)
    for name, value in fields.items():
        setattr(request, name, value)
    return asyncio.run(runtime.generate(request))


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    pipeline = load_pipeline(wan_folder(tmp_path_factory.mktemp("wan21")))
    spec = served_spec(pipeline, "wan21")
    return pipeline, spec, in_process(pipeline, spec, pipeline.transformer)


@pytest.fixture(scope="module")
def wan21_reference(wan21):
    return diffusers_frames(wan21[0])


def test_sequential_equals_wan_pipeline(wan21, wan21_reference):
    result = generate(wan21[2])
    assert result.image.shape == (FRAMES, HEIGHT, WIDTH, 3) == wan21_reference.shape
    assert within_bound(result.image, wan21_reference)
    assert result.rounds == STEPS and result.evaluations == STEPS


def test_negative_prompt_cleaning_and_zeroing_matter(wan21, wan21_reference, monkeypatch):
    """Without the negative prompt, without WanPipeline's prompt cleaning ("&amp;" and double
    spaces), or with the encoder's own states past the prompt instead of zeros, the frames
    differ: parity above needs each."""
    _, spec, runtime = wan21
    assert not within_bound(generate(runtime, negative_prompt=None).image, wan21_reference)
    unzeroed = Pipeline(spec, runtime.pool, runtime.models)
    unzeroed.family = Unzeroed()
    assert not within_bound(generate(unzeroed).image, wan21_reference)
    monkeypatch.setattr(wan_family, "clean_prompt", lambda text: text)
    assert not within_bound(generate(runtime).image, wan21_reference)


class Unzeroed(wan_family.Wan):
    """The Wan family without zeroing the states past each prompt's tokens."""

    async def conditioning(self, encoding, request, spec):
        rows = [wan_family.clean_prompt(text) for text in prompt_rows(request, True)]
        outputs = await encoding.texts(spec.text_encoders[0], rows)
        return split_rows({tensors.ENCODER_HIDDEN_STATES: outputs[tensors.TEXT_EMBEDDINGS]},
                          request.guidance, True)


def test_frames_follow_the_temporal_rule_and_limits(wan21):
    runtime = wan21[2]
    assert runtime.resolve(GenerationRequest(prompt="", frames=7)).frames == 5
    assert runtime.resolve(GenerationRequest(prompt="", frames=9)).frames == 9
    assert runtime.resolve(GenerationRequest(prompt="")).frames == 81
    with pytest.raises(RequestError, match="frames: must be at least 1"):
        runtime.resolve(GenerationRequest(prompt="", frames=0))
    small = Pipeline(replace(runtime.spec, max_video_pixels=FRAMES * HEIGHT * WIDTH),
                     runtime.pool, runtime.models)
    small.resolve(GenerationRequest(prompt="", frames=FRAMES, height=HEIGHT, width=WIDTH))
    with pytest.raises(RequestError, match="FRAMES x HEIGHT x WIDTH"):
        small.resolve(GenerationRequest(prompt="", frames=9, height=HEIGHT, width=WIDTH))
    with pytest.raises(RequestError, match="guidance_2"):
        runtime.resolve(GenerationRequest(prompt="", guidance_2=2.0))


@pytest.mark.parametrize("window", [2, 4])
def test_windows_take_fewer_rounds(wan21, wan21_reference, window):
    result = generate(wan21[2], mode="aggressive", window=window)
    assert result.rounds < STEPS
    assert result.image.shape == wan21_reference.shape


def test_window_one_is_bit_identical(wan21):
    sequential = generate(wan21[2])
    assert np.array_equal(generate(wan21[2], mode="aggressive", window=1).image,
                          sequential.image)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    pipeline = load_pipeline(wan_folder(tmp_path_factory.mktemp("wan22"), seed=5,
                                        boundary_ratio=BOUNDARY_RATIO))
    spec = served_spec(pipeline, "wan22")
    boundary = BOUNDARY_RATIO * pipeline.scheduler.config.num_train_timesteps
    experts = WanExperts(pipeline.transformer, pipeline.transformer_2, boundary)
    return pipeline, spec, in_process(pipeline, spec, experts)


def test_two_experts_equal_wan_pipeline(wan22):
    pipeline, spec, runtime = wan22
    reference = diffusers_frames(pipeline, guidance_scale_2=GUIDANCE_2)
    assert within_bound(generate(runtime, guidance_2=GUIDANCE_2).image, reference)
    # drafts of one round straddle the boundary: still each evaluation by its own expert, and
    # such a round is one round of the pool, not one per expert
    rounds_before = runtime.pool.rounds
    straddling = generate(runtime, guidance_2=GUIDANCE_2, mode="aggressive", window=4)
    assert straddling.rounds < STEPS
    assert runtime.pool.rounds - rounds_before == straddling.rounds
    # one expert for every evaluation, or GUIDANCE in GUIDANCE_2's place, is another video
    one_expert = in_process(pipeline, replace(spec, boundary_ratio=None), pipeline.transformer)
    assert not within_bound(generate(one_expert).image, reference)
    assert not within_bound(generate(runtime).image, reference)


# slow: a dynamo export of each network takes minutes on a 2-core CPU; the in-process tests
# above run the same wrappers through torch
@pytest.mark.slow
def test_transformer_and_decoder_export_validate(wan21, tmp_path):
    """The 3-D transformer's ONNX (dynamic batch, latent frames, height, width) and the VAE
    decoder's (dynamic size, frames fixed at export) match torch in ONNX Runtime."""
    from export.onnx_export import ExportOptions, export_network

    pipeline = wan21[0]
    options = ExportOptions(batch_range=(1, 2, 2), height=(16, HEIGHT, 64),
                            width=(16, WIDTH, 64), external_data_threshold=0)
    specs = ((WanTransformerSpec.from_model(pipeline.transformer), pipeline.transformer),
             (WanVAEDecoderSpec.from_model(pipeline.vae, latent_frames=2), pipeline.vae))
    for spec, module in specs:
        exported = export_network(spec, module, tmp_path / f"{spec.name}.onnx", options)
        assert exported.validation.ok, exported.validation.describe()


def test_generates_progress_bar_counts_steps_and_names_rounds(wan21):
    """`generate`'s bar: the timesteps refined, and the round that refined them."""
    import io

    from tqdm import tqdm

    from runtime.generate import RoundProgress

    runtime = wan21[2]
    request = runtime.resolve(GenerationRequest(prompt="a cat", mode="aggressive", window=2,
                                                steps=STEPS, frames=FRAMES, height=HEIGHT,
                                                width=WIDTH, guidance=GUIDANCE))
    with tqdm(total=runtime.steps_to_run(request), file=io.StringIO()) as bar:
        progress = RoundProgress(bar)
        result = asyncio.run(runtime.run(request, progress=progress))
        assert (bar.n, progress.rounds) == (STEPS, result.rounds)
        assert bar.postfix == f"round {result.rounds}" and result.rounds < STEPS
