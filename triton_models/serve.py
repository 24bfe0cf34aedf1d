"""Run Triton on a model repository: the embedded CPU server and `driffusion serve`.

On a CPU machine the server is the `tritonserver` 2.51 binary of the nvidia-pytriton wheel with
its python backend: the backend is copied to a directory of our own with
the stub for this interpreter, the server runs in its own process group bound to 127.0.0.1,
and stopping it ends every stub process too. On GPU machines `--print-docker` prints the NGC
container command (one server with all GPUs, or one server per GPU).

Safe defaults: the server binds 127.0.0.1 unless `--host` says otherwise; its shared-memory,
trace and logging APIs (which let a client map server memory or choose files the server writes)
are closed to every client (a header value no client can send) unless `--allow-shared-memory`
opens shared memory; `driffusion serve` holds the public ports with a request guard
(triton_models/guard.py) unless `--request-guard-bytes 0`; the model repository is validated
before start; request limits are written into the repository. A tritonserver that dies under
`driffusion serve` is restarted on the same ports (a bounded number of times) while the guard
keeps the public ports open.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from models import paths
from models.limits import GUARD_LIMITS, SERVING_LIMITS
from triton_models.device_endpoints import endpoints_argument
from triton_models.repository import (
    BACKENDS,
    GPU_LAYOUTS,
    Repository,
    RepositoryOptions,
    validate_repository,
    write_repository,
)

if TYPE_CHECKING:
    from typing_extensions import Self

    from export.onnx_export import ExportOptions
    from triton_models.guard_limits import GuardLimits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
NGC_IMAGE = "nvcr.io/nvidia/tritonserver"
NGC_TAG = "24.10-py3"  # Triton 2.51, the version of the embedded server
# In the container: install the project (read-only at /src) so the python-backend models can
# import it, then start Triton on the repository mounted at /models.
CONTAINER_COMMAND = (
    "mkdir -p /tmp/src && cp -r /src/pyproject.toml /src/README.md /src/models /src/export "
    "/src/engines /src/triton_models /src/runtime /src/bench /src/cli /tmp/src/ && "
    "pip install -q /tmp/src 'numpy<2' && "
    "tritonserver --model-repository=/models"
)
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
# `driffusion serve` restarts a tritonserver that died at most this often within the window
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
# Triton APIs closed to clients by default (only a caller with the per-start token may use them)
RESTRICTED_APIS = ("shared-memory", "trace", "logging")
RESTRICTED_HEADER = "driffusion-admin"
UNSENDABLE_VALUE = "closed\nto-every-client"  # a line break: no client can send this value


class ServerError(RuntimeError):
    """The server could not start, or died."""


def pytriton_dir() -> Path:
    """The `pytriton` package directory that carries the tritonserver binary."""
    try:
        import pytriton
    except ImportError as error:
        raise ServerError(
            "the embedded Triton server needs nvidia-pytriton: pip install 'driffusion-trt[serve]'"
        ) from error
    return Path(pytriton.__file__).resolve().parent


def backend_dir(cache_root: Path | None = None) -> Path:
    """A backends directory holding the wheel's python backend plus the stub for this Python.

    Built once per (pytriton install, Python version) under the user's cache directory.
    """
    source = pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version}")
    cache_root = cache_root or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "driffusion-trt"
    fingerprint = f"{source}:{stub.stat().st_mtime_ns}".encode()
    key = f"{hashlib.sha256(fingerprint).hexdigest()[:16]}-py{version}"
    target = cache_root / "triton-backends" / key
    if not (target / "python" / "triton_python_backend_stub").is_file():
        staging = Path(tempfile.mkdtemp(prefix="backends-", dir=_mkdir(cache_root)))
        shutil.copytree(source / "backends" / "python", staging / "python")
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        _mkdir(target.parent)
        try:
            staging.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: the wheel's libraries, and stubs that run this Python.

    The stub's embedded interpreter ignores PYTHON* variables; it takes its prefix from the
    first `python3` on PATH, so this interpreter's bin directory goes first (its venv's
    site-packages, where the project is installed, come with it). Its libpython goes first on
    LD_LIBRARY_PATH so that the stub's libpython is the same patch release as the stdlib.
    """
    env = dict(os.environ)
    libs = [str(pytriton_dir().parent / "nvidia_pytriton.libs")]
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libpython_dir:
        libs.insert(0, libpython_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    # No malloc tunable: none helped. Measured (sim, 10 refused 30 MB PROMPTs, tritonserver and
    # stubs' RSS 5 s after): binary HTTP 1087 -> 1208 MB, all the python backend's shared-memory
    # regions (grown to the largest input, never shrunk: 60 MB in tritonserver, 30 in each of
    # two driffusion stubs), the same with MALLOC_MMAP_THRESHOLD_=1048576 or GLIBC_TUNABLES=
    # glibc.malloc.mmap_threshold=1048576; gRPC 1087 -> 1362-1426 MB (tritonserver heap +150 to
    # +220 MB; 30 requests: +230, so it levels off), 1370-1413 MB with that threshold,
    # MALLOC_ARENA_MAX=2, MALLOC_TRIM_THRESHOLD_ or --grpc-infer-allocation-pool-size 0 or 1.
    return env


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """Prefix `setpriv --pdeathsig TERM` (util-linux) where available, so that the server
    also stops if the Python process that started it is killed without cleaning up."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


class EmbeddedServer:
    """The nvidia-pytriton `tritonserver` on a model repository, as a context manager.

    `with EmbeddedServer(repo, grpc_port=p) as server:` starts it in its own process group,
    waits until every model is ready, and on exit stops it and all its stub processes.
    Start it from a thread that outlives it: the parent-death signal fires when the thread
    that started the server ends, not only when the process does.
    """

    def __init__(self, repository: str | Path, *, host: str = DEFAULT_HOST,
                 grpc_port: int = DEFAULT_PORTS["grpc"], http_port: int = DEFAULT_PORTS["http"],
                 metrics_port: int = DEFAULT_PORTS["metrics"], log_path: Path | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, verbose: bool = False,
                 allow_shared_memory: bool = False,
                 request_guard: GuardLimits | None = None) -> None:
        try:
            self.repository = validate_repository(repository)
        except ValueError as error:
            raise ServerError(str(error)) from error
        self.host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        _check_ports(self.ports)
        self.allow_shared_memory = allow_shared_memory
        self.startup_timeout_s = startup_timeout_s
        self.verbose = verbose
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.cancel = threading.Event()  # set it (e.g. from a signal handler) to abort start()
        # with a request guard (triton_models/guard.py) on the public gRPC and HTTP ports,
        # Triton itself listens on loopback ports of its own
        self.request_guard = request_guard
        self.guard = None
        self.triton_ports = dict(self.ports)
        if request_guard is not None:
            self.triton_ports["grpc"], self.triton_ports["http"] = free_ports(2)
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint (what `--endpoints` takes)."""
        return f"{self._client_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports['metrics']}/metrics"

    @property
    def _client_host(self) -> str:
        return _reachable(self.host)

    def command(self) -> list[str]:
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir()}",
            f"--grpc-address={self.triton_host}", f"--grpc-port={self.triton_ports['grpc']}",
            f"--http-address={self.triton_host}", f"--http-port={self.triton_ports['http']}",
            "--allow-metrics=true", f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false", f"--exit-timeout-secs={exit_timeout_s()}",
            "--disable-auto-complete-config",  # configs are complete; saves a stub launch
            f"--log-verbose={1 if self.verbose else 0}",
            *self._restrictions(),
        ]

    @property
    def triton_host(self) -> str:
        """Where tritonserver's gRPC and HTTP listen: loopback behind a request guard."""
        return "127.0.0.1" if self.request_guard is not None else self.host

    def _restrictions(self) -> list[str]:
        """Close Triton's shared-memory, trace and logging APIs to every client.

        Triton opens a restricted API to requests carrying a header `key: value` named on its
        command line, which any local user can read in /proc. The value here holds a line
        break, which no HTTP/1.1 header or gRPC metadata value can carry, so reading it opens
        nothing: the APIs are unreachable, not merely hidden.
        """
        apis = [api for api in RESTRICTED_APIS
                if not (api == "shared-memory" and self.allow_shared_memory)]
        rule = f"{','.join(apis)}:{RESTRICTED_HEADER}={UNSENDABLE_VALUE}"
        return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]

    def start(self) -> Self:
        if self.process is not None:
            raise ServerError("server already started")
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self._launch("wb")
        try:
            self._wait_ready()
            if self.request_guard is not None:
                self._start_guard()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> None:
        """Start tritonserver again after it died: what is left of its process group (stubs) is
        killed, the same command runs on the same ports (its log appended to the same file),
        and this returns once it is ready. The request guard keeps the public ports open all
        along: clients meanwhile get its refusals, never a closed port."""
        if self.process is None:
            raise ServerError("server not started")
        self._end_process()
        self._launch("ab")
        self._wait_ready()

    def exit_description(self) -> str:
        """How the tritonserver process ended, e.g. `killed by SIGKILL` (or `running`)."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return "running"
        if code >= 0:
            return f"exited with code {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a signal without a name (real-time signals)
            return f"killed by signal {-code}"

    def _launch(self, log_mode: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, log_mode)  # noqa: SIM115 - closed in stop()
        if log_mode == "ab":
            self._log_file.write(b"--- driffusion serve: tritonserver restarted ---\n")
            self._log_file.flush()
        self.process = subprocess.Popen(
            _with_parent_death_signal(self.command()), stdout=self._log_file,
            stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True,
        )

    def _start_guard(self) -> None:
        from triton_models.guard import RequestGuard

        self.guard = RequestGuard(
            host=self.host, grpc_port=self.ports["grpc"], http_port=self.ports["http"],
            upstream_grpc_port=self.triton_ports["grpc"],
            upstream_http_port=self.triton_ports["http"], limits=self.request_guard)
        try:
            self.guard.start()
        except RuntimeError as error:
            raise ServerError(str(error)) from error

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.cancel.is_set():
                raise ServerError("start cancelled")
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                                  f"while starting:\n{self.startup_errors()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n"
                          f"{self.startup_errors()}")

    def is_ready(self) -> bool:
        """True once the server and all its models are ready (HTTP /v2/health/ready)."""
        url = f"http://{_reachable(self.triton_host)}:{self.triton_ports['http']}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def startup_errors(self, width: int = 800) -> str:
        """The server's error lines (a model that failed to load names itself), else the tail."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [line[:width] for line in lines
                  if line.startswith("E") and "CudaDriverHelper" not in line]
        return "\n".join(errors) or self.log_tail()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (model load errors show up here)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server (it unloads models and stops stubs), then SIGKILL any leftover."""
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.stop()
        self._end_process(timeout_s)

    def _end_process(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(process.pid)
            process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def exit_timeout_s() -> int:
    """How long a stopping tritonserver waits for in-flight requests and open HTTP connections
    (even idle kept-alive ones): $DRIFFUSION_EXIT_TIMEOUT_S, default 10 s."""
    value = os.environ.get("DRIFFUSION_EXIT_TIMEOUT_S", "10")
    if not value.isdigit():
        raise ServerError(f"DRIFFUSION_EXIT_TIMEOUT_S must be a whole number of seconds; got "
                          f"{value[:32]!r}")
    return int(value)


def _reachable(host: str) -> str:
    """The address a local client connects to for a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _check_ports(ports: dict[str, int]) -> None:
    for kind, port in ports.items():
        if not 0 < port < 65536:
            raise ServerError(f"--{kind}-port must be in 1..65535; got {port}")
    if len(set(ports.values())) != len(ports):
        raise ServerError(f"the gRPC, HTTP and metrics ports must differ; got {ports}")


