"""Triton model clients over gRPC or HTTP (asyncio): discovery, configs, health, inference.

An endpoint is `HOST:PORT` (Triton's gRPC port, called through `tritonclient.grpc.aio` and a
raw inference stub) or `http://HOST:PORT` (its HTTP port, through runtime/triton_http.py).
`TritonEndpoints` finds the ready models of a list of endpoints and makes a `Device` of every
denoiser among them; `ReplicatedModel` is one network served by several endpoints.
"""
from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from models import tensors
from runtime.device import (
    DEFAULT_DEADLINE_S,
    HEALTH_TIMEOUT_S,
    DenoiserIO,
    Device,
    DeviceError,
    ModelClient,
)
from runtime.triton_http import HttpError, HttpTriton
from runtime.triton_shm import SHARED_MEMORY_MODES, SharedMemoryModel, is_loopback
from runtime.triton_wire import numpy_dtype, raw_tensor_bytes, triton_datatype

if TYPE_CHECKING:
    from typing_extensions import Self

DEVICE_PATTERN = "unet_*"
# gRPC retries a dead connection with exponential back-off (default cap 120 s); a short cap lets
# a restarted server be reached within seconds of coming back
RECONNECT_BACKOFF_MS = {"initial": 250, "min": 250, "max": 2000}


class DiscoveryError(RuntimeError):
    """An endpoint is not a Triton server or serves no usable model."""


class TritonModel:
    """One model on one Triton endpoint, called over gRPC aio.

    Inference builds the `ModelInferRequest` protobuf directly (raw tensor bytes, cached
    requested-output messages) and decodes outputs with `np.frombuffer`, skipping
    tritonclient's per-call InferInput/InferResult objects (about 15 % of the client's CPU per
    call). Readiness goes through tritonclient's client.
    """

    def __init__(self, client, stub, endpoint: str, model_name: str) -> None:
        self.client = client
        self.stub = stub  # GRPCInferenceServiceStub on the endpoint's channel
        self.endpoint = endpoint
        self.model_name = model_name
        self.name = f"{endpoint}/{model_name}"
        self._requested_outputs: dict[tuple[str, ...], list] = {}

    async def infer(self, inputs, outputs, timeout_s=None) -> dict[str, np.ndarray]:
        import grpc
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(
            model_name=self.model_name,
            inputs=[_input_tensor(name, value) for name, value in inputs.items()],
            outputs=self._requested(tuple(outputs)),
            raw_input_contents=[raw_tensor_bytes(value) for value in inputs.values()],
        )
        try:
            response = await self.stub.ModelInfer(request, timeout=timeout_s)
        except grpc.RpcError as error:
            lost = error.code() != grpc.StatusCode.INVALID_ARGUMENT
            raise DeviceError(self.name, error.details() or str(error), lost=lost) from error
        return decode_outputs(self.name, response, outputs)

    def _requested(self, outputs: tuple[str, ...]) -> list:
        requested = self._requested_outputs.get(outputs)
        if requested is None:
            from tritonclient.grpc import service_pb2

            tensor = service_pb2.ModelInferRequest.InferRequestedOutputTensor
            requested = [tensor(name=name) for name in outputs]
            self._requested_outputs[outputs] = requested
        return requested

    async def is_ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.client.is_model_ready(self.model_name,
                                                         client_timeout=HEALTH_TIMEOUT_S))
        except InferenceServerException:
            return False


