"""`driffusion bench floor`: what one device call costs on this machine with nothing to compute.

The orchestration overhead of a round has floors that no change to the sampler or the pool can
remove. This benchmark measures them side by side in one run, on a real tritonserver:
- `bls`: rounds of concurrent BLS calls from a python-backend model (`floor_caller`) to an empty
  python-backend device (`floor_callee`, which only sleeps), the server-side path of the
  `driffusion` model; with and without asking Triton `is_cancelled()` before each round.
- `grpc`, `http`: the same empty device called from this process by the runtime's client (the
  `driffusion generate` path) over each transport: wall time above the sleep and this
  process's CPU per call.
- `sampler`: the sampler and device pool in-process over a device that costs nothing: CPU per
  round.
- `sleep`: how late `time.sleep` wakes up here (it is part of every sleeping device's time).
With `--guard` the server runs behind the request guard (`serve`'s defaults) and `grpc-guard`,
`http-guard` call the device through the guard's ports, `grpc`, `http` through Triton's own:
the difference is the guard's hop (its CPU, in this process, counts in the client CPU column).
Writes floor.json under --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import positive_int
from models import paths

DEFAULT_OUT = paths.output_dir("bench", "floor")
TEMPLATES = Path(__file__).parent / "templates"
CALLER, CALLEE = "floor_caller", "floor_callee"
CLIENTS = {"grpc": "runtime client, gRPC aio", "http": "runtime client, HTTP/1.1",
           "grpc-guard": "gRPC aio via the request guard",
           "http-guard": "HTTP/1.1 via the request guard"}
PAYLOAD = 64  # float32 values per call, as floor_caller sends (an 8x8 latent)
CONFIGS = {
    CALLEE: ('input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }} ]\n'
             'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }} ]\n'
             'instance_group [ {{ count: {calls} kind: KIND_CPU }} ]\n'),
    CALLER: ('input [ { name: "setup" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
             'output [ { name: "ms_per_round" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
             'instance_group [ { count: 1 kind: KIND_CPU } ]\n'),
}


@dataclass(frozen=True)
class FloorSetup:
    latency_ms: float = 20.0  # what the empty device sleeps per call
    calls: int = 4  # concurrent calls of a parallel round (the devices)
    rounds: int = 50  # rounds per measurement
    repeat: int = 5  # measurements per variant, interleaved; the median is reported
    guard: bool = False  # serve behind the request guard; clients call through both ports

    def validate(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency must be >= 0 ms; got {self.latency_ms}")


@dataclass(frozen=True)
class FloorRecord:
    path: str  # bls, grpc, http, grpc-guard, http-guard, sampler, sleep
    calls_per_round: int
    variant: str
    ms_per_round: float  # wall time of a round above the device's sleep
    cpu_ms_per_call: float | None = None  # this process's CPU (grpc, sampler)


def write_floor_repository(directory: Path, calls: int) -> Path:
    """A model repository with `floor_caller` and `floor_callee` (`calls` instances)."""
    if directory.exists():
        shutil.rmtree(directory)
    for model in (CALLER, CALLEE):
        version = directory / model / "1"
        version.mkdir(parents=True)
        shutil.copy(TEMPLATES / model / "1" / "model.py", version / "model.py")
        config = CONFIGS[model].format(calls=calls) if model == CALLEE else CONFIGS[model]
        (directory / model / "config.pbtxt").write_text(
            f'name: "{model}"\nbackend: "python"\nmax_batch_size: 0\n{config}')
    return directory


def measure_bls(client, setup: FloorSetup) -> list[FloorRecord]:
    """Rounds of 1 and `calls` concurrent BLS calls, with and without `is_cancelled()`."""
    import tritonclient.grpc as grpc_client

    def ms_per_round(calls: int, ask: bool, rounds: int) -> float:
        values = np.array([rounds, calls, setup.latency_ms, float(ask)], np.float32)
        tensor = grpc_client.InferInput("setup", [4], "FP32")
        tensor.set_data_from_numpy(values)
        answer = client.infer(CALLER, [tensor])
        return float(answer.as_numpy("ms_per_round")[0]) - setup.latency_ms

    variants = [(calls, ask) for calls in sorted({1, setup.calls}) for ask in (False, True)]
    for calls, ask in variants:
        ms_per_round(calls, ask, 5)  # warm-up
    times: dict[tuple[int, bool], list[float]] = {variant: [] for variant in variants}
    for _ in range(setup.repeat):
        for calls, ask in variants:
            times[(calls, ask)].append(ms_per_round(calls, ask, setup.rounds))
    return [FloorRecord("bls", calls, "is_cancelled() each round" if ask else "calls only",
                        statistics.median(times[(calls, ask)])) for calls, ask in variants]


async def measure_clients(endpoints: dict[str, str], setup: FloorSetup) -> list[FloorRecord]:
    """Rounds of 1 and `calls` concurrent calls from this process by the runtime's client, over
    each transport (`endpoints`: transport name -> endpoint), interleaved."""
    from runtime.triton_clients import TritonEndpoints

    inputs = {"x": np.zeros(PAYLOAD, np.float32)}
    inputs["x"][0] = setup.latency_ms
    async with TritonEndpoints(list(endpoints.values())) as connection:
        models = {transport: connection.model(endpoint, CALLEE)
                  for transport, endpoint in endpoints.items()}

        async def rounds(transport: str, calls: int, count: int) -> tuple[float, float]:
            model = models[transport]
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(count):
                await asyncio.gather(*(model.infer(inputs, ["y"], 10.0) for _ in range(calls)))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            return wall * 1000 / count - setup.latency_ms, cpu * 1000 / (count * calls)

        variants = [(transport, calls) for calls in sorted({1, setup.calls})
                    for transport in endpoints]
        for variant in variants:
            await rounds(*variant, 5)
        times: dict[tuple[str, int], list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(setup.repeat):
            for variant in variants:
                times[variant].append(await rounds(*variant, setup.rounds))
    return [FloorRecord(transport, calls, CLIENTS[transport],
                        statistics.median(t[0] for t in times[(transport, calls)]),
                        statistics.median(t[1] for t in times[(transport, calls)]))
            for transport, calls in variants]


def measure_sampler(setup: FloorSetup) -> list[FloorRecord]:
    """CPU per round of the sampler and pool over devices that cost nothing (DDIM, 8x8)."""
    import torch

    from models.reference import SCHEDULER_CONFIG
    from runtime.driffusion import sample
    from runtime.guidance import Conditioning
    from runtime.local_devices import LocalDevice
    from runtime.pool import DevicePool
    from runtime.schedulers import make_scheduler

    class Free:
        name = "free"

        async def infer(self, inputs, outputs, timeout_s=None):
            return {"out_sample": inputs["sample"]}

        async def is_ready(self):
            return True

    records = []
    for mode, window in (("sequential", 1), ("aggressive", setup.calls)):
        pool = DevicePool([LocalDevice(Free()) for _ in range(setup.calls)])
        conditioning = Conditioning({"encoder_hidden_states": np.zeros((1, 1, 11), np.float32)})

        async def run(pool=pool, conditioning=conditioning, mode=mode, window=window) -> None:
            scheduler = make_scheduler("ddim", setup.rounds, SCHEDULER_CONFIG)
            await sample(pool.denoiser(conditioning), scheduler, torch.zeros(1, 1, 8, 8),
                         mode=mode, window=window)

        asyncio.run(run())
        per_round = []
        for _ in range(setup.repeat):
            rounds, cpu = pool.rounds, time.process_time()
            asyncio.run(run())
            per_round.append((time.process_time() - cpu) * 1000 / (pool.rounds - rounds))
        records.append(FloorRecord("sampler", window, f"{mode}, DDIM {setup.rounds} steps",
                                   statistics.median(per_round), statistics.median(per_round)))
    return records


def measure_sleep(setup: FloorSetup) -> FloorRecord:
    """How late `time.sleep(latency)` returns here: part of every sleeping device's time."""
    late = []
    for _ in range(setup.repeat * 10):
        start = time.perf_counter()
        time.sleep(setup.latency_ms / 1000)
        late.append((time.perf_counter() - start) * 1000 - setup.latency_ms)
    return FloorRecord("sleep", 1, f"time.sleep({setup.latency_ms:g} ms) overshoot",
                       statistics.median(late))


