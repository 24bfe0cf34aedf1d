"""Triton python-backend model: one ONNX network run by ONNX Runtime on the CPU.

Used for `unet_cpu<i>` (one per device), `text_encoder` and `vae_decoder` on CPU machines.
Parameters (config.pbtxt): `onnx_file` (in the version directory) and `intra_op_threads`.
"""
import triton_python_backend_utils as pb_utils

from runtime.devices import ort_session, session_output_names
from triton_models.backend import model_parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        path = version_dir(args) / parameters["onnx_file"]
        self.session = ort_session(path, int(parameters.get("intra_op_threads", "1")))
        self.input_names = [tensor.name for tensor in self.session.get_inputs()]
        self.output_names = session_output_names(self.session)

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                message = f"missing input {name}; this model needs {', '.join(self.input_names)}"
                return _error(message, pb_utils.TritonError.INVALID_ARG)
            feeds[name] = tensor.as_numpy()
        try:
            outputs = self.session.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime reports bad shapes this way
            return _error(f"ONNX Runtime: {error}", pb_utils.TritonError.INVALID_ARG)
        tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.output_names, outputs)]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
