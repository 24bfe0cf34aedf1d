"""Triton python-backend model `tokenizer`: prompts in, token ids out, as diffusers tokenizes.

TEXT (BYTES [N, 1], UTF-8; N at most 2: a prompt and its negative) -> input_ids (INT64
[N, max_length]: padded to `max_length`, truncated there, special tokens added) and DROPPED
(INT32 [N, 1]: tokens truncation dropped, so the caller can warn). `max_length` is the
encoder's token count (a parameter: CLIP's 77, the family's T5 max_sequence_length), else the
tokenizer's model_max_length. The tokenizer files (CLIP's vocab.json and merges.txt, T5's
tokenizer.json, ...) sit in the version directory's `tokenizer/`, copied from the engines by the
repository generator, and load with transformers' AutoTokenizer.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from triton_models.backend import model_parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        parameters = model_parameters(args)
        self.max_bytes = int(parameters.get("max_prompt_bytes", "2048"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir(args) / "tokenizer"),
                                                       local_files_only=True)
        self.max_length = int(parameters.get("max_length", self.tokenizer.model_max_length))

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
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length,
                             truncation=True).input_ids
        full = self.tokenizer(texts, truncation=False).input_ids
        dropped = [max(0, len(tokens) - self.max_length) for tokens in full]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", np.array(ids, dtype=np.int64)),
            pb_utils.Tensor("DROPPED", np.array(dropped, dtype=np.int32).reshape(-1, 1)),
        ])


def _error(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
