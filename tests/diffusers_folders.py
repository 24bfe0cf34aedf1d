"""Tiny random-weight diffusers pipeline folders (SD, SD inpainting, SDXL, SD3 with and without
T5, SD3.5, Flux-dev and Flux-schnell), built from configs.

Each builder seeds torch, builds every component from a small config, and writes the pipeline
with diffusers' own `save_pretrained`, so that `<Pipeline>.from_pretrained(folder)` loads it
back offline and `driffusion serve --model folder` exports it. The tokenizers are the real CLIP
BPE tokenizer (`models.clip_tokenizer`), so prompts tokenize as with released checkpoints.

Sizes are chosen so that a folder builds and exports in seconds on a CPU: 64-pixel images from
8x8 latents (a 4-block VAE), CLIP encoders of 2 layers and widths of a few dozen. The two
encoders of SDXL and SD3 have different widths, so that a swapped or misread encoder output
fails on its shape instead of passing silently. T5 encoders are 2-layer gated-GELU T5 v1.1
models (as SD3 and Flux ship) over about 150 Unigram pieces, tokenized by a T5 tokenizer
built offline with the `tokenizers` library (`t5_tokenizer`); T5 max lengths stay the families'
(256 or 512 tokens).

Random tiny transformers largely ignore their text states; the SD3-with-T5 and Flux folders
scale the transformer's context embedder (`CONTEXT_GAIN`) so that the T5 states move the image
(tests/test_export_t5_flux.py shows that zeroing them moves diffusers' own image beyond the
parity bound), so a served pipeline that drops T5 cannot pass a parity test.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, write_clip_tokenizer

IMAGE_SIZE = 64  # pixels: 8x8 latents under a 4-block (factor 8) VAE
LATENT_SIZE = 8
CONTEXT_GAIN = 8.0  # the SD3/Flux context embedder's weights are scaled by this
T5_VOCAB_WORDS = [
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for",
    "is", "are", "photo", "painting", "picture", "drawing", "portrait", "landscape", "cat",
    "dog", "fox", "bird", "horse", "lighthouse", "house", "tree", "forest", "mountain",
    "river", "sea", "sky", "sun", "moon", "star", "city", "street", "car", "boat", "red",
    "green", "blue", "yellow", "white", "black", "orange", "purple", "dusk", "dawn", "night",
    "day", "snowy", "rainy", "sunny", "watercolor", "oil", "detailed", "blurry", "low", "high",
    "quality", "very", "small", "large", "old", "young", "beautiful", "dark", "bright",
]
SD_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
# the scheduler settings the released SD 1.x / 2.x / SDXL checkpoints ship
SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}


def sd_folder(path: Path, prediction_type: str = "epsilon", scheduler: str = "PNDMScheduler",
              seed: int = 0) -> Path:
    """A StableDiffusionPipeline (one CLIPTextModel, UNet, AutoencoderKL) saved at `path`."""
    from diffusers import StableDiffusionPipeline

    text_encoder = _clip(seed, hidden_size=32)
    unet = _unet(seed + 1, cross_attention_dim=32)
    pipeline = StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=_sd_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, path)


def sd_inpaint_folder(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionInpaintPipeline: its UNet takes 9 channels (latents, mask, masked-image
    latents), as runwayml's and stabilityai's inpainting checkpoints do; DDIM."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline = StableDiffusionInpaintPipeline(
        vae=_vae(seed + 2),
        text_encoder=_clip(seed, hidden_size=32),
        tokenizer=_tokenizer(),
        unet=_unet(seed + 1, cross_attention_dim=32, in_channels=9),
        scheduler=_sd_scheduler("DDIMScheduler", "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, path)


def sdxl_folder(path: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A StableDiffusionXLPipeline: CLIPTextModel (32 wide) + CLIPTextModelWithProjection (48
    wide, projection 24), a `text_time` UNet with 6 time ids of 8, EulerDiscreteScheduler as
    SDXL base ships it; tokenizer_2 pads with "!" like SDXL's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    time_dim, projection = 8, 24
    unet = _unet(
        seed + 2,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection + 6 * time_dim,
        use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(
        **{key: SD_SCHEDULER_CONFIG[key] for key in ("beta_start", "beta_end", "beta_schedule",
                                                     "num_train_timesteps", "steps_offset")},
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(seed + 3),
        text_encoder=_clip(seed, hidden_size=32),
        text_encoder_2=_clip(seed + 1, hidden_size=48, projection_dim=projection),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    return _save(pipeline, path)


def sd3_folder(path: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline without T5: two CLIPTextModelWithProjection (32 and 16 wide,
    projections 32 and 24), an SD3Transformer2DModel whose joint attention width (64) exceeds
    the CLIP states' (48) so that padding matters, a VAE with SD3's shift and scaling factors
    and FlowMatchEulerDiscreteScheduler(shift=3.0)."""
    return _sd3(path, seed, with_t5=False)


