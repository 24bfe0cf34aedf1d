"""The request guard's limits: the values of its flags (`GuardLimits`), the memory budget that
request bytes wait in, and giving the memory of refused requests back to the system."""
from __future__ import annotations

import asyncio
import ctypes
import gc
from dataclasses import dataclass, fields

from models.limits import GUARD_LIMITS

TRIM_BYTES = 4 << 20  # after dropping a request this large, give freed heap back to the system
TRIM_DELAY_S = 0.5
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
