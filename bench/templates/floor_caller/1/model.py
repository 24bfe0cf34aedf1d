"""Triton python-backend model `floor_caller` of `driffusion bench floor`: rounds of BLS calls.

Input `setup` = [rounds, calls per round, callee sleep ms, ask is_cancelled (0/1)]. Each round
issues its calls to `floor_callee` concurrently with `async_exec`, as the `driffusion` model's
device pool does, optionally after asking Triton whether the request was cancelled, as the
`driffusion` model does before a round. Output `ms_per_round`: the wall time of a round.
"""
import asyncio
import time

import numpy as np
import triton_python_backend_utils as pb_utils

PAYLOAD = 64  # float32 values per call: an 8x8 latent


def callee_request(sleep_ms):
    values = np.zeros(PAYLOAD, np.float32)
    values[0] = sleep_ms
    return pb_utils.InferenceRequest(model_name="floor_callee",
                                     inputs=[pb_utils.Tensor("x", values)],
                                     requested_output_names=["y"])


class TritonPythonModel:
    async def execute(self, requests):
        return [await self._respond(request) for request in requests]

    async def _respond(self, request):
        rounds, calls, sleep_ms, ask = pb_utils.get_input_tensor_by_name(request, "setup").as_numpy()
        start = time.perf_counter()
        for _ in range(int(rounds)):
            if ask:
                request.is_cancelled()
            answers = await asyncio.gather(*(callee_request(sleep_ms).async_exec()
                                             for _ in range(int(calls))))
            for answer in answers:
                if answer.has_error():
                    return pb_utils.InferenceResponse(error=answer.error())
                pb_utils.get_output_tensor_by_name(answer, "y").as_numpy()
        per_round = (time.perf_counter() - start) * 1000 / rounds
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor("ms_per_round", np.array([per_round], np.float32))])
