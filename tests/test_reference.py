"""The bundled reference model: checkpoint, conditioning, guided sampling and quality measures."""
from __future__ import annotations

import asyncio

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
from models.reference import (
    ASSET_DIR,
    SCHEDULER_CONFIG,
    load_reference,
    real_digits,
    to_images,
)
from runtime.driffusion import sample
from runtime.schedulers import make_scheduler


@pytest.fixture(scope="module")
def model():
    return load_reference()


@pytest.fixture(scope="module")
def digits():
    return real_digits()


def generate(model, labels: torch.Tensor, guidance: float, steps: int = 20,
             scheduler: str = "ddim", seed: int = 0) -> torch.Tensor:
    noise_scheduler = make_scheduler(scheduler, steps, SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    latents = model.initial_noise(len(labels), generator) * noise_scheduler.init_noise_sigma
    return asyncio.run(sample(denoiser(model, labels, guidance), noise_scheduler, latents,
                              mode="sequential", generator=generator))


def denoiser(model, labels: torch.Tensor, guidance: float):
    return make_denoiser(model, QualitySetup(backend="torch"), labels, guidance)


def test_checkpoint_is_small_and_loads_with_documented_shapes(model):
    assert sum(path.stat().st_size for path in ASSET_DIR.glob("*.safetensors")) <= 6 * 2**20
    unet_params = sum(p.numel() for p in model.unet.parameters())
    assert 0.95e6 < unet_params < 1.05e6
    assert model.text_encoder.embedding.num_embeddings == model.num_classes + 1 == 11
    context = model.text_encoder(torch.tensor([0, 9, model.null_label]))
    assert context.shape == (3, 1, 64)
    x = model.initial_noise(3)
    assert x.shape == (3, model.in_channels, model.sample_size, model.sample_size)
    assert model.unet(x, torch.tensor([999, 500, 0]), context).sample.shape == x.shape
    assert model.scheduler_config["clip_sample"] is False
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_guided_sampling_draws_the_requested_digits(model):
    labels = torch.arange(10).repeat(2)
    samples = generate(model, labels, guidance=2.0)
    assert class_accuracy(model.classifier, samples, labels) >= 0.8
    assert samples.abs().max() < 1.5  # pixel range [-1, 1], no blow-up without clipping


def test_guidance_changes_the_samples_and_one_means_conditional_only(model):
    labels = torch.tensor([3, 7])
    x, t = model.initial_noise(2, torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    conditional = model.unet(x, t, model.text_encoder(labels)).sample
    assert torch.equal(asyncio.run(denoiser(model, labels, 1.0)(x, t)), conditional)
    guided = asyncio.run(denoiser(model, labels, 2.0)(x, t))
    assert not torch.allclose(guided, conditional, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp2m", "unipc", "ddpm"])
def test_every_scheduler_samples_digits_without_blowing_up(model, name):
    labels = torch.arange(10)
    samples = generate(model, labels, guidance=1.5, steps=10, scheduler=name, seed=2)
    assert class_accuracy(model.classifier, samples, labels) >= 0.8
    assert samples.abs().max() < 1.5


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


@pytest.mark.parametrize("bad", [torch.tensor([11]), torch.tensor([-1]), torch.tensor([0.5]),
                                 torch.tensor([[1, 2]])])
def test_bad_labels_are_rejected_with_a_clear_error(model, bad):
    with pytest.raises(ValueError, match="label"):
        model.text_encoder(bad)
    with pytest.raises(ValueError, match="label"):
        denoiser(model, bad, 1.0)


def test_bad_scheduler_requests_are_rejected(model):
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*ddim"):
        make_scheduler("heun", 20, SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="num_steps must be in 1..1000"):
        make_scheduler("ddim", 0, SCHEDULER_CONFIG)