class TritonHttpModel:
    """One model on one Triton HTTP endpoint (`http://HOST:PORT`): the same calls as
    `TritonModel`, as HTTP/1.1 requests with binary tensors on kept-alive connections (half the
    client CPU per call of gRPC aio here; runtime/triton_http.py)."""

    def __init__(self, http, endpoint: str, model_name: str) -> None:
        self.http = http  # runtime.triton_http.HttpTriton of the endpoint
        self.endpoint = endpoint
        self.model_name = model_name
        self.name = f"{endpoint}/{model_name}"

    async def infer(self, inputs, outputs, timeout_s=None) -> dict[str, np.ndarray]:
        try:
            return await self.http.infer(self.model_name, inputs, outputs, timeout_s)
        except HttpError as error:  # 400: the request itself is bad, anywhere
            raise DeviceError(self.name, error.message, lost=error.status != 400) from error
        except asyncio.TimeoutError as error:
            raise DeviceError(self.name, f"no answer within {timeout_s} s") from error
        except (OSError, EOFError) as error:  # refused, reset, closed mid-answer
            raise DeviceError(self.name, f"connection failed: {error!r}") from error
        except ValueError as error:  # an answer without the outputs asked for
            raise DeviceError(self.name, str(error), lost=False) from error

    async def is_ready(self) -> bool:
        try:
            return await self.http.is_model_ready(self.model_name, HEALTH_TIMEOUT_S)
        except (OSError, EOFError, asyncio.TimeoutError):
            return False


def _input_tensor(name: str, value: np.ndarray):
    """The protobuf description (name, datatype, shape) of one numeric input tensor."""
    from tritonclient.grpc import service_pb2

    return service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=triton_datatype(value.dtype), shape=value.shape
    )


