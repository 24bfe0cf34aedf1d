"""Triton's HTTP/REST (KServe v2) API over keep-alive HTTP/1.1 connections, in asyncio.

The device pool's calls are small and many. Measured on the 2-core dev box (`driffusion bench
floor`, docs/BENCHMARKS.md), a call over gRPC aio costs the client about 1.3 ms of CPU when calls
are 20 ms apart, most of it in gRPC's own threads; the same call as one HTTP/1.1 request on a
kept-alive connection, with tensors as binary data, costs about half and returns sooner. This
client speaks just what the runtime needs: health, the repository index, model configs and
inference with binary tensors (the binary tensor data extension), one request per connection at
a time, connections kept for the next call.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.triton_wire import numpy_dtype, raw_tensor_bytes, triton_datatype

HEADER_LENGTH = "Inference-Header-Content-Length"


class HttpError(RuntimeError):
    """Triton answered with an error status: `status` (e.g. 400) and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class HttpTriton:
    """One Triton HTTP endpoint (`host`, `port`); idle connections are kept for reuse.

    Every request takes an idle connection or opens one, so concurrent calls each have their
    own; a connection that fails or times out is closed, never reused.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in idle),
                             return_exceptions=True)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None,
                      timeout_s: float | None = None) -> tuple[dict[str, str], bytes]:
        """(response headers, body) of a 200 answer; HttpError for an error status, OSError or
        asyncio.TimeoutError when the connection fails or the answer is late.

        A kept-alive connection that the server has closed meanwhile fails at once; the request
        then goes once more on a new connection (a dead server refuses that one too).
        """
        reused = bool(self._idle)
        connection = self._idle.pop() if reused else await self._connect(timeout_s)
        try:
            status, answer_headers, answer = await asyncio.wait_for(
                self._exchange(connection, method, path, body, headers or {}), timeout_s)
        except (ConnectionError, EOFError):  # EOFError: an IncompleteReadError
            connection[1].close()
            if not reused:
                raise
            return await self._fresh_request(method, path, body, headers, timeout_s)
        except BaseException:
            connection[1].close()
            raise
        if answer_headers.get("connection", "").lower() == "close":
            connection[1].close()
        else:
            self._idle.append(connection)
        if status != 200:
            raise HttpError(status, _error_message(answer))
        return answer_headers, answer

    async def _connect(self, timeout_s: float | None):
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout_s)

    async def _fresh_request(self, method: str, path: str, body: bytes,
                             headers: Mapping[str, str] | None, timeout_s: float | None):
        idle, self._idle = self._idle, []  # the others are as stale: start afresh
        for _, writer in idle:
            writer.close()
        return await self.request(method, path, body, headers, timeout_s)

    async def _exchange(self, connection, method: str, path: str, body: bytes,
                        headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        reader, writer = connection
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return await read_answer(reader)

    async def get_json(self, path: str, timeout_s: float | None = None) -> Any:
        _, body = await self.request("GET", path, timeout_s=timeout_s)
        return json.loads(body) if body else {}

    async def post_json(self, path: str, payload: Any, timeout_s: float | None = None) -> Any:
        _, body = await self.request("POST", path, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"}, timeout_s)
        return json.loads(body) if body else {}

    async def is_live(self, timeout_s: float | None = None) -> bool:
        await self.request("GET", "/v2/health/live", timeout_s=timeout_s)
        return True

    async def is_model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        try:
            await self.request("GET", f"/v2/models/{model}/ready", timeout_s=timeout_s)
        except HttpError:
            return False
        return True

    async def repository_index(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return await self.post_json("/v2/repository/index", {}, timeout_s)

    async def model_config(self, model: str, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.get_json(f"/v2/models/{model}/config", timeout_s)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """The named outputs of one inference; every tensor travels as binary data."""
        header, body = encode_infer_request(inputs, outputs)
        answer_headers, answer = await self.request(
            "POST", f"/v2/models/{model}/infer", body,
            {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header)}, timeout_s)
        return decode_infer_response(answer_headers, answer, outputs)


def encode_infer_request(inputs: Mapping[str, np.ndarray],
                         outputs: Sequence[str]) -> tuple[int, bytes]:
    """(JSON header length, request body): the JSON header, then each input's raw bytes."""
    raws = [raw_tensor_bytes(value) for value in inputs.values()]
    header = json.dumps({
        "inputs": [{"name": name, "shape": list(value.shape),
                    "datatype": triton_datatype(value.dtype),
                    "parameters": {"binary_data_size": len(raw)}}
                   for (name, value), raw in zip(inputs.items(), raws)],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }).encode()
    return len(header), b"".join([header, *raws])


def decode_infer_response(headers: Mapping[str, str], body: bytes,
                          names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named numeric outputs of an inference answer (binary data after the JSON header)."""
    length = int(headers.get(HEADER_LENGTH.lower(), len(body)))
    described = json.loads(body[:length])
    found, offset = {}, length
    for output in described.get("outputs", []):
        size = int(output.get("parameters", {}).get("binary_data_size", 0))
        dtype = numpy_dtype(output["datatype"])
        if dtype is None:
            raise ValueError(f"output {output['name']!r} has non-numeric type "
                             f"{output['datatype']}")
        if size:
            raw = body[offset:offset + size]
            offset += size
            value = np.frombuffer(raw, dtype=dtype)
        else:  # answered as JSON data
            value = np.asarray(output.get("data", []), dtype=dtype)
        found[output["name"]] = value.reshape(tuple(output["shape"]))
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"the answer has no output {', '.join(map(repr, missing))}")
    return {name: found[name] for name in names}


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of the next HTTP/1.1 answer on `reader`."""
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
    headers = await read_headers(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(parts[1]), headers, body


async def read_headers(reader: asyncio.StreamReader,
                       max_bytes: int | None = None) -> dict[str, str]:
    """The header lines of an HTTP/1.1 message up to the blank line, by lower-case name
    (ValueError past `max_bytes`, ConnectionError if the connection ends first)."""
    headers: dict[str, str] = {}
    size = 0
    while True:
        line = await reader.readline()
        size += len(line)
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"headers over {max_bytes} bytes")
        if not line:
            raise ConnectionError("connection closed in the headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:200].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
