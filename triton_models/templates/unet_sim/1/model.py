"""Triton python-backend model `unet_sim`: the closed-form diffusion model with a set latency.

Each call takes `latency_ms` + `latency_per_item_ms` x rows of wall time in total (it sleeps
for what the closed-form evaluation did not use), so a pool's orchestration can be measured
without compute. One instance is one simulated device; the instance count is the device count.
With dynamic batching (parameter `batching`), the requests Triton hands over together are one
call: concurrent users' drafts share the latency, as they share a GPU's batched UNet call.
"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from models.sim import SimDiffusion
from triton_models.backend import FaultInjection, model_parameters, run_batched, version_dir

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
        self.batching = parameters.get("batching") == "true"
        self.faults = FaultInjection(parameters)

    def execute(self, requests):
        self.faults.check("unet_sim")
        start = time.perf_counter()
        inputs, responses = [], [None] * len(requests)
        for index, request in enumerate(requests):
            tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS]
            if any(tensor is None for tensor in tensors):
                responses[index] = _error(f"unet_sim needs inputs {', '.join(INPUTS)}")
            else:
                inputs.append((index, {name: t.as_numpy() for name, t in zip(INPUTS, tensors)}))
        if self.batching:
            answers = run_batched([item for _, item in inputs], self._denoise)
        else:
            answers = [_call(self._denoise, item) for _, item in inputs]
        rows = sum(item["sample"].shape[0] for _, item in inputs)
        budget = self.latency_s * (1 if self.batching else len(inputs)) + self.per_row_s * rows
        time.sleep(max(0.0, budget - (time.perf_counter() - start)))
        for (index, _), answer in zip(inputs, answers):
            responses[index] = _response(answer)
        return responses

    def _denoise(self, inputs):
        return {"out_sample": self.model.denoise(*(inputs[name] for name in INPUTS))}


def _call(run, inputs):
    try:
        return run(inputs)
    except Exception as error:  # noqa: BLE001 - answered to the request, classified below
        return error


def _response(answer):
    if isinstance(answer, ValueError):  # the inputs' shapes: a bad request
        return _error(str(answer))
    if isinstance(answer, Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            f"unet_sim: {answer!r}", pb_utils.TritonError.INTERNAL))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("out_sample", answer["out_sample"])]
    )


def _error(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
