"""Guidance: one request's conditioning and the family's rule that combines its two predictions.

A family builds a `Conditioning` (the denoiser's inputs for the prompt and the negative prompt,
the guidance scale and how the two predictions combine); the device pool evaluates both halves
and applies `combine` per item. The default rule is classifier-free guidance as most diffusers
pipelines apply it; a family whose pipeline guides otherwise (a renormalised true CFG, a
differently signed formula) supplies its own function.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Prediction = TypeVar("Prediction")  # a numpy array or a torch tensor
# combine(cond prediction, uncond prediction, guidance scale) -> the guided prediction
Combine = Callable[[Prediction, Prediction, float], Prediction]
TEXT_AXIS = 1  # the axis along which cond and uncond inputs may differ in length


def classifier_free_guidance(cond: Prediction, uncond: Prediction, guidance: float) -> Prediction:
    """The guided model output: uncond + guidance (cond - uncond), on numpy or torch tensors."""
    return uncond + guidance * (cond - uncond)


@dataclass(frozen=True)
class Conditioning:
    """One request's conditioning: the denoiser's inputs by name for the latent batch [B, ...],
    for the prompt (`cond`) and the negative prompt (`uncond`), the guidance scale and the
    family's rule `combine(cond_output, uncond_output, guidance)`. `guidance_at(t)`, where a
    family gives it, is the scale at timestep t instead (Wan 2.2: its low-noise expert's
    GUIDANCE_2 below the boundary), so one round can hold items of both scales.

    cond and uncond have the same inputs and batch; an input may differ in length along its
    text axis (axis 1: a prompt and a negative prompt trimmed to their own token counts).
    It travels with the request (`DevicePool.denoiser(conditioning)`): nothing of a request is
    stored on the pool, so concurrent requests share a pool safely.
    """

    cond: Mapping[str, np.ndarray]
    uncond: Mapping[str, np.ndarray] | None = None
    guidance: float = 1.0
    combine: Combine = classifier_free_guidance
    guidance_at: Callable[[float], float] | None = None

    def __post_init__(self) -> None:
        if not self.guidance >= 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        cond = {name: as_float32(value) for name, value in self.cond.items()}
        object.__setattr__(self, "cond", cond)
        batches = {value.shape[0] for value in cond.values()}
        if len(batches) != 1:
            raise ValueError(f"conditioning inputs disagree on the batch: {sorted(batches)}")
        if self.uncond is not None:
            uncond = {name: as_float32(value) for name, value in self.uncond.items()}
            check_uncond_shapes(cond, uncond)
            object.__setattr__(self, "uncond", uncond)

    @property
    def batch(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def scale(self, timestep: float) -> float:
        """The guidance scale of an item at `timestep`."""
        return self.guidance if self.guidance_at is None else self.guidance_at(timestep)

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance runs when there is a negative and guidance > 1 (diffusers)."""
        return self.uncond is not None and self.guidance > 1.0


def check_uncond_shapes(cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray]) -> None:
    """ValueError unless uncond has cond's inputs with cond's shapes, except along the text axis."""
    shapes = {name: value.shape for name, value in cond.items()}
    if set(uncond) != set(cond):
        raise ValueError(f"uncond conditioning must have cond's inputs {sorted(cond)}, "
                         f"got {sorted(uncond)}")
    for name, value in uncond.items():
        if not _same_but_text_length(value.shape, shapes[name]):
            raise ValueError(f"uncond {name} has shape {value.shape}; it must match cond's "
                             f"{shapes[name]} except along axis {TEXT_AXIS} (text length)")


def _same_but_text_length(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    if len(shape) != len(other):
        return False
    return all(a == b for axis, (a, b) in enumerate(zip(shape, other)) if axis != TEXT_AXIS)


def as_float32(value) -> np.ndarray:
    """A numpy float32 array of a numpy array or torch tensor."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
