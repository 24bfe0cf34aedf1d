"""Small diffusers networks built from configs, shared by the export tests."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SDXL_CONDITIONING = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,  # text_embeds 24 + 6 time ids of 8
}


def small_unet(**overrides) -> UNet2DConditionModel:
    """An SD-style UNet of a few thousand parameters (seeded), 8×8 latents of 4 channels."""
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        **overrides,
    }
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def small_sdxl_unet(**overrides) -> UNet2DConditionModel:
    """`small_unet` with SDXL's added text_embeds/time_ids conditioning."""
    return small_unet(**{**SDXL_CONDITIONING, **overrides})


class Conditioned:
    """A device pool with one request's conditioning: callable as the sampler's `denoise`, and
    the pool's attributes (calls, rounds, failovers) readable through it."""

    def __init__(self, pool, cond, uncond=None, guidance: float = 1.0) -> None:
        from models.tensors import ENCODER_HIDDEN_STATES
        from runtime.guidance import Conditioning

        uncond = None if uncond is None else {ENCODER_HIDDEN_STATES: uncond}
        self.pool = pool
        self.denoise = pool.denoiser(
            Conditioning({ENCODER_HIDDEN_STATES: cond}, uncond, guidance))

    def __getattr__(self, name):
        return getattr(self.pool, name)

    async def __call__(self, x, t):
        return await self.denoise(x, t)
