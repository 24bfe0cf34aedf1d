"""The device contract: a denoiser on one model client, its IO and its health.

A *model client* runs one network (`infer(inputs, outputs, timeout_s) -> outputs`): a Triton
model over HTTP or gRPC (runtime/triton_clients.py), a Triton model called by BLS from inside
the server, or an in-process session or callable (runtime/local_devices.py). A `Device` is a
model client holding a denoiser; it evaluates rows and keeps its health as the pools that use
it see it. Nothing here knows the sampling method or guidance.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models import tensors

DEFAULT_DEADLINE_S = 60.0
DEFAULT_RECHECK_S = 2.0  # first health check of a lost device after this long
MAX_RECHECK_S = 30.0  # back-off cap for a device that keeps failing after it answered ready
HEALTH_TIMEOUT_S = 2.0


class DeviceError(RuntimeError):
    """A model call failed: unreachable, timed out, crashed, or it rejected the request.

    `lost` is True when the device failed (the work may be re-issued elsewhere) and False when
    the model rejected the request itself (INVALID_ARGUMENT: every device would reject it).
    """

    def __init__(self, model: str, message: str, *, lost: bool = True) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.lost = lost


class ModelClient(Protocol):
    """One network behind some transport."""

    name: str

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]: ...

    async def is_ready(self) -> bool: ...


@dataclass(frozen=True)
class DenoiserIO:
    """How to call a denoiser model: dtypes by input name (the shared tensor names), batching.

    `sample` and `timestep` go in, `out_sample` comes out; every other input is conditioning
    that the pipeline supplies by the same name.
    """

    dtypes: Mapping[str, str] = field(default_factory=lambda: {
        tensors.SAMPLE: "float32", tensors.TIMESTEP: "float32",
        tensors.ENCODER_HIDDEN_STATES: "float32"})
    # the model batches (Triton max_batch_size > 0): the per-item timestep travels as [N, 1]
    batching: bool = False

    @classmethod
    def from_inputs(cls, model: str, dtypes: Mapping[str, str], outputs: Sequence[str],
                    batching: bool = False) -> DenoiserIO:
        """The IO of a model with these input dtypes and output names; ValueError if it is not
        a denoiser (sample, timestep in; out_sample out)."""
        missing = [name for name in (tensors.SAMPLE, tensors.TIMESTEP) if name not in dtypes]
        if missing or tensors.OUT_SAMPLE not in outputs:
            raise ValueError(
                f"{model} is not a denoiser: it needs inputs {tensors.SAMPLE}, {tensors.TIMESTEP} "
                f"and output {tensors.OUT_SAMPLE}; it has inputs {', '.join(dtypes) or 'none'} "
                f"and outputs {', '.join(outputs) or 'none'}"
            )
        return cls(dict(dtypes), batching)

    @property
    def conditioning(self) -> tuple[str, ...]:
        """Names of the conditioning inputs."""
        return tuple(name for name in self.dtypes if name not in (tensors.SAMPLE, tensors.TIMESTEP))


class Device:
    """A denoiser on one model client: `await device(sample, timestep, conditioning)`.

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
        io: DenoiserIO | None = None,
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
        self.io = io or DenoiserIO()
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

    async def __call__(self, sample: np.ndarray, timestep: np.ndarray,
                       conditioning: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate rows [N, ...] (conditioning by input name, N rows each); calls larger than the
        engine's max batch run one after another."""
        rows = sample.shape[0]
        step = self.max_batch or rows
        parts = [
            await self._infer(sample[i : i + step], timestep[i : i + step],
                              {name: value[i : i + step] for name, value in conditioning.items()})
            for i in range(0, rows, step)
        ]
        output = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.calls += 1
        self.failures = 0
        return output

    async def _infer(self, sample: np.ndarray, timestep: np.ndarray,
                     conditioning: Mapping[str, np.ndarray]) -> np.ndarray:
        timestep = np.ascontiguousarray(timestep, dtype=self._dtype(tensors.TIMESTEP))
        inputs = {
            tensors.SAMPLE: np.ascontiguousarray(sample, dtype=self._dtype(tensors.SAMPLE)),
            tensors.TIMESTEP: timestep.reshape(-1, 1) if self.io.batching else timestep,
        }
        for name, value in conditioning.items():
            value = np.ascontiguousarray(value, dtype=self._dtype(name))
            # a batching model takes a per-row scalar (Flux's guidance) as [N, 1], like timestep
            inputs[name] = value.reshape(-1, 1) if self.io.batching and value.ndim == 1 else value
        result = await self.model.infer(inputs, [tensors.OUT_SAMPLE], self.deadline_s)
        output = result[tensors.OUT_SAMPLE]
        if output.shape != sample.shape:
            raise DeviceError(self.name, f"returned shape {output.shape}, expected {sample.shape}")
        return output.astype(np.float32, copy=False)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.io.dtypes.get(name, "float32"))

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