def _kill_group(group: int) -> None:
    """SIGKILL what is left of a process group and wait until it is gone."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and group_members(group):
        time.sleep(0.05)


def group_members(group: int) -> list[int]:
    """Live (non-zombie) process ids in a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@contextlib.contextmanager
def serving(options: RepositoryOptions, repository_dir: Path, log_path: Path | None = None,
            **server_options) -> Iterator[tuple[EmbeddedServer, Repository]]:
    """Write a model repository and run the embedded tritonserver on it, on free local ports.

    The one launcher of the apps and tests: the server (and every stub process) is stopped when
    the block ends, however it ends.
    """
    repository = write_repository(repository_dir, options)
    grpc_port, http_port, metrics_port = free_ports(3)
    server = EmbeddedServer(repository.path, grpc_port=grpc_port, http_port=http_port,
                            metrics_port=metrics_port, log_path=log_path, **server_options)
    with server:
        yield server, repository


# ---------------------------------------------------------------------------------------------
# NGC container command for GPU machines


def docker_commands(repository: Path, *, gpus: int, per_gpu: bool, tag: str = NGC_TAG,
                    host: str = DEFAULT_HOST) -> list[str]:
    """`docker run` lines for the NGC Triton container: one server, or one per GPU.

    One server per GPU needs a repository written with `--devices 1` (its GPU is device 0
    inside its container); its gRPC ports are 8001, 8011, 8021, ...
    """
    source = paths.source_checkout()
    if source is None:
        raise ValueError("--print-docker mounts the project's source checkout into the container; "
                         "run it from a checkout (git clone), not from an installed package")
    lines = []
    for index in range(gpus if per_gpu else 1):
        base = 10 * index
        gpu = f'"device={index}"' if per_gpu else "all"
        ports = " ".join(f"-p {host}:{port + base}:{port}" for port in DEFAULT_PORTS.values())
        name = f"driffusion-triton-gpu{index}" if per_gpu else "driffusion-triton"
        lines.append(
            f"docker run --rm -d --name {name} --gpus {gpu} --shm-size 1g {ports} "
            f"-v {shlex.quote(str(repository))}:/models "
            f"-v {shlex.quote(str(source))}:/src:ro "
            f"{NGC_IMAGE}:{tag} bash -c {shlex.quote(CONTAINER_COMMAND)}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# `driffusion serve`


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model on Triton (embedded CPU server; prints the NGC command for GPUs)",
        description="Write the model repository and run Triton on it in the foreground until "
        "SIGINT/SIGTERM. On a CPU machine this is the tritonserver of the nvidia-pytriton "
        "wheel with ONNX Runtime devices (or the closed-form sim).",
    )
    add_repository_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default %(default)s; 0.0.0.0 exposes the server)")
    parser.add_argument("--allow-shared-memory", action="store_true",
                        help="let clients register system/CUDA shared memory (off by default: "
                        "only local, trusted clients should map server memory)")
    add_guard_arguments(parser)
    for kind, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{kind}-port", type=int, default=port,
                            help=f"{kind} port (default %(default)s)")
    parser.add_argument("--print-docker", action="store_true",
                        help="print the NGC container command(s) for a GPU machine and exit")
    parser.add_argument("--per-gpu", action="store_true",
                        help="with --print-docker: one server per GPU instead of one for all")
    parser.add_argument("--container-tag", default=NGC_TAG,
                        help="NGC tritonserver tag; its TensorRT must match the plans' "
                        "(default %(default)s)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="server log (default: a new file in the temp directory)")
    parser.add_argument("--verbose", action="store_true", help="verbose server log")
    parser.set_defaults(run=run_serve)


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The request guard's flags: one per limit of models/limits.py GUARD_LIMITS."""
    from triton_models.guard_limits import guard_flag

    guard = parser.add_argument_group(
        "request guard (holds the public gRPC and HTTP ports; Triton then listens on loopback "
        "ports of its own; it checks every inference request, and each guarded call costs "
        "one more local hop: 2.5-3 ms on the 2-core dev box, docs/BENCHMARKS.md)")
    for name, limit in GUARD_LIMITS.items():
        guard.add_argument(guard_flag(name), dest=f"guard_{name}", type=int,
                           default=limit.default,
                           metavar="SECONDS" if name.endswith("_s") else "N",
                           help=f"{limit.help} ({limit.low}..{limit.high}, default "
                           "%(default)s)")


def guard_limits_from_args(args: argparse.Namespace) -> GuardLimits | None:
    """The guard's limits from `serve` flags; None with `--request-guard-bytes 0`."""
    from triton_models.guard_limits import GuardLimits

    if args.guard_max_request_bytes == 0:
        return None
    return GuardLimits(**{name: getattr(args, f"guard_{name}") for name in GUARD_LIMITS})


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `triton-repo`."""
    parser.add_argument("--model", default="reference", metavar="SOURCE",
                        help="a preset (reference, reference-flow, tiny-sd, sim: the "
                        "closed-form model), a diffusers pipeline folder (model_index.json), or "
                        "an engines model "
                        "directory; what is missing is exported and built first, matching "
                        "engines are reused (default %(default)s)")
    parser.add_argument("--devices", type=int, default=2,
                        help="device models to serve: unet_cpu<i>/unet_gpu<i>, or sim instances "
                        "(default %(default)s; 0 with --device-endpoints: a front server)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="engines to serve: auto (TensorRT plans where TensorRT and a GPU "
                        "exist, torch where a GPU exists without TensorRT, else ONNX Runtime), "
                        "onnxruntime, tensorrt or torch (PyTorch FP16 + CUDA graphs on GPU i, "
                        "FP32 on a machine without a GPU) (default %(default)s)")
    parser.add_argument("--gpu-key", default=None,
                        help="engines/<model>/<GPU KEY> to use when several TensorRT sets exist")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per CPU device (default %(default)s)")
    parser.add_argument("--sim-latency-ms", type=float, default=20.0,
                        help="wall time of one unet_sim call (default %(default)s)")
    parser.add_argument("--sim-latency-per-item-ms", type=float, default=0.0,
                        help="extra unet_sim time per row of a call (default %(default)s)")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="the driffusion model splits cond/uncond over two devices")
    parser.add_argument("--no-pipeline-model", dest="pipeline_model", action="store_false",
                        help="leave out the driffusion model (devices and encoders only, e.g. "
                        "for the extra servers of a one-server-per-GPU layout)")
    parser.add_argument("--pipeline-instances", type=int,
                        default=RepositoryOptions.pipeline_instances,
                        help="driffusion model instances: how many requests it serves at once "
                        "(default %(default)s)")
    parser.add_argument("--stream-model", action=argparse.BooleanOptionalAction, default=None,
                        help="also serve driffusion_stream, the decoupled pipeline model that "
                        "streams a progress response per round to gRPC clients (one more stub "
                        "process, running --pipeline-instances requests at once; default: for "
                        "video models only)")
    parser.add_argument("--device-endpoints", type=endpoints_argument, default=(),
                        metavar="HOST:PORT[,HOST:PORT...]",
                        help="device servers (`serve --no-pipeline-model`) whose ready unet_* "
                        "models join the driffusion model's devices, over gRPC (HOST:PORT, the "
                        "gRPC port) or HTTP (http://HOST:PORT, the HTTP port: less CPU per call) "
                        "with --deadline-s per call; found when the model loads, so start them "
                        "first. With them --devices may be 0: a front server without devices")
    parser.add_argument("--encoder-gpu", type=int, default=None, metavar="N",
                        help="put the networks run once per request (text encoders, VAE encoder "
                        "and decoder) on GPU N, and the denoiser devices on the other GPUs "
                        "(TensorRT; default: GPU 0, beside the first device)")
    parser.add_argument("--encoders-only", action="store_true",
                        help="an encoder server: serve the tokenizers and text encoders alone "
                        "(no device, VAE or driffusion model), for fronts' --encoder-endpoints")
    parser.add_argument("--encoder-endpoints", type=endpoints_argument, default=(),
                        metavar="HOST:PORT[,HOST:PORT...]",
                        help="encoder servers (`serve --encoders-only`) whose tokenizers and "
                        "text encoders the driffusion model calls instead of its own (gRPC "
                        "HOST:PORT or http://HOST:PORT; several: the first that answers); "
                        "found when the model loads, so start them first")
    parser.add_argument("--single-gpu", choices=("auto", *GPU_LAYOUTS), default="auto",
                        help="how a server with one GPU runs DRiffusion's parallel rounds: "
                        "batched = one device model, each round one batched call of --devices "
                        "items (the window); instances = --devices device models all on GPU 0, "
                        "a round's items as concurrent calls. auto: batched with TensorRT or "
                        "torch engines and exactly one visible GPU, else one device model per "
                        "GPU. Which is faster depends on the GPU and the model and is to be "
                        "decided by measurement on the GPU (scripts/gpu_check.py); until then "
                        "batched is the one-GPU default (default %(default)s)")
    from export.cli import add_precision_arguments, parse_size  # torch: only when run

    add_precision_arguments(
        parser, None, "for the engines built when missing; default: fp16 on a GPU, fp32 for "
        "ONNX Runtime CPU engines")
    for side in ("height", "width"):
        parser.add_argument(f"--{side}", type=parse_size, default=None,
                            metavar=f"{side[0].upper()}|MIN,OPT,MAX",
                            help=f"image {side} range in pixels of the engines built when "
                            "missing (default: the model's native size; Flux: 1024, as "
                            "FluxPipeline)")
    parser.add_argument("--repository", type=Path, default=paths.repository_dir(),
                        help="where to write the model repository (default %(default)s, "
                        f"under ${paths.HOME_VARIABLE} if set)")
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Serving limits and batching, written into the repository and enforced by the server."""
    defaults = RepositoryOptions()
    limits = parser.add_argument_group("limits (enforced server-side)")
    for name in ("max_steps", "max_window", "max_batch", "max_prompt_bytes", "max_resolution",
                 "max_video_pixels"):
        limit = SERVING_LIMITS[name]
        limits.add_argument(f"--{name.replace('_', '-')}", type=int, default=limit.default,
                            help=f"{limit.help} ({limit.low}..{limit.high}, default "
                            "%(default)s)")
    limits.add_argument("--deadline-s", type=float, default=defaults.deadline_s,
                        help="deadline of each device call of the driffusion model; a device "
                        "that misses it is replaced (default %(default)s)")
    limits.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                        help="device models run each call alone instead of merging concurrent "
                        "calls into one batch")
    for name in ("batch_delay_us", "max_queue_size", "queue_timeout_s"):
        limit = SERVING_LIMITS[name]
        limits.add_argument(f"--{name.replace('_', '-')}", type=int, default=limit.default,
                            help=f"{limit.help} (default %(default)s)")


