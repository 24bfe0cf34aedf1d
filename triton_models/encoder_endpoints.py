"""Encoder servers: the `driffusion` model calls the tokenizers and text encoders of another
Triton server instead of its own.

An encoder runs once per request; an LLM encoder (Flux.2 dev's 24 B Mistral) may not fit a GPU
beside a denoiser, so it can live on a server of its own (`driffusion serve --encoders-only`),
which a front names with `--encoder-endpoints HOST:PORT[,HOST:PORT...]`. When the repository is
written the front records each tokenizer's and text encoder's *signature* (tensor names, dtypes,
shapes) and leaves the models out; at initialize the `driffusion` model finds them on every
endpoint, ready and with the same signature, or refuses to load, naming the endpoint. Calls go
over gRPC (or HTTP, `http://HOST:PORT`) with the per-call deadline; with several endpoints a
call goes to the first that answers. An encoder server that fails mid-service fails the
request with UNAVAILABLE naming it (the driffusion model's DeviceError handling). Light module:
no `triton_python_backend_utils`, tested in-process.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.device import ModelClient
from runtime.triton_clients import DiscoveryError, ReplicatedModel, TritonEndpoints
from triton_models.device_endpoints import (
    DISCOVERY_TIMEOUT_S,
    EndpointConnections,
    RemoteModel,
    parse_endpoints,
    run_sync,
    signature,
    signature_problems,
)

# parameters of the driffusion config
ENCODER_ENDPOINTS_PARAMETER = "encoder_endpoints"  # "host:port,host:port"
ENCODER_SIGNATURES_PARAMETER = "encoder_signatures"  # JSON: {model name: signature}


async def encoder_configs(endpoints: Sequence[str], names: Sequence[str],
                          timeout_s: float = DISCOVERY_TIMEOUT_S) -> dict[tuple[str, str], dict]:
    """{(endpoint, model name): config} of every named model on every endpoint; DiscoveryError
    naming the endpoint if one does not answer or lacks a ready model."""
    found = {}
    async with TritonEndpoints(endpoints, timeout_s=timeout_s) as connection:
        for endpoint in connection.endpoints:
            ready = await connection.ready_models(endpoint)
            missing = [name for name in names if name not in ready]
            if missing:
                raise DiscoveryError(
                    f"encoder endpoint {endpoint} serves no ready {', '.join(missing)} (ready "
                    f"models: {', '.join(ready) or 'none'}); start it with `driffusion serve "
                    "--encoders-only` on the same model")
            for name in names:
                found[endpoint, name] = await connection.model_config(endpoint, name)
    return found


def remote_encoders(endpoints: Sequence[str], expected: Mapping[str, Any],
                    timeout_s: float = DISCOVERY_TIMEOUT_S) -> dict[str, ModelClient]:
    """A model client for each tokenizer and text encoder of `expected` ({name: signature}) on
    the endpoints, checked against its signature (DiscoveryError naming the endpoint and the
    mismatch otherwise). Synchronous, for `initialize`."""
    configs = run_sync(encoder_configs(endpoints, list(expected), timeout_s))
    for (endpoint, name), config in configs.items():
        problems = signature_problems(expected[name], signature(config))
        if problems:
            raise DiscoveryError(
                f"encoder endpoint {endpoint} serves {name}, which does not fit this pipeline: "
                f"{'; '.join(problems)}. Serve the same model on the encoder server as on the "
                "front server")
    connections = EndpointConnections(endpoints, timeout_s)
    clients: dict[str, ModelClient] = {}
    for name in expected:
        replicas = [RemoteModel(connections, endpoint, name) for endpoint in endpoints]
        clients[name] = replicas[0] if len(replicas) == 1 else ReplicatedModel(replicas)
    return clients


def encoders_from_parameters(parameters: Mapping[str, str],
                             timeout_s: float = DISCOVERY_TIMEOUT_S) -> dict[str, ModelClient]:
    """The remote tokenizers and text encoders a `driffusion` config names (none without
    `encoder_endpoints`)."""
    endpoints = parse_endpoints(parameters.get(ENCODER_ENDPOINTS_PARAMETER, ""))
    if not endpoints:
        return {}
    expected = json.loads(parameters[ENCODER_SIGNATURES_PARAMETER])
    return remote_encoders(endpoints, expected, timeout_s)

