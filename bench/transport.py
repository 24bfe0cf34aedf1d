"""`driffusion bench transport`: what moving the latents costs per DRiffusion round, by size and path.

A round sends each device the latent of its draft and gets one back. This benchmark times such
rounds, side by side in one run, against devices that compute nothing (`unet_echo`: a python
backend model answering `out_sample` = `sample`, one instance per device) on a real
tritonserver, through the runtime's own device client (`TritonEndpoints.devices`, `Device`):
- sizes from an SD 1.5 image latent up to a 720p, 81-frame Wan latent ([1, 16, 21, 90, 160],
  19.4 MB in float32), optionally with Wan's UMT5 text states travelling beside it;
- paths: gRPC and HTTP with the tensors in the messages, and both again with the tensors in
  system shared memory regions registered on the server (runtime/triton_shm.py), as a sampler
  on the devices' host can send them;
- 2 and 4 devices (concurrent calls of one round).
Every answer is checked against what was sent. Reported: wall ms per round (median of
`repeat` interleaved measurements of `rounds` rounds) and this process's CPU ms per round.
The python backend copies each tensor once more between Triton and its stub process (a
TensorRT device would not), equally on every path. Writes transport.json under --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import positive_int
from models import paths

DEFAULT_OUT = paths.output_dir("bench", "transport")
TEMPLATES = Path(__file__).parent / "templates"
DEVICE_MODEL = "unet_echo"
# name -> (latent shape, text states shape or None: a tiny stand-in)
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "sd15-512": ((1, 4, 64, 64), None),
    "sdxl-1024": ((1, 4, 128, 128), None),
    "flux-1024": ((1, 4096, 64), None),
    "wan-480p-81f": ((1, 16, 21, 60, 104), None),
    "wan-720p-81f": ((1, 16, 21, 90, 160), None),
    "wan-720p-81f+umt5": ((1, 16, 21, 90, 160), (1, 512, 4096)),
}
DEFAULT_SIZES = tuple(SIZES)
# path -> (endpoint kind, TritonEndpoints shared_memory mode)
PATHS = {"grpc": ("grpc", "off"), "http": ("http", "off"),
         "grpc-shm": ("grpc", "system"), "http-shm": ("http", "system")}
TINY_STATES = (1, 1, 8)
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ -1, -1 ] }},
  {{ name: "timestep" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "encoder_hidden_states" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }}
]
output [ {{ name: "out_sample" data_type: TYPE_FP32 dims: [ -1, -1 ] }} ]
instance_group [ {{ count: {devices} kind: KIND_CPU }} ]
"""


@dataclass(frozen=True)
class TransportSetup:
    sizes: tuple[str, ...] = DEFAULT_SIZES
    devices: tuple[int, ...] = (2, 4)
    paths: tuple[str, ...] = tuple(PATHS)
    rounds: int = 10  # rounds per measurement
    repeat: int = 3  # measurements per variant, interleaved; the median is reported

    def validate(self) -> None:
        unknown = [size for size in self.sizes if size not in SIZES]
        if unknown:
            raise ValueError(f"unknown sizes {unknown}; choose from {list(SIZES)}")
        unknown = [path for path in self.paths if path not in PATHS]
        if unknown:
            raise ValueError(f"unknown paths {unknown}; choose from {list(PATHS)}")
        if not self.devices or min(self.devices) < 1:
            raise ValueError(f"device counts must be >= 1; got {list(self.devices)}")


@dataclass(frozen=True)
class TransportRecord:
    size: str
    latent_shape: list[int]
    mib_per_call: float  # what one call sends (latent and states); as much latent comes back
    devices: int
    path: str
    ms_per_round: float
    cpu_ms_per_round: float  # this process's CPU


def write_repository(directory: Path, devices: int) -> Path:
    """A model repository with `unet_echo`, `devices` instances."""
    if directory.exists():
        shutil.rmtree(directory)
    return add_echo_model(directory, devices)


def add_echo_model(directory: Path, devices: int) -> Path:
    """`unet_echo` with `devices` instances added to the model repository `directory`."""
    version = directory / DEVICE_MODEL / "1"
    version.mkdir(parents=True)
    shutil.copy(TEMPLATES / DEVICE_MODEL / "1" / "model.py", version / "model.py")
    (directory / DEVICE_MODEL / "config.pbtxt").write_text(
        CONFIG.format(name=DEVICE_MODEL, devices=devices))
    return directory


def call_inputs(size: str, devices: int) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """One latent per device (flat [1, N]: the bytes of the shape), the timestep, the states."""
    latent_shape, states_shape = SIZES[size]
    count = math.prod(latent_shape)
    generator = np.random.default_rng(0)
    latents = [generator.standard_normal((1, count), np.float32) for _ in range(devices)]
    states = np.zeros(states_shape or TINY_STATES, np.float32)
    return latents, np.array([500.0], np.float32), {"encoder_hidden_states": states}


