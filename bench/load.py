"""`driffusion bench load`: many concurrent gRPC clients against the `driffusion` model.

Each client sends one request after another (a prompt, or a label for class-conditional models,
and a fresh seed) for the duration; `--mixed` varies prompts, modes and windows from request to
request. The run reports throughput, latency percentiles, failures, the mean time requests
waited in the `driffusion` model's queue and, from Triton's own statistics, how many device
calls the devices' dynamic batcher merged (requests per model execution). Clients speak gRPC
to `HOST:PORT` endpoints and HTTP/1.1 (binary tensors, kept-alive connections) to
`http://HOST:PORT` ones. Without `--endpoint` it serves `--model` (default: the closed-form
`unet_sim` devices, which measure orchestration and serving, not compute) on an embedded server
of its own, over `--protocol`; `--compare-batching` runs the same load a second time with
dynamic batching off, `--compare-guard` runs it through the request guard's port and then
through Triton's own port of one server, and each prints both side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.common import infer_inputs, machine_info
from runtime.driffusion import MODES
from runtime.generate import PIPELINE_MODEL
from runtime.triton_clients import is_http, parse_endpoint, split_host_port

DEVICE_PREFIX = "unet_"
MAX_CLIENTS = 4096


@dataclass(frozen=True)
class LoadSetup:
    """One load run: the clients, their requests and (for the embedded server) the serving."""

    clients: int = 32
    duration_s: float = 60.0
    steps: int = 20
    mode: str = "aggressive"
    window: int | None = None
    guidance: float = 2.0
    timeout_s: float = 120.0
    devices: int = 2
    sim_latency_ms: float = 20.0
    pipeline_instances: int = 8
    dynamic_batching: bool = True
    model: str = "sim"  # embedded server: sim, a preset or a diffusers folder
    mixed: bool = False  # vary prompts, modes and windows from request to request

    def validate(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be in 1..{MAX_CLIENTS}; got {self.clients}")
        if not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s; got {self.duration_s}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1; got {self.window}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 s; got {self.timeout_s}")


@dataclass
class LoadResult:
    """What one load run measured."""

    batching: str  # "dynamic", "off" or "endpoint" (a server this benchmark did not start)
    port: str = ""  # with --compare-guard: "guard" or "triton" (Triton's own port)
    protocol: str = "grpc"
    requests: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # first line of each error -> count
    seconds: float = 0.0
    throughput_rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, mean, max
    device_requests: int = 0  # device calls the devices received
    device_executions: int = 0  # model executions that ran them (fewer: batched together)
    queue_ms: float = 0.0  # mean wait in the driffusion model's queue (Triton's statistics)

    @property
    def calls_per_execution(self) -> float:
        return self.device_requests / self.device_executions if self.device_executions else 0.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "load",
        help="concurrent clients against the driffusion model: throughput, p50/p99, failures",
        description="Run --clients concurrent gRPC clients against the driffusion model for "
        "--duration seconds and report throughput, latency percentiles and failures as JSON. "
        "Without --endpoint, an embedded server with closed-form unet_sim devices is started.",
    )
    defaults = LoadSetup()
    parser.add_argument("--endpoint", default=None,
                        help="HOST:PORT of a running server with the driffusion model (default: "
                        "start an embedded sim server)")
    parser.add_argument("--clients", type=int, default=defaults.clients,
                        help="concurrent clients (default %(default)s)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s,
                        help="seconds to keep sending requests (default %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="STEPS of each request (default %(default)s)")
    parser.add_argument("--mode", choices=MODES, default=defaults.mode,
                        help="MODE of each request (default %(default)s)")
    parser.add_argument("--window", type=int, default=None,
                        help="WINDOW of each request (default: the server's device count)")
    parser.add_argument("--guidance", type=float, default=defaults.guidance,
                        help="GUIDANCE of each request (default %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                        help="client deadline of one request (default %(default)s)")
    parser.add_argument("--devices", type=int, default=defaults.devices,
                        help="embedded server: unet_sim devices (default %(default)s)")
    parser.add_argument("--sim-latency-ms", type=float, default=defaults.sim_latency_ms,
                        help="embedded server: wall time of one device call (default %(default)s)")
    parser.add_argument("--pipeline-instances", type=int, default=defaults.pipeline_instances,
                        help="embedded server: driffusion instances, i.e. requests served at "
                        "once (default %(default)s)")
    parser.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                        help="embedded server: device models run each call alone")
    parser.add_argument("--model", default=defaults.model,
                        help="embedded server: sim, a preset (tiny-sd, reference) or a diffusers "
                        "folder, built first if needed (default %(default)s)")
    parser.add_argument("--mixed", action="store_true",
                        help="vary prompts (or labels), modes and windows between requests")
    parser.add_argument("--compare-batching", action="store_true",
                        help="embedded server: run again with dynamic batching off and compare")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="embedded server: the clients' protocol (default %(default)s; "
                        "--endpoint says it by its form)")
    parser.add_argument("--compare-guard", action="store_true",
                        help="embedded server: serve with the request guard (serve's defaults) "
                        "and run the load through its port, then through Triton's own port")
    parser.add_argument("--out", type=Path, default=Path("bench_load.json"),
                        help="JSON results (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_load)


def run_load(args: argparse.Namespace) -> int:
    setup = LoadSetup(
        clients=args.clients, duration_s=args.duration, steps=args.steps, mode=args.mode,
        window=args.window, guidance=args.guidance, timeout_s=args.timeout_s,
        devices=args.devices, sim_latency_ms=args.sim_latency_ms,
        pipeline_instances=args.pipeline_instances, dynamic_batching=args.dynamic_batching,
        model=args.model, mixed=args.mixed,
    )
    try:
        setup.validate()
        if args.endpoint is not None:
            if args.compare_batching or args.compare_guard:
                raise ValueError("--compare-batching and --compare-guard need the embedded "
                                 "server (no --endpoint)")
            results = [measure(parse_endpoint(args.endpoint), setup, "endpoint", args.quiet)]
        elif args.compare_guard:
            if args.compare_batching:
                raise ValueError("give --compare-guard or --compare-batching, not both")
            results = measure_guard(setup, args.protocol, args.quiet)
        else:
            variants = [setup.dynamic_batching, False] if args.compare_batching else [
                setup.dynamic_batching]
            results = [measure_embedded(_with_batching(setup, on), args.protocol, args.quiet)
                       for on in variants]
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report(setup, results, args.out)
    return 0 if all(result.failures == 0 for result in results) else 1


def _with_batching(setup: LoadSetup, on: bool) -> LoadSetup:
    return LoadSetup(**{**asdict(setup), "dynamic_batching": on})


def measure_embedded(setup: LoadSetup, protocol: str = "grpc",
                     quiet: bool = False) -> LoadResult:
    """Serve unet_sim devices on an embedded server and run the load against it."""
    with embedded_sim_server(setup) as server:
        endpoint = server.http_url if protocol == "http" else server.grpc_url
        return measure(endpoint, setup, "dynamic" if setup.dynamic_batching else "off", quiet)


def measure_guard(setup: LoadSetup, protocol: str, quiet: bool = False) -> list[LoadResult]:
    """The same load through the request guard's port, then through Triton's own port of the
    same server (its loopback port behind the guard)."""
    from triton_models.guard_limits import GuardLimits

    with embedded_sim_server(setup, GuardLimits()) as server:
        own = server.triton_ports[protocol]
        endpoints = {"guard": server.http_url if protocol == "http" else server.grpc_url,
                     "triton": f"http://127.0.0.1:{own}" if protocol == "http"
                     else f"127.0.0.1:{own}"}
        results = []
        for port, endpoint in endpoints.items():
            result = measure(endpoint, setup, "dynamic" if setup.dynamic_batching else "off",
                             quiet)
            result.port = port
            results.append(result)
        return results


@contextmanager
def embedded_sim_server(setup: LoadSetup, guard=None) -> Iterator:
    """`with embedded_sim_server(setup) as server`: `setup.model` served on free local ports
    (behind a request guard with `guard`'s limits, if given)."""
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import ServerError, prepare_model, serving

    options = prepare_model(RepositoryOptions(
        model=setup.model, devices=setup.devices, sim_latency_ms=setup.sim_latency_ms,
        pipeline_instances=setup.pipeline_instances, dynamic_batching=setup.dynamic_batching,
        max_queue_size=max(16, setup.clients), backend="auto",
    ))
    with tempfile.TemporaryDirectory(prefix="driffusion-load-") as scratch:
        print(f"starting an embedded Triton server ({setup.model}, {setup.devices} devices, "
              f"{setup.pipeline_instances} driffusion instances, dynamic batching "
              f"{'on' if setup.dynamic_batching else 'off'}) ...", flush=True)
        try:
            with serving(options, Path(scratch) / "repository", Path(scratch) / "server.log",
                         request_guard=guard) as (server, _):
                yield server
        except ServerError as error:
            raise RuntimeError(str(error)) from error


def measure(endpoint: str, setup: LoadSetup, batching: str, quiet: bool = False) -> LoadResult:
    """Run the clients against `endpoint` for the setup's duration."""
    return asyncio.run(_measure(endpoint, setup, batching, quiet))


async def _measure(endpoint: str, setup: LoadSetup, batching: str, quiet: bool) -> LoadResult:
    clients = [load_client(endpoint) for _ in range(setup.clients)]
    try:
        await _check_endpoint(clients[0], endpoint)
        prompts = await _uses_prompts(clients[0])
        await _request(clients[0], setup, prompts, 0, seed=0)  # warm-up, not counted
        before = await _device_counts(clients[0])
        queue_before = await _queue(clients[0])
        start = time.perf_counter()
        end = start + setup.duration_s
        progress = asyncio.create_task(_progress(end, setup.duration_s, quiet))
        outcomes = await asyncio.gather(*(_client_loop(client, index, setup, end, prompts)
                                          for index, client in enumerate(clients)))
        seconds = time.perf_counter() - start
        await progress
        after = await _device_counts(clients[0])
        queue_after = await _queue(clients[0])
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    samples = [sample for client_samples in outcomes for sample in client_samples]
    result = summarise(samples, seconds, batching, before, after)
    result.protocol = "http" if is_http(endpoint) else "grpc"
    waited = queue_after[1] - queue_before[1]
    result.queue_ms = round((queue_after[0] - queue_before[0]) / 1e6 / waited, 1) if waited else 0
    return result


class RequestFailed(Exception):
    """A request the server refused or did not answer in time (its message)."""


def load_client(endpoint: str) -> GrpcLoadClient | HttpLoadClient:
    return HttpLoadClient(endpoint) if is_http(endpoint) else GrpcLoadClient(endpoint)


class GrpcLoadClient:
    """What a load client asks of a Triton gRPC endpoint (tritonclient's aio client)."""

    def __init__(self, endpoint: str) -> None:
        import tritonclient.grpc.aio as grpc_aio

        self.client = grpc_aio.InferenceServerClient(endpoint)

    async def infer(self, model: str, fields: dict[str, np.ndarray], timeout_s: float) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            await self.client.infer(model, infer_inputs(fields), client_timeout=timeout_s)
        except InferenceServerException as error:
            raise RequestFailed(error.message() or str(error)) from error

    async def is_model_ready(self, model: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return await self.client.is_model_ready(model, client_timeout=10)
        except InferenceServerException as error:
            raise RequestFailed(error.message()) from error

    async def model_config(self, model: str) -> dict:
        return await self.client.get_model_config(model, as_json=True)

    async def statistics(self, model: str = "") -> dict:
        return await self.client.get_inference_statistics(model, as_json=True)

    async def close(self) -> None:
        await self.client.close()


class HttpLoadClient:
    """The same over Triton's HTTP/REST API (runtime.triton_http: binary tensors, kept-alive
    connections)."""

    def __init__(self, endpoint: str) -> None:
        from runtime.triton_http import HttpTriton

        self.client = HttpTriton(*split_host_port(endpoint))

    async def infer(self, model: str, fields: dict[str, np.ndarray], timeout_s: float) -> None:
        from runtime.triton_http import HttpError

        try:
            await self.client.infer(model, fields, ["IMAGE"], timeout_s=timeout_s)
        except HttpError as error:
            raise RequestFailed(error.message) from error
        except (OSError, EOFError, asyncio.TimeoutError) as error:
            raise RequestFailed(f"{type(error).__name__}: {error}") from error

    async def is_model_ready(self, model: str) -> bool:
        try:
            return await self.client.is_model_ready(model, timeout_s=10)
        except (OSError, EOFError, asyncio.TimeoutError) as error:
            raise RequestFailed(str(error)) from error

    async def model_config(self, model: str) -> dict:
        return await self.client.model_config(model)

    async def statistics(self, model: str = "") -> dict:
        return await self.client.get_json(f"/v2/models/{model}/stats" if model
                                          else "/v2/models/stats")

    async def close(self) -> None:
        await self.client.close()


async def _uses_prompts(client) -> bool:
    """True when the served model takes PROMPT (a text model), False for LABEL models."""
    from models.pipeline_spec import PipelineSpec

    config = await client.model_config(PIPELINE_MODEL)
    spec = config.get("config", config)["parameters"]["pipeline"]["string_value"]
    return PipelineSpec.from_json(spec).uses_prompts


async def _queue(client) -> tuple[int, int]:
    """(total ns requests waited in the driffusion model's queue, requests) so far."""
    statistics = await client.statistics(PIPELINE_MODEL)
    stats = [m.get("inference_stats", {}) for m in statistics.get("model_stats", [])]
    return (sum(int(s.get("queue", {}).get("ns", 0)) for s in stats),
            sum(int(s.get("queue", {}).get("count", 0)) for s in stats))


async def _check_endpoint(client, endpoint: str) -> None:
    try:
        ready = await client.is_model_ready(PIPELINE_MODEL)
    except RequestFailed as error:
        protocol = "HTTP" if is_http(endpoint) else "gRPC"
        raise RuntimeError(f"{endpoint} does not answer as a Triton {protocol} server: "
                           f"{error}") from error
    if not ready:
        raise RuntimeError(f"{endpoint} serves no ready {PIPELINE_MODEL} model; start one with "
                           "`driffusion serve --model sim`")


PROMPTS = ("a photo of a cat", "a red car in the rain", "", "two dogs on a beach at sunset",
           "a watercolor painting of a lighthouse")
MIXED = (("aggressive", None), ("sequential", None), ("conservative", 2), ("aggressive", 1))


async def _request(client, setup: LoadSetup, prompts: bool, number: int, seed: int) -> None:
    mode, window = MIXED[number % len(MIXED)] if setup.mixed else (setup.mode, setup.window)
    condition = ({"PROMPT": np.array([PROMPTS[number % len(PROMPTS)].encode()], dtype=object)}
                 if prompts else {"LABEL": np.array([number % 10], np.int32)})
    fields = {**condition, "SEED": np.array([seed], np.int64),
              "STEPS": np.array([setup.steps], np.int32),
              "MODE": np.array([mode.encode()], dtype=object),
              "GUIDANCE": np.array([setup.guidance], np.float32)}
    if window is not None:
        fields["WINDOW"] = np.array([window], np.int32)
    await client.infer(PIPELINE_MODEL, fields, setup.timeout_s)


async def _client_loop(client, index: int, setup: LoadSetup, end: float,
                       prompts: bool) -> list[tuple]:
    """(latency s, error or None) of each request one client sent before `end`."""
    samples, sent = [], 0
    while time.perf_counter() < end:
        started = time.perf_counter()
        error = None
        try:
            await _request(client, setup, prompts, index + sent, seed=index * 1_000_000 + sent)
        except RequestFailed as failure:
            error = (str(failure) or type(failure).__name__).splitlines()[0][:200]
        samples.append((time.perf_counter() - started, error))
        sent += 1
    return samples


async def _progress(end: float, duration_s: float, quiet: bool) -> None:
    """A progress bar over the load's seconds."""
    from tqdm import tqdm

    total = max(1, round(duration_s))
    with tqdm(total=total, desc="load", unit="s", disable=quiet) as bar:
        while (left := end - time.perf_counter()) > 0:
            await asyncio.sleep(min(1.0, left))
            bar.update(round(total * (1 - max(0.0, end - time.perf_counter()) / duration_s))
                       - bar.n)


async def _device_counts(client) -> tuple[int, int]:
    """(requests, executions) of the device models (`unet_*`) so far, from Triton's statistics."""
    statistics = await client.statistics()
    models = [m for m in statistics.get("model_stats", [])
              if m.get("name", "").startswith(DEVICE_PREFIX)]
    requests = sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
                   for m in models)
    executions = sum(int(m.get("execution_count", 0)) for m in models)
    return requests, executions


def summarise(samples: list[tuple], seconds: float, batching: str,
              before: tuple[int, int] = (0, 0), after: tuple[int, int] = (0, 0)) -> LoadResult:
    """Throughput over successful requests, latency percentiles, failures by message."""
    result = LoadResult(batching=batching, requests=len(samples), seconds=round(seconds, 3))
    latencies = np.array([latency for latency, error in samples if error is None])
    for _, error in samples:
        if error is not None:
            result.failures += 1
            result.errors[error] = result.errors.get(error, 0) + 1
    result.throughput_rps = round(len(latencies) / seconds, 3) if seconds > 0 else 0.0
    if latencies.size:
        result.latency_ms = {
            "p50": _ms(np.percentile(latencies, 50)), "p90": _ms(np.percentile(latencies, 90)),
            "p99": _ms(np.percentile(latencies, 99)), "mean": _ms(latencies.mean()),
            "max": _ms(latencies.max()),
        }
    result.device_requests = after[0] - before[0]
    result.device_executions = after[1] - before[1]
    return result


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 1)


