"""Tiny random-weight Wan text-to-video folders (Wan 2.1, and Wan 2.2 with two experts), built
from configs and saved with diffusers' own `save_pretrained`.

The text encoder is a 2-layer UMT5 over the offline T5 tokenizer of tests/diffusers_folders.py;
the transformer is a one-block WanTransformer3DModel (patch 1x2x2) whose text embedder is
amplified (`TEXT_GAIN`) so the prompt moves the frames; the VAE is a 4-level AutoencoderKLWan
with temporal downsampling x4 and spatial x8 (base width 3), with Wan's per-channel
latents_mean / latents_std (random here, so a decoder that skips them fails parity). The
scheduler is UniPC with flow sigmas and flow_shift, as the released Wan folders ship it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.diffusers_folders import _save, t5_tokenizer

TEXT_GAIN = 8.0  # the transformer's text embedder weights are scaled by this
TEXT_DIM = 32
FRAMES = 5  # 2 latent frames under the x4 temporal VAE
HEIGHT, WIDTH = 32, 48  # pixels: 4x6 latents, 2x3 patches of 2x2
Z_DIM = 16


def wan_folder(path: Path, seed: int = 0, *, boundary_ratio: float | None = None,
               flow_shift: float = 3.0) -> Path:
    """A WanPipeline folder; with `boundary_ratio`, a Wan 2.2 folder of two experts
    (`transformer` for timesteps >= boundary_ratio x 1000, `transformer_2` below it)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipeline = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_umt5(seed),
        vae=_wan_vae(seed + 1),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=flow_shift),
        transformer=_wan_transformer(seed + 2),
        transformer_2=None if boundary_ratio is None else _wan_transformer(seed + 3),
        boundary_ratio=boundary_ratio,
    )
    return _save(pipeline, path)


def _umt5(seed: int):
    """A 2-layer UMT5 encoder (gated GELU, per-layer relative attention, as umt5-xxl)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(t5_tokenizer()), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM,
        num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=Z_DIM,
        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    with torch.no_grad():
        transformer.condition_embedder.text_embedder.linear_1.weight.mul_(TEXT_GAIN)
    return transformer.eval()


def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mean = (torch.randn(Z_DIM, generator=generator) * 0.5).tolist()
    std = (torch.rand(Z_DIM, generator=generator) * 2 + 0.5).tolist()
    return AutoencoderKLWan(base_dim=3, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=mean,
                            latents_std=std).eval()
