"""Stable Diffusion 3 / 3.5, as StableDiffusion3Pipeline: two CLIP encoders and T5.

The CLIP encoders' penultimate states are concatenated, padded to the joint attention width
and joined along the sequence with T5's states (zeros of `t5_tokens` tokens for a folder
without T5); the pooled projections of both CLIP encoders are concatenated.
"""
from __future__ import annotations

import numpy as np

from models import tensors
from models.pipeline_spec import STABLE_DIFFUSION_3, PipelineSpec
from runtime.families import Family, TextEncoding, prompt_rows, split_rows
from runtime.guidance import Conditioning
from runtime.request import ResolvedRequest


class StableDiffusion3(Family):
    name = STABLE_DIFFUSION_3
    title = "SD3/SD3.5"
    default_strength = 0.6  # StableDiffusion3Img2ImgPipeline
    strength_rounds_kept_steps = False

    async def conditioning(self, encoding: TextEncoding, request: ResolvedRequest,
                           spec: PipelineSpec) -> Conditioning:
        cfg = request.guidance > 1.0
        rows = prompt_rows(request, cfg)
        clip = [await encoding.texts(e, rows) for e in spec.text_encoders if not e.is_t5]
        t5 = [await encoding.texts(e, rows) for e in spec.text_encoders if e.is_t5]
        states = np.concatenate([e[tensors.PENULTIMATE_HIDDEN_STATES] for e in clip], axis=-1)
        width = spec.joint_attention_dim
        if states.shape[-1] > width:
            raise ValueError(f"CLIP states of width {states.shape[-1]} exceed the joint "
                             f"attention width {width}")
        states = np.pad(states, ((0, 0), (0, 0), (0, width - states.shape[-1])))
        t5_states = (t5[0][tensors.TEXT_EMBEDDINGS] if t5 else
                     np.zeros((len(rows), spec.t5_tokens, width), np.float32))
        inputs = {
            tensors.ENCODER_HIDDEN_STATES: np.concatenate([states, t5_states], axis=1),
            tensors.POOLED_PROJECTIONS: np.concatenate([e[tensors.POOLED] for e in clip],
                                                       axis=-1),
        }
        return split_rows(inputs, request.guidance, cfg)


FAMILY = StableDiffusion3()