def options_from_args(args: argparse.Namespace) -> RepositoryOptions:
    return RepositoryOptions(
        model=args.model, devices=args.devices, backend=args.backend, gpu_key=args.gpu_key,
        cpu_threads=args.cpu_threads, sim_latency_ms=args.sim_latency_ms,
        sim_latency_per_item_ms=args.sim_latency_per_item_ms, cfg_parallel=args.cfg_parallel,
        pipeline_model=args.pipeline_model, pipeline_instances=args.pipeline_instances,
        stream_model=args.stream_model,
        max_steps=args.max_steps, max_window=args.max_window, max_batch=args.max_batch,
        max_prompt_bytes=args.max_prompt_bytes, max_resolution=args.max_resolution,
        max_video_pixels=args.max_video_pixels,
        deadline_s=args.deadline_s, dynamic_batching=args.dynamic_batching,
        batch_delay_us=args.batch_delay_us, max_queue_size=args.max_queue_size,
        queue_timeout_s=args.queue_timeout_s, device_endpoints=args.device_endpoints,
        encoder_gpu=args.encoder_gpu, encoders_only=args.encoders_only,
        encoder_endpoints=args.encoder_endpoints,
        gpu_layout=getattr(args, "single_gpu", None),  # "auto": resolved by prepare_model
    )


