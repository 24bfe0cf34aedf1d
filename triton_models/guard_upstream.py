"""Triton behind the request guard: its models' specs, whether it answers, and what a client
is told of its errors (busy, restarting)."""
from __future__ import annotations

import asyncio
import json
import re

from runtime.triton_http import HttpError, HttpTriton
from triton_models.request_check import BadRequest, ModelSpec

BUSY_TRITON_TEXT = "Exceeds maximum queue size"
BUSY_MESSAGE = ("server busy: every driffusion instance is working and its queue is full "
                f"(Triton: {BUSY_TRITON_TEXT}); retry later")
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
UNAVAILABLE_MESSAGE = ("the inference server is not answering (it may be restarting); retry "
                       "later")
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what a model repository's names may be
CONNECT_WAIT_S = 1.0
CONFIG_TIMEOUT_S = 10.0  # for a model config from Triton's loopback port


class ModelSpecs:
    """What the guard checks inference requests against: each model's config, fetched from
    Triton's loopback HTTP port on first use and kept (the repository never changes while
    Triton runs: model control mode none)."""

    def __init__(self, http_port: int) -> None:
        self.triton = HttpTriton("127.0.0.1", http_port)
        self._specs: dict[str, ModelSpec] = {}

    async def get(self, model: str) -> ModelSpec:
        """The spec of `model`; BadRequest for a model Triton does not serve, OSError when
        Triton does not answer."""
        if model in self._specs:
            return self._specs[model]
        if not MODEL_NAME.fullmatch(model):
            raise BadRequest(f"model name {model[:64]!r}: not a model of this server (names "
                             "are letters, digits, '_', '.', '-')")
        try:
            _, body = await self.triton.request("GET", f"/v2/models/{model}/config",
                                                timeout_s=CONFIG_TIMEOUT_S)
        except HttpError:
            raise BadRequest(f"Request for unknown model: '{model}' is not found") from None
        except asyncio.TimeoutError as error:
            raise OSError("Triton did not answer for a model config") from error
        self._specs[model] = ModelSpec.from_config(json.loads(body))
        return self._specs[model]


async def upstream_ready(channel) -> bool:
    """Whether the channel to Triton is connected, waiting up to CONNECT_WAIT_S while it
    reconnects (after a restart a call would otherwise fail until the next retry)."""
    import grpc

    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return True
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_WAIT_S)
    except asyncio.TimeoutError:
        return False
    return True


def upstream_details(error) -> str:
    """What the client is told of Triton's error: its own text, less anything that names the
    loopback address behind the guard."""
    import grpc

    details = error.details() or ""
    if BUSY_TRITON_TEXT in details:
        return BUSY_MESSAGE
    if error.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" in details:
        return UNAVAILABLE_MESSAGE
    return details
