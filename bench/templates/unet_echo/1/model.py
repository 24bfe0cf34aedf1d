"""Triton python-backend model `unet_echo` of `driffusion bench transport`: a free denoiser.

It answers `out_sample` = its `sample`, unchanged and at once, so a call costs only what the
transport, Triton and the python backend add: a `unet_sim`-style device with no compute.
"""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "out_sample", pb_utils.get_input_tensor_by_name(request, "sample").as_numpy())])
            for request in requests]