def sd3_t5_folder(path: Path, seed: int = 0) -> Path:
    """sd3_folder's pipeline with T5: a T5EncoderModel as `text_encoder_3` (d_model 64, the
    transformer's joint attention width, as SD3 requires) and its tokenizer as `tokenizer_3`;
    the context embedder is scaled so that the T5 states matter."""
    return _sd3(path, seed, with_t5=True)


def sd35_folder(path: Path, seed: int = 0) -> Path:
    """An SD3.5-medium-style pipeline with T5: the transformer has RMS qk-norm and dual
    attention in its first layer (`qk_norm="rms_norm"`, `dual_attention_layers=(0,)`)."""
    return _sd3(path, seed, with_t5=True, qk_norm="rms_norm", dual_attention_layers=(0,))


def flux_folder(path: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """A FluxPipeline: CLIPTextModel (32 wide; its pooled output feeds the transformer),
    T5EncoderModel `text_encoder_2` (d_model 32), a FluxTransformer2DModel with 16 latent
    channels (64 packed), one double and one single block; the VAE carries Flux's scaling and
    shift factors. guidance_embeds=True is Flux-dev (its scheduler shifts by resolution, as
    Flux-dev ships it); False is Flux-schnell (shift 1.0, no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    _scale_context(transformer)
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed + 3, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(seed, hidden_size=32),
        tokenizer=_tokenizer(),
        text_encoder_2=_t5(seed + 1, d_model=32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return _save(pipeline, path)


def sd_lora_file(folder: Path, path: Path, seed: int = 0, gain: float = 3.0) -> Path:
    """A LoRA for the SD folder's UNet in diffusers' format (`pytorch_lora_weights.safetensors`),
    random and scaled by `gain` so that it visibly changes the images. (Text-encoder LoRAs load
    through transformers' PEFT integration, which asks for a PEFT release newer than PyPI's.)"""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = load_pipeline(folder)
    torch.manual_seed(seed)
    pipeline.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = get_peft_model_state_dict(pipeline.unet)
    layers = {key: value * gain if "lora_B" in key else value for key, value in state.items()}
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers)
    return path / "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------
# components


def _sd3(path: Path, seed: int, *, with_t5: bool, **transformer_options) -> Path:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 24,
        pos_embed_max_size=16,
        **transformer_options,
    )
    if with_t5:
        _scale_context(transformer)
    vae = _vae(seed + 3, latent_channels=16, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=_clip(seed, hidden_size=32, projection_dim=32),
        tokenizer=_tokenizer(),
        text_encoder_2=_clip(seed + 1, hidden_size=16, projection_dim=24),
        tokenizer_2=_tokenizer(pad_token="!"),
        text_encoder_3=_t5(seed + 4, d_model=64) if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None,
    )
    return _save(pipeline, path)


def _scale_context(transformer) -> None:
    """Make the text states matter to a random transformer: scale its context embedder."""
    with torch.no_grad():
        transformer.context_embedder.weight.mul_(CONTEXT_GAIN)


def _t5(seed: int, *, d_model: int):
    """A 2-layer T5 v1.1 encoder (gated GELU, as SD3's and Flux's T5-XXL) over t5_tokenizer's
    vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer built offline: a Unigram model over T5_VOCAB_WORDS, single letters, digits
    and punctuation (metaspace pre-tokenizer, "</s>" appended; <pad>=0, </s>=1, <unk>=2 as T5
    numbers them), as transformers' T5 tokenizer saving tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    words = ["▁" + word for word in dict.fromkeys(T5_VOCAB_WORDS) if len(word) > 1]
    pieces = [*words, *("▁" + letter for letter in letters), *letters,
              *(str(digit) for digit in range(10)), "▁", ",", ".", "!", "?", "'", "-"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -1.0 - rank / 100) for rank, piece in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=model_max_length)



def _clip(seed: int, *, hidden_size: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder over the full CLIP vocabulary; with a projection (pooled
    `text_embeds`) when `projection_dim` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_class(config).eval()


def _unet(seed: int, **overrides):
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        **overrides,
    }
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def _vae(seed: int, latent_channels: int = 4, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16),
        sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **overrides,
    ).eval()


def _tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer(Path(directory), model_max_length=77, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def _sd_scheduler(class_name: str, prediction_type: str):
    import diffusers

    if class_name not in SD_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SD_SCHEDULERS)}; got {class_name}")
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})


def _save(pipeline, path: Path) -> Path:
    path = Path(path)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def load_pipeline(path: Path):
    """The folder's own diffusers pipeline class, loaded offline in fp32 on the CPU.

    Components saved as null (SD3's absent T5) are passed as None: diffusers does not accept a
    folder that leaves out a component its pipeline's __init__ requires.
    """
    import json

    import diffusers

    index = json.loads((Path(path) / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    absent = {key: None for key, value in index.items()
              if not key.startswith("_") and isinstance(value, list) and None in value}
    pipeline = pipeline_class.from_pretrained(path, local_files_only=True, **absent)
    pipeline.to(torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
