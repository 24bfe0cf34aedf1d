"""Triton python-backend pipeline model `driffusion`: label or prompt in, image out.

It runs the project's own runtime server-side: `runtime.pipeline.Pipeline` with the DRiffusion
sampler and a `DevicePool` whose devices call the `unet_*` models of this server through
asynchronous BLS (`InferenceRequest.async_exec`), so each round of a request fans out over every
device. The model is not decoupled (a plain gRPC infer gets the image), so Triton runs one
`execute` at a time per instance: concurrent requests need more instances (--pipeline-instances).
Parameters (config.pbtxt): `pipeline` (PipelineSpec JSON), `devices` (JSON [[name, instances]]),
`deadline_s` (per device call) and `cfg_parallel`.
"""
import asyncio
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.devices import Device, DeviceError, DevicePool, PoolError
from runtime.pipeline import Pipeline, PipelineSpec, RequestError
from triton_models.backend import model_parameters
from triton_models.pipeline_io import DRIFFUSION_INPUTS, request_from_tensors


class BlsModel:
    """A model of this server called through BLS (the `ModelClient` interface of the runtime)."""

    def __init__(self, name):
        self.name = name

    async def infer(self, inputs, outputs, timeout_s=None):
        request = pb_utils.InferenceRequest(
            model_name=self.name,
            inputs=[pb_utils.Tensor(key, np.ascontiguousarray(value)) for key, value in inputs.items()],
            requested_output_names=list(outputs),
            timeout=int(timeout_s * 1_000_000) if timeout_s else 0,
        )
        response = await request.async_exec()
        if response.has_error():
            raise DeviceError(self.name, response.error().message())
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    async def is_ready(self):
        return pb_utils.is_model_ready(self.name)


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)  # scheduler arithmetic on tiny tensors; leave cores to devices
        parameters = model_parameters(args)
        self.spec = PipelineSpec.from_json(parameters["pipeline"])
        deadline_s = float(parameters.get("deadline_s", "60"))
        self.devices = [
            Device(BlsModel(name), instances=int(instances), deadline_s=deadline_s,
                   max_batch=int(max_batch) if max_batch else None)
            for name, instances, max_batch in json.loads(parameters["devices"])
        ]
        self.cfg_parallel = parameters.get("cfg_parallel", "false") == "true"
        self.encoder = BlsModel("text_encoder")
        self.decoder = BlsModel("vae_decoder") if self.spec.decoder == "vae" else None

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._respond(request) for request in requests)))

    async def _respond(self, request):
        tensors = {}
        for name in DRIFFUSION_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            tensors[name] = None if tensor is None else tensor.as_numpy()
        try:
            generation = request_from_tensors(tensors)
            pool = DevicePool(self.devices, cfg_parallel=self.cfg_parallel)
            image = await Pipeline(self.spec, pool, self.encoder, self.decoder).generate(generation)
        except RequestError as error:
            return _error(f"{error.field.upper()}: {error.detail}", pb_utils.TritonError.INVALID_ARG)
        except ValueError as error:  # a combination the sampler rejects (e.g. draft order 2)
            return _error(str(error), pb_utils.TritonError.INVALID_ARG)
        except (DeviceError, PoolError) as error:
            return _error(f"device failure: {error}", pb_utils.TritonError.UNAVAILABLE)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", image)])


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
