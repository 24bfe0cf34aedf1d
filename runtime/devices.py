"""Device layer: UNet evaluations on Triton models (gRPC aio), BLS or in-process, and the pool.

A *model client* runs one network (`infer(inputs) -> outputs`): a Triton model over
`tritonclient.grpc.aio`, a Triton model called by BLS from inside the server, an ONNX Runtime
session or a Python callable in-process. A `Device` is a model client holding a UNet. The
`DevicePool` is the sampler's `denoise`: it spreads one round's items over the devices
concurrently and applies classifier-free guidance. Nothing here knows the sampling method.

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

DEVICE_PATTERN = "unet_*"
DEFAULT_DEADLINE_S = 60.0
DEFAULT_RECHECK_S = 2.0  # first health check of a lost device after this long
MAX_RECHECK_S = 30.0  # back-off cap for a device that keeps failing after it answered ready
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
class UNetIO:
    """Tensor names and dtype of a UNet model (the export spec's names by default)."""

    sample: str = "sample"
    timestep: str = "timestep"
    context: str = "encoder_hidden_states"
    output: str = "out_sample"
    dtype: str = "float32"
    # the model batches (Triton max_batch_size > 0): the per-item timestep travels as [N, 1]
    batching: bool = False


class Device:
    """A UNet on one model client: `await device(sample, timestep, context) -> output`.

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
        io: UNetIO = UNetIO(),
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
        self.io = io
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

    async def __call__(
        self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray
    ) -> np.ndarray:
        """Evaluate rows [N, ...]; calls larger than the engine's max batch run one after another."""
        rows = sample.shape[0]
        step = self.max_batch or rows
        parts = [
            await self._infer(sample[i : i + step], timestep[i : i + step], context[i : i + step])
            for i in range(0, rows, step)
        ]
        output = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.calls += 1
        self.failures = 0
        return output

    async def _infer(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray):
        dtype = np.dtype(self.io.dtype)
        timestep = np.ascontiguousarray(timestep, dtype=np.float32)
        inputs = {
            self.io.sample: np.ascontiguousarray(sample, dtype=dtype),
            self.io.timestep: timestep.reshape(-1, 1) if self.io.batching else timestep,
            self.io.context: np.ascontiguousarray(context, dtype=dtype),
        }
        result = await self.model.infer(inputs, [self.io.output], self.deadline_s)
        output = result[self.io.output]
        if output.shape != sample.shape:
            raise DeviceError(self.name, f"returned shape {output.shape}, expected {sample.shape}")
        return output.astype(np.float32, copy=False)

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
    """A UNet evaluated in-process: an ONNX Runtime session, a torch module or a numpy function."""

    @classmethod
    def from_function(cls, name: str, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
                      io: UNetIO = UNetIO(), **kwargs) -> LocalDevice:
        """`fn(sample, timestep, context) -> output` on numpy arrays (e.g. `SimDiffusion.denoise`)."""

        def run(**inputs):
            return {io.output: fn(inputs[io.sample], inputs[io.timestep], inputs[io.context])}

        return cls(LocalModel(name, run), io=io, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int = 1, name: str | None = None,
                  **kwargs) -> LocalDevice:
        """An ONNX Runtime CPU session on `path` with `threads` intra-op threads."""
        session = ort_session(path, threads)
        io = unet_io_of_session(session)

        def run(**inputs):
            return dict(zip(session_output_names(session), session.run(None, inputs)))

        return cls(LocalModel(name or Path(path).stem, run), io=io, **kwargs)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, name: str = "torch",
                   **kwargs) -> LocalDevice:
        """A diffusers-style UNet module: `module(sample, timestep, context)` (.sample if present)."""
        import torch

        io = UNetIO()

        @torch.no_grad()
        def fn(sample, timestep, context):
            output = module(torch.from_numpy(sample), torch.from_numpy(timestep),
                            torch.from_numpy(context))
            return getattr(output, "sample", output).numpy()

        return cls.from_function(name, fn, io=io, **kwargs)


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


_ORT_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def unet_io_of_session(session) -> UNetIO:
    """UNet tensor names of an ONNX session (inputs sample, timestep, context in that order)."""
    inputs = session.get_inputs()
    if len(inputs) != 3:
        raise ValueError(
            f"a UNet needs 3 inputs (sample, timestep, encoder_hidden_states); "
            f"this model has {[i.name for i in inputs]}"
        )
    dtype = _ORT_FLOAT_TYPES.get(inputs[0].type, "float32")
    names = [i.name for i in inputs]
    return UNetIO(names[0], names[1], names[2], session_output_names(session)[0], dtype)


# ---------------------------------------------------------------------------------------------
# Triton over gRPC (asyncio)


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
            raw_input_contents=[value.tobytes() for value in inputs.values()],
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


