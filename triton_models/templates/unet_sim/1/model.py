"""Triton python-backend model `unet_sim`: the closed-form diffusion model with a set latency.

Each call takes `latency_ms` + `latency_per_item_ms` x rows of wall time in total (it sleeps
for what the closed-form evaluation did not use), so a pool's orchestration can be measured
without compute. One instance is one simulated device; the instance count is the device count.
"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_models.backend import model_parameters, version_dir
from triton_models.sim import SimDiffusion

INPUTS = ("sample", "timestep", "encoder_hidden_states")


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.model = SimDiffusion(
            np.load(version_dir(args) / "alphas_cumprod.npy"),
            num_classes=int(parameters["num_classes"]),
            sample_shape=tuple(int(d) for d in parameters["sample_shape"].split(",")),
        )
        self.latency_s = float(parameters["latency_ms"]) / 1000
        self.per_row_s = float(parameters["latency_per_item_ms"]) / 1000

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        start = time.perf_counter()
        tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS]
        if any(tensor is None for tensor in tensors):
            return _error(f"unet_sim needs inputs {', '.join(INPUTS)}")
        sample, timestep, context = (tensor.as_numpy() for tensor in tensors)
        try:
            output = self.model.denoise(sample, timestep, context)
        except ValueError as error:
            return _error(str(error))
        budget = self.latency_s + self.per_row_s * sample.shape[0]
        time.sleep(max(0.0, budget - (time.perf_counter() - start)))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("out_sample", output)])


def _error(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
