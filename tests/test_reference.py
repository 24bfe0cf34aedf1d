"""The bundled reference model: a diffusers text-to-image folder of 8x8 digits (checkpoint,
prompts, guided sampling, diffusers' own pipeline) and the quality measures."""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from scipy import linalg

from bench.metrics import (
    class_accuracy,
    classifier_features,
    digits_fd,
    frechet_distance,
    mean_sample_distance,
)
from bench.quality import QualitySetup, make_denoiser
from models import reference as reference_module
from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE
from models.reference import (
    ASSET_DIR,
    EMPTY_PROMPT,
    PROMPT_TEMPLATES,
    SCHEDULER_CONFIG,
    load_pipeline,
    load_reference,
    prompt_for,
    real_digits,
    to_gray,
    to_images,
)
from runtime.driffusion import sample
from runtime.schedulers import make_scheduler

DIGITS = torch.arange(10)


@pytest.fixture(scope="module")
def model():
    return load_reference()


@pytest.fixture(scope="module")
def digits():
    return real_digits()


def generate(model, prompts: list[str], guidance: float, steps: int = 20,
             scheduler: str = "ddim", seed: int = 0) -> torch.Tensor:
    """Gray samples [N, 1, 8, 8] in [-1, 1] (unclipped), sequential sampling, decoded."""
    noise_scheduler = make_scheduler(scheduler, steps, model.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    latents = model.initial_noise(len(prompts), generator) * noise_scheduler.init_noise_sigma
    latents = asyncio.run(sample(denoiser(model, prompts, guidance), noise_scheduler, latents,
                                 mode="sequential", generator=generator))
    return to_gray(model.decode(latents))


def denoiser(model, prompts: list[str], guidance: float):
    return make_denoiser(model, QualitySetup(backend="torch"), prompts, guidance)


def asked(labels: torch.Tensor, template: str = PROMPT_TEMPLATES[0]) -> list[str]:
    return [prompt_for(int(digit), template) for digit in labels]


def test_folder_is_a_small_stable_diffusion_pipeline():
    weights = list(ASSET_DIR.rglob("*.safetensors"))
    assert {path.parent.name for path in weights} == {"reference", "text_encoder", "unet", "vae"}
    assert sum(path.stat().st_size for path in weights) <= 10 * 10**6
    index = json.loads((ASSET_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    scheduler = json.loads((ASSET_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    assert {p.name for p in (ASSET_DIR / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}


def test_checkpoint_loads_with_documented_shapes(model):
    tokenizer, text_encoder, unet, vae = model.tokenizer, model.text_encoder, model.unet, model.vae
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (VOCAB_SIZE, BOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID)
    ids = model.tokenize(["a handwritten seven", EMPTY_PROMPT])
    assert ids.shape == (2, 77) and ids[0, 0] == BOS_TOKEN_ID and ids[1, 1:].eq(EOS_TOKEN_ID).all()
    config = text_encoder.config
    assert (config.vocab_size, config.hidden_size, config.max_position_embeddings) == (
        VOCAB_SIZE, 16, 77)
    context = model.encode_prompts(["a handwritten seven", "the digit 7", EMPTY_PROMPT])
    assert context.shape == (3, 77, 16)
    assert 0.95e6 < sum(p.numel() for p in unet.parameters()) < 1.05e6
    assert len(vae.config.block_out_channels) == 1  # VAE scale factor 1: latents 8x8 too
    x = model.initial_noise(3)
    assert x.shape == (3, 1, 8, 8) == (3, model.latent_channels, 8, model.sample_size)
    assert unet(x, torch.tensor([999, 500, 0]), context).sample.shape == x.shape
    assert model.decode(x).shape == (3, 3, 8, 8)
    networks = (text_encoder, unet, vae, model.classifier)
    assert all(p.dtype == torch.float32 and not p.requires_grad
               for network in networks for p in network.parameters())
    assert model.scheduler_config["clip_sample"] is False


def test_vae_reconstructs_digits_and_its_latents_have_unit_scale(model, digits):
    images, labels = digits
    latents = model.encode_images(images)
    assert latents.shape == (len(images), 1, 8, 8)
    assert 0.9 < latents.std().item() < 1.1  # scaling_factor = 1 / std of the latents
    reconstructed = to_gray(model.decode(latents))
    assert (reconstructed - images).square().mean() < 0.01
    assert class_accuracy(model.classifier, reconstructed.clamp(-1, 1), labels) > 0.97


def test_guided_sampling_draws_the_digits_the_prompts_ask_for(model):
    labels = DIGITS.repeat(2)
    samples = generate(model, asked(labels), guidance=2.0)
    assert class_accuracy(model.classifier, samples.clamp(-1, 1), labels) >= 0.8
    assert samples.abs().max() < 1.5  # pixel range [-1, 1], no blow-up without clipping


def test_other_prompt_templates_ask_for_the_same_digits(model):
    prompts = asked(DIGITS, "the digit {digit}") + asked(DIGITS, "{word}")
    samples = generate(model, prompts, guidance=2.0, seed=3)
    assert class_accuracy(model.classifier, samples.clamp(-1, 1), DIGITS.repeat(2)) >= 0.8


def test_guidance_changes_the_samples_and_one_means_conditional_only(model):
    prompts = asked(torch.tensor([3, 7]))
    x, t = model.initial_noise(2, torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    conditional = model.unet(x, t, model.encode_prompts(prompts)).sample
    assert torch.equal(asyncio.run(denoiser(model, prompts, 1.0)(x, t)), conditional)
    guided = asyncio.run(denoiser(model, prompts, 2.0)(x, t))
    assert not torch.allclose(guided, conditional, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp2m", "unipc", "ddpm"])
def test_every_scheduler_samples_digits_without_blowing_up(model, name):
    samples = generate(model, asked(DIGITS), guidance=2.0, steps=10, scheduler=name, seed=2)
    assert class_accuracy(model.classifier, samples.clamp(-1, 1), DIGITS) >= 0.8
    assert samples.abs().max() < 1.5


def test_diffusers_stable_diffusion_pipeline_runs_the_folder_offline(model):
    pipeline = load_pipeline()
    assert pipeline.vae_scale_factor == 1
    output = pipeline(asked(DIGITS), num_inference_steps=20, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), output_type="np")
    images = torch.from_numpy(np.asarray(output.images)).permute(0, 3, 1, 2)
    assert images.shape == (10, 3, 8, 8)
    gray = to_gray(images.float() * 2 - 1)
    assert class_accuracy(model.classifier, gray, DIGITS) >= 0.8


def test_export_derives_an_ordinary_sd_spec_from_the_folder():
    from export.presets import load_bundle, pipeline_spec

    spec = pipeline_spec(load_bundle("reference"))
    assert (spec.family, spec.decoder, spec.latent_shape, spec.image_size) == (
        "sd", "vae", (1, 8, 8), (8, 8))
    assert [(e.tokenizer, e.network, e.hidden_size) for e in spec.text_encoders] == [
        ("tokenizer", "text_encoder", 16)]


def test_source_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    from export.presets import source_fingerprint

    before = source_fingerprint("reference")
    assert before.startswith("reference:") and source_fingerprint("reference") == before
    copy = tmp_path / "reference"
    shutil.copytree(ASSET_DIR, copy)
    monkeypatch.setattr(reference_module, "ASSET_DIR", copy)
    assert source_fingerprint("reference") == before  # the same contents elsewhere
    (copy / "classifier.safetensors").write_bytes(b"not part of the pipeline")
    assert source_fingerprint("reference") == before
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert source_fingerprint("reference") != before


def test_prompts_name_the_digits():
    assert prompt_for(7) == "a handwritten seven"
    assert prompt_for(7, "the digit {digit}") == "the digit 7"
    with pytest.raises(ValueError, match="digit must be in 0..9"):
        prompt_for(10)


def test_classifier_recognises_real_digits_and_fd_separates_real_from_noise(model, digits):
    images, labels = digits
    assert class_accuracy(model.classifier, images, labels) > 0.97
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]]
    real_vs_real = digits_fd(model.classifier, subset, images)
    noise = torch.rand((500, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert real_vs_real < 15.0  # 500-vs-all floor measured 4.5-10 over seeds
    assert digits_fd(model.classifier, noise, images) > 10 * real_vs_real


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(200, 6, generator=generator, dtype=torch.float64) @ torch.rand(
        6, 6, generator=generator, dtype=torch.float64) + 0.5
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = (np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(cov_a)
                + np.trace(cov_b) - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_features_and_distances_have_the_documented_shapes(model, digits):
    images, _ = digits
    assert classifier_features(model.classifier, images[:5]).shape == (5, 128)
    assert mean_sample_distance(images[:4], images[:4]) == 0.0
    assert mean_sample_distance(torch.ones(3, 1, 2, 2), -torch.ones(3, 1, 2, 2)) == 2.0
    with pytest.raises(ValueError, match="same shape"):
        mean_sample_distance(images[:4], images[:3])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


def test_real_digits_and_to_images_use_the_model_pixel_range(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    pixels = to_images(torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]]))
    assert pixels.dtype == torch.uint8 and pixels.tolist() == [[[0, 128], [255, 255]]]
    rgb = torch.tensor([[[[-1.0]], [[0.0]], [[1.0]]]])  # [1, 3, 1, 1]: the channel mean
    assert to_images(rgb).tolist() == [[[128]]]
    with pytest.raises(ValueError, match="images"):
        to_gray(torch.zeros(1, 2, 8, 8))


def test_bad_prompt_lists_are_rejected_with_a_clear_error(model):
    with pytest.raises(ValueError, match="prompts"):
        denoiser(model, "a handwritten seven", 1.0)
    with pytest.raises(ValueError, match="prompts"):
        denoiser(model, [], 1.0)


def test_bad_scheduler_requests_are_rejected():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*ddim"):
        make_scheduler("heun", 20, SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="num_steps must be in 1..1000"):
        make_scheduler("ddim", 0, SCHEDULER_CONFIG)
