"""Triton python-backend model for scripts/gpu_check.py: the check's PyTorch UNet on one device.

gpu_check.py copies this file as model.py into a throw-away model repository; the config's
parameters name the UNet config, device, dtype and where gpu_check.py lives, so every instance
builds the same seeded UNet as the in-process measurement.
"""
import json
import sys

import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

INPUTS = ("sample", "timestep", "encoder_hidden_states")
OUTPUT = "out_sample"


class TritonPythonModel:
    """One UNetRunner per instance; each request is one UNet call."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        sys.path.insert(0, params["scripts_dir"])
        import gpu_check
        import torch

        if int(params["cpu_threads"]):
            torch.set_num_threads(int(params["cpu_threads"]))
        self.runner = gpu_check.UNetRunner(
            json.loads(params["unet_config"]), params["device"],
            gpu_check.torch_dtype(params["dtype"]), int(params["context_tokens"]),
            cuda_graphs=params["cuda_graphs"] == "1",
        )

    def execute(self, requests):
        return [self.answer(request) for request in requests]

    def answer(self, request):
        # DLPack both ways: the stub's numpy bridge predates numpy 2 and returns empty tensors
        # under it (seen with Triton 2.51's stub and numpy 2.2); DLPack does not go through it.
        try:
            tensors = [from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
                       for name in INPUTS]
            output = self.runner.run_host(*tensors)
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(output))])
        except Exception as error:  # noqa: BLE001 - the client gets the error, the server lives
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))
