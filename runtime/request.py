"""A generation request as a client states it, as the pipeline resolved it, and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Cancelled", "GenerationRequest", "RequestError", "ResolvedRequest", "shown"]


class Cancelled(RuntimeError):
    """The caller gave up on the request; no further rounds were issued after `rounds`."""

    def __init__(self, rounds: int) -> None:
        super().__init__(f"cancelled after {rounds} rounds")
        self.rounds = rounds


class RequestError(ValueError):
    """A generation request with a bad field; `field` names it (e.g. "steps")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message


@dataclass
class GenerationRequest:
    """One image to generate; None fields take the spec's defaults."""

    label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    mode: str = "aggressive"
    window: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    tolerance: float | None = None  # mode "verified" only
    draft_order: int = 1
    height: int | None = None
    width: int | None = None
    true_cfg: float | None = None  # Flux: diffusers' true_cfg_scale (needs a negative prompt)
    # uint8 [H, W, 3]: img2img / inpainting
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    # uint8 [H, W]: 255 repaints, 0 keeps (needs init_image)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None  # how much of the schedule runs from init_image, in (0, 1]
    frames: int | None = None  # video models: diffusers' num_frames
    guidance_2: float | None = None  # Wan 2.2: the low-noise expert's guidance_scale_2


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every default filled in."""

    prompt: str | None
    negative_prompt: str | None
    label: int | None
    negative_label: int | None
    seed: int
    steps: int
    mode: str
    window: int
    guidance: float
    scheduler: str
    tolerance: float | None = None
    draft_order: int = 1
    height: int = 0
    width: int = 0
    true_cfg: float = 1.0
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    frames: int = 1  # video frames, after the VAE's temporal rule (images: 1)
    guidance_2: float = 1.0  # Wan 2.2's low-noise expert (else unused)


def shown(value: object, limit: int = 64) -> str:
    """A client value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
