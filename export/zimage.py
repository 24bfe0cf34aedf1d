"""Z-Image's transformer as one traceable forward over a batch whose rows share one text length.

diffusers' ZImageTransformer2DModel takes lists (one latent and one caption of its own length
per item), pads inside and builds a complex rotary embedding (torch.polar, view_as_complex),
which ONNX export does not take. `ZImageForward` computes what that forward computes for a batch
of rows with one latent size and one text length (the pool stacks only such rows), from the
module's own layers, with the rotary embedding as cosine and sine tables:

- the caption's states are embedded, padded to a multiple of 32 tokens with the caption pad
  token, at positions (1 + j, 0, 0) for j below the padded length;
- the latents are cut into 2x2 patches (one frame), padded to a multiple of 32 tokens with the
  image pad token (position (0, 0, 0)), the patches at (padded caption length + 1, row, column);
- refiner layers run on each stream, the main layers on [image tokens, caption tokens], with no
  attention mask (every row has the same length, as diffusers runs such a batch);
- ZImagePipeline's work around the call: the timestep t (the scheduler's, sigma x 1000) enters
  as (1000 - t) / 1000 and the output is negated.

So the sampler sees an ordinary flow-matching velocity: x_next = x + (sigma_next - sigma) * v, as
FlowMatchEulerDiscreteScheduler.step takes it, and classifier-free guidance on the negated
outputs equals the pipeline's guidance negated (negation is exact in floating point).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEQUENCE_MULTIPLE = 32  # diffusers pads the caption and the image tokens to multiples of this
PATCH = 2  # ZImagePipeline calls the transformer with patch_size=2, f_patch_size=1
FRAME_PATCH = 1


class ZImageForward(nn.Module):
    """(sample [B, C, h, w], timestep [B], encoder_hidden_states [B, L, D]) -> the velocity
    [B, C, h, w] that ZImagePipeline steps its scheduler with."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.module = transformer
        config = transformer.config
        cosines, sines = rotary_tables(config.axes_dims, config.axes_lens, config.rope_theta)
        for axis, (cosine, sine) in enumerate(zip(cosines, sines)):
            self.register_buffer(f"cos_{axis}", cosine, persistent=False)
            self.register_buffer(f"sin_{axis}", sine, persistent=False)
        self.axes = len(cosines)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        model = self.module
        key = f"{PATCH}-{FRAME_PATCH}"
        height, width = sample.shape[2:]
        adaln = model.t_embedder((1000 - timestep) / 1000 * model.t_scale).type_as(sample)

        image_tokens = (height // PATCH) * (width // PATCH)
        image = model.all_x_embedder[key](patchify(sample))
        image = padded(image, model.x_pad_token, padded_length(image_tokens))
        caption = model.cap_embedder(encoder_hidden_states)
        caption_length = padded_length(encoder_hidden_states.shape[1])
        caption = padded(caption, model.cap_pad_token, caption_length)

        image_rope = self.rope(self.image_positions(height // PATCH, width // PATCH,
                                                    caption_length))
        caption_rope = self.rope(caption_positions(caption_length))
        for layer in model.noise_refiner:
            image = block(layer, image, image_rope, adaln)
        for layer in model.context_refiner:
            caption = block(layer, caption, caption_rope, None)
        unified = torch.cat([image, caption], dim=1)
        unified_rope = tuple(torch.cat(pair, dim=0) for pair in zip(image_rope, caption_rope))
        for layer in model.layers:
            unified = block(layer, unified, unified_rope, adaln)
        output = model.all_final_layer[key](unified, c=adaln)[:, :image_tokens]
        return -unpatchify(output, height, width)

    def image_positions(self, rows: int, columns: int, caption_length) -> torch.Tensor:
        """[padded image tokens, 3] position ids: patches row-major at (caption_length + 1, row,
        column), then (0, 0, 0) for the pad tokens."""
        row = torch.arange(rows).unsqueeze(1).expand(rows, columns).reshape(-1)
        column = torch.arange(columns).unsqueeze(0).expand(rows, columns).reshape(-1)
        frame = torch.full_like(row, 1) * (caption_length + 1)
        ids = torch.stack([frame, row, column], dim=-1)
        pad = ids.new_zeros(SEQUENCE_MULTIPLE, 3)
        return torch.cat([ids, pad], dim=0)[:padded_length(rows * columns)]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [S, head_dim / 2] of the rotary angles at position ids [S, axes]."""
        cosines = [getattr(self, f"cos_{axis}")[positions[:, axis]] for axis in range(self.axes)]
        sines = [getattr(self, f"sin_{axis}")[positions[:, axis]] for axis in range(self.axes)]
        return torch.cat(cosines, dim=-1), torch.cat(sines, dim=-1)


def rotary_tables(dims, lengths, theta: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per axis, cos and sin [length, dim / 2] of position x frequency: the angles diffusers'
    RopeEmbedder computes (float64 frequencies, float32 angles)."""
    cosines, sines = [], []
    for dim, length in zip(dims, lengths):
        frequencies = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), frequencies).float()
        cosines.append(angles.cos())
        sines.append(angles.sin())
    return cosines, sines


