"""The `unet_sim` model: an exact class-conditional diffusion model in closed form.

Data of class k are N(mean_k, std^2 I); the unconditional distribution (the null label) is the
equal mixture of all classes. The "text encoder" maps a label to a one-hot embedding
[B, 1, classes + 1] and the UNet returns the optimal epsilon E[eps | x_t, label], so sampling,
classifier-free guidance and every skip transition behave like a real model at no compute cost.
The same code runs in-process (tests, benchmarks) and inside the Triton python backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from models.pipeline_spec import CLASS_CONDITIONAL, PipelineSpec, digit_names

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
SAMPLE_SHAPE = (1, 8, 8)
CLASS_STD = 0.3
MEANS_SEED = 0


def class_means(num_classes: int, sample_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic, well separated class means in (-0.8, 0.8): [classes, *sample_shape]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return 0.8 * torch.tanh(torch.randn((num_classes, *sample_shape), generator=generator))


class SimDiffusion:
    """Closed-form class-conditional model: `encode(labels)` and `denoise(sample, t, context)`."""

    def __init__(
        self,
        alphas_cumprod: np.ndarray,
        *,
        num_classes: int = NUM_CLASSES,
        sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
        std: float = CLASS_STD,
        seed: int = MEANS_SEED,
    ) -> None:
        import torch

        from models.closed_form import GaussianMixtureModel

        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)
        alphas = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        means = class_means(num_classes, self.sample_shape, seed)
        self.classes = [
            GaussianMixtureModel(means[k : k + 1], std, alphas_cumprod=alphas)
            for k in range(num_classes)
        ]
        self.unconditional = GaussianMixtureModel(means, std, alphas_cumprod=alphas)

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, **kwargs) -> SimDiffusion:
        """Build with the noise schedule of a diffusers scheduler config."""
        return cls(alphas_cumprod_of(scheduler_config), **kwargs)

    @property
    def embed_dim(self) -> int:
        return self.num_classes + 1

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """Labels int [B] (null label = classes) -> one-hot embeddings float32 [B, 1, classes + 1]."""
        return self.one_hot(labels, self.num_classes)

    @staticmethod
    def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The sim's "text encoder": one-hot float32 [B, 1, num_classes + 1] of int labels [B]."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"label must be a 1-D integer array; got {labels.dtype} {labels.shape}")
        bad = labels[(labels < 0) | (labels > num_classes)]
        if bad.size:
            raise ValueError(
                f"label must be in 0..{num_classes - 1} or {num_classes} (null); got {bad.tolist()}"
            )
        embeddings = np.zeros((labels.shape[0], 1, num_classes + 1), dtype=np.float32)
        embeddings[np.arange(labels.shape[0]), 0, labels] = 1.0
        return embeddings

    def denoise(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Optimal epsilon float32 [N, *shape] for states [N, *shape], timesteps [N], context [N,1,D]."""
        import torch

        self._check_inputs(sample, timestep, context)
        x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
        t = torch.from_numpy(np.ascontiguousarray(timestep, dtype=np.float32))
        classes = np.asarray(context)[:, 0, :].argmax(axis=1)
        output = torch.empty_like(x)
        for k in np.unique(classes):
            rows = torch.from_numpy(np.flatnonzero(classes == k))
            model = self.unconditional if k == self.num_classes else self.classes[k]
            output[rows] = model(x[rows], t[rows])
        return output.numpy()

    def _check_inputs(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> None:
        rows = sample.shape[0]
        if tuple(sample.shape[1:]) != self.sample_shape:
            raise ValueError(f"sample must be [N, {self.sample_shape}]; got {sample.shape}")
        if timestep.shape != (rows,):
            raise ValueError(f"timestep must be [{rows}]; got {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != rows or context.shape[2] != self.embed_dim:
            raise ValueError(
                f"encoder_hidden_states must be [{rows}, S, {self.embed_dim}]; got {context.shape}"
            )


def alphas_cumprod_of(scheduler_config: dict) -> np.ndarray:
    """The training noise schedule (alphas_cumprod) that a diffusers scheduler config defines."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.numpy().astype(np.float64)


def sim_spec() -> PipelineSpec:
    """The pipeline spec of the closed-form sim (the reference model's schedule and labels)."""
    from models.reference import SCHEDULER_CONFIG

    return PipelineSpec(
        model="sim", family=CLASS_CONDITIONAL, latent_channels=SAMPLE_SHAPE[0],
        latent_size=SAMPLE_SHAPE[1:], scheduler_config=dict(SCHEDULER_CONFIG),
        num_labels=NUM_CLASSES, null_label=NULL_LABEL, label_names=digit_names(NUM_CLASSES),
        default_scheduler="ddim",
    )