def resolve_gpu_layout(options: RepositoryOptions, gpu_count: int | None = None
                       ) -> RepositoryOptions:
    """`--single-gpu auto`: the batched layout where GPU engines (TensorRT, torch) are served
    with several devices on exactly one visible GPU (besides the encoder GPU, if given); else
    one device model per device (None). The batched default awaits a measurement on a GPU
    (scripts/gpu_check.py)."""
    if options.gpu_layout != "auto":
        return options
    layout = None
    if options.backend in ("tensorrt", "torch") and options.devices > 1:
        if gpu_count is None:
            from engines.gpu import list_gpus
            from engines.torch_build import torch_gpus

            gpu_count = len(list_gpus()[0] or torch_gpus())
        denoiser_gpus = gpu_count - (options.encoder_gpu is not None)
        layout = "batched" if denoiser_gpus == 1 else None
    return replace(options, gpu_layout=layout)


def build_arguments(args: argparse.Namespace) -> dict:
    """prepare_model's build options from the --precision, --network-precision,
    --max-sequence-length, --height and --width flags."""
    from export.onnx_export import ExportOptions

    return {"precision": args.precision, "loras": tuple(args.lora),
            "export": ExportOptions(network_precisions=dict(args.network_precision),
                                    max_sequence_length=args.max_sequence_length,
                                    height=args.height, width=args.width)}


