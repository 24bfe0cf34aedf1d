"""The Qwen-Image runtime family without a served model: true CFG's norm rescale against
QwenImagePipeline's formula on packed predictions, timesteps and latents as the pipeline's, the
conditioning cut to each prompt's tokens less the template's prefix, the VAE's latents
statistics in decoding and image-to-image, and the pipeline spec of a tiny folder."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from export.specs import pack_latents
from models import tensors
from models.pipeline_spec import QWEN_IMAGE, PipelineSpec, TextEncoder
from runtime.families import family_of
from runtime.families.qwenimage import norm_rescaled_cfg
from runtime.pipeline import GenerationRequest, Pipeline, resolve

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "shift": 1.0, "use_dynamic_shifting": True, "base_shift": np.log(3.0),
             "max_shift": np.log(3.0), "base_image_seq_len": 256, "max_image_seq_len": 8192,
             "shift_terminal": 0.02, "time_shift_type": "exponential"}
WIDTH = 6  # of the fake encoder's states
TOKENS = 40  # the fake encoder's max_length
DROPPED = 5
MEAN, STD = (0.5, -0.5, 1.0, 0.0), (2.0, 0.5, 1.0, 3.0)


def qwen_spec() -> PipelineSpec:
    encoder = TextEncoder("text_encoder", "tokenizer", "Qwen2_5_VLForConditionalGeneration",
                          TOKENS, WIDTH, layers=(-1,), template="<s>{}</s>",
                          drop_tokens=DROPPED, trim=True)
    return PipelineSpec(
        model="qwen-test", family=QWEN_IMAGE, latent_channels=4, latent_size=(128, 128),
        scheduler_config=SCHEDULER, vae_scale_factor=8, decoder="vae", size_multiple=16,
        height_range=(256, 1536), width_range=(256, 1536), default_steps=50,
        default_true_cfg=4.0, latents_mean=MEAN, latents_std=STD, text_encoders=(encoder,))


def test_true_cfg_is_the_pipelines_formula_on_packed_predictions():
    """neg + s (pos - neg) rescaled to pos's norm along the packed channels (C x the 2x2
    patch), computed by QwenImagePipeline's formula on packed tensors, equals ours unpacked."""
    generator = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(1, 4, 6, 10, generator=generator) for _ in range(2))
    pos, neg = pack_latents(cond), pack_latents(uncond)
    combined = neg + 4.0 * (pos - neg)
    rescaled = combined * (torch.norm(pos, dim=-1, keepdim=True)
                           / torch.norm(combined, dim=-1, keepdim=True))
    ours = norm_rescaled_cfg(cond.numpy(), uncond.numpy(), 4.0)
    np.testing.assert_allclose(pack_latents(torch.from_numpy(ours)).numpy(), rescaled.numpy(),
                               rtol=1e-5, atol=1e-6)
    plain = (uncond + 4.0 * (cond - uncond)).numpy()
    assert np.abs(ours - plain).max() > 0.5  # the rescale changes the prediction


