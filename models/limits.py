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
    "batch_delay_us": Limit(0, 0, 10_000_000, "how long a device call may wait for others to "
                                              "batch with"),
    "max_queue_size": Limit(16, 1, 100_000, "requests the driffusion model queues beyond those "
                                            "it runs; more answer UNAVAILABLE at once"),
    "queue_timeout_s": Limit(60, 1, 86_400, "seconds a request may wait in that queue before it "
                                            "is refused"),
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
