"""Tiny offline LLM-conditioned pipeline folders (Flux.2 Klein, Z-Image) and their pieces.

`qwen_tokenizer()` is a byte-level BPE trained with the `tokenizers` library on a few sentences
and wrapped as transformers' Qwen2 tokenizer (the class Qwen3 and Qwen2.5-VL folders ship), with
ChatML special tokens and a chat template of the same shape as Qwen3's: a user turn, the
assistant's generation prompt and, when `enable_thinking` is False, an empty think block. It
builds in well under a second, needs no download, and `save_pretrained` writes it as a released
folder's `tokenizer/` (tokenizer.json, tokenizer_config.json, chat_template.jinja).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"  # padding, as Qwen's tokenizers pad
THINK_TOKENS = ("<think>", "</think>")
VOCAB_SIZE = 400  # the trained vocabulary (256 bytes, merges, the special tokens)
TRAINING_TEXT = (
    "a photo of a cat sitting on a red chair in the sun",
    "a watercolor painting of a lighthouse at dusk by the sea",
    "an oil painting of a fox in a snowy forest at night",
    "a detailed drawing of an old city street with cars and boats",
    "a portrait of a young woman, very high quality, bright light",
    "blurry, low quality, dark, ugly",
    "You are a helpful assistant. Describe the image the user asks for.",
    "user assistant system",
)
# ChatML turns; the generation prompt opens the assistant's turn, and a model told not to think
# gets an empty think block there (the shape of Qwen3's own template)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@functools.cache
def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on TRAINING_TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = [END_OF_TEXT, IM_START, IM_END, *THINK_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(tokenizer.model.__getstate__())
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def qwen_tokenizer(model_max_length: int = 32768, chat_template: bool = True):
    """A Qwen2 tokenizer (byte-level BPE, ChatML special tokens, `<|endoftext|>` padding) built
    offline; `chat_template=False` leaves the chat template out (a folder that cannot be
    served with a chat-template family)."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _trained_bpe()
    tokenizer = Qwen2TokenizerFast(vocab=dict(vocab), merges=list(merges),
                                   model_max_length=model_max_length,
                                   additional_special_tokens=[IM_START, IM_END])
    tokenizer.add_tokens(list(THINK_TOKENS))
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
# the transformer's context embedder and output projection are scaled by these, so that the
# text moves the image: another prompt, or Klein's layers in reverse order, then move diffusers'
# own image by about 9/255 at most and 0.7-1.0/255 on average, beyond the parity bound
CONTEXT_GAIN = 8.0
OUTPUT_GAIN = 4.0


