"""Triton python-backend model `floor_callee` of `driffusion bench floor`: an empty device.

It answers its input unchanged after sleeping the milliseconds held in the input's first value,
so a call costs only what the python backend, Triton and the transport add to that sleep.
"""
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if values[0] > 0:
                time.sleep(float(values[0]) / 1000)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", values)]))
        return responses
