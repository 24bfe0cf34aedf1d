"""Triton python-backend pipeline model `driffusion`: prompt (or label) in, image out.

It runs the project's own runtime server-side: `runtime.pipeline.Pipeline` with the DRiffusion
sampler and a `DevicePool` whose devices call the `unet_*` models of this server through
asynchronous BLS (`InferenceRequest.async_exec`), so each round of a request fans out over every
device. A device model that fails (crashed stub, unloaded, past its deadline) is taken out of
service for every request of this instance and its calls are re-issued on the others; it rejoins
after a health check. The model is not decoupled (a plain gRPC infer gets the image), so Triton
runs one `execute` at a time per instance: concurrent requests need more instances
(--pipeline-instances). Whether the client gave up is asked before a round, at most every
CANCEL_CHECK_INTERVAL_S (each question is an IPC round trip to the server).
Streaming: with the parameter `stream` the same model is `driffusion_stream`, decoupled (gRPC
ModelStreamInfer only): after each round it sends a progress response (STEPS_DONE, STEPS_TOTAL,
ROUNDS so far), then the response `driffusion` would give (outputs or its error), with the
final flag. Triton hands a decoupled python model each request at once (its async `execute`
runs in the background), so one instance runs `concurrency` requests at a time itself and
refuses more than `max_queue_size` waiting (UNAVAILABLE).
Parameters (config.pbtxt): `pipeline` (PipelineSpec JSON with the serving limits), `devices`
(JSON list of {name, instances, max_batch, batching, dtypes}), `deadline_s` (per model call),
`cfg_parallel`, `batched_rounds` and `window` (the one-GPU batched layout: each round is one call
of `window` items to the first device). Outputs: IMAGE (uint8 [H, W, 3]), or a video model's
VIDEO (uint8 [F, H, W, 3]; it also takes FRAMES and GUIDANCE_2), ROUNDS and EVALUATIONS (what
DRiffusion did).
Scale out: `device_endpoints` (HOST:PORT,...) and `device_signature` add the ready unet_*
models of device servers on other hosts, over gRPC, found and checked at initialize
(triton_models/device_endpoints.py). Encoder servers: `encoder_endpoints` and
`encoder_signatures` replace the tokenizers and text encoders by those of other servers, found
and checked at initialize (triton_models/encoder_endpoints.py); one that fails a request's call
fails the request with UNAVAILABLE naming it.
"""
import asyncio
import json
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.device import DenoiserIO, Device, DeviceError
from runtime.families import family_of
from runtime.pipeline import Cancelled, Pipeline, PipelineSpec, RequestError
from runtime.pool import DevicePool, PoolError
from runtime.schedulers import max_steps
from triton_models.backend import ThrottledCheck, model_parameters
from triton_models.device_endpoints import describe, devices_from_parameters
from triton_models.encoder_endpoints import encoders_from_parameters
from triton_models.pipeline_io import (
    DRIFFUSION_IMAGE_INPUTS,
    DRIFFUSION_INPUTS,
    IMAGE_OUTPUT,
    VIDEO_INPUTS,
    VIDEO_OUTPUT,
    check_image_shape,
    request_from_tensors,
)

# executor threads beyond one per device lane: encoders, the VAE, health checks, failover calls
EXTRA_THREADS = 4
BUSY_MESSAGE = ("server busy: driffusion_stream runs {running} requests (--pipeline-instances) "
                "and {waiting} wait (--max-queue-size); retry later")


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
        try:  # the request timeout only bounds queueing; this bounds the whole call
            response = await asyncio.wait_for(request.async_exec(), timeout_s)
        except asyncio.TimeoutError as error:
            raise DeviceError(self.name, f"no answer within {timeout_s} s") from error
        if response.has_error():
            error = response.error()
            lost = error.code() != pb_utils.TritonError.INVALID_ARG
            raise DeviceError(self.name, error.message(), lost=lost)
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    async def is_ready(self):
        return pb_utils.is_model_ready(self.name)


class Metrics:
    """The model's Prometheus counters, on Triton's metrics endpoint (custom-metrics API)."""

    def __init__(self):
        def counter(name, description):
            return pb_utils.MetricFamily(name=name, description=description,
                                         kind=pb_utils.MetricFamily.COUNTER)

        self.families = {
            "requests": counter("driffusion_requests_total",
                                "images requested, by mode and outcome (ok, invalid, "
                                "unavailable, cancelled, internal)"),
            "rounds": counter("driffusion_rounds_total", "parallel rounds run, by mode"),
            "evaluations": counter("driffusion_evaluations_total",
                                   "model evaluations (CFG pairs count once), by mode"),
            "steps": counter("driffusion_steps_total",
                             "timesteps refined, by mode (steps / rounds = accepted per round)"),
            "failovers": counter("driffusion_device_failovers_total",
                                 "device calls re-issued on another device, by failed device"),
        }
        self.metrics = {}

    def add(self, family, value, **labels):
        key = (family, tuple(sorted(labels.items())))
        if key not in self.metrics:
            self.metrics[key] = self.families[family].Metric(labels=labels)
        self.metrics[key].increment(value)