def report(setup: LoadSetup, results: list[LoadResult], out: Path) -> None:
    """Print one line per run (and the batching ratio) and write the JSON file."""
    for result in results:
        latency = result.latency_ms
        through = f"{result.protocol} via {result.port:>6} port, " if result.port else ""
        print(f"{through}batching {result.batching:>8}: {result.requests} requests in {result.seconds:.1f} s"
              f", {result.throughput_rps:.2f} req/s, p50 {latency.get('p50', 0):.0f} ms, "
              f"p99 {latency.get('p99', 0):.0f} ms, queue {result.queue_ms:.0f} ms, "
              f"{result.failures} failures, {result.calls_per_execution:.2f} device calls per "
              "execution")
        for message, count in result.errors.items():
            print(f"  {count} x {message}")
    if len(results) == 2 and results[0].port and results[1].throughput_rps:
        print(f"through the guard: {results[0].throughput_rps / results[1].throughput_rps:.2f}x "
              f"the throughput of Triton's own port, p50 "
              f"{results[0].latency_ms.get('p50', 0) - results[1].latency_ms.get('p50', 0):+.0f} "
              "ms")
    elif len(results) == 2 and results[1].throughput_rps:
        print(f"dynamic batching: {results[0].throughput_rps / results[1].throughput_rps:.2f}x "
              "the throughput without")
    document = {
        "benchmark": "load",
        "command": "driffusion " + " ".join(sys.argv[1:]) if sys.argv else "",
        "machine": machine_info(),
        "setup": asdict(setup),
        "results": [{**asdict(result), "calls_per_execution": round(result.calls_per_execution, 3)}
                    for result in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")