def flux2_klein_folder(path: Path, seed: int = 0, is_distilled: bool = False) -> Path:
    """A Flux2KleinPipeline: a 28-layer Qwen3ForCausalLM 16 wide (Klein stacks layers 9, 18
    and 27: 48-wide states) over qwen_tokenizer(), a Flux2Transformer2DModel with 16 patchified
    channels (one double, one single block; no guidance embedding, as Klein), an
    AutoencoderKLFlux2 of 4 latent channels (factor 8: 16 pixels per patchified latent) whose
    batch-norm statistics are random (not 0 and 1), and Klein's flow-matching scheduler."""
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline(
        scheduler=_flux2_scheduler(),
        vae=_flux2_vae(seed + 2),
        text_encoder=_qwen3(seed, layers=28, hidden_size=16),
        tokenizer=qwen_tokenizer(),
        transformer=_flux2_transformer(seed + 1, guidance_embeds=False),
        is_distilled=is_distilled,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return Path(path)


def flux2_dev_folder(path: Path, seed: int = 0) -> Path:
    """A Flux2Pipeline (dev): a 31-layer Mistral3ForConditionalGeneration 16 wide (dev stacks
    layers 10, 20 and 30), mistral_tokenizer() in the place of the PixtralProcessor (which needs
    torchvision), the Klein folder's transformer with a guidance embedding, VAE and scheduler."""
    from diffusers import Flux2Pipeline

    pipeline = Flux2Pipeline(
        scheduler=_flux2_scheduler(),
        vae=_flux2_vae(seed + 2),
        text_encoder=mistral3(seed),
        tokenizer=mistral_tokenizer(),
        transformer=_flux2_transformer(seed + 1, guidance_embeds=True),
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _flux2_transformer(seed: int, *, guidance_embeds: bool):
    """A Flux2Transformer2DModel with 16 patchified channels over 48-wide text states (three
    16-wide layers stacked), one double and one single block, text-sensitive (the gains)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    with torch.no_grad():
        transformer.context_embedder.weight.mul_(CONTEXT_GAIN)
        transformer.proj_out.weight.mul_(OUTPUT_GAIN)
    return transformer


def _flux2_scheduler():
    """The flow-matching scheduler Flux.2's folders ship (shifted by the pipelines' mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _qwen3(seed: int, *, layers: int, hidden_size: int, with_head: bool = True):
    """A tiny Qwen3ForCausalLM over qwen_tokenizer()'s vocabulary (without the head: the
    Qwen3Model that Z-Image folders ship)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(qwen_tokenizer()), hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return (Qwen3ForCausalLM if with_head else Qwen3Model)(config).eval()


def _flux2_vae(seed: int):
    """A 4-block AutoencoderKLFlux2 (factor 8), 4 latent channels, random batch-norm stats."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae.eval()


# Z-Image's caption embedder is scaled by this, so that the text moves the image: without the
# negative prompt, with the last hidden state instead of the one before it, with the states
# padded to 512 tokens instead of cut to the prompt's, or without the chat template, diffusers'
# own image moves by 69/255 or more at most (tests/test_zimage_serving.py shows it)
ZIMAGE_TEXT_GAIN = 8.0
ZIMAGE_TEXT_WIDTH = 24  # the tiny Qwen3's hidden size: the transformer's cap_feat_dim


def zimage_transformer(seed: int = 0):
    """A ZImageTransformer2DModel 32 wide (2 heads of 16 = rotary axes 8 + 4 + 4), one refiner
    layer per stream and two main layers over 16 latent channels, with random pad tokens (the
    caption and patch padding must matter) and a scaled caption embedder."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=ZIMAGE_TEXT_WIDTH,
        axes_dims=[8, 4, 4], axes_lens=[1024, 32, 32])
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
        transformer.cap_embedder[1].weight.mul_(ZIMAGE_TEXT_GAIN)
    return transformer.eval()


def zimage_folder(path: Path, seed: int = 0, turbo: bool = False) -> Path:
    """A ZImagePipeline: a 3-layer Qwen3Model 24 wide over qwen_tokenizer(), zimage_transformer,
    an AutoencoderKL of 16 latent channels with Z-Image's scaling and shift factors (factor 8),
    and a flow-matching scheduler: shifted by resolution (`mu`), or with turbo=True Z-Image-
    Turbo's fixed shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers_folders import _vae

    dynamic = {} if turbo else {"base_shift": 0.5, "max_shift": 1.15,
                                "base_image_seq_len": 256, "max_image_seq_len": 4096}
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=not turbo, **dynamic),
        vae=_vae(seed + 2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_qwen3(seed, layers=3, hidden_size=ZIMAGE_TEXT_WIDTH, with_head=False),
        tokenizer=qwen_tokenizer(),
        transformer=zimage_transformer(seed + 1),
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return Path(path)


# Qwen-Image's tiny transformer listens to its text through these gains on its blocks' text
# value projections (the text's only way into the image stream: a gain before the blocks' layer
# norms would cancel) and its output projection: another prompt moves diffusers' own image by
# 26/255 at most, dropping the negative prompt by 19/255; without the template's 34 dropped
# tokens or the norm rescale of true CFG it moves beyond the parity bound too
# (tests/test_qwenimage_serving.py shows it)
QWEN_IMAGE_TEXT_GAIN = 16.0
QWEN_IMAGE_OUTPUT_GAIN = 4.0
QWEN_IMAGE_TEXT_WIDTH = 32  # the tiny Qwen2.5-VL's hidden size: the joint attention width
# the tiny VAE's per-channel statistics: far from 0 and 1, so that decoding without them fails
QWEN_IMAGE_LATENTS_MEAN = (0.6, -0.4, 0.3, -0.8)
QWEN_IMAGE_LATENTS_STD = (2.0, 0.6, 1.5, 0.8)


def qwen_image_folder(path: Path, seed: int = 0) -> Path:
    """A QwenImagePipeline: a 2-layer Qwen2_5_VLForConditionalGeneration 32 wide (a 1-block
    vision tower 16 wide) over qwen_tokenizer(), a QwenImageTransformer2DModel of 4 latent
    channels (16 packed; 2 blocks, 2 heads of 16 = rotary axes 4 + 6 + 6) with scaled text
    value and output projections, an AutoencoderKLQwenImage of factor 2 with QWEN_IMAGE_LATENTS_MEAN /
    _STD, and Qwen-Image's released scheduler settings (exponential shift by resolution,
    terminal sigma 0.02)."""
    import math

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=QWEN_IMAGE_TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6))
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(QWEN_IMAGE_TEXT_GAIN)
        transformer.proj_out.weight.mul_(QWEN_IMAGE_OUTPUT_GAIN)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=list(QWEN_IMAGE_LATENTS_MEAN), latents_std=list(QWEN_IMAGE_LATENTS_STD))
    shift = math.log(3.0)
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=shift,
            max_shift=shift, base_image_seq_len=256, max_image_seq_len=8192,
            shift_terminal=0.02, time_shift_type="exponential"),
        vae=vae.eval(),
        text_encoder=_qwen25_vl(seed),
        tokenizer=qwen_tokenizer(),
        transformer=transformer.eval(),
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _qwen25_vl(seed: int):
    """A tiny Qwen2_5_VLForConditionalGeneration over qwen_tokenizer()'s vocabulary: 2 text
    layers QWEN_IMAGE_TEXT_WIDTH wide (multimodal rotary sections 2 + 3 + 3 of its 16-wide
    heads) and a 1-block vision tower, which Qwen-Image never runs."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    special = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    text = {"vocab_size": len(tokenizer), "hidden_size": QWEN_IMAGE_TEXT_WIDTH,
            "intermediate_size": 2 * QWEN_IMAGE_TEXT_WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": special[0],
            "eos_token_id": special[1]}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": QWEN_IMAGE_TEXT_WIDTH, "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
MISTRAL_TOKENS = ("<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                  "[/SYSTEM_PROMPT]", "[IMG]")
# the shape of Mistral Small 3's chat template: BOS, the system prompt, user turns; a message's
# content is a string or a list of text parts
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'][0]['text'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' + text + '[/INST]' }}{%- endif -%}"
    "{%- endfor -%}"
)


def mistral_tokenizer():
    """A byte-level BPE (qwen_tokenizer's merges) with Mistral's special tokens, a BOS-adding
    post-processor and a Mistral-shaped chat template, as transformers' fast tokenizer. (A
    Flux.2 dev folder ships a PixtralProcessor around its tokenizer, which needs torchvision:
    not installed here, so the tests use the tokenizer in the processor's place.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _trained_bpe()
    vocab = dict(vocab)
    for token in MISTRAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_TOKENS[3:]))
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def mistral3(seed: int = 0, *, layers: int = 31, hidden_size: int = 16):
    """A tiny Mistral3ForConditionalGeneration (a one-layer Pixtral vision tower, a
    `layers`-deep Mistral language model) over mistral_tokenizer()'s vocabulary."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    tokenizer = mistral_tokenizer()
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        pad_token_id=tokenizer.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=32, patch_size=16, head_dim=8)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()
