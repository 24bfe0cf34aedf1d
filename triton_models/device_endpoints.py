"""Scale out: the `driffusion` model's device pool reaches device servers on other hosts.

A front server (`driffusion serve --device-endpoints HOST:PORT,...`, `--devices 0` for none of
its own) runs the `driffusion` model over its local `unet_*` models (BLS) plus every ready
`unet_*` model of each endpoint, called over gRPC with the runtime's device client
(`runtime.triton_clients.TritonModel`, a deadline on every call). Discovery runs once, at model
initialize: an endpoint that does not answer, serves no `unet_*` model, or serves one whose
inputs or outputs differ from what the served pipeline feeds its devices (the *device
signature*: tensor names, dtypes and shapes, i.e. latent channels and size and the
conditioning) stops the model from loading, with the endpoint named, before any request.

How a round is cut into calls depends only on the total lane count (`DevicePool.width`), never
on where a device lives, so a mix of local and remote devices gives the image that the same
number of local devices gives. Light module: no `triton_python_backend_utils`, tested
in-process.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import json
import sys
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runtime.device import Device
from runtime.triton_clients import (
    DEVICE_PATTERN,
    DiscoveryError,
    TritonEndpoints,
    TritonModel,
    device_from_config,
    parse_endpoint,
)

# parameters of the driffusion config
ENDPOINTS_PARAMETER = "device_endpoints"  # "host:port,host:port"
SIGNATURE_PARAMETER = "device_signature"  # JSON: what every device model must accept
DISCOVERY_TIMEOUT_S = 10.0  # per discovery call (liveness, repository index, model config)
T = TypeVar("T")


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT...]` (or a list of them) validated, in order, without repeats."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = tuple(parse_endpoint(item) for item in items if item.strip())
    repeated = sorted({item for item in parsed if parsed.count(item) > 1})
    if repeated:
        raise ValueError(f"device endpoint(s) given twice: {', '.join(repeated)}")
    return parsed


# ---------------------------------------------------------------------------------------------
# Device signatures: what a device model takes and returns, independent of batching


def signature(config: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{"inputs"|"outputs": {name: {"dtype": "TYPE_FP32", "shape": [-1, 4, 64, 64]}}}` of a
    Triton model config (the JSON form, as `get_model_config` returns it).

    Shapes include the batch dimension (-1) whether Triton batches the model or not, so a
    batching and a non-batching device of the same network have the same signature.
    """
    batched = int(config.get("max_batch_size", 0) or 0) > 0

    def shape(tensor: Mapping[str, Any]) -> list[int]:
        dims = (tensor["reshape"].get("shape", []) if "reshape" in tensor
                else tensor.get("dims", []))
        dims = [int(d) for d in dims]
        return [-1, *dims] if batched else dims

    return {
        kind: {tensor["name"]: {"dtype": tensor.get("data_type", "TYPE_FP32"),
                                "shape": shape(tensor)}
               for tensor in config.get(kind[:-1], [])}
        for kind in ("inputs", "outputs")
    }


def config_of_file(path: str | Path) -> dict[str, Any]:
    """A config.pbtxt as the JSON form a server's `get_model_config` answers with."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


WHAT = {"sample": "latent channels x height x width", "out_sample": "latent channels x height "
        "x width"}


def signature_problems(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Why a device of signature `found` cannot serve a pipeline that expects `expected`
    (empty if it can). A dimension the pipeline fixes must be that size or dynamic on the
    device; one the pipeline leaves dynamic (several image sizes) must be dynamic there too."""
    problems = []
    for kind in ("inputs", "outputs"):
        want, have = expected.get(kind, {}), found.get(kind, {})
        missing = [name for name in want if name not in have]
        if missing:
            problems.append(f"no {kind[:-1]} {', '.join(missing)}")
        extra = [name for name in have if name not in want]
        if extra and kind == "inputs":
            problems.append(f"unexpected input {', '.join(extra)} (the pipeline's conditioning "
                            f"is {', '.join(want)})")
        for name in want:
            if name not in have:
                continue
            a, b = want[name], have[name]
            if a["dtype"] != b["dtype"]:
                problems.append(f"{kind[:-1]} {name} is {b['dtype']}, expected {a['dtype']}")
            if not _shape_fits(a["shape"], b["shape"]):
                what = WHAT.get(name, "conditioning")
                problems.append(f"{kind[:-1]} {name} has shape {b['shape']}, expected "
                                f"{a['shape']} ({what})")
    return problems


