"""Triton python-backend model `tokenizer`: prompts in, token ids out, as diffusers tokenizes.

TEXT (BYTES [N, 1], UTF-8; N at most 2: a prompt and its negative) -> input_ids (INT64
[N, max_length]: padded on the right to `max_length`, truncated there, special tokens added),
attention_mask (INT64 [N, max_length]: 1 for the prompt's tokens, 0 for padding) and DROPPED
(INT32 [N, 1]: tokens truncation dropped, so the caller can warn). `max_length` is the
encoder's token count (a parameter: CLIP's 77, the family's T5 or LLM max_sequence_length),
else the tokenizer's model_max_length; `template` is the encoder's prompt template (an LLM
encoder's chat template or format string; models/prompt_tokens.py). The tokenizer files (CLIP's
vocab.json and merges.txt, T5's or an LLM's tokenizer.json, a chat template, ...) sit in the
version directory's `tokenizer/`, copied from the engines by the repository generator, and load
with transformers' AutoTokenizer.
"""
import json

import triton_python_backend_utils as pb_utils

from models.prompt_tokens import check_template, tokenize
from triton_models.backend import model_parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        parameters = model_parameters(args)
        self.max_bytes = int(parameters.get("max_prompt_bytes", "2048"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir(args) / "tokenizer"),
                                                       local_files_only=True)
        self.max_length = int(parameters.get("max_length", self.tokenizer.model_max_length))
        self.template = parameters.get("template", "")
        check_template(self.tokenizer, self.template, json.loads(args["model_config"])["name"])

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
        if tensor is None:
            return _error("missing input TEXT (BYTES [N, 1])")
        texts = []
        for raw in tensor.as_numpy().reshape(-1):
            raw = raw if isinstance(raw, bytes) else str(raw).encode()
            if len(raw) > self.max_bytes:
                return _error(f"TEXT: at most {self.max_bytes} bytes; got {len(raw)}")
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return _error("TEXT: must be UTF-8")
        tokens = tokenize(self.tokenizer, texts, self.max_length, self.template)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", tokens.input_ids),
            pb_utils.Tensor("attention_mask", tokens.attention_mask),
            pb_utils.Tensor("DROPPED", tokens.dropped.reshape(-1, 1)),
        ])


def _error(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
