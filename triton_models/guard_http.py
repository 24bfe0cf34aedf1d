"""The request guard's HTTP/1.1 port: requests parsed by h11 under time limits and a memory
budget, then written anew to Triton's loopback HTTP port.

Nothing a client sends reaches Triton as sent. h11 parses the request (header names must be
RFC 9110 tokens, values hold no control bytes, framing must be unambiguous); the guard then
writes the request line and the parsed headers itself, without hop-by-hop, framing and coding
headers, with one Content-Length, followed by the body once the whole of it has arrived.
Refused before Triton sees a byte, and the connection closed:
- malformed HTTP (h11's verdict), a framing or coding header given twice, or a header name that
  reads as one once punctuation is dropped (Content_Encoding): 400; a head over 16 KiB: 431;
- a method other than GET and POST: 405; an HTTP version other than 1.0 and 1.1: 505;
- any Transfer-Encoding: 411; a Content-Encoding other than identity: 415;
- a body over the byte cap: 413; a body whose bytes, as they arrive, do not fit the memory
  budget (in all, or for its client address), or a connection over the connection cap (in all,
  or for its client address): 503 with Retry-After;
- a head not complete within the header timeout, a body that goes silent for the body timeout
  or averages under the minimum rate after it: 408 (an idle kept-alive connection is closed
  without an answer).
A refused request's body is still read and dropped (up to its declared length, while it keeps
coming) before the connection closes, so the client reads the answer instead of a reset.
"""
from __future__ import annotations

import asyncio
import json
import mmap
import re
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from urllib.parse import unquote

import h11

from triton_models.guard_limits import (
    TRIM_BYTES,
    GuardLimits,
    MemoryBudget,
    give_heap_back_soon,
    guard_flag,
)
from triton_models.guard_upstream import (
    BUSY_MESSAGE,
    BUSY_TRITON_TEXT,
    INFER_METHOD,
    UNAVAILABLE_MESSAGE,
    ModelSpecs,
    upstream_details,
    upstream_ready,
)
from triton_models.kserve_http import http_answer, http_error
from triton_models.request_check import (
    BadRequest,
    CheckLimits,
    check_json,
    header_length_value,
    parse_http_infer,
    to_grpc_request,
)

