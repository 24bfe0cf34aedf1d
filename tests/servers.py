"""Test helpers for real tritonservers: a diffusers folder built and served as `driffusion serve`
serves it, a cluster of servers that restart on their own ports, `driffusion serve` in a process
of its own, signals to a server's process group, Prometheus metrics read from its endpoint, the
servers' memory, and the image of one request over HTTP/JSON or through `driffusion generate`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from triton_models.serve import EmbeddedServer, free_ports, group_members

if TYPE_CHECKING:
    from typing_extensions import Self


def http_json_image(http_url: str, values: dict[str, tuple[str, object]]) -> np.ndarray:
    """IMAGE of one KServe v2 JSON request to the `driffusion` model; `values`: input name ->
    (datatype, value), each input of shape [1]."""
    body = {"inputs": [{"name": name, "shape": [1], "datatype": datatype, "data": [value]}
                       for name, (datatype, value) in values.items()],
            "outputs": [{"name": "IMAGE"}]}
    request = urllib.request.Request(f"{http_url}/v2/models/driffusion/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as reply:
        (output,) = json.loads(reply.read())["outputs"]
    return np.array(output["data"], np.uint8).reshape(output["shape"])


def generate_image(http_url: str, out: Path, *arguments: str) -> np.ndarray:
    """The image `driffusion generate --endpoints HTTP_URL ARGUMENTS` writes to `out` (a PNG)."""
    from PIL import Image

    from cli import main as driffusion

    assert driffusion(["generate", "--endpoints", http_url, *arguments, "--out", str(out),
                       "--quiet"]) == 0
    return np.asarray(Image.open(out))


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
    return sum(rss_mb(pid) for pid in group_members(server.process.pid))


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> str:
    """Read the process's output until a line contains `text` (with a deadline)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} from `driffusion serve`:\n{''.join(seen)}")


def children_of(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 once it is gone)."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0.0
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class ServeCommand:
    """`driffusion serve --model sim` with `flags`, run as a user runs it, in a process of its own
    on free ports; `with ServeCommand(tmp, ...) as serve:` waits until it is ready and stops it
    (SIGINT, as Ctrl-C) at the end."""

    def __init__(self, root: Path, *flags: str) -> None:
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.command = [sys.executable, "-m", "cli", "serve", "--model", "sim", "--devices", "1",
                        "--repository", str(root / "repo"), "--log-file", str(root / "server.log"),
                        "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                        "--metrics-port", str(self.metrics_port), *flags]
        self.process: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        try:
            self.output = wait_for_line(self.process, "Triton ready", timeout_s=240)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.output += self.process.stdout.read()
        self.process.stdout.close()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def tritonserver(self) -> int:
        """The process id of the tritonserver that `driffusion serve` runs now."""
        (triton,) = children_of(self.process.pid)
        return triton

    def memory_mb(self) -> tuple[float, float]:
        """(the serve process, which holds the request guard; tritonserver and its stubs) RSS."""
        (triton,) = children_of(self.process.pid)
        return rss_mb(self.process.pid), sum(rss_mb(pid) for pid in group_members(triton))

    def shm_mb(self) -> float:
        """What the /dev/shm files that tritonserver and its stubs map occupy, in MB: this
        server's python-backend regions only, not those of servers that other workers run."""
        paths = set()
        for pid in group_members(self.tritonserver()):
            try:
                maps = (Path("/proc") / str(pid) / "maps").read_text()
            except OSError:
                continue
            paths.update(line.split(maxsplit=5)[5].removesuffix(" (deleted)")
                         for line in maps.splitlines() if " /dev/shm/" in line)
        return sum(Path(path).stat().st_blocks * 512 for path in paths
                   if Path(path).is_file()) / (1 << 20)