def _input_tensor(name: str, value: np.ndarray):
    """The protobuf description (name, datatype, shape) of one numeric input tensor."""
    from tritonclient.grpc import service_pb2

    return service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=_triton_datatype(value.dtype), shape=value.shape
    )


@cache
def _triton_datatype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(dtype)
    if datatype in (None, "BYTES"):
        raise ValueError(f"input dtype {dtype} is not supported: send numeric arrays "
                         "(bool, int, uint, float)")
    return datatype


@cache
def _numpy_dtype(datatype: str) -> np.dtype | None:
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
        dtype = _numpy_dtype(output.datatype)
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


_TRITON_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16"}


class TritonEndpoints:
    """gRPC aio clients for a list of `host:port` endpoints; use as `async with`.

    Each endpoint gets a tritonclient client (discovery, configs, health) and an inference
    stub on a channel of its own (the models' direct-protobuf calls).
    """

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 10.0) -> None:
        self.endpoints = [parse_endpoint(endpoint) for endpoint in endpoints]
        if not self.endpoints:
            raise ValueError("give at least one endpoint (HOST:PORT)")
        self.timeout_s = timeout_s
        self.clients: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.stubs: dict[str, Any] = {}

    async def __aenter__(self) -> Self:
        import grpc
        import tritonclient.grpc.aio as grpc_aio
        from tritonclient.grpc import service_pb2_grpc

        for endpoint in self.endpoints:
            self.clients[endpoint] = grpc_aio.InferenceServerClient(
                endpoint, channel_args=channel_arguments()
            )
            channel = grpc.aio.insecure_channel(endpoint, options=channel_arguments())
            self.channels[endpoint] = channel
            self.stubs[endpoint] = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.gather(*(client.close() for client in self.clients.values()),
                             *(channel.close() for channel in self.channels.values()))
        self.clients.clear()
        self.channels.clear()
        self.stubs.clear()

    async def ready_models(self, endpoint: str) -> list[str]:
        """Names of the ready models on `endpoint` (DiscoveryError if it is not Triton)."""
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

    async def model_config(self, endpoint: str, model_name: str) -> dict:
        response = await self.clients[endpoint].get_model_config(
            model_name, as_json=True, client_timeout=self.timeout_s
        )
        return response.get("config", response)

    def model(self, endpoint: str, model_name: str) -> TritonModel:
        return TritonModel(self.clients[endpoint], self.stubs[endpoint], endpoint, model_name)

    async def find_model(self, model_name: str) -> TritonModel | None:
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
    """A Device whose instances, tensor names, dtype and max batch come from a Triton config."""
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
    inputs = config.get("input", [])
    names = [tensor["name"] for tensor in inputs]
    outputs = [tensor["name"] for tensor in config.get("output", [])]
    defaults = UNetIO()
    io = UNetIO(
        sample=defaults.sample if defaults.sample in names else names[0],
        timestep=defaults.timestep if defaults.timestep in names else names[1],
        context=defaults.context if defaults.context in names else names[2],
        output=defaults.output if defaults.output in outputs else outputs[0],
        dtype=_TRITON_DTYPES.get(inputs[0].get("data_type", "TYPE_FP32"), "float32"),
        batching=int(config.get("max_batch_size", 0)) > 0,
    )
    max_batch = int(config.get("max_batch_size", 0)) or None
    if max_batch is None:
        engine_limit = config.get("parameters", {}).get("max_batch", {}).get("string_value")
        max_batch = int(engine_limit) if engine_limit else None
    return Device(model, instances=instances, io=io, deadline_s=deadline_s, max_batch=max_batch)


