"""The per-family modules of the runtime: found by name, and each does what its diffusers
pipeline does for the latents' draw and the scheduler's timesteps (no served model needed)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from models import tensors
from models.pipeline_spec import FAMILIES, PipelineSpec, TextEncoder
from runtime.families import families, family_of
from runtime.pipeline import GenerationRequest, RequestError, resolve

# the scheduler FLUX.1-dev ships (its scheduler_config.json)
FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                          "num_train_timesteps": 1000, "shift": 1.0,
                          "use_dynamic_shifting": False}


def flux_spec(scheduler_config: dict, guidance_embeds: bool = True) -> PipelineSpec:
    return PipelineSpec(
        model="flux-test", family="flux", latent_channels=16, latent_size=(128, 128),
        scheduler_config=scheduler_config, vae_scale_factor=8, decoder="vae",
        scaling_factor=0.3611, shift_factor=0.1159, size_multiple=16,
        height_range=(256, 1536), width_range=(256, 1536), default_steps=28,
        default_guidance=3.5, guidance_embeds=guidance_embeds,
        text_encoders=(TextEncoder("text_encoder", "tokenizer", "CLIPTextModel"),
                       TextEncoder("text_encoder_2", "tokenizer_2", "T5EncoderModel", 512, 32)),
    )


def test_every_family_of_the_spec_has_a_runtime_module():
    assert sorted(families()) == sorted(FAMILIES)
    spec = flux_spec(FLUX_DEV_SCHEDULER)
    assert family_of(spec).name == "flux"
    object.__setattr__(spec, "family", "hunyuan")  # as a pipeline.json of a newer release
    known = ", ".join(sorted(FAMILIES))  # class, flux, flux2, qwenimage, sd, sd3, sdxl, zimage
    with pytest.raises(ValueError, match=f"no runtime module; known: {known}$"):
        family_of(spec)


@pytest.mark.parametrize("height, width", [(1024, 1024), (768, 1360), (256, 512)])
@pytest.mark.parametrize("config", [FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER],
                         ids=["dev", "schnell"])
def test_flux_timesteps_are_the_flux_pipelines(config, height, width):
    """Sigmas linspace(1, 1/steps) shifted by mu of the packed token count (dev) or by the
    fixed shift (schnell), exactly as FluxPipeline sets them."""
    spec = flux_spec(config)
    steps = 28
    request = resolve(GenerationRequest(prompt="x", steps=steps, height=height, width=width),
                      spec, 1)
    from runtime.pipeline import Pipeline

    served = Pipeline.__new__(Pipeline)
    served.spec, served.family = spec, family_of(spec)
    ours = served.scheduler(request)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_flux_latents_are_drawn_as_the_flux_pipeline_draws_them():
    """The unpacked draw the sampler keeps is diffusers' packed draw, unpacked."""
    spec = flux_spec(FLUX_DEV_SCHEDULER)
    request = resolve(GenerationRequest(prompt="x", seed=42, height=256, width=384), spec, 1)
    family = family_of(spec)
    ours = family.initial_latents(request, spec, None, torch.Generator("cpu").manual_seed(42))
    shape = (1, 16, 32, 48)
    drawn = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(42))
    packed = FluxPipeline._pack_latents(drawn, 1, 16, 32, 48)
    assert torch.equal(ours, FluxPipeline._unpack_latents(packed, 256, 384, 8))
    assert ours.shape == shape


class RecordingEncoders:
    """Encoders that answer with recognisable rows: each text's length fills its row."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    async def texts(self, encoder: TextEncoder, texts: list[str]) -> dict[str, np.ndarray]:
        self.asked.append((encoder.network, texts))
        rows = np.array([len(t) for t in texts], np.float32)
        width = 8 if encoder.is_t5 else 4
        return {tensors.TEXT_EMBEDDINGS: np.ones((len(texts), 3, width), np.float32)
                * rows[:, None, None],
                tensors.PENULTIMATE_HIDDEN_STATES: np.zeros((len(texts), 3, width)),
                tensors.POOLED: np.ones((len(texts), width), np.float32) * rows[:, None]}

    async def labels(self, labels):  # pragma: no cover - not a class-conditional model
        raise AssertionError


@pytest.mark.parametrize("true_cfg, negative, runs_cfg",
                         [(1.0, "blurry", False), (4.0, None, False), (4.0, "blurry", True)])
def test_flux_conditioning_follows_diffusers_true_cfg_rule(true_cfg, negative, runs_cfg):
    """True CFG runs only with TRUE_CFG > 1 and a negative prompt (diffusers' do_true_cfg);
    GUIDANCE goes to the guidance-embedding input; T5 gives the states, CLIP the pooled."""
    spec = flux_spec(FLUX_DEV_SCHEDULER)
    request = resolve(GenerationRequest(prompt="a fox", negative_prompt=negative, guidance=2.5,
                                        true_cfg=true_cfg), spec, 1)
    encoders = RecordingEncoders()
    conditioning = asyncio.run(family_of(spec).conditioning(encoders, request, spec))
    assert conditioning.uses_cfg is runs_cfg
    assert conditioning.guidance == true_cfg
    expected_rows = ["a fox", negative] if runs_cfg else ["a fox"]
    assert encoders.asked == [("text_encoder_2", expected_rows), ("text_encoder", expected_rows)]
    assert conditioning.cond[tensors.GUIDANCE].tolist() == [2.5]
    assert conditioning.cond[tensors.ENCODER_HIDDEN_STATES].shape == (1, 3, 8)
    assert float(conditioning.cond[tensors.POOLED_PROJECTIONS][0, 0]) == len("a fox")
    schnell = flux_spec(FLUX_SCHNELL_SCHEDULER, guidance_embeds=False)
    request = resolve(GenerationRequest(prompt="a fox"), schnell, 1)
    plain = asyncio.run(family_of(schnell).conditioning(RecordingEncoders(), request, schnell))
    assert tensors.GUIDANCE not in plain.cond


@pytest.mark.parametrize("value", [0.5, -1.0, float("nan"), float("inf"), 51.0])
def test_true_cfg_out_of_range_is_refused(value):
    with pytest.raises(RequestError, match=r"true_cfg: must be a number in 1\.\.50"):
        resolve(GenerationRequest(prompt="x", true_cfg=value), flux_spec(FLUX_DEV_SCHEDULER), 1)


def test_true_cfg_is_refused_for_other_families():
    spec = flux_spec(FLUX_DEV_SCHEDULER).with_defaults(
        family="sd3", scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(RequestError, match="TRUE_CFG is for Flux, Qwen-Image models.*use GUIDANCE"):
        resolve(GenerationRequest(prompt="x", true_cfg=2.0), spec, 1)


def test_sd3_with_dynamic_shifting_gets_the_sd3_pipelines_mu():
    """StableDiffusion3Pipeline: mu from (h / patch) * (w / patch) tokens, max_shift 1.16."""
    from runtime.families import dynamic_shift

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}
    spec = flux_spec(config).with_defaults(family="sd3")
    options = dynamic_shift(spec, (1, 16, 96, 64))
    assert options == {"mu": calculate_shift((96 // 2) * (64 // 2), 256, 4096, 0.5, 1.16)}
    assert dynamic_shift(spec.with_defaults(scheduler_config={}), (1, 16, 96, 64)) == {}