def caption_positions(length) -> torch.Tensor:
    """[length, 3] position ids of the padded caption: (1 + j, 0, 0)."""
    first = torch.arange(length) + 1
    return torch.stack([first, torch.zeros_like(first), torch.zeros_like(first)], dim=-1)


def padded_length(tokens):
    """`tokens` rounded up to a multiple of SEQUENCE_MULTIPLE."""
    return (tokens + SEQUENCE_MULTIPLE - 1) // SEQUENCE_MULTIPLE * SEQUENCE_MULTIPLE


def padded(tokens: torch.Tensor, pad_token: torch.Tensor, length) -> torch.Tensor:
    """[B, S, D] tokens followed by pad tokens up to `length` (at most 31 more), cut without a
    zero-sized tensor so that the text length stays one symbolic dim."""
    batch, _, dim = tokens.shape
    pads = pad_token.to(tokens.dtype).expand(batch, SEQUENCE_MULTIPLE, dim)
    return torch.cat([tokens, pads], dim=1)[:, :length]


def patchify(sample: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C], each patch's values ordered (row, column, channel)."""
    batch, channels, height, width = sample.shape
    patches = sample.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, -1, PATCH * PATCH * channels)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """patchify's inverse: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    batch = tokens.shape[0]
    patches = tokens.reshape(batch, height // PATCH, width // PATCH, PATCH, PATCH, -1)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, height, width)


def block(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
          adaln: torch.Tensor | None) -> torch.Tensor:
    """One ZImageTransformerBlock on a batch without padding rows (adaln None: the caption
    refiner's blocks, which have no modulation)."""
    if adaln is None:
        x = x + layer.attention_norm2(attention(layer.attention, layer.attention_norm1(x), rope))
        return x + layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(x)))
    scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln).unsqueeze(1).chunk(
        4, dim=2)
    attended = attention(layer.attention, layer.attention_norm1(x) * (1.0 + scale_msa), rope)
    x = x + gate_msa.tanh() * layer.attention_norm2(attended)
    mixed = layer.feed_forward(layer.ffn_norm1(x) * (1.0 + scale_mlp))
    return x + gate_mlp.tanh() * layer.ffn_norm2(mixed)


def attention(attn: nn.Module, x: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """ZSingleStreamAttnProcessor's self-attention with the rotary embedding in real form."""
    query, key, value = (projection(x).unflatten(-1, (attn.heads, -1))
                         for projection in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query, key = rotated(query, rope), rotated(key, rope)
    attended = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                              value.transpose(1, 2))
    return attn.to_out[0](attended.transpose(1, 2).flatten(2, 3).to(query.dtype))


def rotated(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, S, heads, head_dim] rotated pairwise (elements 2i, 2i+1 as one complex number) by
    the angles whose cos and sin [S, head_dim / 2] are given, in float32."""
    cosine, sine = (part[:, None, :] for part in rope)
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imaginary = pairs[..., 0], pairs[..., 1]
    turned = torch.stack([real * cosine - imaginary * sine, real * sine + imaginary * cosine],
                         dim=-1)
    return turned.flatten(-2).type_as(x)
