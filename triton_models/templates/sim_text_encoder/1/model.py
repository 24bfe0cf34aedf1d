"""Triton python-backend model `text_encoder` of the sim: label int64 [B] -> one-hot [B, 1, D]."""
import triton_python_backend_utils as pb_utils

from models.sim import SimDiffusion
from triton_models.backend import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.num_classes = int(parameters["num_classes"])

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        labels = pb_utils.get_input_tensor_by_name(request, "label")
        if labels is None:
            return _error("missing input label (int64 [B])")
        try:
            embeddings = SimDiffusion.one_hot(labels.as_numpy(), self.num_classes)
        except ValueError as error:
            return _error(str(error))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("text_embeddings", embeddings)]
        )


def _error(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