def _shape_fits(expected: Sequence[int], found: Sequence[int]) -> bool:
    if len(expected) != len(found):
        return False
    return all(f == -1 if e <= 0 else f in (e, -1) for e, f in zip(expected, found))


# ---------------------------------------------------------------------------------------------
# Model clients that follow the event loop they are called from


class EndpointConnections:
    """gRPC connections to the endpoints, opened on first use by the event loop that uses them.

    gRPC aio channels belong to one event loop; the python backend runs `execute` on a loop of
    its own, not the one discovery ran on at initialize, so connections open lazily per loop.
    """

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DISCOVERY_TIMEOUT_S) -> None:
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._open: dict[asyncio.AbstractEventLoop, TritonEndpoints] = {}

    async def connection(self) -> TritonEndpoints:
        loop = asyncio.get_running_loop()
        connection = self._open.get(loop)
        if connection is None:
            connection = await TritonEndpoints(self.endpoints,
                                               timeout_s=self.timeout_s).__aenter__()
            self._open[loop] = connection
        return connection

    async def close(self) -> None:
        """Close the connections of the running loop."""
        connection = self._open.pop(asyncio.get_running_loop(), None)
        if connection is not None:
            await connection.__aexit__(None, None, None)


class RemoteModel:
    """One model on a device server (the runtime's `ModelClient`): a `TritonModel` on the
    calling loop's connection, so calls carry the device's deadline as a gRPC deadline."""

    def __init__(self, connections: EndpointConnections, endpoint: str, model_name: str) -> None:
        self.connections = connections
        self.endpoint = endpoint
        self.model_name = model_name
        self.name = f"{endpoint}/{model_name}"
        self._models: dict[int, TritonModel] = {}

    async def _model(self) -> TritonModel:
        connection = await self.connections.connection()
        model = self._models.get(id(connection))
        if model is None:
            model = connection.model(self.endpoint, self.model_name)
            self._models = {id(connection): model}
        return model

    async def infer(self, inputs, outputs, timeout_s=None):
        return await (await self._model()).infer(inputs, outputs, timeout_s)

    async def is_ready(self) -> bool:
        return await (await self._model()).is_ready()


# ---------------------------------------------------------------------------------------------
# Discovery


async def device_configs(endpoints: Sequence[str], pattern: str = DEVICE_PATTERN,
                         timeout_s: float = DISCOVERY_TIMEOUT_S) -> list[tuple[str, str, dict]]:
    """(endpoint, model name, config) of every ready `pattern` model of every endpoint, in
    endpoint order; DiscoveryError naming the endpoint if one does not answer or serves none."""
    from tritonclient.utils import InferenceServerException

    found = []
    async with TritonEndpoints(endpoints, timeout_s=timeout_s) as connection:
        for endpoint in connection.endpoints:
            models = await connection.ready_models(endpoint)
            names = [name for name in models if fnmatch.fnmatchcase(name, pattern)]
            if not names:
                raise DiscoveryError(
                    f"device endpoint {endpoint} serves no ready {pattern} model (ready models: "
                    f"{', '.join(models) or 'none'}); start it with `driffusion serve "
                    "--no-pipeline-model`")
            for name in names:
                try:
                    config = await connection.model_config(endpoint, name)
                except InferenceServerException as error:
                    raise DiscoveryError(f"device endpoint {endpoint}: no config for {name}: "
                                         f"{error.message()}") from error
                found.append((endpoint, name, config))
    return found


