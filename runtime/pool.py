"""The device pool: one round's items spread over the devices concurrently, guidance applied.

The `DevicePool` is the sampler's `denoise`: it cuts a round's items (each a cond/uncond pair
with guidance) into one call per lane, runs the calls concurrently and combines each item's two
predictions with the request's `Conditioning.combine`. Nothing here knows the sampling method.

Failures: a device call that fails for a reason other than a bad request (server gone,
deadline passed, model unloaded or crashed) marks the device lost and its work is re-issued on
the remaining devices; a lost device is health-checked again after a back-off and rejoins the
pool when it answers ready. How a round is cut into calls never depends on which devices are
healthy, so the result of a round is the same whichever devices compute it.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.device import Device, DeviceError
from runtime.guidance import Conditioning

if TYPE_CHECKING:
    import torch

Denoise = Callable[["torch.Tensor", "torch.Tensor"], Awaitable["torch.Tensor"]]
# the window of a batched pool when the caller names none: items per round, all in one call
# (one GPU: a batch of 4 items, 8 rows with guidance, keeps a GPU busy without waiting long)
DEFAULT_BATCHED_WINDOW = 4


@dataclass(frozen=True)
class _Task:
    """Rows of one item sent to one lane: the item's cond and/or uncond half."""

    item: int
    halves: tuple[str, ...]


@dataclass(frozen=True)
class Failover:
    """A call that failed on `device` and was re-issued on `replacement` after `seconds`."""

    device: str
    replacement: str
    error: str
    seconds: float


class PoolError(RuntimeError):
    """No device is left to run a round."""


