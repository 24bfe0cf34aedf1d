"""Triton python-backend model: one ONNX network run by ONNX Runtime on the CPU.

Used for `unet_cpu<i>` (one per device), `text_encoder` and `vae_decoder` on CPU machines.
Parameters (config.pbtxt): `onnx_file` (a plain name in the version directory),
`intra_op_threads`, and `batching` ("true" for dynamically batched device models: the requests
Triton hands over together run as one ONNX Runtime call).
"""
import json

import triton_python_backend_utils as pb_utils

from runtime.local_devices import ort_session, session_output_names
from triton_models.backend import (
    FaultInjection,
    answer_requests,
    file_in_version_dir,
    model_parameters,
)


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        path = file_in_version_dir(args, parameters["onnx_file"])
        self.session = ort_session(path, int(parameters.get("intra_op_threads", "1")))
        self.input_names = [tensor.name for tensor in self.session.get_inputs()]
        self.output_names = session_output_names(self.session)
        self.batching = parameters.get("batching") == "true"
        self.faults = FaultInjection(parameters)
        self.name = json.loads(args["model_config"])["name"]

    def execute(self, requests):
        self.faults.check(self.name)
        answers = answer_requests(requests, self._feeds, self._run, self.batching)
        return [_response(answer) for answer in answers]

    def _feeds(self, request):
        """The request's inputs by name, or a message naming the missing one."""
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return f"missing input {name}; this model needs {', '.join(self.input_names)}"
            feeds[name] = tensor.as_numpy()
        return feeds

    def _run(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))



def _response(answer):
    if isinstance(answer, str):  # inputs that do not fit
        return _error(answer, pb_utils.TritonError.INVALID_ARG)
    if isinstance(answer, Exception):
        # ONNX Runtime's InvalidArgument is a bad request (shapes, dtypes); anything else is a
        # fault of this device, which the caller's pool fails over
        bad_request = type(answer).__name__ == "InvalidArgument"
        code = pb_utils.TritonError.INVALID_ARG if bad_request else pb_utils.TritonError.INTERNAL
        return _error(f"ONNX Runtime: {answer}", code)
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, value) for name, value in answer.items()]
    )


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
