"""A request guard on tritonserver's public gRPC and HTTP ports: byte caps, a strict HTTP
parser, time limits and a memory budget before Triton reads a request.

Triton 2.51 takes any request size on both ports (gRPC up to 2 GB, HTTP unbounded, and it
inflates gzip/deflate bodies without a cap, also under a header name it reads only up to a
NUL byte), and copies a request whole before any model can look at it. Under `driffusion
serve` (`--request-guard-bytes N`, default 64 MiB, 0: off; the other `--request-guard-*`
flags: models/limits.py GUARD_LIMITS), Triton listens on loopback ports of its own and this
guard holds the public ones, in a thread of the serving process:
- gRPC: messages over N bytes are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are
  read whole; every other call, unary or streaming, goes through unchanged (metadata,
  deadline, cancellation, status and trailers);
- HTTP (triton_models/guard_http.py): requests parsed by h11 and written anew to Triton;
  malformed, ambiguous, compressed, chunked and oversized ones are refused from their heads,
  slow ones are cut off, and bodies wait in a bounded memory budget until they are whole;
- an overloaded `driffusion` queue answers UNAVAILABLE (503) saying the server is busy.
Each public request costs one more local hop; the metrics port stays Triton's own.
"""
from __future__ import annotations

import asyncio
import resource
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields

from models.limits import GUARD_LIMITS

BUSY_TRITON_TEXT = "Exceeds maximum queue size"
BUSY_MESSAGE = ("server busy: every driffusion instance is working and its queue is full "
                f"(Triton: {BUSY_TRITON_TEXT}); retry later")
START_TIMEOUT_S = 10.0


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

    def __post_init__(self) -> None:
        if self.max_request_bytes == 0:
            raise ValueError(f"{guard_flag('max_request_bytes')} 0 means no guard; give a cap "
                             "of 1 byte or more")
        for field in fields(self):
            limit, value = GUARD_LIMITS[field.name], getattr(self, field.name)
            if not limit.low <= value <= limit.high:
                raise ValueError(f"{guard_flag(field.name)} must be in {limit.low}.."
                                 f"{limit.high}; got {value}")
        if self.memory_bytes < self.max_request_bytes:
            raise ValueError(f"{guard_flag('memory_bytes')} ({self.memory_bytes}) must be at "
                             f"least {guard_flag('max_request_bytes')} "
                             f"({self.max_request_bytes}): a body of the largest size must fit")


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
            ("grpc.max_send_message_length", cap), ("grpc.max_receive_message_length", -1)])
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers((_GrpcForward(channel),))
        server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        await server.start()
        http = HttpGuard(self.limits, http_upstream)
        try:
            await http.start(self.host, self.http_port)
            started.set()
            await self._stopped.wait()
        finally:
            await http.stop()
            await server.stop(grace=None)
            await channel.close()


def allow_open_files(count: int) -> None:
    """Raise this process's soft limit of open files to `count` where the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _GrpcForward:
    """Every gRPC method of Triton's service, forwarded as raw bytes."""

    def __init__(self, channel) -> None:
        self.channel = channel

    def service(self, details):
        import grpc

        method = details.method
        if method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method: str):
        call = self.channel.unary_unary(method)

        async def forward(request: bytes, context):
            import grpc

            try:
                return await call(request, metadata=_passed_on(context.invocation_metadata()),
                                  timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), _details(error),
                                    _passed_on(error.trailing_metadata()))

        return forward

    def _stream(self, method: str):
        call = self.channel.stream_stream(method)

        async def forward(requests: AsyncIterator[bytes], context):
            import grpc

            try:
                async for response in call(requests, metadata=_passed_on(context.invocation_metadata()),
                                           timeout=context.time_remaining()):
                    yield response
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), _details(error),
                                    _passed_on(error.trailing_metadata()))

        return forward


def _passed_on(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata pairs one gRPC side hands to the other (gRPC sets its own)."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith(("grpc-", ":")) and key != "user-agent")


def _details(error) -> str:
    details = error.details() or ""
    return BUSY_MESSAGE if BUSY_TRITON_TEXT in details else details
