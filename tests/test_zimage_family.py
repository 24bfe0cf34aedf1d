"""The Z-Image runtime family without a served model: timesteps, latents, the conditioning's
trim by the attention mask and the guidance rule, each as ZImagePipeline computes them."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

from models import tensors
from models.pipeline_spec import CHAT_THINKING_TEMPLATE, Z_IMAGE, PipelineSpec, TextEncoder
from runtime.families import family_of
from runtime.pipeline import GenerationRequest, Pipeline, resolve

# the scheduler of Z-Image-Turbo's folder, and one that shifts by resolution
TURBO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                   "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
DYNAMIC_SCHEDULER = {**TURBO_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
WIDTH = 6  # of the fake encoder's states
TOKENS = 16  # the fake encoder's max_length


def zimage_spec(scheduler_config: dict) -> PipelineSpec:
    encoder = TextEncoder("text_encoder", "tokenizer", "Qwen3Model", TOKENS, WIDTH,
                          layers=(-2,), template=CHAT_THINKING_TEMPLATE, trim=True)
    return PipelineSpec(
        model="zimage-test", family=Z_IMAGE, latent_channels=16, latent_size=(128, 128),
        scheduler_config=scheduler_config, vae_scale_factor=8, decoder="vae",
        scaling_factor=0.3611, shift_factor=0.1159, size_multiple=16,
        height_range=(256, 1536), width_range=(256, 1536), default_steps=50,
        default_guidance=5.0, text_encoders=(encoder,))


@pytest.mark.parametrize("height, width", [(1024, 1024), (768, 1360), (256, 512)])
@pytest.mark.parametrize("config", [DYNAMIC_SCHEDULER, TURBO_SCHEDULER], ids=["mu", "turbo"])
def test_timesteps_are_the_zimage_pipelines(config, height, width):
    """Float32 linspace(1, 1/steps) sigmas with mu of the 2x2 patch count, as ZImagePipeline
    passes them (the scheduler ignores mu unless it shifts dynamically)."""
    spec = zimage_spec(config)
    steps = 9
    request = resolve(GenerationRequest(prompt="x", steps=steps, height=height, width=width),
                      spec, 1)
    served = Pipeline.__new__(Pipeline)
    served.spec, served.family = spec, family_of(spec)
    ours = served.scheduler(request)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    theirs.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_latents_are_drawn_as_the_zimage_pipeline_draws_them():
    spec = zimage_spec(TURBO_SCHEDULER)
    request = resolve(GenerationRequest(prompt="x", seed=42, height=256, width=384), spec, 1)
    ours = family_of(spec).initial_latents(request, spec, None,
                                           torch.Generator("cpu").manual_seed(42))
    drawn = torch.randn((1, 16, 32, 48), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(ours, drawn)


class MaskedEncoder:
    """An LLM encoder whose text i has len(text) real tokens: row values i + 1, then padding."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def texts(self, encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
        self.asked.append(texts)
        states = np.full((len(texts), TOKENS, WIDTH), -7.0, np.float32)
        mask = np.zeros((len(texts), TOKENS), np.int64)
        for row, text in enumerate(texts):
            states[row, :len(text)] = row + 1
            mask[row, :len(text)] = 1
        return {tensors.TEXT_EMBEDDINGS: states, tensors.ATTENTION_MASK: mask}


@pytest.mark.parametrize("guidance", [5.0, 0.5])
def test_conditioning_is_cut_to_each_prompts_tokens_and_guided_as_zimage(guidance):
    spec = zimage_spec(TURBO_SCHEDULER)
    request = resolve(GenerationRequest(prompt="a fox", negative_prompt="blur",
                                        guidance=guidance), spec, 1)
    encoder = MaskedEncoder()
    conditioning = asyncio.run(family_of(spec).conditioning(encoder, request, spec))
    assert encoder.asked == [["a fox", "blur"]]
    cond = conditioning.cond[tensors.ENCODER_HIDDEN_STATES]
    uncond = conditioning.uncond[tensors.ENCODER_HIDDEN_STATES]
    np.testing.assert_array_equal(cond, np.ones((1, 5, WIDTH), np.float32))
    np.testing.assert_array_equal(uncond, np.full((1, 4, WIDTH), 2.0, np.float32))
    assert conditioning.uses_cfg, "guided at any GUIDANCE > 0, also below 1"
    pos, neg = torch.randn(2, 16, 8, 8).unbind(0)
    guided = conditioning.combine(pos.numpy(), neg.numpy(), conditioning.guidance)
    np.testing.assert_array_equal(guided, (pos + guidance * (pos - neg)).numpy())


def test_guidance_zero_encodes_the_prompt_alone():
    spec = zimage_spec(TURBO_SCHEDULER)
    request = resolve(GenerationRequest(prompt="a fox", negative_prompt="blur", guidance=0.0),
                      spec, 1)
    encoder = MaskedEncoder()
    conditioning = asyncio.run(family_of(spec).conditioning(encoder, request, spec))
    assert encoder.asked == [["a fox"]]
    assert conditioning.uncond is None and not conditioning.uses_cfg