def decode_outputs(model: str, response, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named outputs of a ModelInferResponse as (read-only) arrays over its raw bytes."""
    index = {output.name: i for i, output in enumerate(response.outputs)}
    decoded = {}
    for name in names:
        if name not in index:
            raise DeviceError(model, f"response has no output {name!r}", lost=False)
        output = response.outputs[index[name]]
        dtype = numpy_dtype(output.datatype)
        if dtype is None:
            raise DeviceError(model, f"output {name!r} has non-numeric type {output.datatype}",
                              lost=False)
        raw = response.raw_output_contents[index[name]]
        decoded[name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(output.shape))
    return decoded


class ReplicatedModel:
    """One network served by several replicas (e.g. `text_encoder` on every endpoint).

    A call goes to the first replica that answers; a replica that fails is skipped for this call.
    """

    def __init__(self, replicas: Sequence[ModelClient]) -> None:
        if not replicas:
            raise ValueError("a ReplicatedModel needs at least one replica")
        self.replicas = list(replicas)
        self.name = replicas[0].name

    async def infer(self, inputs, outputs, timeout_s=None) -> dict[str, np.ndarray]:
        failures = []
        for replica in self.replicas:
            try:
                return await replica.infer(inputs, outputs, timeout_s)
            except DeviceError as error:
                if not error.lost:
                    raise
                failures.append(str(error))
        raise DeviceError(self.name, f"every replica failed: {'; '.join(failures)}")

    async def is_ready(self) -> bool:
        answers = await asyncio.gather(*(replica.is_ready() for replica in self.replicas))
        return any(answers)


class TritonEndpoints:
    """Clients for a list of endpoints; use as `async with`.

    An endpoint is `HOST:PORT` (Triton's gRPC port) or `http://HOST:PORT` (its HTTP port). A gRPC
    endpoint gets a tritonclient aio client (discovery, configs, health) and an inference stub
    on a channel of its own; an HTTP one gets a `runtime.triton_http.HttpTriton` for all of it,
    whose calls cost the client about half the CPU.

    `shared_memory` is how the denoiser devices of endpoints on this host (loopback) pass
    tensors (runtime/triton_shm.py): "auto" (the default: a 720p Wan latent's round costs a
    sixth, `driffusion bench transport`) through system shared memory where the server allows
    it (`serve --allow-shared-memory`), else over the network; "system" or "cuda" (GPU 0)
    always (a refusal is an error); "off" never.
    """

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 10.0,
                 shared_memory: str = "auto") -> None:
        self.endpoints = [parse_endpoint(endpoint) for endpoint in endpoints]
        if not self.endpoints:
            raise ValueError("give at least one endpoint (HOST:PORT or http://HOST:PORT)")
        if shared_memory not in SHARED_MEMORY_MODES:
            raise ValueError(f"shared_memory must be one of {SHARED_MEMORY_MODES}; "
                             f"got {shared_memory!r}")
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self.shared_memory_models: list[SharedMemoryModel] = []
        self.clients: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.stubs: dict[str, Any] = {}
        self.http: dict[str, Any] = {}

    async def __aenter__(self) -> Self:
        for endpoint in self.endpoints:
            if is_http(endpoint):
                host, port = split_host_port(endpoint)
                self.http[endpoint] = HttpTriton(host, port)
            else:
                self._open_grpc(endpoint)
        return self

    def _open_grpc(self, endpoint: str) -> None:
        import grpc
        import tritonclient.grpc.aio as grpc_aio
        from tritonclient.grpc import service_pb2_grpc

        self.clients[endpoint] = grpc_aio.InferenceServerClient(
            endpoint, channel_args=channel_arguments()
        )
        channel = grpc.aio.insecure_channel(endpoint, options=channel_arguments())
        self.channels[endpoint] = channel
        self.stubs[endpoint] = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def __aexit__(self, *exc_info) -> None:
        for model in self.shared_memory_models:
            await model.close()
        self.shared_memory_models.clear()
        await asyncio.gather(*(client.close() for client in self.clients.values()),
                             *(channel.close() for channel in self.channels.values()),
                             *(http.close() for http in self.http.values()))
        self.clients.clear()
        self.channels.clear()
        self.stubs.clear()
        self.http.clear()

    async def ready_models(self, endpoint: str) -> list[str]:
        """Names of the ready models on `endpoint` (DiscoveryError if it is not Triton)."""
        if endpoint in self.http:
            return await self._ready_models_http(endpoint)
        from tritonclient.utils import InferenceServerException

        client = self.clients[endpoint]
        try:
            await client.is_server_live(client_timeout=self.timeout_s)
            index = await client.get_model_repository_index(as_json=True,
                                                            client_timeout=self.timeout_s)
        except InferenceServerException as error:
            raise DiscoveryError(
                f"{endpoint} does not answer as a Triton gRPC server: {error.message()}"
            ) from error
        return sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")

    async def _ready_models_http(self, endpoint: str) -> list[str]:
        http = self.http[endpoint]
        try:
            await http.is_live(self.timeout_s)
            index = await http.repository_index(self.timeout_s)
        except (HttpError, OSError, EOFError, ValueError, asyncio.TimeoutError) as error:
            raise DiscoveryError(
                f"{endpoint} does not answer as a Triton HTTP server: {error!r}") from error
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    async def model_config(self, endpoint: str, model_name: str) -> dict:
        if endpoint in self.http:
            return await self.http[endpoint].model_config(model_name, self.timeout_s)
        response = await self.clients[endpoint].get_model_config(
            model_name, as_json=True, client_timeout=self.timeout_s
        )
        return response.get("config", response)

    def model(self, endpoint: str, model_name: str) -> TritonModel | TritonHttpModel:
        if endpoint in self.http:
            return TritonHttpModel(self.http[endpoint], endpoint, model_name)
        return TritonModel(self.clients[endpoint], self.stubs[endpoint], endpoint, model_name)

    async def find_model(self, model_name: str) -> ModelClient | None:
        """The first endpoint's ready `model_name`, or None."""
        for endpoint in self.endpoints:
            if model_name in await self.ready_models(endpoint):
                return self.model(endpoint, model_name)
        return None

    async def find_replicas(self, model_name: str) -> ReplicatedModel | None:
        """`model_name` on every endpoint that serves it ready, as one model, or None."""
        replicas = [self.model(endpoint, model_name) for endpoint in self.endpoints
                    if model_name in await self.ready_models(endpoint)]
        return ReplicatedModel(replicas) if replicas else None

    async def devices(self, pattern: str = DEVICE_PATTERN, *,
                      deadline_s: float | None = DEFAULT_DEADLINE_S) -> list[Device]:
        """A Device for every ready model matching `pattern` on every endpoint."""
        found: list[Device] = []
        for endpoint in self.endpoints:
            models = await self.ready_models(endpoint)
            names = [name for name in models if fnmatch.fnmatchcase(name, pattern)]
            if not names:
                raise DiscoveryError(
                    f"{endpoint} serves no ready {pattern} model (ready models: "
                    f"{', '.join(models) or 'none'}); start it with `driffusion serve`"
                )
            for name in names:
                config = await self.model_config(endpoint, name)
                found.append(device_from_config(self._device_model(endpoint, name), config,
                                                deadline_s))
        return found

    def _device_model(self, endpoint: str, model_name: str) -> ModelClient:
        """A denoiser's client: through shared memory where `shared_memory` asks for it."""
        model = self.model(endpoint, model_name)
        if self.shared_memory == "off" or not is_loopback(endpoint):
            return model
        kind = "system" if self.shared_memory == "auto" else self.shared_memory
        wrapped = SharedMemoryModel(model, kind=kind, fallback=self.shared_memory == "auto")
        self.shared_memory_models.append(wrapped)
        return wrapped


def channel_arguments() -> list[tuple[str, int]]:
    """gRPC channel options: unlimited message sizes (as tritonclient's defaults) and a short
    reconnect back-off, so that a server that comes back is reachable again within seconds."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        *((f"grpc.{kind}_reconnect_backoff_ms", ms) for kind, ms in RECONNECT_BACKOFF_MS.items()),
    ]


def device_from_config(model: ModelClient, config: Mapping[str, Any],
                       deadline_s: float | None = DEFAULT_DEADLINE_S) -> Device:
    """A Device whose instances, input dtypes and max batch come from its Triton config."""
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
    dtypes = {tensor["name"]: tensors.dtype_of_triton_config(tensor.get("data_type", "TYPE_FP32"))
              .name for tensor in config.get("input", [])}
    outputs = [tensor["name"] for tensor in config.get("output", [])]
    batching = int(config.get("max_batch_size", 0)) > 0
    try:
        io = DenoiserIO.from_inputs(model.name, dtypes, outputs, batching)
    except ValueError as error:
        raise DiscoveryError(str(error)) from error
    max_batch = int(config.get("max_batch_size", 0)) or None
    if max_batch is None:
        engine_limit = config.get("parameters", {}).get("max_batch", {}).get("string_value")
        max_batch = int(engine_limit) if engine_limit else None
    return Device(model, instances=instances, io=io, deadline_s=deadline_s, max_batch=max_batch)


HTTP_SCHEME = "http://"


def parse_endpoint(endpoint: str) -> str:
    """Validate `HOST:PORT` (gRPC) or `http://HOST:PORT` (port 1..65535) and return it stripped."""
    text = endpoint.strip()
    host, _, port = text.removeprefix(HTTP_SCHEME).rpartition(":")
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} must be HOST:PORT (gRPC) or http://HOST:PORT "
                         "with a port in 1..65535")
    return text


def is_http(endpoint: str) -> bool:
    """True for an `http://HOST:PORT` endpoint (Triton's HTTP port)."""
    return endpoint.startswith(HTTP_SCHEME)


def split_host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix(HTTP_SCHEME).rpartition(":")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def discover_devices(endpoints: Sequence[str], pattern: str = DEVICE_PATTERN, *,
                           deadline_s: float | None = DEFAULT_DEADLINE_S):
    """`async with discover_devices(["host:8001", ...]) as devices`: every ready `unet_*` model."""
    async with TritonEndpoints(endpoints) as connection:
        yield await connection.devices(pattern, deadline_s=deadline_s)