def prepare_model(options: RepositoryOptions, log=print, *, precision: str | None = None,
                  export: ExportOptions | None = None, loras: tuple = ()) -> RepositoryOptions:
    """Options naming built engines: a preset or diffusers folder is exported and built first
    (engines whose manifest matches are kept) at `precision` (None: the backend's default) with
    `export`'s options and `loras` fused into the weights; sim and engines directories pass as
    they are."""
    from engines.build import build_engines
    from engines.build_types import BuildRequest
    from export.onnx_export import ExportOptions
    from export.presets import PRESETS, model_name

    source = options.model
    folder = Path(source)
    if source == "sim" or (source not in PRESETS and any(folder.glob("*/manifest.json"))):
        return resolve_gpu_layout(replace(options, backend="onnxruntime"
                                          if options.backend == "auto" else options.backend))
    if source not in PRESETS and not any((folder / name).is_file()
                                         for name in ("model_index.json", "config.json")):
        raise FileNotFoundError(
            f"no engines for model {source!r}: give a preset ({', '.join(PRESETS)}, sim), a "
            "diffusers pipeline folder (model_index.json) or an engines directory written by "
            "`driffusion build-engines`")
    name = model_name(source, loras)
    log(f"[1/3] engines for {source}: exporting and building what is missing")
    request = BuildRequest(source=source, name=name, backend=options.backend,
                           precision=precision, export=export or ExportOptions(), loras=loras)
    outcome = build_engines(request, lambda line: log(f"      {line}"))
    return resolve_gpu_layout(replace(options, model=str(outcome.directories[0].parent),
                                      backend=outcome.backend))