async def measure(endpoints: dict[str, str], setup: TransportSetup) -> list[TransportRecord]:
    """Every (size, devices, path), interleaved per measurement."""
    from runtime.triton_clients import TritonEndpoints

    connections, devices = {}, {}
    try:
        for path in setup.paths:
            kind, shared_memory = PATHS[path]
            connections[path] = await TritonEndpoints(
                [endpoints[kind]], shared_memory=shared_memory).__aenter__()
            (devices[path],) = await connections[path].devices(DEVICE_MODEL)
        return await _measure_devices(devices, setup)
    finally:
        for connection in connections.values():
            await connection.__aexit__(None, None, None)


async def _measure_devices(devices: dict, setup: TransportSetup) -> list[TransportRecord]:
    records = []
    for size in setup.sizes:
        for count in setup.devices:
            latents, timestep, conditioning = call_inputs(size, count)

            async def rounds(path: str, number: int, latents=latents, timestep=timestep,
                             conditioning=conditioning) -> tuple[float, float]:
                cpu, start = time.process_time(), time.perf_counter()
                for _ in range(number):
                    answers = await asyncio.gather(*(devices[path](latent, timestep, conditioning)
                                                     for latent in latents))
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                if not all(np.array_equal(a, b) for a, b in zip(answers, latents)):
                    raise RuntimeError(f"{path}: the device answered other bytes than sent")
                return wall * 1000 / number, cpu * 1000 / number

            for path in setup.paths:
                await rounds(path, 2)  # warm-up: connections, regions
            times: dict[str, list[tuple[float, float]]] = {path: [] for path in setup.paths}
            for _ in range(setup.repeat):
                for path in setup.paths:
                    times[path].append(await rounds(path, setup.rounds))
            mib = (latents[0].nbytes + conditioning["encoder_hidden_states"].nbytes) / 2**20
            records += [TransportRecord(size, list(SIZES[size][0]), round(mib, 2), count, path,
                                        statistics.median(t[0] for t in times[path]),
                                        statistics.median(t[1] for t in times[path]))
                        for path in setup.paths]
    return records


def run_benchmark(setup: TransportSetup, out: Path) -> dict[str, Any]:
    """Every path, size and device count, measured in one run; the JSON-ready report (also
    written to transport.json)."""
    from bench.common import machine_info
    from triton_models.serve import EmbeddedServer, free_ports

    setup.validate()
    out.mkdir(parents=True, exist_ok=True)
    repository = write_repository(out / "transport-repository", max(setup.devices))
    grpc_port, http_port, metrics_port = free_ports(3)
    with EmbeddedServer(repository, grpc_port=grpc_port, http_port=http_port,
                        metrics_port=metrics_port, log_path=out / "transport-tritonserver.log",
                        allow_shared_memory=True) as server:
        endpoints = {"grpc": server.grpc_url, "http": server.http_url}
        records = asyncio.run(measure(endpoints, setup))
    report = {"setup": asdict(setup), "machine": machine_info(),
              "records": [asdict(record) for record in records]}
    (out / "transport.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict[str, Any]) -> str:
    """One line per (size, devices): ms per round of each path, then the best shm gain."""
    setup = report["setup"]
    paths_ = setup["paths"]
    rows: dict[tuple[str, int], dict[str, dict]] = {}
    for record in report["records"]:
        rows.setdefault((record["size"], record["devices"]), {})[record["path"]] = record
    title = (f"ms per round (one latent out and back per device; median of {setup['repeat']} "
             f"x {setup['rounds']} rounds; client CPU ms per round in brackets)")
    lines = [title,
             f"{'size':<20}{'MiB/call':>9}{'devices':>8}" + "".join(f"{p:>18}" for p in paths_)]
    for (size, devices), by_path in rows.items():
        mib = next(iter(by_path.values()))["mib_per_call"]
        cells = "".join(f"{by_path[p]['ms_per_round']:>9.1f} ({by_path[p]['cpu_ms_per_round']:5.1f})"
                        for p in paths_)
        lines.append(f"{size:<20}{mib:>9.2f}{devices:>8}{cells}")
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _counts(text: str) -> tuple[int, ...]:
    return tuple(positive_int(name) for name in _names(text))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transport",
        help="transport per round by latent size: gRPC, HTTP, system shared memory",
        description="Times DRiffusion rounds (one latent out and back per device) against "
        "devices that compute nothing, on a real tritonserver, side by side in one run: latent "
        "sizes from SD 1.5 to a 720p Wan video, over gRPC and HTTP with the tensors in the "
        "messages or in system shared memory, for 2 and 4 devices. Writes transport.json "
        "under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=_names, default=DEFAULT_SIZES,
                        help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--devices", type=_counts, default=(2, 4),
                        help="comma-separated device counts (concurrent calls per round)")
    parser.add_argument("--paths", type=_names, default=tuple(PATHS),
                        help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--rounds", type=positive_int, default=10,
                        help="rounds per measurement")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="measurements per variant (interleaved); the median is reported")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.common import run_stopping_servers
    from triton_models.serve import ServerError

    setup = TransportSetup(args.sizes, args.devices, args.paths, args.rounds, args.repeat)
    report = run_stopping_servers(lambda: run_benchmark(setup, args.out),
                                  (ValueError, ServerError))
    if isinstance(report, int):
        return report
    print(format_report(report))
    print(f"wrote {args.out / 'transport.json'}")
    return 0
