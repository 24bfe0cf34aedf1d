"""A request guard on tritonserver's public gRPC and HTTP ports: byte caps, a strict HTTP
parser, time limits and a memory budget before Triton reads a request.

Triton 2.51 takes any request size on both ports (gRPC up to 2 GB, HTTP unbounded, and it
inflates gzip/deflate bodies without a cap, also under a header name it reads only up to a
NUL byte), and copies a request whole before any model can look at it. Under `driffusion
serve` (`--request-guard-bytes N`, default 64 MiB, 0: off; the other `--request-guard-*`
flags: models/limits.py GUARD_LIMITS), Triton listens on loopback ports of its own and this
guard holds the public ones, in a thread of the serving process:
- gRPC: messages over N bytes are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are
  read whole, calls beyond --request-guard-grpc-calls likewise; a message that does not fit
  the memory budget shared with HTTP gets UNAVAILABLE; an inference request is parsed and
  checked against the model's config (triton_models/request_check.py: shapes against the
  data, datatypes, value ranges, names) and Triton gets its canonical re-encoding, or the
  client gets INVALID_ARGUMENT naming the field; every other call goes through unchanged
  (metadata, deadline, cancellation, status and trailers);
- HTTP (triton_models/guard_http.py): requests parsed by h11; malformed, ambiguous,
  compressed, chunked and oversized ones are refused from their heads, slow ones are cut off,
  and bodies wait in the memory budget until they are whole; inference requests are checked
  like gRPC ones and sent to Triton over gRPC, so a client that disconnects cancels its
  request; other bodies must be JSON within the guard's depth limit;
- an overloaded `driffusion` queue answers UNAVAILABLE (503) saying the server is busy.
Each public request costs one more local hop; the metrics port stays Triton's own.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import re
import resource
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields

from models.limits import GUARD_LIMITS
from triton_models.request_check import (
    BadRequest,
    ModelSpec,
    decode_grpc_infer,
    model_of_grpc_infer,
    parse_grpc_infer,
    to_grpc_request,
)

BUSY_TRITON_TEXT = "Exceeds maximum queue size"
BUSY_MESSAGE = ("server busy: every driffusion instance is working and its queue is full "
                f"(Triton: {BUSY_TRITON_TEXT}); retry later")
START_TIMEOUT_S = 10.0
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UNAVAILABLE_MESSAGE = ("the inference server is not answering (it may be restarting); retry "
                       "later")
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what a model repository's names may be
TRIM_BYTES = 4 << 20  # after dropping a request this large, give freed heap back to the system
TRIM_DELAY_S = 0.5
CONNECT_WAIT_S = 1.0
# Triton is on this host and restarted at once when it dies (triton_models/serve.py): try it
# again every 0.1-0.5 s, not with gRPC's default backoff (1 s growing to 120 s)
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500))
_trim: asyncio.TimerHandle | None = None  # the pending give_heap_back() of the guard's loop


def guard_flag(name: str) -> str:
    """The `driffusion serve` flag of guard limit `name`."""
    return ("--request-guard-bytes" if name == "max_request_bytes"
            else f"--request-guard-{name.replace('_', '-')}")


@dataclass(frozen=True)
class GuardLimits:
    """What the guard allows (defaults and ranges: models/limits.py GUARD_LIMITS)."""

    max_request_bytes: int = GUARD_LIMITS["max_request_bytes"].default
    header_timeout_s: int = GUARD_LIMITS["header_timeout_s"].default
    body_timeout_s: int = GUARD_LIMITS["body_timeout_s"].default
    min_rate: int = GUARD_LIMITS["min_rate"].default
    memory_bytes: int = GUARD_LIMITS["memory_bytes"].default
    connections: int = GUARD_LIMITS["connections"].default
    json_bytes: int = GUARD_LIMITS["json_bytes"].default
    client_memory_bytes: int = GUARD_LIMITS["client_memory_bytes"].default
    client_connections: int = GUARD_LIMITS["client_connections"].default
    grpc_calls: int = GUARD_LIMITS["grpc_calls"].default

    def __post_init__(self) -> None:
        if self.max_request_bytes == 0:
            raise ValueError(f"{guard_flag('max_request_bytes')} 0 means no guard; give a cap "
                             "of 1 byte or more")
        for field in fields(self):
            limit, value = GUARD_LIMITS[field.name], getattr(self, field.name)
            if not limit.low <= value <= limit.high:
                raise ValueError(f"{guard_flag(field.name)} must be in {limit.low}.."
                                 f"{limit.high}; got {value}")
        for name in ("memory_bytes", "client_memory_bytes"):
            if getattr(self, name) < self.max_request_bytes:
                raise ValueError(f"{guard_flag(name)} ({getattr(self, name)}) must be at "
                                 f"least {guard_flag('max_request_bytes')} "
                                 f"({self.max_request_bytes}): a body of the largest size must "
                                 "fit")


class RequestGuard:
    """Public `host`:`grpc_port` / `http_port` in front of Triton's loopback ports."""

    def __init__(self, *, host: str, grpc_port: int, http_port: int, upstream_grpc_port: int,
                 upstream_http_port: int, limits: GuardLimits) -> None:
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.upstream = ("127.0.0.1", upstream_grpc_port, upstream_http_port)
        self.limits = limits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def start(self) -> None:
        """Listen on the public ports (returns once they accept connections)."""
        started = threading.Event()
        failure: list[BaseException] = []
        # every public HTTP connection may hold one to Triton too
        allow_open_files(2 * self.limits.connections + 256)

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve(started))
            except BaseException as error:  # noqa: BLE001 - reported by start()
                failure.append(error)
                started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=serve, name="request-guard", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S) or failure:
            raise RuntimeError(f"the request guard did not start: {failure or 'timeout'}")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(START_TIMEOUT_S)
        self._thread = None

    async def _serve(self, started: threading.Event) -> None:
        import grpc

        from triton_models.guard_http import HttpGuard

        self._stopped = asyncio.Event()
        host, grpc_upstream, http_upstream = self.upstream
        cap = self.limits.max_request_bytes
        channel = grpc.aio.insecure_channel(f"{host}:{grpc_upstream}", options=[
            ("grpc.max_send_message_length", cap), ("grpc.max_receive_message_length", -1),
            *RECONNECT])
        budget = MemoryBudget(self.limits.memory_bytes, self.limits.client_memory_bytes)
        specs = ModelSpecs(http_upstream)
        server = grpc.aio.server(maximum_concurrent_rpcs=self.limits.grpc_calls, options=[
            ("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers((_GrpcForward(channel, budget, specs),))
        server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        await server.start()
        http = HttpGuard(self.limits, http_upstream, budget, specs, channel)
        try:
            await http.start(self.host, self.http_port)
            started.set()
            await self._stopped.wait()
        finally:
            await http.stop()
            await server.stop(grace=None)
            await channel.close()
            await specs.triton.close()  # Triton waits for open HTTP connections when it stops


def allow_open_files(count: int) -> None:
    """Raise this process's soft limit of open files to `count` where the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class MemoryBudget:
    """Bytes of requests (HTTP bodies, gRPC messages) the guard holds at once, in all and per
    client address, counted as they arrive (one event loop uses it: no lock)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.held = 0
        self.by_client: dict[str, int] = {}

    def full(self, client: str, count: int) -> str | None:
        """The name of the guard limit that `count` more bytes for `client` would pass now, or
        None (nothing is counted)."""
        if self.held + count > self.total:
            return "memory_bytes"
        if self.by_client.get(client, 0) + count > self.per_client:
            return "client_memory_bytes"
        return None

    def take(self, client: str, count: int) -> str | None:
        """None once `count` more bytes are counted for `client`; else the name of the guard
        limit that they would pass (nothing is counted then)."""
        full = self.full(client, count)
        if full is None:
            self.held += count
            self.by_client[client] = self.by_client.get(client, 0) + count
        return full

    def give_back(self, client: str, count: int) -> None:
        self.held -= count
        left = self.by_client.get(client, 0) - count
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)

    def busy_message(self, limit: str) -> str:
        """What a client is told whose request does not fit `limit` (a `full` answer)."""
        whose, total = (("this client address's", self.per_client)
                        if limit == "client_memory_bytes" else ("all", self.total))
        return (f"server busy: request bytes in transit fill {whose} {total} bytes of the "
                f"guard ({guard_flag(limit)}); retry later")


class ModelSpecs:
    """What the guard checks inference requests against: each model's config, fetched from
    Triton's loopback HTTP port on first use and kept (the repository never changes while
    Triton runs: model control mode none)."""

    def __init__(self, http_port: int) -> None:
        from runtime.triton_http import HttpTriton

        self.triton = HttpTriton("127.0.0.1", http_port)
        self._specs: dict[str, ModelSpec] = {}

    async def get(self, model: str) -> ModelSpec:
        """The spec of `model`; BadRequest for a model Triton does not serve, OSError when
        Triton does not answer."""
        import json

        from runtime.triton_http import HttpError

        if model in self._specs:
            return self._specs[model]
        if not MODEL_NAME.fullmatch(model):
            raise BadRequest(f"model name {model[:64]!r}: not a model of this server (names "
                             "are letters, digits, '_', '.', '-')")
        try:
            _, body = await self.triton.request("GET", f"/v2/models/{model}/config",
                                                timeout_s=START_TIMEOUT_S)
        except HttpError:
            raise BadRequest(f"Request for unknown model: '{model}' is not found") from None
        except asyncio.TimeoutError as error:
            raise OSError("Triton did not answer for a model config") from error
        self._specs[model] = ModelSpec.from_config(json.loads(body))
        return self._specs[model]


class _GrpcForward:
    """Every gRPC method of Triton's service, forwarded as raw bytes; inference requests are
    checked and re-encoded first, and every message is counted against the memory budget while
    its call runs."""

    def __init__(self, channel, budget: MemoryBudget, specs: ModelSpecs) -> None:
        self.channel = channel
        self.budget = budget
        self.specs = specs

    def service(self, details):
        import grpc

        method = details.method
        if method == STREAM_METHOD:
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    async def _checked(self, method: str, message: bytes, context) -> bytes:
        """The message Triton gets: an inference request's canonical re-encoding, any other
        message as it came; the call is aborted with INVALID_ARGUMENT for a bad request."""
        import grpc

        if method not in (INFER_METHOD, STREAM_METHOD):
            return message
        try:
            request = decode_grpc_infer(message)  # once: a message may be 64 MiB
            spec = await self.specs.get(model_of_grpc_infer(request))
            return to_grpc_request(parse_grpc_infer(request, lambda name: spec))
        except BadRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except OSError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)

    async def _hold(self, message: bytes, context) -> str:
        """Count `message` against the memory budget for its client (its address); the call is
        aborted with UNAVAILABLE when it does not fit."""
        import grpc

        client = client_address(context.peer())
        full = self.budget.take(client, len(message))
        if full is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.budget.busy_message(full))
        return client

    def _drop(self, client: str, message: bytes) -> None:
        self.budget.give_back(client, len(message))
        if len(message) >= TRIM_BYTES:
            give_heap_back_soon()

    def _unary(self, method: str):
        call = self.channel.unary_unary(method)

        async def forward(request: bytes, context):
            import grpc

            client = await self._hold(request, context)
            try:
                checked = await self._checked(method, request, context)
                if not await upstream_ready(self.channel):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)
                return await call(checked, metadata=_passed_on(context.invocation_metadata()),
                                  timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), upstream_details(error),
                                    _passed_on(error.trailing_metadata()))
            finally:
                self._drop(client, request)

        return forward

    def _stream(self, method: str):
        call = self.channel.stream_stream(method)

        async def forward(requests: AsyncIterator[bytes], context):
            import grpc

            async def checked() -> AsyncIterator[bytes]:
                async for request in requests:
                    client = await self._hold(request, context)
                    try:
                        yield await self._checked(method, request, context)
                    finally:
                        self._drop(client, request)

            try:
                async for response in call(checked(),
                                           metadata=_passed_on(context.invocation_metadata()),
                                           timeout=context.time_remaining()):
                    yield response
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), upstream_details(error),
                                    _passed_on(error.trailing_metadata()))

        return forward