def parse_endpoint(endpoint: str) -> str:
    """Validate `HOST:PORT` (port 1..65535) and return it stripped."""
    text = endpoint.strip()
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} must be HOST:PORT with a port in 1..65535")
    return text


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
    """The sampler's `denoise`: one round's items spread over the devices concurrently.

    Each device offers `instances` lanes. A round of k items is cut into at most `width`
    chunks (one per lane of the pool as configured, healthy or not), every chunk is one model
    call, and the calls run concurrently (asyncio.gather). With guidance != 1 each item is a
    cond/uncond pair evaluated in the same call, or split over two lanes with `cfg_parallel`.
    `batched` sends the whole round to one device in one call.

    A chunk whose device fails is re-issued unchanged on a remaining device (`failovers` records
    each re-issue); each round starts background health checks of lost devices that are due,
    and a device that answers ready takes work again from the next round on.
    Because chunks never change with the devices' health, neither does any output.
    """

    def __init__(self, devices: Sequence[Device], *, cfg_parallel: bool = False,
                 batched: bool = False) -> None:
        if not devices:
            raise ValueError("a DevicePool needs at least one device")
        self.devices = list(devices)
        self.cfg_parallel = cfg_parallel
        self.batched = batched
        self.calls = 0  # model calls made (re-issues included)
        self.rounds = 0  # parallel rounds completed
        self.failovers: list[Failover] = []
        self._cond: np.ndarray | None = None
        self._uncond: np.ndarray | None = None
        self.guidance = 1.0

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
        depend on which devices happen to be healthy.
        """
        return 1 if self.batched else sum(device.instances for device in self.devices)

    def condition(self, cond, uncond=None, guidance: float = 1.0) -> None:
        """Set the embeddings [B, S, D] of the latent batch and the guidance scale."""
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self._cond = _as_numpy(cond)
        self._uncond = None if uncond is None else _as_numpy(uncond)
        if self._uncond is not None and self._uncond.shape != self._cond.shape:
            raise ValueError(
                f"uncond embeddings {self._uncond.shape} must match cond {self._cond.shape}"
            )
        self.guidance = float(guidance)

    @property
    def uses_cfg(self) -> bool:
        return self._uncond is not None and self.guidance != 1.0

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One parallel round: x [items*B, C, H, W], t [items*B] -> outputs like x."""
        import torch  # imported here so that model processes that only serve ORT skip it

        if self._cond is None:
            raise RuntimeError("call DevicePool.condition(...) before sampling")
        batch = self._cond.shape[0]
        items, remainder = divmod(x.shape[0], batch)
        if remainder or t.shape != (x.shape[0],):
            raise ValueError(
                f"round of {x.shape[0]} rows (t {tuple(t.shape)}) is not whole items of "
                f"latent batch {batch}"
            )
        sample = x.detach().cpu().numpy().astype(np.float32, copy=False)
        timestep = t.detach().cpu().numpy().astype(np.float32, copy=False)
        outputs = await self._run_round(self._tasks(items), sample, timestep, batch)
        self.rounds += 1
        return torch.from_numpy(self._combine(outputs, items)).to(x.dtype)

    def _tasks(self, items: int) -> list[_Task]:
        halves = ("uncond", "cond") if self.uses_cfg else ("cond",)
        if self.cfg_parallel and len(halves) == 2:
            return [_Task(item, (half,)) for item in range(items) for half in halves]
        return [_Task(item, halves) for item in range(items)]

    async def _run_round(self, tasks, sample, timestep, batch) -> dict[tuple[int, str], np.ndarray]:
        for device in self.devices:
            device.check_in_background()
        lanes = self.lanes
        if not lanes:
            raise PoolError(self._nothing_left())
        chunks = [chunk for chunk in split_evenly(tasks, self.width) if chunk]
        # rotate the first lane per round so that small rounds spread the load over devices
        start = self.rounds % len(lanes)
        results = await asyncio.gather(*(
            self._run_chunk(lanes[(start + index) % len(lanes)], chunk, sample, timestep, batch)
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

    async def _run_chunk(self, device: Device, chunk: list[_Task], sample, timestep, batch):
        rows = [(task.item, half) for task in chunk for half in task.halves]
        inputs = [self._rows(item, half, sample, timestep, batch) for item, half in rows]
        stacked = inputs[0] if len(inputs) == 1 else [np.concatenate(parts) for parts in zip(*inputs)]
        while True:
            started = time.monotonic()
            try:
                self.calls += 1
                output = await device(*stacked)
                break
            except DeviceError as error:
                if not error.lost:
                    raise
                device.mark_lost(error)
                failed, device = device, self._replacement()
                self.failovers.append(Failover(failed.name, device.name, str(error),
                                               time.monotonic() - started))
        return {row: output[index * batch : (index + 1) * batch] for index, row in enumerate(rows)}

    def _replacement(self) -> Device:
        """A remaining device to re-issue a failed chunk on (PoolError if none is left)."""
        remaining = self.lanes
        if not remaining:
            raise PoolError(self._nothing_left())
        return remaining[self.calls % len(remaining)]

    def _nothing_left(self) -> str:
        reasons = "; ".join(f"{device.name}: {device.lost_error}" for device in self.devices)
        return f"no device left to run the round (every device failed: {reasons})"

    def _rows(self, item: int, half: str, sample, timestep, batch):
        span = slice(item * batch, (item + 1) * batch)
        context = self._cond if half == "cond" else self._uncond
        return sample[span], timestep[span], context

    def _combine(self, outputs: dict[tuple[int, str], np.ndarray], items: int) -> np.ndarray:
        combined = []
        for item in range(items):
            cond = outputs[(item, "cond")]
            if self.uses_cfg:
                uncond = outputs[(item, "uncond")]
                cond = uncond + self.guidance * (cond - uncond)
            combined.append(cond)
        return np.concatenate(combined)

    async def health(self) -> dict[str, bool]:
        """Readiness of every device, by name."""
        answers = await asyncio.gather(*(device.healthy() for device in self.devices))
        return {device.name: ok for device, ok in zip(self.devices, answers)}


def split_evenly(tasks: Sequence, parts: int) -> list[list]:
    """Cut `tasks` into `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(tasks), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(tasks[start:end]))
        start = end
    return chunks


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
