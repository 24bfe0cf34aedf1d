"""Sample-quality measures for the reference model (pure functions, no I/O).

- class accuracy: how often the evaluation classifier recognises the requested digit;
- digits-FD: the Frechet distance between Gaussians fitted to the classifier's 128-d
  penultimate features of two image sets (the FID recipe with a domain classifier);
- mean sample distance: how far paired samples (same seed, e.g. DRiffusion vs sequential) are.
"""
from __future__ import annotations

import torch
from torch import nn


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"{name} must be images [N,C,H,W]; got shape {tuple(images.shape)}")


@torch.no_grad()
def classifier_features(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Penultimate features [N, D] of images [N,C,H,W] in [-1, 1], computed in batches."""
    _check_images("images", images)
    classifier.eval()
    return torch.cat([classifier.features(chunk.float()) for chunk in images.split(batch_size)])


@torch.no_grad()
def class_accuracy(classifier: nn.Module, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples [N,C,H,W] that the classifier assigns to their requested label [N]."""
    _check_images("samples", samples)
    if labels.shape != (samples.shape[0],):
        raise ValueError(f"need one label per sample: labels {tuple(labels.shape)}, "
                         f"samples {samples.shape[0]}")
    classifier.eval()
    predicted = torch.cat([classifier(chunk.float()).argmax(dim=1) for chunk in samples.split(512)])
    return (predicted == labels).float().mean().item()


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    tr(sqrt(S_a S_b)) is computed as the trace of sqrt(sqrt(S_a) S_b sqrt(S_a)), a symmetric
    PSD matrix, so only symmetric eigendecompositions are needed (no complex sqrtm).
    """
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(
                f"{name} must be [N, D] with N >= 2; got shape {tuple(features.shape)}"
            )
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(distance.item(), 0.0)


def digits_fd(classifier: nn.Module, samples: torch.Tensor, real_images: torch.Tensor) -> float:
    """Frechet distance between samples and real images on the classifier's features."""
    return frechet_distance(classifier_features(classifier, samples),
                            classifier_features(classifier, real_images))


def mean_sample_distance(samples_a: torch.Tensor, samples_b: torch.Tensor) -> float:
    """Mean over pairs of the per-pixel RMS difference between paired samples (same shape).

    In the [-1, 1] pixel range: 0 means identical, 2 means every pixel flipped end to end.
    """
    if samples_a.shape != samples_b.shape or samples_a.dim() < 2:
        raise ValueError(f"need two paired sample sets of the same shape [N, ...]; got "
                         f"{tuple(samples_a.shape)} and {tuple(samples_b.shape)}")
    difference = (samples_a.double() - samples_b.double()).flatten(start_dim=1)
    return difference.square().mean(dim=1).sqrt().mean().item()