async def upstream_ready(channel) -> bool:
    """Whether the channel to Triton is connected, waiting up to CONNECT_WAIT_S while it
    reconnects (after a restart a call would otherwise fail until the next retry)."""
    import grpc

    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return True
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_WAIT_S)
    except asyncio.TimeoutError:
        return False
    return True


def client_address(peer: str) -> str:
    """The address part of a gRPC peer ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5', 'unix:...')."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.index("]")] if "]" in rest else rest
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


def give_heap_back_soon(delay_s: float = TRIM_DELAY_S) -> None:
    """give_heap_back() once, `delay_s` from now (gRPC frees a call's buffers after the call
    ends): many large requests in a row trim once."""
    global _trim
    if _trim is None or _trim.cancelled() or _trim.when() < asyncio.get_running_loop().time():
        _trim = asyncio.get_running_loop().call_later(delay_s, give_heap_back)


def give_heap_back() -> None:
    """Free what refused requests left and return free heap pages to the system. Measured: 20
    concurrent 60 MB gRPC messages refused by the guard left its process 1.4 GB larger, held by
    reference cycles through the aborted calls' tracebacks (gc.collect frees them) and by glibc's
    heaps (malloc_trim returns them): 1.7 GB -> 0.16 GB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _passed_on(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata pairs one gRPC side hands to the other (gRPC sets its own)."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith(("grpc-", ":")) and key != "user-agent")


def upstream_details(error) -> str:
    """What the client is told of Triton's error: its own text, less anything that names the
    loopback address behind the guard."""
    import grpc

    details = error.details() or ""
    if BUSY_TRITON_TEXT in details:
        return BUSY_MESSAGE
    if error.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" in details:
        return UNAVAILABLE_MESSAGE
    return details
