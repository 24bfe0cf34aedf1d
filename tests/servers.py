"""Test helpers for real tritonservers: a diffusers folder built and served as `driffusion serve`
serves it, a cluster of servers that restart on their own ports, signals to a server's process
group, and Prometheus metrics read from its endpoint."""
from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from triton_models.serve import EmbeddedServer, free_ports, group_members


@contextmanager
def serving_folder(folder: Path, root: Path, **build) -> Iterator[EmbeddedServer]:
    """`folder` exported, built as fp32 ONNX Runtime engines and served on 2 devices under a
    DRIFFUSION_HOME of `root`, as `driffusion serve --model FOLDER` does (`build`: prepare_model's
    export and loras); the server stops on exit."""
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import prepare_model, serving

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFFUSION_HOME", str(root))
        options = prepare_model(RepositoryOptions(model=str(folder), devices=2,
                                                  backend="onnxruntime"),
                                log=lambda line: None, **build)
        with serving(options, root / "repo", root / "server.log") as (server, _):
            yield server


class Cluster:
    """Servers started by a test module, all stopped at its end (restarts keep their ports)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[EmbeddedServer] = []

    def start(self, repository: Path, ports: dict[str, int] | None = None) -> EmbeddedServer:
        grpc, http, metrics = free_ports(3) if ports is None else ports.values()
        server = EmbeddedServer(repository, grpc_port=grpc, http_port=http, metrics_port=metrics,
                                log_path=self.root / f"server{len(self.servers)}.log")
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            if server.process is not None:
                signal_group(server, signal.SIGCONT)
        with ThreadPoolExecutor(len(self.servers) or 1) as pool:  # ~2.5 s each: all at once
            list(pool.map(EmbeddedServer.stop, self.servers))


def signal_group(server: EmbeddedServer, signum: int) -> None:
    """Send `signum` to every process of the server (tritonserver and its stubs)."""
    try:
        os.killpg(server.process.pid, signum)
    except ProcessLookupError:
        pass


def metric(server: EmbeddedServer, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels` (0 if none)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} ([0-9.e+]+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def group_rss_mb(server: EmbeddedServer) -> float:
    """Resident memory of tritonserver and its stubs together, in MB."""
    total = 0
    for pid in group_members(server.process.pid):
        try:
            status = (Path("/proc") / str(pid) / "status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    return total / 1024
