"""Class-conditional models (the closed-form sim): LABEL -> label encoder -> embedding."""
from __future__ import annotations

from models import tensors
from models.pipeline_spec import CLASS_CONDITIONAL, PipelineSpec
from runtime.families import Family, TextEncoding, split_rows
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest


class ClassConditional(Family):
    """The label's embedding conditions the denoiser; the null label is the negative."""

    name = CLASS_CONDITIONAL
    title = "class-conditional"
    takes_images = False  # no VAE encoder: its latents are the pixels

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        labels = [request.label, request.negative_label] if cfg else [request.label]
        embeddings = await encoding.labels(labels)
        return split_rows({tensors.ENCODER_HIDDEN_STATES: embeddings}, request.guidance, cfg)


FAMILY = ClassConditional()
