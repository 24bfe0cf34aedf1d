"""Prompts -> token ids and attention masks, as each family's diffusers pipeline tokenizes them.

One definition for the served tokenizer model (triton_models/templates/tokenizer) and the tests:
the encoder's prompt template (`TextEncoder.template`: none, the tokenizer's chat template with
or without thinking, or a format string with one "{}"), then padding to `max_length` on the
right, truncation there, and the count of tokens truncation dropped, so the caller can warn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.pipeline_spec import CHAT_TEMPLATE, CHAT_THINKING_TEMPLATE


@dataclass(frozen=True)
class Tokens:
    """Token ids and attention masks [N, max_length] (int64), tokens dropped per text [N]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    dropped: np.ndarray


def check_template(tokenizer: Any, template: str, component: str = "tokenizer") -> None:
    """ValueError naming `component` if the tokenizer cannot apply `template`."""
    if template in (CHAT_TEMPLATE, CHAT_THINKING_TEMPLATE):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{component}: the tokenizer has no chat template (chat_template."
                             "jinja or tokenizer_config.json's chat_template), which this "
                             "family's prompts are formatted with")
    elif template and template.count("{}") != 1:
        raise ValueError(f"{component}: prompt template {template!r} must hold exactly one "
                         "\"{}\" (where the prompt goes)")


def templated(tokenizer: Any, text: str, template: str) -> str:
    """The prompt as the encoder reads it: in the tokenizer's chat template as a user turn
    followed by the assistant's generation prompt, in a format string, or as it is."""
    if template in (CHAT_TEMPLATE, CHAT_THINKING_TEMPLATE):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=template == CHAT_THINKING_TEMPLATE)
    return template.format(text) if template else text


def system_template(tokenizer: Any, system_message: str) -> str:
    """A format string of the tokenizer's chat template applied to a system message and one
    user turn (the prompt's place is "{}"), without a generation prompt: how Flux2Pipeline
    formats its prompts, fixed at export so that serving needs no chat-template call."""
    marker = "\ue000"  # a private-use character no template or system message holds
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": system_message}]},
         {"role": "user", "content": [{"type": "text", "text": marker}]}],
        tokenize=False, add_generation_prompt=False)
    if rendered.count(marker) != 1:
        raise ValueError("the chat template does not place the user's text exactly once")
    escaped = rendered.replace("{", "{{").replace("}", "}}")
    return escaped.replace(marker, "{}")


def tokenize(tokenizer: Any, texts: list[str], max_length: int, template: str = "") -> Tokens:
    """Token ids and masks of `texts` padded on the right to `max_length` and truncated there.
    A formatted prompt that already starts with the BOS token gets no special tokens added
    (as transformers' processors tokenize their chat templates)."""
    formatted = [templated(tokenizer, text, template) for text in texts]
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and all(text.startswith(bos) for text in formatted))
    encoded = tokenizer(formatted, padding="max_length", max_length=max_length,
                        truncation=True, add_special_tokens=special)
    full = tokenizer(formatted, truncation=False, add_special_tokens=special).input_ids
    dropped = [max(0, len(tokens) - max_length) for tokens in full]
    return Tokens(np.array(encoded.input_ids, dtype=np.int64),
                  np.array(encoded.attention_mask, dtype=np.int64),
                  np.array(dropped, dtype=np.int32))
