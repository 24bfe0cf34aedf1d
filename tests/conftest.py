"""Shared pytest fixtures."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from triton_models.serve import free_ports

# servers stopped by the tests wait 2 s, not 10, for connections a test left open (Triton counts
# idle kept-alive HTTP connections too): about a minute of the suite
os.environ.setdefault("DRIFFUSION_EXIT_TIMEOUT_S", "2")


@pytest.fixture(name="free_ports")
def free_ports_fixture() -> Callable[[int], list[int]]:
    """`free_ports(count)`: distinct TCP ports free on 127.0.0.1 a moment ago."""
    return free_ports


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory) -> Iterator[Callable[[Path], object]]:
    """Factory `start(repository_dir) -> EmbeddedServer`: a real tritonserver on free ports.

    Every server started through it is stopped (with its stub processes) when the module ends.
    """
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from triton_models.serve import EmbeddedServer

    servers: list[EmbeddedServer] = []

    def start(repository: Path) -> EmbeddedServer:
        grpc_port, http_port, metrics_port = free_ports(3)
        log_path = tmp_path_factory.mktemp("tritonserver") / "server.log"
        server = EmbeddedServer(repository, grpc_port=grpc_port, http_port=http_port,
                                metrics_port=metrics_port, log_path=log_path)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_sd_engines(tmp_path_factory):
    """RepositoryOptions naming tiny-sd's ONNX Runtime engines, exported and built once for the
    whole run: in a directory every pytest-xdist worker shares (the build lock makes a second
    worker wait, then keep the engines). Modules write their own repositories from it."""
    from triton_models.repository import RepositoryOptions
    from triton_models.serve import prepare_model

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    home = shared / "tiny-sd-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFFUSION_HOME", str(home))
        return prepare_model(RepositoryOptions(model="tiny-sd", backend="onnxruntime"),
                             log=lambda line: None)


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread for a module: on these shared 2-core machines, torch's own thread
    pool made tiny export/validation runs 2-3x slower than one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