def run_serve(args: argparse.Namespace) -> int:
    from engines.build import EngineBuildError
    from export.presets import ModelSourceError
    from export.specs import UnsupportedModelError

    options = options_from_args(args)
    try:
        guard = guard_limits_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_docker and args.per_gpu:
        options.devices = 1  # each container sees only its own GPU, as device 0
    try:
        options = prepare_model(options, **build_arguments(args))
        print(f"[2/3] model repository: {args.repository}", flush=True)
        repository = write_repository(args.repository, options)
    except (ValueError, FileNotFoundError, FileExistsError, ModelSourceError,
            UnsupportedModelError, EngineBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_docker:
        print_docker(repository.path, args)
        return 0
    try:
        server = EmbeddedServer(repository.path, host=args.host, grpc_port=args.grpc_port,
                                http_port=args.http_port, metrics_port=args.metrics_port,
                                log_path=args.log_file, verbose=args.verbose,
                                allow_shared_memory=args.allow_shared_memory,
                                request_guard=guard)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[3/3] starting Triton on {repository.path} (models: "
          f"{', '.join(repository.models)}) ...", flush=True)
    example = '--prompt "a photo of a cat"' if repository.spec.uses_prompts else "--label 3"
    return serve_forever(server, example)


def print_docker(repository: Path, args: argparse.Namespace) -> None:
    """The NGC container command(s) for this repository, and how to reach the servers."""
    if args.backend not in ("tensorrt", "torch"):
        print("note: GPU servers are meant to serve TensorRT plans: add --backend tensorrt",
              file=sys.stderr)
    commands = docker_commands(repository, gpus=args.devices, per_gpu=args.per_gpu,
                               tag=args.container_tag, host=args.host)
    for line in commands:
        print(line)
    endpoints = ",".join(f"{args.host}:{DEFAULT_PORTS['grpc'] + 10 * i}"
                         for i in range(len(commands)))
    print(f"# then: driffusion generate --endpoints {endpoints} --label 3 --compare")


def guard_summary(limits: GuardLimits) -> str:
    """One line saying what the request guard allows."""
    return (f"request guard on the gRPC and HTTP ports: at most {limits.max_request_bytes} "
            f"bytes a request; HTTP heads within {limits.header_timeout_s} s, bodies without "
            f"a {limits.body_timeout_s} s pause and at {limits.min_rate} bytes/s or more, "
            f"{limits.memory_bytes} bytes of requests held at once "
            f"({limits.client_memory_bytes} per client address), {limits.connections} "
            f"connections ({limits.client_connections} per client address); inference "
            "requests checked against the models' configs; compressed and chunked bodies "
            "refused\n")


class RestartBudget:
    """At most `limit` restarts within any `window_s` seconds."""

    def __init__(self, limit: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.times: list[float] = []

    def take(self) -> bool:
        """Count one restart now; False (and nothing counted) once the budget is spent."""
        now = self.clock()
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


def restart_after_death(server: EmbeddedServer, restarts: RestartBudget) -> bool:
    """Say that tritonserver died and restart it within the budget; False once it is spent."""
    how = server.exit_description()
    if not restarts.take():
        print(f"error: tritonserver {how} again after {restarts.limit} restarts within "
              f"{restarts.window_s:.0f} s; stopping instead of restarting it. Server log: "
              f"{server.log_path}", file=sys.stderr, flush=True)
        return False
    print(f"error: tritonserver {how}; restarting it on the same ports (restart "
          f"{len(restarts.times)} of at most {restarts.limit} within {restarts.window_s:.0f} s; "
          f"server log: {server.log_path})", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        server.restart()
    except ServerError as error:
        raise ServerError(f"restarting tritonserver failed: {error}\nserver log: "
                          f"{server.log_path}") from error
    print(f"Triton ready again after {time.monotonic() - started:.1f} s", flush=True)
    return True


def serve_forever(server: EmbeddedServer, example: str = "--label 3") -> int:
    """Start `server`, print its endpoints, block until SIGINT/SIGTERM; a tritonserver that dies
    meanwhile is restarted (at most MAX_RESTARTS times within RESTART_WINDOW_S)."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        print(f"\n{signal.Signals(signum).name}: stopping Triton ...", flush=True)
        stop.set()
        server.cancel.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"Triton ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics "
              f"{server.metrics_url}\n"
              + (guard_summary(server.request_guard) if server.request_guard else "")
              + f"try: driffusion generate --endpoints {server.http_url} {example} --compare\n"
              f"server log: {server.log_path}  (Ctrl-C stops)", flush=True)
        restarts = RestartBudget()
        while not stop.wait(0.5):
            if server.process.poll() is not None and not restart_after_death(server, restarts):
                return 1
        return 0
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
