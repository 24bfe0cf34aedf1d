"""The bundled flow-matching reference model: a small Stable Diffusion 3 pipeline of 8x8 digits.

`--model reference-flow` everywhere means this model. `models/assets/reference_flow/` is an
ordinary diffusers folder (`model_index.json`, StableDiffusion3Pipeline without T5:
text_encoder_3 and tokenizer_3 are null): the real CLIP BPE tokenizer twice, two small
`CLIPTextModelWithProjection` encoders (16 and 8 wide) trained jointly with an
`SD3Transformer2DModel` (an MMDiT, 2x2 patches) by rectified flow on the first reference's
digits and prompts (models/reference.py), that model's one-block `AutoencoderKL` with SD3's
shift and scaling factors set to standardise its latents, and `FlowMatchEulerDiscreteScheduler`.
`StableDiffusion3Pipeline.from_pretrained(ASSET_DIR, text_encoder_3=None, tokenizer_3=None)`
runs it offline; it is served like any other diffusers folder. The first reference's evaluation
classifier judges its samples; `training.json` is the training record.

SD3 pipelines without T5 append 256 zero "T5" tokens to the 77 CLIP tokens. Those tokens are
identical at every layer (no positions, the same input), so attending to 256 of them equals
attending to one with its attention logit raised by log 256: `fold_t5_tokens` makes the
transformer compute that way, which training and in-process evaluation use (4x cheaper).
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models import reference, tensors
from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE
from models.reference import (
    IMAGE_CHANNELS,
    LATENT_CHANNELS,
    MAX_TOKENS,
    MODEL_INDEX,
    SAMPLE_SIZE,
    DigitClassifier,
    load_classifier,
)

PRESET = "reference-flow"
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "reference_flow"
# what the served pipeline is made of (the training record is not part of it)
PIPELINE_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                       "transformer", "vae")
ABSENT_COMPONENTS = {"text_encoder_3": None, "tokenizer_3": None}  # no T5

TEXT_WIDTHS = (16, 8)  # hidden = projection width of text_encoder and text_encoder_2
JOINT_ATTENTION_DIM = 32  # > 16 + 8: the CLIP states are zero-padded, as in SD3
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": SAMPLE_SIZE,
    "patch_size": 2,  # 16 image tokens: as good as 64 in a pilot, 1.5x cheaper to train
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": JOINT_ATTENTION_DIM,
    "caption_projection_dim": 64,  # = heads x head dim
    "pooled_projection_dim": sum(TEXT_WIDTHS),
    "pos_embed_max_size": SAMPLE_SIZE // 2,
}
# shift 1: no resolution shift at 8x8 (SD3's 3.0 is for 1024-pixel images)
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}


def text_encoder_config(width: int) -> dict[str, Any]:
    """A 2-layer CLIP text encoder `width` wide over the full CLIP vocabulary."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": width,
        "hidden_act": "quick_gelu",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": EOS_TOKEN_ID,
    }


