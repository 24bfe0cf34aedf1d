"""Hardening against local users: nothing a process listing shows opens Triton's admin APIs."""
from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import pytest
import tritonclient.grpc as grpc_client
from servers import group_rss_mb
from tritonclient.utils import InferenceServerException

from triton_models.repository import RepositoryOptions, write_repository
from triton_models.serve import RESTRICTED_HEADER, group_members

pytestmark = pytest.mark.triton
ADMIN_PATHS = ("/v2/logging", "/v2/trace/setting", "/v2/systemsharedmemory/status")


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    options = RepositoryOptions(model="sim", devices=1)
    return triton_server(write_repository(tmp_path_factory.mktemp("h") / "repo", options).path)


def readable_strings(pid: int) -> list[str]:
    """What any local user can read about a process: its command line and environment."""
    strings = []
    for name in ("cmdline", "environ"):
        try:
            raw = (Path("/proc") / str(pid) / name).read_bytes()
        except OSError:
            continue
        strings += [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return strings


def candidate_headers(strings: list[str]) -> set[tuple[str, str]]:
    """(key, value) pairs a snooping user would try: every `key=value` found, each line of a
    value alone and joined with a space, under the found key and the project's header."""
    pairs = set()
    for text in strings:
        for key, value in re.findall(r"([A-Za-z0-9_.-]+)=([^,:]*)$", text, flags=re.DOTALL):
            for variant in {value, value.replace("\n", " "), *value.splitlines()}:
                pairs |= {(key, variant), (RESTRICTED_HEADER, variant)}
    return pairs


def http_status(port: int, path: str, key: str, value: str) -> str:
    """The status line Triton answers to a raw HTTP/1.1 GET with one extra header."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}: {value}\r\n"
               "Connection: close\r\n\r\n").encode(errors="replace")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        return connection.recv(64).decode(errors="replace").split("\r\n")[0]


def test_nothing_in_any_server_process_listing_opens_the_admin_apis(server):
    processes = group_members(server.process.pid)
    assert len(processes) >= 2  # tritonserver and its model stubs
    pairs = candidate_headers([s for pid in processes for s in readable_strings(pid)])
    assert any(key == RESTRICTED_HEADER for key, _ in pairs)  # the rule itself is visible
    for key, value in sorted(pairs):
        for path in ADMIN_PATHS:
            assert " 200 " not in http_status(server.ports["http"], path, key, value)
    client = grpc_client.InferenceServerClient(server.grpc_url)
    try:
        for key, value in sorted(pairs):
            with pytest.raises((InferenceServerException, ValueError)):
                client.get_log_settings(headers={key.lower(): value})
        assert client.is_server_ready()
    finally:
        client.close()


@pytest.fixture(scope="module")
def text_server(triton_server, tmp_path_factory, tiny_sd_engines):
    options = dataclasses.replace(tiny_sd_engines, max_batch=8)
    repository = write_repository(tmp_path_factory.mktemp("home") / "repo", options)
    return triton_server(repository.path)


def oversized(model: str) -> list:
    """One request about 100x over what `model` accepts (rows, or bytes for strings)."""
    import numpy as np

    def tensor(name, array, datatype):
        item = grpc_client.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    if model == "driffusion":  # PROMPT of 100x the byte limit
        return [tensor("PROMPT", np.array([b"x" * 204_800], dtype=object), "BYTES")]
    if model == "tokenizer":  # 200 texts, the limit is 2
        return [tensor("TEXT", np.array([[b"a cat"]] * 200, dtype=object), "BYTES")]
    if model == "text_encoder":  # 200 rows of ids, the limit is 2
        return [tensor("input_ids", np.zeros((200, 77), np.int64), "INT64")]
    if model == "vae_decoder":  # 100 latents, the limit is 1
        return [tensor("latent", np.zeros((100, 4, 8, 8), np.float32), "FP32")]
    rows = 800  # unet_cpu0: 100x its max batch of 8
    return [tensor("sample", np.zeros((rows, 4, 8, 8), np.float32), "FP32"),
            tensor("timestep", np.zeros((rows, 1), np.float32), "FP32"),
            tensor("encoder_hidden_states", np.zeros((rows, 77, 32), np.float32), "FP32")]


@pytest.mark.slow  # Triton's own port; the guard refuses these first: tests/test_hostile_inputs.py
@pytest.mark.parametrize("model", ["driffusion", "tokenizer", "text_encoder", "vae_decoder",
                                   "unet_cpu0"])
def test_a_request_far_over_a_models_limit_is_refused_fast_without_keeping_memory(
        text_server, model):
    import time

    client = grpc_client.InferenceServerClient(text_server.grpc_url)
    try:
        before = group_rss_mb(text_server)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, oversized(model))
        seconds = time.monotonic() - started
        assert client.is_server_ready()
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    assert seconds < 1.0
    assert group_rss_mb(text_server) - before < 100