@pytest.mark.parametrize("height, width", [(1024, 1024), (768, 1360), (256, 512)])
def test_timesteps_are_the_qwenimage_pipelines(height, width):
    spec = qwen_spec()
    steps = 9
    request = resolve(GenerationRequest(prompt="x", steps=steps, height=height, width=width),
                      spec, 1)
    served = Pipeline.__new__(Pipeline)
    served.spec, served.family = spec, family_of(spec)
    ours = served.scheduler(request)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    mu = calculate_shift((height // 16) * (width // 16), 256, 8192, np.log(3.0), np.log(3.0))
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_latents_are_drawn_as_the_pipeline_draws_them_and_true_cfg_defaults_to_4():
    spec = qwen_spec()
    request = resolve(GenerationRequest(prompt="x", seed=42, height=256, width=384), spec, 1)
    assert request.true_cfg == 4.0
    ours = family_of(spec).initial_latents(request, spec, None,
                                           torch.Generator("cpu").manual_seed(42))
    drawn = torch.randn((1, 1, 4, 32, 48), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(ours, drawn[:, 0])


class MaskedEncoder:
    """An LLM encoder whose text i has len(text) real tokens valued by position, then padding."""

    async def texts(self, encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
        states = np.full((len(texts), TOKENS, WIDTH), -7.0, np.float32)
        mask = np.zeros((len(texts), TOKENS), np.int64)
        for row, text in enumerate(texts):
            states[row, :len(text)] = np.arange(len(text))[:, None] + 100 * row
            mask[row, :len(text)] = 1
        return {tensors.TEXT_EMBEDDINGS: states, tensors.ATTENTION_MASK: mask}


@pytest.mark.parametrize("negative, true_cfg, guided", [
    ("blurry", 4.0, True), (None, 4.0, False), ("blurry", 1.0, False)])
def test_conditioning_cuts_each_prompt_to_its_tokens_less_the_prefix(negative, true_cfg,
                                                                     guided):
    spec = qwen_spec()
    request = resolve(GenerationRequest(prompt="a red fox at dawn", negative_prompt=negative,
                                        true_cfg=true_cfg), spec, 1)
    conditioning = asyncio.run(family_of(spec).conditioning(MaskedEncoder(), request, spec))
    cond = conditioning.cond[tensors.ENCODER_HIDDEN_STATES]
    assert cond.shape == (1, len("a red fox at dawn") - DROPPED, WIDTH)
    assert cond[0, 0, 0] == DROPPED  # the first kept token is the one after the prefix
    assert conditioning.uses_cfg == guided
    if guided:
        uncond = conditioning.uncond[tensors.ENCODER_HIDDEN_STATES]
        assert uncond.shape == (1, len("blurry") - DROPPED, WIDTH)
        assert conditioning.guidance == 4.0 and conditioning.combine is norm_rescaled_cfg


def test_decoding_and_image_to_image_use_the_latents_statistics():
    """Decoding takes latents x std + mean per channel (QwenImagePipeline's latents /
    (1 / std) + mean); image-to-image normalises a posterior sample the other way."""
    spec = qwen_spec()
    family = family_of(spec)
    latents = torch.randn(1, 4, 6, 10)
    mean = torch.tensor(MEAN).view(1, 4, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1)
    torch.testing.assert_close(family.decoder_input(latents, spec), latents / (1.0 / std) + mean)
    torch.testing.assert_close(family.image_latents(latents, spec), (latents - mean) / std)


def test_the_pipeline_spec_of_a_folder(tmp_path):
    from llm_folders import QWEN_IMAGE_LATENTS_MEAN, QWEN_IMAGE_LATENTS_STD, qwen_image_folder

    from export.presets import QWEN_IMAGE_TEMPLATE, load_bundle, pipeline_spec

    spec = pipeline_spec(load_bundle(str(qwen_image_folder(tmp_path / "qwen"))))
    (encoder,) = spec.text_encoders
    assert (encoder.kind, encoder.template, encoder.drop_tokens, encoder.trim) == (
        "Qwen2_5_VLForConditionalGeneration", QWEN_IMAGE_TEMPLATE, 34, True)
    assert (encoder.max_length, encoder.layers, encoder.hidden_size) == (512 + 34, (-1,), 32)
    assert (spec.latents_mean, spec.latents_std) == (QWEN_IMAGE_LATENTS_MEAN,
                                                     QWEN_IMAGE_LATENTS_STD)
    assert (spec.default_steps, spec.default_true_cfg, spec.image_size) == (50, 4.0,
                                                                           (256, 256))
    assert (spec.latent_channels, spec.vae_scale_factor, spec.size_multiple) == (4, 2, 4)
    assert PipelineSpec.from_json(spec.to_json()) == spec


def test_an_sdxl_vae_with_latents_statistics_decodes_as_the_sdxl_pipeline(tmp_path):
    """Older families too: an SDXL folder whose VAE config has latents_mean / latents_std gets
    them in its spec, and the family's decoder input is what StableDiffusionXLPipeline hands
    its VAE (latents x std / scaling_factor + mean); image-to-image is its inverse, as
    StableDiffusionXLImg2ImgPipeline normalises."""
    import json

    from diffusers_folders import load_pipeline, sdxl_folder

    from export.presets import load_bundle, pipeline_spec

    folder = sdxl_folder(tmp_path / "sdxl")
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config |= {"latents_mean": list(MEAN), "latents_std": list(STD)}
    config_file.write_text(json.dumps(config))
    spec = pipeline_spec(load_bundle(str(folder)))
    assert (spec.latents_mean, spec.latents_std) == (MEAN, STD)
    pipeline = load_pipeline(folder)
    decode, seen = pipeline.vae.decode, {}

    def captured_decode(latents, *args, **kwargs):
        seen["decoded"] = latents
        return decode(latents, *args, **kwargs)

    def last_latents(pipe, step, timestep, outputs):
        seen["latents"] = outputs["latents"]
        return outputs

    pipeline.vae.decode = captured_decode
    with torch.no_grad():
        pipeline("a red fox", num_inference_steps=2, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0),
                 callback_on_step_end=last_latents)
    family = family_of(spec)
    ours = family.decoder_input(seen["latents"], spec)
    torch.testing.assert_close(ours, seen["decoded"])
    torch.testing.assert_close(family.image_latents(ours, spec), seen["latents"])
    assert (ours - seen["latents"] / spec.scaling_factor).abs().max() > 0.1


def test_max_sequence_length_sets_the_encoders_tokens_and_the_transformers_profile(tmp_path):
    """--max-sequence-length N: the transformer takes up to N text tokens, the encoder N + 34
    (the template's prefix the pipeline drops); more than QwenImagePipeline's 1024 is refused."""
    from llm_folders import qwen_image_folder

    from export.presets import load_bundle, pipeline_spec

    bundle = load_bundle(str(qwen_image_folder(tmp_path / "qwen")))
    spec = pipeline_spec(bundle, max_sequence_length=100)
    assert spec.text_encoders[0].max_length == 134
    specs = bundle.specs(max_sequence_length=100)
    assert specs["transformer"].text_lengths() == (1, 100, 100)
    assert specs["text_encoder"].sequence_length == 134
    with pytest.raises(ValueError, match="at most 1024 tokens"):
        bundle.specs(max_sequence_length=1025)