def build_text_encoders() -> tuple[nn.Module, nn.Module]:
    """Freshly initialised text_encoder and text_encoder_2 (CLIPTextModelWithProjection; about
    0.80 M and 0.40 M parameters, nearly all of them token embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    first, second = (CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_config(width)))
                     for width in TEXT_WIDTHS)
    return first, second


def build_transformer(config: dict[str, Any] = TRANSFORMER_CONFIG) -> nn.Module:
    """A freshly initialised SD3Transformer2DModel (about 0.58 M parameters), its adaptive
    norms' modulation and its output projection zero (DiT's adaLN-Zero: every block starts as
    the identity, which trains faster than diffusers' default initialisation)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

    transformer = SD3Transformer2DModel(**config)
    modulations = [module.linear for module in transformer.modules()
                   if isinstance(module, (AdaLayerNormZero, AdaLayerNormContinuous))]
    for layer in [*modulations, transformer.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return transformer


def sd3_t5_tokens() -> int:
    """The zero T5 tokens diffusers' StableDiffusion3Pipeline appends (max_sequence_length)."""
    from diffusers import StableDiffusion3Pipeline

    return int(inspect.signature(StableDiffusion3Pipeline.__call__)
               .parameters["max_sequence_length"].default)


class FoldedT5Attention:
    """SD3 joint attention in which the last context token stands for `copies` identical ones.

    Equal to diffusers' JointAttnProcessor2_0 over the unfolded sequence: `copies` equal keys
    and values weigh as one key whose attention logit is raised by log(copies).
    """

    def __init__(self, copies: int) -> None:
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None or attn.norm_q is not None:
            raise NotImplementedError("FoldedT5Attention serves joint attention without qk norm")
        image_tokens = hidden_states.shape[1]

        def heads(image_proj: nn.Module, context_proj: nn.Module) -> torch.Tensor:
            joint = torch.cat([image_proj(hidden_states), context_proj(encoder_hidden_states)], 1)
            return joint.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query = heads(attn.to_q, attn.add_q_proj)
        key = heads(attn.to_k, attn.add_k_proj)
        value = heads(attn.to_v, attn.add_v_proj)
        bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[0, -1] = self.log_copies
        joint = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        joint = joint.transpose(1, 2).flatten(2)
        image, context = joint[:, :image_tokens], joint[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        return image, context if attn.context_pre_only else attn.to_add_out(context)


def fold_t5_tokens(transformer: nn.Module, copies: int) -> None:
    """Make `transformer` take the `copies` zero T5 tokens as one (see FoldedT5Attention)."""
    transformer.set_attn_processor(FoldedT5Attention(copies))


def encode_prompts(pipeline, prompts: list[str], t5_tokens: int) -> dict[str, torch.Tensor]:
    """The transformer's conditioning as diffusers' StableDiffusion3Pipeline encodes prompts
    (gradients flow into the encoders): encoder_hidden_states [N, 77 + t5_tokens, 32] and
    pooled_projections [N, 24]."""
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=torch.device("cpu"),
        do_classifier_free_guidance=False, max_sequence_length=t5_tokens)
    return {tensors.ENCODER_HIDDEN_STATES: embeds, tensors.POOLED_PROJECTIONS: pooled}


@dataclass
class FlowReferenceModel:
    """The loaded flow reference pipeline in eval mode and the evaluation classifier.

    `t5_tokens` is how many zero T5 tokens the conditioning carries: diffusers' 256 (what the
    exported transformer takes), or 1 when the transformer folds them (`fold_t5_tokens`).
    """

    pipeline: Any  # diffusers StableDiffusion3Pipeline
    classifier: DigitClassifier
    scheduler_config: dict[str, Any]
    t5_tokens: int
    preset: ClassVar[str] = PRESET
    denoiser_network: ClassVar[str] = "transformer"  # the engine that runs the denoiser

    @property
    def transformer(self) -> nn.Module:
        return self.pipeline.transformer

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents [batch, 1, 8, 8] (flow matching starts from the noise)."""
        shape = (batch, self.latent_channels, self.sample_size, self.sample_size)
        return torch.randn(shape, generator=generator)

    @torch.no_grad()
    def denoiser_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's conditioning inputs for prompts, by tensor name."""
        return encode_prompts(self.pipeline, prompts, self.t5_tokens)

    @torch.no_grad()
    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor,
                **conditioning: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for latents `sample` at `timestep` (sigma x 1000)."""
        return self.transformer(hidden_states=sample, timestep=timestep, return_dict=False,
                                **conditioning)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB images [N, 3, 8, 8] in [-1, 1] (unclipped) of latents [N, 1, 8, 8], as SD3 does."""
        vae = self.pipeline.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised latents [N, 1, 8, 8] (posterior means) of gray or RGB images."""
        vae = self.pipeline.vae
        if images.shape[1] == 1:
            images = images.expand(-1, IMAGE_CHANNELS, -1, -1)
        mean = vae.encode(images).latent_dist.mean
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def load_pipeline(asset_dir: Path = ASSET_DIR):
    """diffusers' StableDiffusion3Pipeline of the folder, offline, fp32 on the CPU."""
    from diffusers import StableDiffusion3Pipeline

    check_assets(asset_dir)
    pipeline = StableDiffusion3Pipeline.from_pretrained(asset_dir, local_files_only=True,
                                                        **ABSENT_COMPONENTS)
    pipeline.set_progress_bar_config(disable=True)
    for network in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.transformer,
                    pipeline.vae):
        network.eval().requires_grad_(False)
    return pipeline


def load_flow_reference(fold: bool = False, asset_dir: Path = ASSET_DIR) -> FlowReferenceModel:
    """The committed flow reference and the evaluation classifier; with `fold`, the transformer
    folds the zero T5 tokens into one (exactly, and 4x cheaper in-process)."""
    pipeline = load_pipeline(asset_dir)
    t5_tokens = sd3_t5_tokens()
    if fold:
        fold_t5_tokens(pipeline.transformer, t5_tokens)
    scheduler = json.loads((asset_dir / "scheduler" / "scheduler_config.json").read_text())
    return FlowReferenceModel(pipeline, load_classifier(), scheduler, 1 if fold else t5_tokens)


def check_assets(asset_dir: Path = ASSET_DIR) -> None:
    """FileNotFoundError unless `asset_dir` holds the pipeline folder."""
    needed = [asset_dir / MODEL_INDEX, *(asset_dir / name for name in PIPELINE_COMPONENTS)]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"flow reference model incomplete, missing: {', '.join(missing)}; run "
            "`make train-reference-flow`")


def pipeline_files(asset_dir: Path = ASSET_DIR) -> list[Path]:
    """Every file of the diffusers pipeline folder (not the training record)."""
    return reference.pipeline_files(asset_dir, PIPELINE_COMPONENTS)