class DevicePool:
    """One round's items spread over the devices concurrently: `pool.denoiser(conditioning)` is
    the sampler's `denoise` for one request.

    Each device offers `instances` lanes. A round of k items is cut into at most `width`
    chunks (one per lane of the pool as configured, healthy or not), every chunk is one model
    call, and the calls run concurrently (asyncio.gather). With guidance each item is a
    cond/uncond pair evaluated in the same call, or split over two lanes with `cfg_parallel`,
    and combined by the request's `Conditioning.combine`; a chunk whose cond and uncond rows
    differ in shape (text length) makes one call per shape, one after another. `batched` sends the whole round to one device in one call (one GPU: the
    round's items batched), and the round still holds `window` items (default
    DEFAULT_BATCHED_WINDOW), so DRiffusion keeps its parallelism on a single device.

    A chunk whose device fails is re-issued unchanged on a remaining device (`failovers` records
    each re-issue); each round starts background health checks of lost devices that are due,
    and a device that answers ready takes work again from the next round on.
    Because chunks never change with the devices' health, neither does any output.
    """

    def __init__(self, devices: Sequence[Device], *, cfg_parallel: bool = False,
                 batched: bool = False, window: int | None = None) -> None:
        if not devices:
            raise ValueError("a DevicePool needs at least one device")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window  # the natural window (None: see `width`)
        self.devices = list(devices)
        self.cfg_parallel = cfg_parallel
        self.batched = batched
        self.calls = 0  # model calls made (re-issues included)
        self.rounds = 0  # parallel rounds completed
        self.failovers: list[Failover] = []

    @property
    def lost(self) -> set[str]:
        """Names of the devices out of service."""
        return {device.name for device in self.devices if device.lost}

    @property
    def lanes(self) -> list[Device]:
        """One entry per concurrent call slot of the healthy devices."""
        healthy = [device for device in self.devices if not device.lost]
        if self.batched:
            return healthy[:1]
        return [device for device in healthy for _ in range(device.instances)]

    @property
    def width(self) -> int:
        """Model evaluations one round runs at once with every device up (the natural window).

        It does not shrink when a device is lost: the window, and so the result, must not
        depend on which devices happen to be healthy. It is the window given to the pool; else
        DEFAULT_BATCHED_WINDOW for a batched pool (whose round is one call, but of `width`
        items, so a single device still runs DRiffusion's rounds); else the lanes' count.
        """
        if self.window is not None:
            return self.window
        if self.batched:
            return DEFAULT_BATCHED_WINDOW
        return sum(device.instances for device in self.devices)

    def denoiser(self, conditioning: Conditioning) -> Denoise:
        """The sampler's `denoise(x, t)` for one request with this conditioning."""

        async def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return await self.run_round(x, t, conditioning)

        return denoise

    async def run_round(self, x: torch.Tensor, t: torch.Tensor,
                        conditioning: Conditioning) -> torch.Tensor:
        """One parallel round: x [items*B, C, H, W], t [items*B] -> outputs like x."""
        import torch  # imported here so that model processes that only serve ORT skip it

        batch = conditioning.batch
        items, remainder = divmod(x.shape[0], batch)
        if remainder or t.shape != (x.shape[0],):
            raise ValueError(
                f"round of {x.shape[0]} rows (t {tuple(t.shape)}) is not whole items of "
                f"latent batch {batch}"
            )
        sample = x.detach().cpu().numpy().astype(np.float32, copy=False)
        timestep = t.detach().cpu().numpy().astype(np.float32, copy=False)
        tasks = self._tasks(items, conditioning.uses_cfg)
        outputs = await self._run_round(tasks, sample, timestep, conditioning)
        self.rounds += 1
        return torch.from_numpy(self._combine(outputs, timestep, conditioning)).to(x.dtype)

    def _tasks(self, items: int, cfg: bool) -> list[_Task]:
        halves = ("uncond", "cond") if cfg else ("cond",)
        if self.cfg_parallel and len(halves) == 2:
            return [_Task(item, (half,)) for item in range(items) for half in halves]
        return [_Task(item, halves) for item in range(items)]

    async def _run_round(self, tasks, sample, timestep,
                         conditioning: Conditioning) -> dict[tuple[int, str], np.ndarray]:
        for device in self.devices:
            device.check_in_background()
        lanes = self.lanes
        if not lanes:
            raise PoolError(self._nothing_left())
        parts = 1 if self.batched else self.width  # batched: the whole round in one call
        chunks = [chunk for chunk in split_evenly(tasks, parts) if chunk]
        # rotate the first lane per round so that small rounds spread the load over devices
        start = self.rounds % len(lanes)
        results = await asyncio.gather(*(
            self._run_chunk(lanes[(start + index) % len(lanes)], chunk, sample, timestep,
                            conditioning)
            for index, chunk in enumerate(chunks)
        ))
        return {key: value for result in results for key, value in result.items()}

    async def recover(self) -> list[str]:
        """Health-check now the lost devices that are due; names of those back in service.

        Rounds start these checks in the background themselves; this waits for them.
        """
        due = [device for device in self.devices if device.check_due]
        back = await asyncio.gather(*(device.health_check() for device in due))
        return [device.name for device, ok in zip(due, back) if ok]

    async def _run_chunk(self, device: Device, chunk: list[_Task], sample, timestep,
                         conditioning: Conditioning) -> dict[tuple[int, str], np.ndarray]:
        """The outputs of a chunk's rows on one lane: rows whose conditioning shapes differ
        (a prompt and a negative prompt of different text lengths) go in separate calls, one
        after another, never padded."""
        rows = [(task.item, half) for task in chunk for half in task.halves]
        outputs: dict[tuple[int, str], np.ndarray] = {}
        for group in _groups_by_shape(rows, conditioning):
            device, answered = await self._call(device, group, sample, timestep, conditioning)
            outputs.update(answered)
        return outputs

    async def _call(self, device: Device, rows: list[tuple[int, str]], sample, timestep,
                    conditioning: Conditioning):
        """One model call on rows that stack, re-issued on a remaining device while devices
        fail: (the device that answered, the rows' outputs)."""
        batch = conditioning.batch
        parts = [_rows(item, half, sample, timestep, conditioning) for item, half in rows]
        stacked_sample = np.concatenate([part[0] for part in parts])
        stacked_timestep = np.concatenate([part[1] for part in parts])
        stacked_conditioning = {name: np.concatenate([part[2][name] for part in parts])
                                for name in parts[0][2]}
        while True:
            started = time.monotonic()
            try:
                self.calls += 1
                output = await device(stacked_sample, stacked_timestep, stacked_conditioning)
                break
            except DeviceError as error:
                if not error.lost:
                    raise
                device.mark_lost(error)
                failed, device = device, self._replacement()
                self.failovers.append(Failover(failed.name, device.name, str(error),
                                               time.monotonic() - started))
        return device, {row: output[index * batch : (index + 1) * batch]
                        for index, row in enumerate(rows)}

    def _replacement(self) -> Device:
        """A remaining device to re-issue a failed chunk on (PoolError if none is left)."""
        remaining = self.lanes
        if not remaining:
            raise PoolError(self._nothing_left())
        return remaining[self.calls % len(remaining)]

    def _nothing_left(self) -> str:
        reasons = "; ".join(f"{device.name}: {device.lost_error}" for device in self.devices)
        return f"no device left to run the round (every device failed: {reasons})"

    @staticmethod
    def _combine(outputs: dict[tuple[int, str], np.ndarray], timestep: np.ndarray,
                 conditioning: Conditioning) -> np.ndarray:
        """Each item's guided output, at the guidance scale of its own timestep."""
        combined = []
        for item in range(len(timestep) // conditioning.batch):
            cond = outputs[(item, "cond")]
            if conditioning.uses_cfg:
                scale = conditioning.scale(float(timestep[item * conditioning.batch]))
                cond = conditioning.combine(cond, outputs[(item, "uncond")], scale)
            combined.append(cond)
        return np.concatenate(combined)

    async def health(self) -> dict[str, bool]:
        """Readiness of every device, by name."""
        answers = await asyncio.gather(*(device.healthy() for device in self.devices))
        return {device.name: ok for device, ok in zip(self.devices, answers)}


def _rows(item: int, half: str, sample: np.ndarray, timestep: np.ndarray,
          conditioning: Conditioning):
    """Sample, timestep and conditioning rows of one item's cond or uncond half."""
    batch = conditioning.batch
    span = slice(item * batch, (item + 1) * batch)
    inputs = conditioning.cond if half == "cond" else conditioning.uncond
    return sample[span], timestep[span], inputs


def _groups_by_shape(rows: list[tuple[int, str]],
                     conditioning: Conditioning) -> list[list[tuple[int, str]]]:
    """The rows in groups of equal conditioning shapes (each group stacks into one call), in
    the order each shape first appears."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for item, half in rows:
        inputs = conditioning.cond if half == "cond" else conditioning.uncond
        shapes = tuple(sorted((name, value.shape) for name, value in inputs.items()))
        groups.setdefault(shapes, []).append((item, half))
    return list(groups.values())


def split_evenly(tasks: Sequence, parts: int) -> list[list]:
    """Cut `tasks` into `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(tasks), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(tasks[start:end]))
        start = end
    return chunks
