"""Closed-form diffusion models: the exact optimal denoiser of Gaussian-mixture data.

Used where a real network would only add noise to a measurement: tests of the method, the
`unet_sim` Triton model and the orchestration benchmarks. Data are a mixture of isotropic
Gaussians N(mean_k, std_k^2 I); a noisy state is x = alpha * x0 + sigma * eps.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


class GaussianMixtureModel:
    """The optimal denoiser E[x0 | x] of a Gaussian mixture, as a `model(x, t)` callable.

    t are training timesteps (as a diffusers UNet receives them); `alphas_cumprod` maps them to
    noise levels, with linear interpolation in sigma = sqrt((1 - a) / a) for fractional t.
    For prediction type "flow", t is sigma * num_train_timesteps and x = (1-sigma) x0 + sigma eps.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
        *,
        alphas_cumprod: torch.Tensor | None = None,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; "
                f"choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.means = means.to(torch.float64)  # [K, *sample_shape]
        components = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(components).clone()
        if weights is None:
            weights = torch.full((components,), 1.0 / components, dtype=torch.float64)
        self.log_weights = torch.as_tensor(weights, dtype=torch.float64).log()
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        if alphas_cumprod is not None:
            a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
            self.train_sigmas = ((1 - a) / a).sqrt()

    @classmethod
    def gaussian(cls, mean: float, std: float, sample_shape: tuple[int, ...], **kwargs):
        """A single Gaussian N(mean, std^2 I) over samples of `sample_shape`."""
        return cls(torch.full((1, *sample_shape), float(mean)), std, **kwargs)

    def noise_levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) per item for model timesteps t[N]."""
        t = t.to(torch.float64)
        if self.prediction_type == "flow":
            sigma = t / self.num_train_timesteps
            return 1 - sigma, sigma
        low = t.floor().long().clamp(0, len(self.train_sigmas) - 1)
        high = (low + 1).clamp(max=len(self.train_sigmas) - 1)
        frac = t - low
        ratio = self.train_sigmas[low] * (1 - frac) + self.train_sigmas[high] * frac
        alpha = 1 / (ratio**2 + 1).sqrt()
        return alpha, ratio * alpha

    def denoised(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x] for states x[N, ...] at per-item noise levels alpha[N], sigma[N]."""
        x = x.to(torch.float64)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = alpha.reshape(shape), sigma.reshape(shape)
        dims = x[0].numel()
        variances = a.unsqueeze(1) ** 2 * self.stds.reshape(1, -1, *[1] * (x.dim() - 1)) ** 2
        variances = variances + s.unsqueeze(1) ** 2  # [N, K, 1...]
        offsets = x.unsqueeze(1) - a.unsqueeze(1) * self.means.unsqueeze(0)  # [N, K, ...]
        flat_var = variances.reshape(variances.shape[0], variances.shape[1])
        log_resp = (
            self.log_weights
            - 0.5 * offsets.flatten(2).pow(2).sum(-1) / flat_var
            - 0.5 * dims * flat_var.log()
        )
        resp = torch.softmax(log_resp, dim=1).reshape(variances.shape)
        gain = a.unsqueeze(1) * self.stds.reshape(1, -1, *[1] * (x.dim() - 1)) ** 2 / variances
        return (resp * (self.means.unsqueeze(0) + gain * offsets)).sum(1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.noise_levels(t)
        x0 = self.denoised(x, alpha, sigma)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = alpha.reshape(shape), sigma.reshape(shape)
        eps = (x.to(torch.float64) - a * x0) / s
        if self.prediction_type == "epsilon":
            output = eps
        elif self.prediction_type == "v_prediction":
            output = a * eps - s * x0
        elif self.prediction_type == "sample":
            output = x0
        else:
            output = eps - x0
        return output.to(x.dtype)

    def exact_ode_solution(
        self, x_start: torch.Tensor, start: tuple[float, float], end: tuple[float, float]
    ) -> torch.Tensor:
        """Probability-flow ODE solution from noise level `start` to `end` ((alpha, sigma) pairs).

        Exact for a single Gaussian, where the standardised state is invariant along the flow.
        """
        if self.means.shape[0] != 1:
            raise ValueError("the exact ODE solution is closed-form only for a single Gaussian")
        mean, std = self.means[0], self.stds[0]
        (a0, s0), (a1, s1) = start, end
        z = (x_start.to(torch.float64) - a0 * mean) / math.sqrt(a0**2 * std**2 + s0**2)
        return a1 * mean + math.sqrt(a1**2 * std**2 + s1**2) * z
