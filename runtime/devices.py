"""Device layer: UNet evaluations on Triton models (HTTP or gRPC), BLS or in-process; the pool.

A *model client* runs one network (`infer(inputs) -> outputs`): a Triton model over its HTTP
port (`runtime.triton_http`) or over `tritonclient.grpc.aio`, a Triton model called by BLS from
inside the server, an ONNX Runtime session or a Python callable in-process. A `Device` is a
model client holding a UNet. The `DevicePool` is the sampler's `denoise`: it spreads one
round's items over the devices concurrently and applies classifier-free guidance. Nothing here
knows the sampling method.

Failures: a device call that fails for a reason other than a bad request (server gone,
deadline passed, model unloaded or crashed) marks the device lost and its work is re-issued on
the remaining devices; a lost device is health-checked again after a back-off and rejoins the
pool when it answers ready. How a round is cut into calls never depends on which devices are
healthy, so the result of a round is the same whichever devices compute it.
"""
from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models import tensors
from runtime.guidance import Conditioning

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

DEVICE_PATTERN = "unet_*"
Denoise = Callable[["torch.Tensor", "torch.Tensor"], Awaitable["torch.Tensor"]]
DEFAULT_DEADLINE_S = 60.0
DEFAULT_RECHECK_S = 2.0  # first health check of a lost device after this long
MAX_RECHECK_S = 30.0  # back-off cap for a device that keeps failing after it answered ready
# the window of a batched pool when the caller names none: items per round, all in one call
# (one GPU: a batch of 4 items, 8 rows with guidance, keeps a GPU busy without waiting long)
DEFAULT_BATCHED_WINDOW = 4
HEALTH_TIMEOUT_S = 2.0
# gRPC retries a dead connection with exponential back-off (default cap 120 s); a short cap lets
# a restarted server be reached within seconds of coming back
RECONNECT_BACKOFF_MS = {"initial": 250, "min": 250, "max": 2000}


class DeviceError(RuntimeError):
    """A model call failed: unreachable, timed out, crashed, or it rejected the request.

    `lost` is True when the device failed (the work may be re-issued elsewhere) and False when
    the model rejected the request itself (INVALID_ARGUMENT: every device would reject it).
    """

    def __init__(self, model: str, message: str, *, lost: bool = True) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.lost = lost


class DiscoveryError(RuntimeError):
    """An endpoint is not a Triton server or serves no usable model."""


class ModelClient(Protocol):
    """One network behind some transport."""

    name: str

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]: ...

    async def is_ready(self) -> bool: ...


@dataclass(frozen=True)
class DenoiserIO:
    """How to call a denoiser model: dtypes by input name (the shared tensor names), batching.

    `sample` and `timestep` go in, `out_sample` comes out; every other input is conditioning
    that the pipeline supplies by the same name.
    """

    dtypes: Mapping[str, str] = field(default_factory=lambda: {
        tensors.SAMPLE: "float32", tensors.TIMESTEP: "float32",
        tensors.ENCODER_HIDDEN_STATES: "float32"})
    # the model batches (Triton max_batch_size > 0): the per-item timestep travels as [N, 1]
    batching: bool = False

    @classmethod
    def from_inputs(cls, model: str, dtypes: Mapping[str, str], outputs: Sequence[str],
                    batching: bool = False) -> DenoiserIO:
        """The IO of a model with these input dtypes and output names; ValueError if it is not
        a denoiser (sample, timestep in; out_sample out)."""
        missing = [name for name in (tensors.SAMPLE, tensors.TIMESTEP) if name not in dtypes]
        if missing or tensors.OUT_SAMPLE not in outputs:
            raise ValueError(
                f"{model} is not a denoiser: it needs inputs {tensors.SAMPLE}, {tensors.TIMESTEP} "
                f"and output {tensors.OUT_SAMPLE}; it has inputs {', '.join(dtypes) or 'none'} "
                f"and outputs {', '.join(outputs) or 'none'}"
            )
        return cls(dict(dtypes), batching)

    @property
    def conditioning(self) -> tuple[str, ...]:
        """Names of the conditioning inputs."""
        return tuple(name for name in self.dtypes if name not in (tensors.SAMPLE, tensors.TIMESTEP))


