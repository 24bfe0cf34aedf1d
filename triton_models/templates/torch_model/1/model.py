"""Triton python-backend model: a torch engine (a denoiser or a text encoder) on GPU i, no TensorRT.

Used for `unet_gpu<i>` and, with `--backend torch`, `text_encoder*`: the network
(engines/torch_build.py) runs at its recorded precision (FP16, or BF16 for SD3/Flux transformers
and T5/LLM encoders) on `cuda:<gpu>` with a CUDA graph per (batch, input shapes, dtypes),
captured on first use, and eager where shapes are dynamic, a capture fails or the repository
asks for none (text encoders); without any GPU, FP32 eager on the CPU. Floating inputs and
outputs stay FP32 on the wire; inputs and outputs are the config's, by name (a denoiser's
sample/timestep/... -> out_sample, an encoder's input_ids/attention_mask -> text_embeddings...).
Parameters (config.pbtxt): `torch_file` (a plain name in the version directory), `gpu`,
`precision` (the manifest's: fp16/bf16/fp32 on the GPU), `cuda_graphs`, `max_graphs`,
`intra_op_threads` (CPU), `batching` ("true": the requests Triton hands over together run as one
call), `fail_calls`.
Inputs and outputs carry the shared tensor names; a request whose inputs do not fit answers
INVALID_ARG, a failure of the network (or an injected fault) INTERNAL.
"""
import json

import triton_python_backend_utils as pb_utils

from triton_models.backend import (
    FaultInjection,
    answer_requests,
    file_in_version_dir,
    model_parameters,
)
from triton_models.torch_device import (
    DEFAULT_MAX_GRAPHS,
    BadInput,
    check_feeds,
    config_tensors,
    load_runner,
)


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = config_tensors(config, "input")
        self.runner = load_runner(
            file_in_version_dir(args, parameters["torch_file"]),
            gpu=int(parameters.get("gpu", "0")),
            precision=parameters.get("precision", "fp16"),
            cuda_graphs=parameters.get("cuda_graphs", "true") == "true",
            outputs=config_tensors(config, "output"),
            threads=int(parameters.get("intra_op_threads", "1")),
            max_graphs=int(parameters.get("max_graphs", DEFAULT_MAX_GRAPHS)),
        )
        self.batching = parameters.get("batching") == "true"
        self.faults = FaultInjection(parameters)
        pb_utils.Logger.log_info(f"{self.name}: {self.runner.describe()}")

    def execute(self, requests):
        self.faults.check(self.name)
        answers = answer_requests(requests, self._feeds, self.runner, self.batching)
        return [_response(answer) for answer in answers]

    def _feeds(self, request):
        """The request's inputs by name, or a message saying which one does not fit."""
        feeds = {}
        for tensor in self.inputs:
            value = pb_utils.get_input_tensor_by_name(request, tensor.name)
            if value is not None:
                feeds[tensor.name] = value.as_numpy()
        try:
            check_feeds(feeds, self.inputs)
        except BadInput as error:
            return str(error)
        return feeds



def _response(answer):
    if isinstance(answer, str):  # inputs that do not fit
        return _error(answer, pb_utils.TritonError.INVALID_ARG)
    if isinstance(answer, Exception):
        # inputs that do not fit are the request's fault; anything else is this device's,
        # which the caller's pool fails over
        bad_request = isinstance(answer, BadInput)
        code = pb_utils.TritonError.INVALID_ARG if bad_request else pb_utils.TritonError.INTERNAL
        return _error(f"torch: {type(answer).__name__}: {answer}", code)
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, value) for name, value in answer.items()]
    )


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