def remote_devices(endpoints: Sequence[str], expected: Mapping[str, Any],
                   deadline_s: float | None, *, pattern: str = DEVICE_PATTERN,
                   timeout_s: float = DISCOVERY_TIMEOUT_S) -> list[Device]:
    """Devices for every ready `unet_*` model of the endpoints, checked against the pipeline's
    device signature (DiscoveryError naming the endpoint and the mismatch otherwise).

    Synchronous (for `initialize`): discovery runs on a loop of its own; the devices' calls
    open their connections on whichever loop later calls them.
    """
    found = run_sync(device_configs(endpoints, pattern, timeout_s))
    connections = EndpointConnections(endpoints, timeout_s)
    devices = []
    for endpoint, name, config in found:
        problems = signature_problems(expected, signature(config))
        if problems:
            raise DiscoveryError(
                f"device endpoint {endpoint} serves {name}, which does not fit this pipeline: "
                f"{'; '.join(problems)}. Serve the same model (and image size) on every device "
                "server as on the front server")
        devices.append(device_from_config(RemoteModel(connections, endpoint, name), config,
                                          deadline_s))
    return devices


def devices_from_parameters(parameters: Mapping[str, str], deadline_s: float | None,
                            timeout_s: float = DISCOVERY_TIMEOUT_S) -> list[Device]:
    """The remote devices a `driffusion` config names (none without `device_endpoints`)."""
    endpoints = parse_endpoints(parameters.get(ENDPOINTS_PARAMETER, ""))
    if not endpoints:
        return []
    expected = json.loads(parameters[SIGNATURE_PARAMETER])
    return remote_devices(endpoints, expected, deadline_s, timeout_s=timeout_s)


def run_sync(coroutine: Awaitable[T]) -> T:
    """Run a coroutine to completion from synchronous code, even under a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def describe(devices: Sequence[Device]) -> str:
    """`name x instances, ...` for a log line."""
    return ", ".join(f"{device.name} x{device.instances}" for device in devices) or "none"


def endpoints_argument(text: str) -> tuple[str, ...]:
    """argparse `type` of `--device-endpoints HOST:PORT[,HOST:PORT...]`."""
    import argparse

    try:
        return parse_endpoints(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


# ---------------------------------------------------------------------------------------------
# Waiting for device servers (a front server's start script: the model loads only once they are up)


async def wait_for_devices(endpoints: Sequence[str], timeout_s: float, *, poll_s: float = 2.0,
                           pattern: str = DEVICE_PATTERN) -> list[str]:
    """Poll until every endpoint serves a ready `pattern` model; the endpoints still not ready
    when `timeout_s` has passed (empty once all are)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(parse_endpoints(endpoints))
    async with TritonEndpoints(waiting, timeout_s=min(poll_s, DISCOVERY_TIMEOUT_S)) as connection:
        while True:
            still = []
            for endpoint in waiting:
                try:
                    models = await connection.ready_models(endpoint)
                except DiscoveryError:
                    models = []
                if not any(fnmatch.fnmatchcase(name, pattern) for name in models):
                    still.append(endpoint)
            waiting = still
            if not waiting or time.monotonic() >= deadline:
                return waiting
            await asyncio.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m triton_models.device_endpoints wait HOST:PORT,... [--timeout-s S] [--models
    PATTERN]`: exit 0 once every server serves a ready unet_* (or PATTERN, e.g. text_encoder*
    for encoder servers) model, 1 (naming them) if some never do."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m triton_models.device_endpoints")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait", help="wait until device servers serve ready unet_* models")
    wait.add_argument("endpoints", type=endpoints_argument, metavar="HOST:PORT[,HOST:PORT...]")
    wait.add_argument("--timeout-s", type=float, default=600.0)
    wait.add_argument("--poll-s", type=float, default=2.0)
    wait.add_argument("--models", default=DEVICE_PATTERN,
                      help="the model name pattern to wait for (default %(default)s)")
    args = parser.parse_args(argv)
    waiting = asyncio.run(wait_for_devices(args.endpoints, args.timeout_s, poll_s=args.poll_s,
                                           pattern=args.models))
    servers = "device servers" if args.models == DEVICE_PATTERN else f"{args.models} servers"
    if waiting:
        print(f"{servers} not ready after {args.timeout_s:g} s: {', '.join(waiting)}",
              file=sys.stderr)
        return 1
    print(f"{servers} ready: {', '.join(args.endpoints)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