READ_BYTES = 64 * 1024  # one read from a client
WRITE_BYTES = 1 << 20  # one write of a body to Triton
MAX_HEAD_BYTES = 16 * 1024  # Triton clients send well under 1 KiB; nginx allows 8 KiB a line
LINGER_S = 2.0  # how long a refused request's body is read and dropped before closing
METHODS = (b"GET", b"POST")  # all that Triton's HTTP/REST API uses
VERSIONS = (b"1.0", b"1.1")
# framing and coding headers: each at most once; the guard writes Content-Length itself and
# forwards neither coding
FRAMING = (b"content-length", b"transfer-encoding", b"content-encoding")
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"upgrade", b"expect"}
NOT_FORWARDED = HOP_BY_HOP | set(FRAMING)  # of a request
NOT_ANSWERED = HOP_BY_HOP | {b"content-length", b"transfer-encoding"}  # of Triton's answer
# bytes a header name loses before it is compared with the framing names
PUNCTUATION = bytes(sorted(set(range(256)) - set(b"0123456789abcdefghijklmnopqrstuvwxyz"
                                                 b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")))
LOOKALIKES = {name.translate(None, PUNCTUATION): name for name in FRAMING}
MAPPED_BYTES = 1 << 20  # bodies from this size up are held in a mapping of their own
INFER_TARGET = re.compile(rb"/v2/models/([^/?#]+)(?:/versions/([^/?#]+))?/infer(?:\?.*)?")
ALLOWED = ("this server takes HTTP/1.1 requests with header names that are RFC 9110 tokens, a "
           f"head of at most {MAX_HEAD_BYTES} bytes, at most one Content-Length and no "
           "Transfer-Encoding")


class Refusal(Exception):
    """An answer the guard gives itself; the connection closes after it."""

    def __init__(self, status: int, message: str, *, linger: bool = True,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.linger = linger  # read and drop what the client still sends before closing
        self.headers = headers


def busy(budget: MemoryBudget, limit: str) -> Refusal:
    """The 503 for a request whose bytes do not fit the guard limit `limit`."""
    return Refusal(503, budget.busy_message(limit), headers=(("retry-after", "1"),))


class Body:
    """A request body on its way to Triton, its bytes counted against the memory budget as they
    arrive until it is released. A large one lies in an anonymous memory mapping of its
    declared length, whose pages are taken only as bytes arrive and go back to the system when
    it is released (a freed heap block of that size may stay in the process)."""

    def __init__(self, length: int, budget: MemoryBudget, client: str) -> None:
        self.length = length
        self.filled = 0
        self.client = client
        self._budget: MemoryBudget | None = budget
        self._memory = mmap.mmap(-1, length) if length >= MAPPED_BYTES else bytearray()

    def append(self, data: bytes) -> None:
        """Hold `data`, the next bytes of the body; a Refusal (503) if they do not fit."""
        full = self._budget.take(self.client, len(data))
        if full is not None:
            raise busy(self._budget, full)
        if isinstance(self._memory, mmap.mmap):
            self._memory[self.filled:self.filled + len(data)] = data
        else:
            self._memory += data
        self.filled += len(data)

    def view(self) -> memoryview:
        return memoryview(self._memory)[:self.filled]

    def slices(self, size: int) -> Iterator[memoryview]:
        with memoryview(self._memory) as view:
            for start in range(0, self.length, size):
                yield view[start:start + size]

    def release(self) -> None:
        if self._budget is None:
            return
        self._budget.give_back(self.client, self.filled)
        self._budget = None
        if isinstance(self._memory, mmap.mmap):
            try:
                self._memory.close()
            except BufferError:  # a slice still sits in a transport: unmapped when it goes
                pass


class HttpGuard:
    """Triton's HTTP API on a public port, behind the guard's limits."""

    def __init__(self, limits: GuardLimits, upstream_port: int, budget: MemoryBudget,
                 specs: ModelSpecs, channel) -> None:
        self.limits = limits
        self.upstream_port = upstream_port
        self.budget = budget
        self.specs = specs
        self.channel = channel
        self.infer = channel.unary_unary(INFER_METHOD)  # Triton's gRPC port: it cancels
        # JSON is parsed one body at a time, beside the event loop: its memory is a few times
        # the body's, so at most one such peak at once
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="guard-json")
        self._connections: set[asyncio.Task] = set()
        self._by_client: dict[str, int] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port,
                                                  limit=READ_BYTES)

    async def stop(self) -> None:
        """Stop listening and end every connection (none is left pending)."""
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.parser.shutdown(wait=False, cancel_futures=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        connection = PublicConnection(self, reader, writer)
        client = connection.client
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            if len(self._connections) > self.limits.connections:
                await connection.refuse(Refusal(
                    503, f"server busy: {self.limits.connections} HTTP connections are open "
                    f"({guard_flag('connections')}); retry later",
                    headers=(("retry-after", "1"),)))
            elif self._by_client[client] > self.limits.client_connections:
                await connection.refuse(Refusal(
                    503, f"server busy: this client address holds "
                    f"{self.limits.client_connections} HTTP connections "
                    f"({guard_flag('client_connections')}); retry later",
                    headers=(("retry-after", "1"),)))
            else:
                await connection.serve()
        except (ConnectionError, asyncio.TimeoutError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:  # stop(): the task ends quietly, as its stream expects
            pass
        finally:
            self._connections.discard(task)
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]
            connection.close()


class PublicConnection:
    """One client connection: requests one after another, each checked, then forwarded."""

    def __init__(self, guard: HttpGuard, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.guard = guard
        self.limits = guard.limits
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.unread = 0  # bytes of the current request's body not read yet

    async def serve(self) -> None:
        while True:
            try:
                request = await self._next_request()
                if request is None:
                    return
                body = await self._read_body(checked_length(*request, self.limits))
                try:
                    answer = await self._answer_for(request[0], body)
                finally:
                    body.release()
                    if body.length >= TRIM_BYTES:
                        give_heap_back_soon()
            except Refusal as refusal:
                await self.refuse(refusal)
                return
            await self._answer(*answer)
            if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
                return
            self.http.start_next_cycle()

    def close(self) -> None:
        """Close the client's connection (at once if an answer is stuck in its buffer) and
        Triton's."""
        if self.writer.transport.get_write_buffer_size():
            self.writer.transport.abort()
        else:
            self.writer.close()
        if self.upstream is not None:
            self.upstream[1].transport.abort()
            self.upstream = None

    async def _next_request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its head as received; None when the client ends or stays
        silent for the header timeout before sending a byte of it."""
        deadline = self.loop.time() + self.limits.header_timeout_s
        received = bytearray(self.http.trailing_data[0])  # what came after the last request
        while True:
            event = self._next_event()
            if isinstance(event, h11.Request):
                unread = len(self.http.trailing_data[0])
                self.unread = declared_length(event) - unread
                return event, bytes(received[:len(received) - unread])
            if event is not h11.NEED_DATA:
                return None  # the client closed the connection between requests
            data = await self._receive(deadline)
            if data is None:
                if not received:
                    return None
                raise Refusal(408, "the request head did not arrive within "
                              f"{self.limits.header_timeout_s} s "
                              f"({guard_flag('header_timeout_s')})", linger=False)
            received += data
            self.http.receive_data(data)

    async def _read_body(self, length: int) -> Body:
        """The whole body, while it fits the memory budget and keeps arriving."""
        body = Body(length, self.guard.budget, self.client)
        try:
            if self.http.they_are_waiting_for_100_continue:
                full = self.guard.budget.full(self.client, length)
                if full is not None:  # the client has not sent the body: tell it now
                    raise busy(self.guard.budget, full)
                await self._send(h11.InformationalResponse(status_code=100, headers=[],
                                                             reason=b"Continue"))
            started = self.loop.time()
            while True:
                event = self._next_event()
                if isinstance(event, h11.Data):
                    body.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return body
                else:
                    await self._receive_body(started, body.filled)
        except BaseException:
            body.release()
            raise

    async def _receive_body(self, started: float, received: int) -> None:
        """Feed h11 the next bytes of a body, or refuse one that stalls or trickles."""
        now = self.loop.time()
        pause = self.limits.body_timeout_s
        deadline = now + pause
        if self.limits.min_rate:
            deadline = min(deadline, started + pause + received / self.limits.min_rate)
        data = await self._receive(deadline)
        if data is not None:
            self.unread -= len(data)
            self.http.receive_data(data)
        elif deadline - now > pause - 0.01:
            raise Refusal(408, f"no byte of the request body came for {pause} s "
                          f"({guard_flag('body_timeout_s')})", linger=False)
        else:
            raise Refusal(408, f"the request body came at under {self.limits.min_rate} "
                          f"bytes/s ({guard_flag('min_rate')})", linger=False)

    async def _receive(self, deadline: float) -> bytes | None:
        """The client's next bytes (b"" at its end); None once `deadline` has passed."""
        left = deadline - self.loop.time()
        if left <= 0:
            return None
        try:
            return await asyncio.wait_for(self.reader.read(READ_BYTES), left)
        except asyncio.TimeoutError:
            return None

    def _next_event(self):
        try:
            return self.http.next_event()
        except h11.RemoteProtocolError as error:
            status = 431 if error.error_status_hint == 431 else 400
            raise Refusal(status, f"malformed HTTP request ({error}); {ALLOWED}") from None

    async def _answer_for(self, request: h11.Request, body: Body) -> tuple[int, dict, bytes]:
        """The answer to a whole request: inference checked and sent over gRPC, any other JSON
        body checked and the request forwarded as HTTP."""
        target = INFER_TARGET.fullmatch(request.target)
        try:
            if request.method == b"POST" and target:
                return await self._infer(request, target, body)
            if request.method == b"POST" and body.filled:
                check_json(body.view(), CheckLimits())
        except BadRequest as error:
            import grpc

            return as_answer(http_error(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
        return await self._forward(request, body)

    async def _infer(self, request: h11.Request, target: re.Match, body: Body
                     ) -> tuple[int, dict, bytes]:
        """Triton's answer to a checked inference request, asked over gRPC; the call is
        cancelled if the client goes away meanwhile."""
        import grpc

        headers = dict(request.headers)  # h11 gives lower-case names
        model, version = (unquote(part.decode("latin-1")) for part in target.groups(b""))
        length = headers.get(b"inference-header-content-length")
        header_length = (None if length is None
                         else header_length_value(length.decode("latin-1"), body.filled))
        if (header_length or body.filled) > self.limits.json_bytes:
            return error_answer(413, f"the request's JSON has {header_length or body.filled} "
                                f"bytes; this server parses at most {self.limits.json_bytes} "
                                f"({guard_flag('json_bytes')}): send large tensors as binary "
                                "data (tritonclient: binary_data=True)")
        try:
            spec = await self.guard.specs.get(model)
        except OSError:
            raise Refusal(503, UNAVAILABLE_MESSAGE, linger=False,
                          headers=(("retry-after", "1"),)) from None
        if spec.decoupled:  # Triton's status for it; its text does not say what to use
            return error_answer(501, f"model {model!r} is decoupled (it streams its responses): "
                                "ask it over gRPC's ModelStreamInfer (tritonclient.grpc: "
                                "start_stream, async_stream_infer)")
        with body.view() as data:
            checked = await self.loop.run_in_executor(
                self.guard.parser, parse_http_infer, data, header_length, model, version, spec)
        message = to_grpc_request(checked)
        if not await upstream_ready(self.guard.channel):
            return error_answer(503, UNAVAILABLE_MESSAGE)
        try:
            response = await self._until_gone(self.guard.infer(message))
        except grpc.aio.AioRpcError as error:
            return as_answer(http_error(error.code(), upstream_details(error)))
        requested = [(output.name, output.binary) for output in checked.outputs]
        answer = as_answer(http_answer(response, requested,
                                       checked.parameters.get("binary_data_output") is True))
        return compressed(answer, headers.get(b"accept-encoding", b""))

    async def _until_gone(self, call):
        """The result of `call`; cancelled (and the client's connection ended) when the client
        closes its connection before it is done."""
        answer = asyncio.ensure_future(call)
        watch = asyncio.ensure_future(self._client_gone())
        try:
            done, _ = await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
            if answer not in done:
                call.cancel()  # Triton is told: the driffusion model stops within a round
                answer.cancel()
                raise ConnectionResetError("the client closed its connection")
            return answer.result()
        finally:
            watch.cancel()

    async def _client_gone(self) -> None:
        """Returns when the client ends its connection; bytes it sends meanwhile (a pipelined
        next request) are kept for h11, up to a head's size."""
        kept = 0
        while kept <= MAX_HEAD_BYTES:
            data = await self.reader.read(READ_BYTES)
            if not data:
                return
            kept += len(data)
            self.http.receive_data(data)
        await asyncio.Event().wait()  # enough is buffered: stop reading, never return

    async def _forward(self, request: h11.Request, body: Body) -> tuple[int, dict, bytes]:
        """Triton's answer (status, headers, body) to the request written anew."""
        from runtime.triton_http import read_answer

        try:
            if self.upstream is None:
                self.upstream = await asyncio.open_connection("127.0.0.1",
                                                              self.guard.upstream_port)
            reader, writer = self.upstream
            writer.write(upstream_head(request, body.length))
            for part in body.slices(WRITE_BYTES):
                writer.write(part)
                await writer.drain()
            status, headers, answer = await read_answer(reader)
        except (ConnectionError, EOFError):  # its address is the server's own business
            raise Refusal(503, "the inference server is not answering (it may be restarting); "
                          "retry later", linger=False, headers=(("retry-after", "1"),)) from None
        if headers.get("connection", "").lower() == "close":
            writer.close()
            self.upstream = None
        if status == 503 and BUSY_TRITON_TEXT.encode() in answer:
            answer = json.dumps({"error": BUSY_MESSAGE}).encode()
        return status, headers, answer

    async def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        kept = [(name, value) for name, value in headers.items()
                if name.encode("latin-1") not in NOT_ANSWERED]
        await self._send(h11.Response(status_code=status, reason=reason(status),
                                      headers=[*kept, ("content-length", str(len(body)))]),
                         h11.Data(data=body), h11.EndOfMessage())

    async def refuse(self, refusal: Refusal) -> None:
        body = json.dumps({"error": refusal.message}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("connection", "close"), *refusal.headers]
        try:
            await self._send(h11.Response(status_code=refusal.status,
                                          reason=reason(refusal.status), headers=headers),
                             h11.Data(data=body), h11.EndOfMessage())
        except h11.LocalProtocolError:  # an answer was already under way
            return
        if refusal.linger:
            await self._linger()

    async def _send(self, *events) -> None:
        """Write `events`; the client must take them within the body timeout."""
        for event in events:
            self.writer.write(self.http.send(event) or b"")
        if self.writer.transport.get_write_buffer_size():
            await asyncio.wait_for(self.writer.drain(), self.limits.body_timeout_s)

    async def _linger(self) -> None:
        """Read and drop the rest of a refused body (at most its declared length, and no more
        than the byte cap) while it keeps coming, so that the client finishes writing it and
        reads the answer instead of meeting a reset connection."""
        left = min(self.unread, self.limits.max_request_bytes)
        final = self.loop.time() + (max(LINGER_S, self.limits.body_timeout_s) if left > 0
                                    else LINGER_S)
        while left > 0 or self.unread <= 0:
            data = await self._receive(min(final, self.loop.time() + LINGER_S))
            if not data:
                return
            left -= len(data)


def compressed(answer: tuple[int, dict, bytes], accepted: bytes) -> tuple[int, dict, bytes]:
    """`answer` in the coding the client accepts, as Triton's HTTP endpoint answers it (gzip,
    else deflate: zlib's stream, else as it is)."""
    status, headers, body = answer
    codings = {token.split(b";")[0].strip().lower() for token in accepted.split(b",")}
    for coding, wbits in ((b"gzip", 31), (b"deflate", 15)):
        if coding in codings:
            packer = zlib.compressobj(wbits=wbits)
            body = packer.compress(body) + packer.flush()
            return status, {**headers, "content-encoding": coding.decode()}, body
    return answer


def error_answer(status: int, message: str) -> tuple[int, dict, bytes]:
    """An error answer in Triton's form ({"error": message}); the connection stays open."""
    return (status, {"content-type": "application/json"},
            json.dumps({"error": message}).encode())


def as_answer(answer: tuple[int, list[tuple[str, str]], bytes]) -> tuple[int, dict, bytes]:
    status, headers, body = answer
    return status, dict(headers), body


def checked_length(request: h11.Request, head: bytes, limits: GuardLimits) -> int:
    """The Content-Length of a request the guard forwards; Refusal for any other."""
    if request.method not in METHODS:
        raise Refusal(405, f"method {request.method.decode()} is not served; this server takes "
                      "GET and POST", headers=(("allow", "GET, POST"),))
    if len(head) > MAX_HEAD_BYTES:  # h11 bounds only heads that arrive in pieces
        raise Refusal(431, f"the request head has {len(head)} bytes; {ALLOWED}")
    if request.http_version not in VERSIONS:
        raise Refusal(505, f"HTTP/{request.http_version.decode()} is not served; {ALLOWED}")
    check_framing_names(head)
    headers = dict(request.headers)  # the framing and coding names are unique by now
    if b"transfer-encoding" in headers:
        if b"content-length" in headers:
            raise Refusal(400, "Content-Length and Transfer-Encoding together make the body's "
                          "length ambiguous; send a Content-Length only")
        raise Refusal(411, "chunked request bodies (Transfer-Encoding) are refused; send a "
                      "Content-Length")
    coding = headers.get(b"content-encoding", b"identity").strip().lower()
    if coding != b"identity":
        raise Refusal(415, f"compressed request bodies (Content-Encoding: "
                      f"{coding[:32].decode('latin-1')}) are refused; send the body "
                      "uncompressed")
    length = int(headers.get(b"content-length", b"0"))
    if length > limits.max_request_bytes:
        raise Refusal(413, f"the request body has {length} bytes; this server takes at most "
                      f"{limits.max_request_bytes} ({guard_flag('max_request_bytes')})")
    return length


def declared_length(request: h11.Request) -> int:
    """The body length a request's head declares (0 where it declares none or no number)."""
    for name, value in request.headers:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


def check_framing_names(head: bytes) -> None:
    """Refusal unless each framing or coding header appears at most once in the head as sent
    (h11 merges equal Content-Lengths) and no other name reads as one without punctuation."""
    names = [line.partition(b":")[0].lower() for line in head.split(b"\n")[1:]
             if line.strip() and line[:1] not in b" \t"]  # not folded continuation lines
    for name in FRAMING:
        if names.count(name) > 1:
            raise Refusal(400, f"{name.decode()} is given {names.count(name)} times; send it "
                          f"at most once")
    for name in names:
        framing = LOOKALIKES.get(name.translate(None, PUNCTUATION))
        if framing is not None and name != framing:
            raise Refusal(400, f"header name {name.decode()!r} reads as {framing.decode()}; "
                          "send that name exactly, at most once")


def upstream_head(request: h11.Request, length: int) -> bytes:
    """The request line and headers the guard sends Triton for `request`."""
    named_hop = {token.strip().lower() for name, value in request.headers
                 if name == b"connection" for token in value.split(b",")}
    kept = [name + b": " + value for name, value in request.headers
            if name not in NOT_FORWARDED and name not in named_hop]
    if not any(name == b"host" for name, _ in request.headers):
        kept.append(b"host: 127.0.0.1")
    lines = [request.method + b" " + request.target + b" HTTP/1.1", *kept,
             b"content-length: %d" % length]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def reason(status: int) -> bytes:
    """The reason phrase of `status` (its class's name for a code HTTP does not list)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return {1: b"Informational", 2: b"Success", 3: b"Redirection",
                4: b"Client Error"}.get(status // 100, b"Server Error")
