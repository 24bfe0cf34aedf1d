"""The request and serving limits: one table that the server, its flags and the clients share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A serving limit: its default and the range a server may set it to."""

    default: int
    low: int
    high: int
    help: str


# name (RepositoryOptions field, `--max-...` flag) -> limit
SERVING_LIMITS: dict[str, Limit] = {
    "max_steps": Limit(1000, 1, 10_000, "largest STEPS a request may ask for"),
    "max_window": Limit(64, 1, 1024, "largest WINDOW a request may ask for"),
    "max_batch": Limit(64, 1, 4096, "most rows in one device call: the device models' "
                                    "max_batch_size"),
    "max_prompt_bytes": Limit(2048, 1, 1_000_000, "most UTF-8 bytes in PROMPT/NEGATIVE_PROMPT"),
    "max_resolution": Limit(2048, 8, 65_536, "refuse to serve a model whose images are larger "
                                             "(pixels per side)"),
    "max_video_pixels": Limit(81 * 720 * 1280, 1, 1 << 34, "most FRAMES x HEIGHT x WIDTH a "
                                                           "video request may ask for"),
    "batch_delay_us": Limit(0, 0, 10_000_000, "how long a device call may wait for others to "
                                              "batch with"),
    "max_queue_size": Limit(16, 1, 100_000, "requests the driffusion model queues beyond those "
                                            "it runs; more answer UNAVAILABLE at once"),
    "queue_timeout_s": Limit(60, 1, 86_400, "seconds a request may wait in that queue before it "
                                            "is refused"),
}
# name (GuardLimits field of triton_models/guard.py, `--request-guard-...` flag of `driffusion
# serve`) -> limit of the request guard on the public gRPC and HTTP ports
GUARD_LIMITS: dict[str, Limit] = {
    "max_request_bytes": Limit(
        64 << 20, 0, (1 << 31) - 1,
        "refuse gRPC messages and HTTP bodies over N bytes before Triton reads them (far above "
        "any request of the served models: an SDXL UNet call of 8 rows is about 7 MB); 0: no "
        "guard, Triton on the public ports (for device servers that only fronts reach on a "
        "trusted network)"),
    "header_timeout_s": Limit(
        15, 1, 3600, "seconds an HTTP request head may take to arrive, counted from the "
        "connection's start or its previous answer; later: 408 and closed (an idle kept-alive "
        "connection is closed without an answer)"),
    "body_timeout_s": Limit(
        15, 1, 3600, "seconds an HTTP body may go without a byte, and the grace before "
        "--request-guard-min-rate applies; later: 408 and closed"),
    "min_rate": Limit(
        65_536, 0, 1 << 30, "bytes per second an HTTP body must average once its grace has "
        "passed (0: no minimum); slower: 408 and closed"),
    "memory_bytes": Limit(
        256 << 20, 1, 1 << 40, "bytes of HTTP bodies and gRPC messages the guard holds at once "
        "over all connections, counted as they arrive (at least --request-guard-bytes); a "
        "request whose bytes do not fit: 503 / UNAVAILABLE"),
    "connections": Limit(
        1000, 1, 100_000, "HTTP connections the guard holds at once; more: 503 and closed"),
    "json_bytes": Limit(
        16 << 20, 1, (1 << 31) - 1, "bytes of JSON in one HTTP inference request (the whole "
        "body, or the JSON header before binary tensors), which the guard parses and checks; "
        "larger tensors go as binary data (tritonclient: binary_data=True); beyond: 413"),
    "client_memory_bytes": Limit(
        128 << 20, 1, 1 << 40, "bytes of HTTP bodies and gRPC messages the guard holds at once "
        "for one client address (at least --request-guard-bytes; behind a proxy every client "
        "shares its address: raise it to --request-guard-memory-bytes); beyond: 503"),
    "client_connections": Limit(
        256, 1, 100_000, "HTTP connections one client address may hold at once (behind a proxy "
        "raise it to --request-guard-connections); more: 503 and closed"),
    "grpc_calls": Limit(
        256, 1, 100_000, "gRPC calls the guard runs at once; more: RESOURCE_EXHAUSTED at once "
        "(gRPC reads a whole message before the guard sees it, so this bounds what it holds)"),
}
# guidance scales a request may use (diffusers' pipelines take any float; beyond this, images
# are noise)
MAX_GUIDANCE = 50.0


def check_limit(name: str, value: int) -> None:
    """ValueError unless `value` lies in the range of limit `name`."""
    limit = SERVING_LIMITS[name]
    if not limit.low <= value <= limit.high:
        raise ValueError(f"{name.replace('_', ' ')} must be in {limit.low}..{limit.high}; "
                         f"got {value}")
