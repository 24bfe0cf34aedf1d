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
  client gets INVALID_ARGUMENT naming the field (on a stream: an error response for that
  request, and the stream goes on, as Triton answers); every other call goes through unchanged
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
import resource
import threading
from collections.abc import AsyncIterator

from triton_models.guard_http import HttpGuard
from triton_models.guard_limits import TRIM_BYTES, GuardLimits, MemoryBudget, give_heap_back_soon
from triton_models.guard_upstream import (
    INFER_METHOD,
    UNAVAILABLE_MESSAGE,
    ModelSpecs,
    upstream_details,
    upstream_ready,
)
from triton_models.request_check import (
    BadRequest,
    decode_grpc_infer,
    grpc_stream_error,
    model_of_grpc_infer,
    parse_grpc_infer,
    to_grpc_request,
)

START_TIMEOUT_S = 10.0
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Triton is on this host and restarted at once when it dies (triton_models/serve.py): try it
# again every 0.1-0.5 s, not with gRPC's default backoff (1 s growing to 120 s)
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500))


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

        if method != INFER_METHOD:
            return message
        try:
            return await self._canonical(message)
        except BadRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except OSError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)

    async def _canonical(self, message: bytes) -> bytes:
        """An inference request's canonical re-encoding, checked against its model's config
        (BadRequest naming the field; OSError while Triton cannot say)."""
        request = decode_grpc_infer(message)  # once: a message may be 64 MiB
        spec = await self.specs.get(model_of_grpc_infer(request))
        return to_grpc_request(parse_grpc_infer(request, lambda name: spec))

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

            writing = asyncio.Lock()  # the client's stream: answers from Triton and refusals

            async def write(message: bytes) -> None:
                async with writing:
                    await context.write(message)

            async def checked() -> AsyncIterator[bytes]:
                """The requests Triton gets; a bad one is answered on the stream with an error
                naming the field, and the stream goes on (as Triton does)."""
                async for request in requests:
                    client = await self._hold(request, context)
                    try:
                        yield await self._canonical(request)
                    except BadRequest as error:
                        await write(grpc_stream_error(request, str(error)))
                    except OSError:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)
                    finally:
                        self._drop(client, request)

            upstream = call(checked(), metadata=_passed_on(context.invocation_metadata()),
                            timeout=context.time_remaining())
            try:
                async for response in upstream:
                    await write(response)
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), upstream_details(error),
                                    _passed_on(error.trailing_metadata()))
            finally:
                # a client that cancels its stream cancels this task, also while it writes: its
                # requests on Triton must stop too (an async generator left suspended at a yield
                # would hold the upstream call open until the garbage collector closed it)
                upstream.cancel()

        return forward


def client_address(peer: str) -> str:
    """The address part of a gRPC peer ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5', 'unix:...')."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.index("]")] if "]" in rest else rest
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


def _passed_on(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata pairs one gRPC side hands to the other (gRPC sets its own)."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith(("grpc-", ":")) and key != "user-agent")