def run_benchmark(setup: FloorSetup, out: Path) -> dict[str, Any]:
    """Every floor, measured in one run; the JSON-ready report (also written to floor.json)."""
    import tritonclient.grpc as grpc_client

    from bench.common import machine_info
    from triton_models.guard_limits import GuardLimits
    from triton_models.serve import EmbeddedServer, free_ports

    setup.validate()
    out.mkdir(parents=True, exist_ok=True)
    repository = write_floor_repository(out / "floor-repository", setup.calls)
    grpc_port, http_port, metrics_port = free_ports(3)
    with EmbeddedServer(repository, grpc_port=grpc_port, http_port=http_port,
                        metrics_port=metrics_port, log_path=out / "floor-tritonserver.log",
                        request_guard=GuardLimits() if setup.guard else None) as server:
        own = server.triton_ports
        endpoints = {"grpc": f"127.0.0.1:{own['grpc']}", "http": f"http://127.0.0.1:{own['http']}"}
        if setup.guard:
            endpoints |= {"grpc-guard": server.grpc_url, "http-guard": server.http_url}
        client = grpc_client.InferenceServerClient(endpoints["grpc"])
        records = measure_bls(client, setup)
        client.close()
        records += asyncio.run(measure_clients(endpoints, setup))
    records += measure_sampler(setup)
    records.append(measure_sleep(setup))
    report = {"setup": asdict(setup), "machine": machine_info(),
              "records": [asdict(record) for record in records]}
    (out / "floor.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict[str, Any]) -> str:
    setup = report["setup"]
    title = (f"empty device sleeping {setup['latency_ms']:g} ms per call; {setup['rounds']} "
             f"rounds per measurement, median of {setup['repeat']}")
    width = max(len(record["path"]) for record in report["records"]) + 2
    header = (f"{'path':<{width}}{'calls/round':>12}  {'variant':<30}{'ms/round above sleep':>21}"
              f"{'CPU ms/call':>13}")
    lines = [title, header]
    for record in report["records"]:
        cpu = record["cpu_ms_per_call"]
        lines.append(f"{record['path']:<{width}}{record['calls_per_round']:>12}  {record['variant']:<30}"
                     f"{record['ms_per_round']:>21.2f}" + (f"{cpu:>13.3f}" if cpu is not None
                                                           else ""))
    lines.append("bls: the driffusion model's path (python backend to python backend); grpc, "
                 "http: the generate client's path; sampler: CPU of a round's sampler and pool "
                 "work, devices free")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "floor",
        help="what an empty device call costs here: BLS, gRPC, HTTP, the sampler, sleep",
        description="Measures the floors of a round's orchestration overhead on this machine, "
        "side by side in one run: rounds of BLS calls to an empty python-backend device (the "
        "driffusion model's path; with and without asking is_cancelled), the same device called "
        "by the runtime's client over gRPC and over HTTP (the generate path; wall time and "
        "client CPU per call), the sampler and pool's CPU per round with devices that cost "
        "nothing, and time.sleep's overshoot. Writes floor.json under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="what the empty device sleeps per call")
    parser.add_argument("--calls", type=positive_int, default=4,
                        help="concurrent calls of a parallel round (devices)")
    parser.add_argument("--rounds", type=positive_int, default=50,
                        help="rounds per measurement")
    parser.add_argument("--repeat", type=positive_int, default=5,
                        help="measurements per variant (interleaved); the median is reported")
    parser.add_argument("--guard", action="store_true",
                        help="serve behind the request guard and call through its ports too")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.common import run_stopping_servers
    from triton_models.serve import ServerError

    setup = FloorSetup(args.latency_ms, args.calls, args.rounds, args.repeat, args.guard)
    report = run_stopping_servers(lambda: run_benchmark(setup, args.out),
                                  (ValueError, ServerError))
    if isinstance(report, int):
        return report
    print(format_report(report))
    print(f"wrote {args.out / 'floor.json'}")
    return 0
