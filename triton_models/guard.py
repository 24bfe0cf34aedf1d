"""A request guard on tritonserver's public gRPC and HTTP ports: byte caps before Triton reads.

Triton 2.51 takes any request size on both ports (gRPC up to 2 GB, HTTP unbounded, and it
inflates gzip/deflate bodies without a cap), and copies a request whole before any model can
look at it. Under `driffusion serve` (`--request-guard-bytes N`, default 64 MiB, 0: off),
Triton listens on loopback ports of its own and this guard holds the public ones, in a thread
of the serving process:
- gRPC: messages over N bytes are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are
  read whole; every other call, unary or streaming, goes through unchanged (metadata,
  deadline, cancellation, status and trailers);
- HTTP: a body over N bytes (413), a compressed body (415) and a chunked body (411) are refused
  from the headers alone; everything else goes through unchanged, on kept-alive connections;
- an overloaded `driffusion` queue answers UNAVAILABLE (503) saying the server is busy.
Each public request costs one more local hop; the metrics port stays Triton's own.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

BUSY_TRITON_TEXT = "Exceeds maximum queue size"
BUSY_MESSAGE = ("server busy: every driffusion instance is working and its queue is full "
                f"(Triton: {BUSY_TRITON_TEXT}); retry later")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "upgrade", "expect", "content-length"}
MAX_HEADER_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0
LINGER_S = 2.0  # how long a refused HTTP body is read and dropped before the connection closes


class RequestGuard:
    """Public `host`:`grpc_port` / `http_port` in front of Triton's loopback ports."""

    def __init__(self, *, host: str, grpc_port: int, http_port: int, upstream_grpc_port: int,
                 upstream_http_port: int, max_request_bytes: int) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max request bytes must be >= 1; got {max_request_bytes}")
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.upstream = ("127.0.0.1", upstream_grpc_port, upstream_http_port)
        self.max_request_bytes = max_request_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def start(self) -> None:
        """Listen on the public ports (returns once they accept connections)."""
        started = threading.Event()
        failure: list[BaseException] = []

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
        host, grpc_upstream, _ = self.upstream
        channel = grpc.aio.insecure_channel(f"{host}:{grpc_upstream}", options=[
            ("grpc.max_send_message_length", self.max_request_bytes),
            ("grpc.max_receive_message_length", -1)])
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_request_bytes),
            ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers((_GrpcForward(channel),))
        server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        await server.start()
        http = await asyncio.start_server(self._http_connection, self.host, self.http_port,
                                          limit=MAX_HEADER_BYTES)
        started.set()
        try:
            await self._stopped.wait()
        finally:
            http.close()
            await server.stop(grace=None)
            await channel.close()

    async def _http_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        host, _, http_upstream = self.upstream
        upstream = None
        try:
            while True:
                request = await _read_head(reader)
                if request is None:
                    return
                line, headers = request
                refusal = self._http_refusal(headers)
                if refusal:
                    await _answer(writer, *refusal, close=True)
                    await _linger(reader)
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if upstream is None:
                    upstream = await asyncio.open_connection(host, http_upstream)
                status, answer_headers, answer = await _forward(upstream, line, headers, body)
                if status == 503 and BUSY_TRITON_TEXT.encode() in answer:
                    answer = json.dumps({"error": BUSY_MESSAGE}).encode()
                close = headers.get("connection", "").lower() == "close"
                _write_answer(writer, status, answer_headers, answer, close)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()

    def _http_refusal(self, headers: dict[str, str]) -> tuple[int, str] | None:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return 415, (f"compressed request bodies (Content-Encoding: {encoding[:32]}) are "
                         "refused; send the body uncompressed")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 411, "chunked request bodies are refused; send a Content-Length"
        length = headers.get("content-length", "0").strip()
        if not length.isdigit():
            return 400, "Content-Length must be a number of bytes"
        if int(length) > self.max_request_bytes:
            return 413, (f"the request body has {length} bytes; this server takes at most "
                         f"{self.max_request_bytes} (--request-guard-bytes)")
        return None


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


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client still sends for a moment, so that it finishes writing the
    refused body and reads the answer instead of meeting a reset connection."""
    try:
        await asyncio.wait_for(_drop_until_end(reader), LINGER_S)
    except (asyncio.TimeoutError, ConnectionError):
        pass


async def _drop_until_end(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]] | None:
    """(request line, headers by lower-case name) of the next request; None at a clean end."""
    from runtime.triton_http import read_headers

    line = await reader.readline()
    if not line:
        return None
    return line.rstrip(b"\r\n"), await read_headers(reader, MAX_HEADER_BYTES - len(line))


async def _forward(upstream, line: bytes, headers: dict[str, str],
                   body: bytes) -> tuple[int, dict[str, str], bytes]:
    from runtime.triton_http import read_answer

    reader, writer = upstream
    kept = [f"{name}: {value}" for name, value in headers.items() if name not in HOP_BY_HOP]
    head = "\r\n".join([line.decode("latin-1"), *kept, f"Content-Length: {len(body)}"])
    writer.write(head.encode("latin-1") + b"\r\n\r\n" + body)
    return await read_answer(reader)


def _write_answer(writer: asyncio.StreamWriter, status: int, headers: dict[str, str],
                  body: bytes, close: bool) -> None:
    kept = [f"{name}: {value}" for name, value in headers.items() if name not in HOP_BY_HOP]
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", *kept,
             f"Content-Length: {len(body)}", f"Connection: {'close' if close else 'keep-alive'}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


async def _answer(writer: asyncio.StreamWriter, status: int, message: str,
                  close: bool) -> None:
    body = json.dumps({"error": message}).encode()
    _write_answer(writer, status, {"content-type": "application/json"}, body, close)
    await writer.drain()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required",
            413: "Content Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
            503: "Service Unavailable"}