class ProgressSender:
    """The progress responses of a streamed request: one after each round (called by the
    sampler with the timesteps the round refined)."""

    def __init__(self, sender, total_steps):
        self.sender = sender
        self.total_steps = total_steps
        self.steps_done = 0
        self.rounds = 0

    def __call__(self, refined):
        self.steps_done += refined
        self.rounds += 1
        values = {"STEPS_DONE": self.steps_done, "STEPS_TOTAL": self.total_steps,
                  "ROUNDS": self.rounds}
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.array([value], np.int32)) for name, value in values.items()
        ]))


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)  # scheduler arithmetic on tiny tensors; leave cores to devices
        parameters = model_parameters(args)
        self.spec = PipelineSpec.from_json(parameters["pipeline"])
        self.deadline_s = float(parameters.get("deadline_s", "60"))
        self.devices = [
            Device(BlsModel(device["name"]), instances=int(device["instances"]),
                   deadline_s=self.deadline_s, max_batch=device["max_batch"],
                   io=DenoiserIO(device["dtypes"], device["batching"]))
            for device in json.loads(parameters["devices"])
        ]
        # device servers on other hosts (`device_endpoints`): found now, checked against the
        # device signature; an endpoint that is down or serves another model fails the load
        remote = devices_from_parameters(parameters, self.deadline_s)
        if remote:
            pb_utils.Logger.log_info(f"driffusion: local devices {describe(self.devices)}; "
                                     f"remote devices {describe(remote)}")
        self.devices += remote
        self.cfg_parallel = parameters.get("cfg_parallel", "false") == "true"
        self.batched_rounds = parameters.get("batched_rounds", "false") == "true"
        self.window = int(parameters["window"]) if "window" in parameters else None
        self.max_resolution = int(parameters["max_resolution"])
        self.models = {name: BlsModel(name) for name in Pipeline.needed_models(self.spec)}
        self.output = VIDEO_OUTPUT[0] if family_of(self.spec).makes_video else IMAGE_OUTPUT
        # encoder servers (`encoder_endpoints`): their tokenizers and text encoders, found and
        # checked now; an endpoint that is down or serves another model fails the load
        remote_encoders = encoders_from_parameters(parameters)
        if remote_encoders:
            pb_utils.Logger.log_info("driffusion: remote encoders " + ", ".join(
                client.name for client in remote_encoders.values()))
        self.models.update(remote_encoders)
        self.remote_encoders = {client.name for client in remote_encoders.values()}
        self.log = pb_utils.Logger
        self.metrics = Metrics()
        self._executor_loop = None
        self.stream = parameters.get("stream", "false") == "true"
        self.concurrency = int(parameters.get("concurrency", "1"))
        self.max_waiting = int(parameters.get("max_queue_size", "0"))
        self._turns = None  # streamed requests: `concurrency` run at once (asyncio.Semaphore)
        self._admitted = 0  # streamed requests running or waiting for their turn
        # import the schedulers and find the default one's step limit now, not in a request
        max_steps(self.spec.default_scheduler, self.spec.scheduler_config, self.spec.max_steps)

    async def execute(self, requests):
        self._size_executor(asyncio.get_running_loop())
        if self.stream:
            await asyncio.gather(*(self._stream(request) for request in requests))
            return None
        return list(await asyncio.gather(*(self._respond(request) for request in requests)))

    async def _stream(self, request):
        """A decoupled request: progress responses, then the last response and the final flag
        (`concurrency` at a time; beyond `max_waiting` waiting ones, UNAVAILABLE at once)."""
        sender = request.get_response_sender()
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.concurrency)
        if self._admitted >= self.concurrency + self.max_waiting:
            busy = BUSY_MESSAGE.format(running=self.concurrency, waiting=self.max_waiting)
            response = self._fail("unavailable", "unknown", busy,
                                  pb_utils.TritonError.UNAVAILABLE)
        else:
            self._admitted += 1
            try:
                async with self._turns:
                    response = await self._respond(request, sender)
            finally:
                self._admitted -= 1
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _size_executor(self, loop):
        """Give the stub's event loop enough threads for a whole round of BLS calls.

        `async_exec` runs each call in a thread of the loop's default executor, whose default
        size is the CPU count + 4 (6 on 2 cores): a round of 8 device calls then waited for a
        free thread and took two device times instead of one (measured by `bench speed`,
        window 8). The loop is the stub's own, created for the first `execute`.
        """
        if self._executor_loop is loop:
            return
        lanes = sum(device.instances for device in self.devices) * self.concurrency
        loop.set_default_executor(ThreadPoolExecutor(max_workers=lanes + EXTRA_THREADS,
                                                     thread_name_prefix="driffusion-bls"))
        self._executor_loop = loop

    def _inputs(self, request):
        """The request's input tensors by name (None where absent); image shapes are checked
        against the resolution limit before their pixels are read."""
        tensors = {}
        for name in [*DRIFFUSION_INPUTS, *VIDEO_INPUTS, *DRIFFUSION_IMAGE_INPUTS]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None and name in DRIFFUSION_IMAGE_INPUTS:
                check_image_shape(name, tensor.shape(), self.max_resolution)
            tensors[name] = None if tensor is None else tensor.as_numpy()
        return request_from_tensors(tensors, self.spec.max_prompt_bytes)

    async def _respond(self, request, progress_sender=None):
        """The response to one request: its outputs, or the error the client is told; with a
        streamed request's sender, a progress response goes to it after each round."""
        pool = DevicePool(self.devices, cfg_parallel=self.cfg_parallel,
                          batched=self.batched_rounds, window=self.window)
        pipeline = Pipeline(self.spec, pool, self.models, self.deadline_s)
        rejoins_before = [device.rejoins for device in self.devices]
        mode = "unknown"
        try:
            resolved = pipeline.resolve(self._inputs(request))
            mode = resolved.mode
            cancelled = ThrottledCheck(request.is_cancelled)
            progress = (None if progress_sender is None
                        else ProgressSender(progress_sender, pipeline.steps_to_run(resolved)))
            result = await pipeline.run(resolved, progress, should_stop=cancelled)
        except RequestError as error:
            return self._fail("invalid", mode, f"{error.field.upper()}: {error.detail}",
                              pb_utils.TritonError.INVALID_ARG)
        except Cancelled as error:
            self.log.log_info(f"driffusion: request {request.request_id()!r} {error}")
            self.metrics.add("rounds", error.rounds, mode=mode)
            return self._fail("cancelled", mode, f"request cancelled by the client ({error})",
                              pb_utils.TritonError.CANCELLED)
        except PoolError as error:
            return self._fail("unavailable", mode, f"no device available: {error}",
                              pb_utils.TritonError.UNAVAILABLE)
        except DeviceError as error:
            if error.lost:
                what = "encoder server" if error.model in self.remote_encoders else "device"
                return self._fail("unavailable", mode, f"{what} failure: {error}",
                                  pb_utils.TritonError.UNAVAILABLE)
            return self._internal(mode, error)
        except Exception as error:  # noqa: BLE001 - a server fault, never the client's
            return self._internal(mode, error)
        finally:
            self._log_health(pool, rejoins_before)
        self._count(resolved, result)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(self.output, result.image),
            pb_utils.Tensor("ROUNDS", np.array([result.rounds], np.int32)),
            pb_utils.Tensor("EVALUATIONS", np.array([result.evaluations], np.int32)),
        ])

    def _count(self, resolved, result):
        mode = resolved.mode
        self.metrics.add("requests", 1, mode=mode, outcome="ok")
        self.metrics.add("rounds", result.rounds, mode=mode)
        self.metrics.add("evaluations", result.evaluations, mode=mode)
        self.metrics.add("steps", resolved.steps, mode=mode)

    def _fail(self, outcome, mode, message, code):
        self.metrics.add("requests", 1, mode=mode, outcome=outcome)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _internal(self, mode, error):
        """A server fault: the cause and traceback go to the server log, not to the client."""
        self.log.log_error(f"driffusion: internal error: {error!r}\n{traceback.format_exc()}")
        return self._fail("internal", mode, "internal server error (the cause is in the server "
                          "log)", pb_utils.TritonError.INTERNAL)

    def _log_health(self, pool, rejoins_before):
        for device, before in zip(self.devices, rejoins_before):
            if device.rejoins > before:
                self.log.log_warn(f"device {device.name} answered its health check: back in "
                                  "service")
        for failover in pool.failovers:
            self.metrics.add("failovers", 1, device=failover.device)
            self.log.log_warn(
                f"device {failover.device} lost after {failover.seconds:.2f} s "
                f"({failover.error}); its call was re-issued on {failover.replacement}"
            )