class Device:
    """A denoiser on one model client: `await device(sample, timestep, conditioning)`.

    It also keeps the device's health as the pools that use it see it: `lost` after a failed
    call, back in service after a health check finds it ready. Checks run every `recheck_s`,
    doubling (up to MAX_RECHECK_S) each time the device fails again after rejoining. Pools
    sharing a Device share this state.
    """

    def __init__(
        self,
        model: ModelClient,
        *,
        instances: int = 1,
        max_batch: int | None = None,
        io: DenoiserIO | None = None,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        recheck_s: float = DEFAULT_RECHECK_S,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline must be > 0 s or None, got {deadline_s}")
        self.model = model
        self.instances = instances
        self.max_batch = max_batch
        self.io = io or DenoiserIO()
        self.deadline_s = deadline_s
        self.recheck_s = recheck_s
        self.calls = 0  # successful model calls
        self.failures = 0  # failed calls since the last success
        self.rejoins = 0  # times a health check brought it back into service
        self.lost_error: str | None = None
        self._next_check = 0.0
        self._background_check: asyncio.Future | None = None

    @property
    def name(self) -> str:
        return self.model.name

    def __repr__(self) -> str:
        return f"Device({self.name!r}, instances={self.instances})"

    async def __call__(self, sample: np.ndarray, timestep: np.ndarray,
                       conditioning: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate rows [N, ...] (conditioning by input name, N rows each); calls larger than the
        engine's max batch run one after another."""
        rows = sample.shape[0]
        step = self.max_batch or rows
        parts = [
            await self._infer(sample[i : i + step], timestep[i : i + step],
                              {name: value[i : i + step] for name, value in conditioning.items()})
            for i in range(0, rows, step)
        ]
        output = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.calls += 1
        self.failures = 0
        return output

    async def _infer(self, sample: np.ndarray, timestep: np.ndarray,
                     conditioning: Mapping[str, np.ndarray]) -> np.ndarray:
        timestep = np.ascontiguousarray(timestep, dtype=self._dtype(tensors.TIMESTEP))
        inputs = {
            tensors.SAMPLE: np.ascontiguousarray(sample, dtype=self._dtype(tensors.SAMPLE)),
            tensors.TIMESTEP: timestep.reshape(-1, 1) if self.io.batching else timestep,
        }
        for name, value in conditioning.items():
            value = np.ascontiguousarray(value, dtype=self._dtype(name))
            # a batching model takes a per-row scalar (Flux's guidance) as [N, 1], like timestep
            inputs[name] = value.reshape(-1, 1) if self.io.batching and value.ndim == 1 else value
        result = await self.model.infer(inputs, [tensors.OUT_SAMPLE], self.deadline_s)
        output = result[tensors.OUT_SAMPLE]
        if output.shape != sample.shape:
            raise DeviceError(self.name, f"returned shape {output.shape}, expected {sample.shape}")
        return output.astype(np.float32, copy=False)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.io.dtypes.get(name, "float32"))

    async def healthy(self) -> bool:
        """True if the model answers a readiness check in time (never raises)."""
        try:
            return bool(await asyncio.wait_for(self.model.is_ready(), HEALTH_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - no answer means "not healthy"
            return False

    @property
    def lost(self) -> bool:
        return self.lost_error is not None

    def mark_lost(self, error: Exception) -> None:
        """Take the device out of service after a failed call; schedule its next health check."""
        self.failures += 1
        self.lost_error = str(error)
        self._schedule_check()

    def _schedule_check(self) -> None:
        backoff = self.recheck_s * 2 ** max(0, self.failures - 1)
        self._next_check = time.monotonic() + min(MAX_RECHECK_S, backoff)

    @property
    def check_due(self) -> bool:
        """Lost, and its back-off has passed."""
        return self.lost and time.monotonic() >= self._next_check

    async def health_check(self) -> bool:
        """Check the device now; a lost device that answers ready is back in service."""
        if await self.healthy():
            if self.lost:
                self.rejoins += 1
            self.lost_error = None
            return True
        self._schedule_check()
        return False

    def check_in_background(self) -> None:
        """Start a health check if one is due, without waiting for it (rounds never wait)."""
        if self.check_due and (self._background_check is None or self._background_check.done()):
            self._background_check = asyncio.ensure_future(self.health_check())


# ---------------------------------------------------------------------------------------------
# In-process model clients


class LocalModel:
    """A Python callable `fn(**inputs) -> {output: array}` run in a worker thread."""

    def __init__(self, name: str, fn: Callable[..., Mapping[str, np.ndarray]]) -> None:
        self.name = name
        self.fn = fn

    async def infer(self, inputs, outputs, timeout_s=None) -> dict[str, np.ndarray]:
        call = asyncio.to_thread(self.fn, **inputs)
        try:
            result = await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError as error:
            raise DeviceError(self.name, f"no answer within {timeout_s} s") from error
        except DeviceError:
            raise
        except Exception as error:
            raise DeviceError(self.name, f"{type(error).__name__}: {error}") from error
        return {name: np.asarray(result[name]) for name in outputs}

    async def is_ready(self) -> bool:
        return True


class LocalDevice(Device):
    """A denoiser evaluated in-process: an ONNX Runtime session, a torch module or a function."""

    @classmethod
    def from_function(cls, name: str, fn: Callable[..., Any], **kwargs) -> LocalDevice:
        """`fn(sample, timestep, *conditioning)` on numpy arrays (e.g. `SimDiffusion.denoise`),
        conditioning in the order the pipeline gives it."""

        def run(**inputs):
            sample, timestep = inputs.pop(tensors.SAMPLE), inputs.pop(tensors.TIMESTEP)
            return {tensors.OUT_SAMPLE: fn(sample, timestep, *inputs.values())}

        return cls(LocalModel(name, run), **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int = 1, name: str | None = None,
                  **kwargs) -> LocalDevice:
        """An ONNX Runtime CPU session on `path` with `threads` intra-op threads."""
        session = ort_session(path, threads)
        name = name or Path(path).stem
        dtypes = {i.name: tensors.dtype_of_onnx(i.type).name for i in session.get_inputs()}
        io = DenoiserIO.from_inputs(name, dtypes, session_output_names(session))

        def run(**inputs):
            return dict(zip(session_output_names(session), session.run(None, inputs)))

        return cls(LocalModel(name, run), io=io, **kwargs)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, name: str = "torch",
                   **kwargs) -> LocalDevice:
        """A diffusers UNet module: `module(sample, timestep, encoder_hidden_states,
        added_cond_kwargs=...)` (SDXL's text_embeds / time_ids go in added_cond_kwargs)."""
        import torch

        @torch.no_grad()
        def run(**inputs):
            given = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
            sample, timestep = given.pop(tensors.SAMPLE), given.pop(tensors.TIMESTEP)
            context = given.pop(tensors.ENCODER_HIDDEN_STATES)
            extra = {"added_cond_kwargs": given} if given else {}
            output = module(sample, timestep, context, **extra)
            return {tensors.OUT_SAMPLE: getattr(output, "sample", output).numpy()}

        return cls(LocalModel(name, run), **kwargs)


def ort_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"intra-op threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own untyped exceptions
        raise ValueError(f"ONNX Runtime cannot load {path}: {error}; rebuild it with "
                         "`driffusion build-engines --force`") from error


def session_output_names(session) -> list[str]:
    return [output.name for output in session.get_outputs()]


# ---------------------------------------------------------------------------------------------
# Triton over gRPC or HTTP (asyncio)


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
        from runtime.triton_http import HttpError

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


def raw_tensor_bytes(value: np.ndarray) -> bytes:
    """The wire bytes of one input: the array's memory, or length-prefixed strings for BYTES."""
    if value.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        return serialize_byte_tensor(value).item()  # one bytes object: the length-prefixed items
    return value.tobytes()


@cache
def triton_datatype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(dtype)
    if datatype is None:
        raise ValueError(f"input dtype {dtype} is not supported: send numeric arrays or bytes")
    return datatype


@cache
def numpy_dtype(datatype: str) -> np.dtype | None:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    return np.dtype(dtype) if dtype not in (None, np.object_) else None


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
    """

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 10.0) -> None:
        self.endpoints = [parse_endpoint(endpoint) for endpoint in endpoints]
        if not self.endpoints:
            raise ValueError("give at least one endpoint (HOST:PORT or http://HOST:PORT)")
        self.timeout_s = timeout_s
        self.clients: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.stubs: dict[str, Any] = {}
        self.http: dict[str, Any] = {}

    async def __aenter__(self) -> Self:
        from runtime.triton_http import HttpTriton

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
        from runtime.triton_http import HttpError

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
                found.append(device_from_config(self.model(endpoint, name), config, deadline_s))
        return found


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


# ---------------------------------------------------------------------------------------------
# The pool


@dataclass(frozen=True)
class _Task:
    """Rows of one item sent to one lane: the item's cond and/or uncond half."""

    item: int
    halves: tuple[str, ...]


@dataclass(frozen=True)
class Failover:
    """A call that failed on `device` and was re-issued on `replacement` after `seconds`."""

    device: str
    replacement: str
    error: str
    seconds: float


class PoolError(RuntimeError):
    """No device is left to run a round."""


class DevicePool:
    """One round's items spread over the devices concurrently: `pool.denoiser(conditioning)` is
    the sampler's `denoise` for one request.

    Each device offers `instances` lanes. A round of k items is cut into at most `width`
    chunks (one per lane of the pool as configured, healthy or not), every chunk is one model
    call, and the calls run concurrently (asyncio.gather). With classifier-free guidance each
    item is a cond/uncond pair evaluated in the same call, or split over two lanes with
    `cfg_parallel`. `batched` sends the whole round to one device in one call (one GPU: the
    round's items batched), and the round still holds `window` items (default
    DEFAULT_BATCHED_WINDOW), so DRiffusion keeps its parallelism on a single device.

    A chunk whose device fails is re-issued unchanged on a remaining device (`failovers` records
    each re-issue); each round starts background health checks of lost devices that are due,
    and a device that answers ready takes work again from the next round on.
    Because chunks never change with the devices' health, neither does any output.
    """

    def __init__(self, devices: Sequence[Device], *, cfg_parallel: bool = False,
                 batched: bool = False, window: int | None = None) -> None:
        if not devices:
            raise ValueError("a DevicePool needs at least one device")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window  # the natural window (None: see `width`)
        self.devices = list(devices)
        self.cfg_parallel = cfg_parallel
        self.batched = batched
        self.calls = 0  # model calls made (re-issues included)
        self.rounds = 0  # parallel rounds completed
        self.failovers: list[Failover] = []

    @property
    def lost(self) -> set[str]:
        """Names of the devices out of service."""
        return {device.name for device in self.devices if device.lost}

    @property
    def lanes(self) -> list[Device]:
        """One entry per concurrent call slot of the healthy devices."""
        healthy = [device for device in self.devices if not device.lost]
        if self.batched:
            return healthy[:1]
        return [device for device in healthy for _ in range(device.instances)]

    @property
    def width(self) -> int:
        """Model evaluations one round runs at once with every device up (the natural window).

        It does not shrink when a device is lost: the window, and so the result, must not
        depend on which devices happen to be healthy. It is the window given to the pool; else
        DEFAULT_BATCHED_WINDOW for a batched pool (whose round is one call, but of `width`
        items, so a single device still runs DRiffusion's rounds); else the lanes' count.
        """
        if self.window is not None:
            return self.window
        if self.batched:
            return DEFAULT_BATCHED_WINDOW
        return sum(device.instances for device in self.devices)

    def denoiser(self, conditioning: Conditioning) -> Denoise:
        """The sampler's `denoise(x, t)` for one request with this conditioning."""

        async def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return await self.run_round(x, t, conditioning)

        return denoise

    async def run_round(self, x: torch.Tensor, t: torch.Tensor,
                        conditioning: Conditioning) -> torch.Tensor:
        """One parallel round: x [items*B, C, H, W], t [items*B] -> outputs like x."""
        import torch  # imported here so that model processes that only serve ORT skip it

        batch = conditioning.batch
        items, remainder = divmod(x.shape[0], batch)
        if remainder or t.shape != (x.shape[0],):
            raise ValueError(
                f"round of {x.shape[0]} rows (t {tuple(t.shape)}) is not whole items of "
                f"latent batch {batch}"
            )
        sample = x.detach().cpu().numpy().astype(np.float32, copy=False)
        timestep = t.detach().cpu().numpy().astype(np.float32, copy=False)
        tasks = self._tasks(items, conditioning.uses_cfg)
        outputs = await self._run_round(tasks, sample, timestep, conditioning)
        self.rounds += 1
        return torch.from_numpy(self._combine(outputs, items, conditioning)).to(x.dtype)

    def _tasks(self, items: int, cfg: bool) -> list[_Task]:
        halves = ("uncond", "cond") if cfg else ("cond",)
        if self.cfg_parallel and len(halves) == 2:
            return [_Task(item, (half,)) for item in range(items) for half in halves]
        return [_Task(item, halves) for item in range(items)]

    async def _run_round(self, tasks, sample, timestep,
                         conditioning: Conditioning) -> dict[tuple[int, str], np.ndarray]:
        for device in self.devices:
            device.check_in_background()
        lanes = self.lanes
        if not lanes:
            raise PoolError(self._nothing_left())
        parts = 1 if self.batched else self.width  # batched: the whole round in one call
        chunks = [chunk for chunk in split_evenly(tasks, parts) if chunk]
        # rotate the first lane per round so that small rounds spread the load over devices
        start = self.rounds % len(lanes)
        results = await asyncio.gather(*(
            self._run_chunk(lanes[(start + index) % len(lanes)], chunk, sample, timestep,
                            conditioning)
            for index, chunk in enumerate(chunks)
        ))
        return {key: value for result in results for key, value in result.items()}

    async def recover(self) -> list[str]:
        """Health-check now the lost devices that are due; names of those back in service.

        Rounds start these checks in the background themselves; this waits for them.
        """
        due = [device for device in self.devices if device.check_due]
        back = await asyncio.gather(*(device.health_check() for device in due))
        return [device.name for device, ok in zip(due, back) if ok]

    async def _run_chunk(self, device: Device, chunk: list[_Task], sample, timestep,
                         conditioning: Conditioning) -> dict[tuple[int, str], np.ndarray]:
        """The outputs of a chunk's rows on one lane: rows whose conditioning shapes differ
        (a prompt and a negative prompt of different text lengths) go in separate calls, one
        after another, never padded."""
        rows = [(task.item, half) for task in chunk for half in task.halves]
        outputs: dict[tuple[int, str], np.ndarray] = {}
        for group in _groups_by_shape(rows, conditioning):
            device, answered = await self._call(device, group, sample, timestep, conditioning)
            outputs.update(answered)
        return outputs

    async def _call(self, device: Device, rows: list[tuple[int, str]], sample, timestep,
                    conditioning: Conditioning):
        """One model call on rows that stack, re-issued on a remaining device while devices
        fail: (the device that answered, the rows' outputs)."""
        batch = conditioning.batch
        parts = [_rows(item, half, sample, timestep, conditioning) for item, half in rows]
        stacked_sample = np.concatenate([part[0] for part in parts])
        stacked_timestep = np.concatenate([part[1] for part in parts])
        stacked_conditioning = {name: np.concatenate([part[2][name] for part in parts])
                                for name in parts[0][2]}
        while True:
            started = time.monotonic()
            try:
                self.calls += 1
                output = await device(stacked_sample, stacked_timestep, stacked_conditioning)
                break
            except DeviceError as error:
                if not error.lost:
                    raise
                device.mark_lost(error)
                failed, device = device, self._replacement()
                self.failovers.append(Failover(failed.name, device.name, str(error),
                                               time.monotonic() - started))
        return device, {row: output[index * batch : (index + 1) * batch]
                        for index, row in enumerate(rows)}

    def _replacement(self) -> Device:
        """A remaining device to re-issue a failed chunk on (PoolError if none is left)."""
        remaining = self.lanes
        if not remaining:
            raise PoolError(self._nothing_left())
        return remaining[self.calls % len(remaining)]

    def _nothing_left(self) -> str:
        reasons = "; ".join(f"{device.name}: {device.lost_error}" for device in self.devices)
        return f"no device left to run the round (every device failed: {reasons})"

    @staticmethod
    def _combine(outputs: dict[tuple[int, str], np.ndarray], items: int,
                 conditioning: Conditioning) -> np.ndarray:
        combined = []
        for item in range(items):
            cond = outputs[(item, "cond")]
            if conditioning.uses_cfg:
                cond = conditioning.combine(cond, outputs[(item, "uncond")],
                                            conditioning.guidance)
            combined.append(cond)
        return np.concatenate(combined)

    async def health(self) -> dict[str, bool]:
        """Readiness of every device, by name."""
        answers = await asyncio.gather(*(device.healthy() for device in self.devices))
        return {device.name: ok for device, ok in zip(self.devices, answers)}


def _rows(item: int, half: str, sample: np.ndarray, timestep: np.ndarray,
          conditioning: Conditioning):
    """Sample, timestep and conditioning rows of one item's cond or uncond half."""
    batch = conditioning.batch
    span = slice(item * batch, (item + 1) * batch)
    inputs = conditioning.cond if half == "cond" else conditioning.uncond
    return sample[span], timestep[span], inputs


def _groups_by_shape(rows: list[tuple[int, str]],
                     conditioning: Conditioning) -> list[list[tuple[int, str]]]:
    """The rows in groups of equal conditioning shapes (each group stacks into one call), in
    the order each shape first appears."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for item, half in rows:
        inputs = conditioning.cond if half == "cond" else conditioning.uncond
        shapes = tuple(sorted((name, value.shape) for name, value in inputs.items()))
        groups.setdefault(shapes, []).append((item, half))
    return list(groups.values())


def split_evenly(tasks: Sequence, parts: int) -> list[list]:
    """Cut `tasks` into `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(tasks), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(tasks[start:end]))
        start = end
    return chunks
