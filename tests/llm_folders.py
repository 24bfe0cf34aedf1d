"""Tiny offline pieces of LLM-conditioned pipeline folders (Flux.2, Z-Image, Qwen-Image).

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
