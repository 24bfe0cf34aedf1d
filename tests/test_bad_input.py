"""Bad input and safe defaults: every bad request, flag, file or endpoint gets a clear error
naming what was wrong and what is allowed, and the server stays ready afterwards.

Requests go to a real tritonserver serving the `driffusion` model with tightened limits
(gRPC INVALID_ARGUMENT, message starting with the field); the CLI answers exit code 2 and one
line on stderr; corrupted engine files, foreign TensorRT manifests, endpoints that are not
Triton or serve no device are refused by name.
"""
from __future__ import annotations

import http.server
import ipaddress
import re
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc_client
from test_triton_repository import write_engines
from tritonclient.utils import InferenceServerException

from cli import main as cli_main
from engines.gpu import GpuInfo
from engines.manifest import EngineMismatchError, check_plan_compatible, read_manifest
from engines.ort_build import OrtBuildError, build_ort_engine
from runtime.local_devices import LocalDevice
from triton_models.backend import file_in_version_dir
from triton_models.repository import RepositoryOptions, validate_repository, write_repository
from triton_models.serve import EmbeddedServer, ServerError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_steps": 50, "max_window": 8, "max_prompt_bytes": 64}
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, "GPU-1234")
L4 = GpuInfo(0, "NVIDIA L4", 8, 9, "GPU-5678")
TRITON_TYPES = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
                np.dtype(np.float32): "FP32", np.dtype(object): "BYTES",
                np.dtype(np.uint8): "UINT8"}


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory) -> EmbeddedServer:
    repository = write_repository(tmp_path_factory.mktemp("limits") / "repo", RepositoryOptions(
        model="sim", devices=2, **LIMITS))
    return triton_server(repository.path)


def tensor(name: str, value, dtype=None, shape=None) -> grpc_client.InferInput:
    """An input of a scalar, a list, or an image (a numpy array, sent as it is)."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        array = np.array(value if isinstance(value, list) else [value], dtype=dtype)
    if array.dtype.kind in "US":
        array = np.array([v.encode() if isinstance(v, str) else v for v in array.tolist()],
                         dtype=object)
    item = grpc_client.InferInput(name, list(shape or array.shape), TRITON_TYPES[array.dtype])
    item.set_data_from_numpy(array.reshape(shape) if shape else array)
    return item


def infer(url: str, inputs: list[grpc_client.InferInput]) -> np.ndarray:
    client = grpc_client.InferenceServerClient(url)
    try:
        return client.infer("driffusion", inputs, client_timeout=60).as_numpy("IMAGE")
    finally:
        client.close()


LABEL = ("LABEL", 3, np.int32)
LONG_PROMPT = "a handwritten seven " * 4  # 80 bytes, over the limit of 64

# (inputs as (name, value, dtype), text the error must start with, then contain)
FIELD_CASES = {
    "steps zero": ([LABEL, ("STEPS", 0, np.int32)], "STEPS:", "must be in 1..50"),
    "steps above limit": ([LABEL, ("STEPS", 51, np.int32)], "STEPS:", "must be in 1..50"),
    "window zero": ([LABEL, ("WINDOW", 0, np.int32)], "WINDOW:", "must be in 1..8"),
    "window above limit": ([LABEL, ("WINDOW", 9, np.int32)], "WINDOW:", "must be in 1..8"),
    "unknown mode": ([LABEL, ("MODE", "fast", object)], "MODE:",
                     "one of sequential, conservative, aggressive"),
    "unknown scheduler": ([LABEL, ("SCHEDULER", "magic", object)], "SCHEDULER:", "one of default, ddim"),
    "guidance NaN": ([LABEL, ("GUIDANCE", float("nan"), np.float32)], "GUIDANCE:", "in 0..50"),
    "guidance negative": ([LABEL, ("GUIDANCE", -1.0, np.float32)], "GUIDANCE:", "in 0..50"),
    "guidance too large": ([LABEL, ("GUIDANCE", 51.0, np.float32)], "GUIDANCE:", "in 0..50"),
    "oversized prompt": ([("PROMPT", LONG_PROMPT, object)], "PROMPT:", "at most 64 bytes"),
    "oversized negative prompt": ([LABEL, ("NEGATIVE_PROMPT", LONG_PROMPT, object)],
                                  "NEGATIVE_PROMPT:", "at most 64 bytes"),
    "prompt not utf-8": ([("PROMPT", b"\xff\xfe", object)], "PROMPT:", "UTF-8"),
    "prompt naming no class": ([("PROMPT", "a cat", object)], "PROMPT:", "exactly one class"),
    "seed negative": ([LABEL, ("SEED", -1, np.int64)], "SEED:", "in 0..2^63-1"),
    "label outside classes": ([("LABEL", 12, np.int32)], "LABEL:", "in 0..9"),
    "label negative": ([("LABEL", -1, np.int32)], "LABEL:", "in 0..9"),
    "label and prompt": ([LABEL, ("PROMPT", "three", object)], "LABEL:", "exactly one of"),
    "missing label and prompt": ([("STEPS", 4, np.int32)], "LABEL:", "exactly one of"),
    "tolerance outside verified": ([LABEL, ("TOLERANCE", 0.1, np.float32)], "TOLERANCE:",
                                   "mode verified only"),
    "draft order": ([LABEL, ("DRAFT_ORDER", 3, np.int32)], "DRAFT_ORDER:", "one of (1, 2)"),
    # inputs the class-conditional family does not serve
    "init image on a class model": ([LABEL, ("INIT_IMAGE", np.zeros((8, 8, 3), np.uint8), None)],
                                    "INIT_IMAGE:", "image-to-image is served for SD 1.x/2.x,"),
    "strength on a class model": ([LABEL, ("STRENGTH", 0.5, np.float32)], "STRENGTH:",
                                  "takes no image inputs (INIT_IMAGE, MASK, STRENGTH)"),
    "true cfg on a class model": ([LABEL, ("TRUE_CFG", 2.0, np.float32)], "TRUE_CFG:",
                                  "sim is a model of the class-conditional family: use GUIDANCE"),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", FIELD_CASES)
def test_bad_field_is_invalid_argument_naming_field_and_range(server, case):
    fields, starts, says = FIELD_CASES[case]
    with pytest.raises(InferenceServerException) as error:
        infer(server.grpc_url, [tensor(name, value, dtype) for name, value, dtype in fields])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.value.message().startswith(starts) and says in error.value.message()


# Triton checks these against the model config before the model sees them
TYPE_CASES = {
    "wrong dtype": ([tensor("LABEL", 3, np.int32), tensor("STEPS", 4.0, np.float32)],
                    r"'STEPS'.*(FP32|INT32)"),
    "wrong shape": ([tensor("LABEL", 3, np.int32), tensor("STEPS", [4, 5], np.int32)],
                    r"shape for input 'STEPS'.*\[1\]"),
    "unknown input": ([tensor("LABEL", 3, np.int32), tensor("COLOR", 1, np.int32)],
                      r"'COLOR'"),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", TYPE_CASES)
def test_wrong_type_shape_or_name_is_rejected_by_triton_naming_the_input(server, case):
    inputs, pattern = TYPE_CASES[case]
    with pytest.raises(InferenceServerException) as error:
        infer(server.grpc_url, inputs)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(pattern, error.value.message()), error.value.message()


@pytest.mark.triton
def test_device_models_refuse_other_resolutions_and_oversized_batches(server):
    client = grpc_client.InferenceServerClient(server.grpc_url)

    def call(rows: int, side: int) -> None:
        inputs = [tensor("sample", np.zeros((rows, 1, side, side)).tolist(), np.float32,
                         (rows, 1, side, side)),
                  tensor("timestep", np.full((rows, 1), 10.0).tolist(), np.float32, (rows, 1)),
                  tensor("encoder_hidden_states", np.zeros((rows, 1, 11)).tolist(), np.float32,
                         (rows, 1, 11))]
        client.infer("unet_sim", inputs)

    try:
        with pytest.raises(InferenceServerException, match=r"'sample'.*\[-1,1,8,8\]"):
            call(1, 16)
        with pytest.raises(InferenceServerException, match="batch-size must be <= 64"):
            call(65, 8)
        call(2, 8)  # the right shapes still work
    finally:
        client.close()


@pytest.mark.triton
def test_server_is_still_ready_and_serving_after_bad_requests(server):
    bad = [tensor("LABEL", 12, np.int32)]
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            infer(server.grpc_url, bad)
    assert server.is_ready()
    image = infer(server.grpc_url, [tensor("LABEL", 3, np.int32), tensor("STEPS", 4, np.int32)])
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Image inputs on the reference model (an SD folder with a VAE encoder, 8x8-pixel engines)


@pytest.fixture(scope="module")
def reference_server(triton_server, tmp_path_factory) -> EmbeddedServer:
    """The bundled reference model on one ONNX Runtime device (its engines are built once and
    shared with the bench tests)."""
    from bench.common import ensure_reference_engines

    engines = ensure_reference_engines(lambda line: None)
    repository = write_repository(tmp_path_factory.mktemp("reference") / "repo", RepositoryOptions(
        model=str(engines.directory.parent), devices=1, **LIMITS))
    return triton_server(repository.path)


PROMPT = ("PROMPT", "a handwritten three", object)
PIXELS_8 = ("INIT_IMAGE", np.full((8, 8, 3), 128, np.uint8), None)
REFERENCE_CASES = {
    "init image off the engines' size": (
        [PROMPT, ("INIT_IMAGE", np.full((16, 16, 3), 128, np.uint8), None)],
        "INIT_IMAGE: is 16x16 pixels (height x width); reference's engines take 8x8 pixels only"),
    "mask off the init image's size": (
        [PROMPT, PIXELS_8, ("MASK", np.full((4, 8), 255, np.uint8), None)],
        "MASK: must be the size of INIT_IMAGE [8, 8]; got [4, 8]"),
    "strength without an init image": (
        [PROMPT, ("STRENGTH", 0.5, np.float32)],
        "STRENGTH: needs an INIT_IMAGE (image-to-image or inpainting)"),
    "true cfg on an SD model": (
        [PROMPT, ("TRUE_CFG", 2.0, np.float32)],
        "TRUE_CFG: TRUE_CFG is for Flux, Qwen-Image models; reference is a model of the SD 1.x/2.x family"),
}


@pytest.mark.triton
@pytest.mark.slow  # one more server; the same refusals are served on an SD folder in test_inpainting
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_bad_image_input_on_the_reference_model_is_invalid_argument_naming_it(
        reference_server, case):
    fields, starts = REFERENCE_CASES[case]
    with pytest.raises(InferenceServerException) as error:
        infer(reference_server.grpc_url, [tensor(*field) for field in fields])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.value.message().startswith(starts), error.value.message()


@pytest.mark.triton
@pytest.mark.slow  # img2img is served in tests/test_clients.py and test_text_to_image.py
def test_an_init_image_of_the_engines_size_is_served(reference_server):
    image = infer(reference_server.grpc_url, [tensor(*PROMPT), tensor(*PIXELS_8),
                                              tensor("STEPS", 4, np.int32)])
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.triton
@pytest.mark.parametrize("flags, says", [
    (["--label", "3", "--steps", "0"], "steps: must be in 1..50"),
    (["--label", "3", "--steps", "51"], "steps: must be in 1..50"),  # the server's limit
    (["--label", "3", "--window", "9"], "window: must be in 1..8"),
    (["--label", "10"], "label: must be in 0..9"),
    (["--prompt", "a cat"], "prompt: sim is class-conditional"),
    (["--label", "3", "--scheduler", "magic"], "scheduler: must be one of"),
    (["--label", "3", "--deadline-s", "0"], "deadline must be > 0 s"),
    (["--label", "3", "--devices", "unet_gpu*"], "serves no ready unet_gpu* model"),
])
def test_generate_command_explains_bad_flags(server, flags, says, capsys, tmp_path):
    code = cli_main(["generate", "--endpoints", server.grpc_url, "--quiet",
                     "--out", str(tmp_path / "x.png"), *flags])
    assert code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["generate", "--endpoints", "localhost", "--label", "1"], "must be HOST:PORT"),
    (["generate", "--endpoints", "localhost:99999", "--label", "1"], "port in 1..65535"),
    (["serve", "--model", "sim", "--max-steps", "0"], "max steps must be in 1..10000"),
    (["serve", "--model", "sim", "--max-window", "0"], "max window must be in 1..1024"),
    (["serve", "--model", "sim", "--max-batch", "0"], "max batch must be in 1..4096"),
    (["serve", "--model", "sim", "--max-prompt-bytes", "0"], "max prompt bytes must be in"),
    (["serve", "--model", "sim", "--max-resolution", "4"], "max resolution must be in 8.."),
    (["serve", "--model", "sim", "--grpc-port", "70000"], "--grpc-port must be in 1..65535"),
    (["serve", "--model", "sim", "--grpc-port", "9000", "--http-port", "9000"],
     "ports must differ"),
    (["triton-repo", "--model", "sim", "--devices", "0"], "devices must be in 1..64"),
    (["bench", "load", "--clients", "0"], "clients must be in 1..4096"),
    (["bench", "load", "--duration", "0"], "duration must be > 0 s"),
])
def test_cli_rejects_bad_flags_with_the_allowed_range(argv, says, capsys, tmp_path):
    if argv[0] in ("serve", "triton-repo"):
        argv = [*argv, "--repository", str(tmp_path / "repo")]
    assert cli_main(argv) == 2
    assert says in capsys.readouterr().err


def test_generate_rejects_a_spec_file_that_is_not_a_spec(tmp_path, capsys, free_ports):
    spec = tmp_path / "spec.json"
    spec.write_text('{"model": "x", "__class__": "os.system"}')
    (port,) = free_ports(1)
    assert cli_main(["generate", "--endpoints", f"127.0.0.1:{port}", "--label", "1",
                     "--spec", str(spec)]) == 2
    assert "not a PipelineSpec JSON object" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Endpoints that are not Triton, or serve no device


@pytest.fixture
def plain_tcp_server() -> Iterator[str]:
    """A TCP server on a free port that answers every connection with a line of text."""
    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"hello, I am not Triton\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Greeter) as tcp:
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
        yield f"127.0.0.1:{tcp.server_address[1]}"
        tcp.shutdown()


@pytest.fixture
def plain_http_server(tmp_path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        yield f"127.0.0.1:{web.server_address[1]}"
        web.shutdown()


@pytest.mark.parametrize("kind", ["plain_tcp_server", "plain_http_server"])
def test_an_endpoint_that_is_not_triton_is_named(kind, request, capsys):
    endpoint = request.getfixturevalue(kind)
    assert cli_main(["generate", "--endpoints", endpoint, "--label", "1"]) == 2
    assert f"{endpoint} does not answer as a Triton gRPC server" in capsys.readouterr().err
    assert cli_main(["bench", "load", "--endpoint", endpoint, "--duration", "1"]) == 2
    assert f"{endpoint} does not answer as a Triton gRPC server" in capsys.readouterr().err


@pytest.mark.triton
def test_an_endpoint_with_no_device_model_is_named(triton_server, tmp_path, capsys):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model="sim", devices=1, pipeline_model=False))
    for path in sorted((repository.path / "unet_sim").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (repository.path / "unet_sim").rmdir()
    encoder_only = triton_server(repository.path)
    assert cli_main(["generate", "--endpoints", encoder_only.grpc_url, "--label", "1",
                     "--spec", str(_sim_spec_file(tmp_path))]) == 2
    assert (f"{encoder_only.grpc_url} serves no ready unet_* model (ready models: text_encoder)"
            in capsys.readouterr().err)


def _sim_spec_file(tmp_path: Path) -> Path:
    from triton_models.repository import sim_spec

    path = tmp_path / "sim.json"
    path.write_text(sim_spec().to_json())
    return path


# ---------------------------------------------------------------------------------------------
# Engine files and manifests


def corrupt(path: Path) -> None:
    """Replace a file's bytes in place with garbage (breaking a hard link first)."""
    path.unlink()
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)


def test_corrupted_onnx_is_refused_by_ort_build_triton_repo_and_the_device(tmp_path):
    engines = write_engines(tmp_path / "engines", "onnxruntime")
    onnx_file = engines / "cpu" / "unet.onnx"
    corrupt(onnx_file)
    with pytest.raises(OrtBuildError, match=f"ONNX Runtime cannot load {onnx_file}"):
        build_ort_engine(onnx_file, tmp_path / "out.onnx", {}, [])
    with pytest.raises(ValueError, match=f"ONNX Runtime cannot load {onnx_file}.*build-engines"):
        LocalDevice.from_onnx(onnx_file)
    with pytest.raises(ValueError, match="is not a readable ONNX model.*build-engines --force"):
        write_repository(tmp_path / "repo", RepositoryOptions(model=str(engines)))


@pytest.mark.triton
def test_a_server_whose_onnx_was_corrupted_names_the_model_and_file(tmp_path, free_ports):
    engines = write_engines(tmp_path / "engines", "onnxruntime")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=1, pipeline_model=False))
    corrupt(repository.path / "unet_cpu0" / "1" / "unet.onnx")
    grpc, http, metrics = free_ports(3)
    server = EmbeddedServer(repository.path, grpc_port=grpc, http_port=http, metrics_port=metrics,
                            log_path=tmp_path / "server.log")
    with pytest.raises(ServerError, match="failed to load 'unet_cpu0'.*ONNX Runtime cannot load"):
        server.start()
    assert server.process is None


def test_manifest_paths_and_parameter_files_cannot_leave_their_directory(tmp_path):
    engines = write_engines(tmp_path / "engines", "onnxruntime")
    manifest_file = engines / "cpu" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace(
        '"file": "unet.onnx"', '"file": "../../../etc/passwd"'))
    with pytest.raises(ValueError, match="'../../../etc/passwd', which is not a plain file name"):
        write_repository(tmp_path / "repo", RepositoryOptions(model=str(engines)))
    version = tmp_path / "model" / "1"
    version.mkdir(parents=True)
    args = {"model_repository": str(version.parent), "model_version": "1"}
    with pytest.raises(ValueError, match="not a plain file name"):
        file_in_version_dir(args, "../../secret.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        file_in_version_dir(args, "missing.onnx")


def test_a_model_above_the_max_resolution_is_not_served(tmp_path):
    from runtime.pipeline import PipelineSpec

    engines = write_engines(tmp_path / "engines", "onnxruntime")
    spec_file = engines / "cpu" / "pipeline.json"
    spec = PipelineSpec.from_json(spec_file.read_text())
    spec_file.write_text(spec.with_defaults(latent_channels=4, latent_size=(64, 64),
                                           vae_scale_factor=8, decoder="vae").to_json())
    with pytest.raises(ValueError, match="512-pixel images, above the max resolution 256"):
        write_repository(tmp_path / "repo", RepositoryOptions(model=str(engines),
                                                              max_resolution=256))
    assert not (tmp_path / "repo").exists()  # refused before anything was written


@pytest.mark.parametrize("built, running, says", [
    ("10.3.0", H100, "built with TensorRT 10.3.0 .* runs TensorRT 10.8.0"),
    ("10.8.0", L4, "for NVIDIA H100 80GB HBM3 .* on NVIDIA L4"),
])
def test_a_plan_manifest_from_another_tensorrt_or_gpu_is_refused_naming_both(
        tmp_path, built, running, says):
    engines = write_engines(tmp_path / "engines", "tensorrt", key="h100")
    manifest = read_manifest(engines / "h100")
    manifest["backend_version"] = built
    with pytest.raises(EngineMismatchError, match=says):
        check_plan_compatible(manifest, tensorrt_version="10.8.0", gpus=[running])
    manifest["backend_version"] = "10.8.0"
    assert check_plan_compatible(manifest, tensorrt_version="10.8.0", gpus=[H100]) == H100


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_a_corrupted_plan_is_refused_by_load_plan(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT")
    from engines.gpu import list_gpus
    from engines.manifest import load_engines, write_manifest
    from engines.tensorrt_build import TensorRTBuildError, load_plan

    gpus, why = list_gpus()
    if not gpus:
        pytest.skip(why)
    engines = write_engines(tmp_path / "engines", "tensorrt", key="gpu")
    manifest = read_manifest(engines / "gpu")
    manifest["backend_version"], manifest["gpu"] = trt.__version__, gpus[0].to_json()
    write_manifest(engines / "gpu", manifest)
    (engine_set,) = load_engines(engines)
    with pytest.raises(TensorRTBuildError, match="could not deserialize"):
        load_plan(engine_set, "unet")


# ---------------------------------------------------------------------------------------------
# Safe defaults


@pytest.mark.triton
def test_server_listens_on_loopback_only(server):
    listening = _listening_addresses()
    for port in server.ports.values():
        addresses = listening.get(port, [])
        assert addresses and all(address.is_loopback for address in addresses), (port, addresses)


def _listening_addresses() -> dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Listening TCP sockets (from /proc/net/tcp and tcp6): port -> local addresses (an IPv6
    socket bound to an IPv4-mapped address as that IPv4 address)."""
    found: dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw)
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.setdefault(int(hex_port, 16), []).append(address)
    return found


@pytest.mark.triton
def test_shared_memory_and_model_loading_are_closed_to_clients(server):
    client = grpc_client.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("region", "/driffusion-test", 64)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.update_log_settings({"log_file": "/tmp/overwritten.log"})
        with pytest.raises(InferenceServerException):
            client.load_model("unet_sim")  # the repository is fixed (model control mode none)
    finally:
        client.close()
    assert server.is_ready()


def test_shared_memory_opens_only_when_asked(tmp_path):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(model="sim", devices=1))
    closed = " ".join(EmbeddedServer(repository.path).command())
    opened = " ".join(EmbeddedServer(repository.path, allow_shared_memory=True).command())
    assert "--grpc-restricted-protocol=shared-memory,trace,logging:" in closed
    assert "--grpc-restricted-protocol=trace,logging:" in opened
    assert "--grpc-address=127.0.0.1" in closed and "--http-address=127.0.0.1" in closed


@pytest.mark.parametrize("layout, says", [
    ({}, "holds no model"),
    ({"unet_sim/1/model.py": ""}, "'unet_sim' has no config.pbtxt"),
    ({"unet_sim/config.pbtxt": ""}, "'unet_sim' has no numeric version directory"),
    ({"notes.txt": "hi"}, "'notes.txt' is not a model directory"),
    ({"bad name!/config.pbtxt": ""}, "is not a plain model name"),
])
def test_model_repository_layout_is_validated_before_start(tmp_path, layout, says):
    root = tmp_path / "repo"
    root.mkdir()
    for name, text in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(says)):
        validate_repository(root)
    with pytest.raises(ServerError, match=re.escape(says)):
        EmbeddedServer(root)
    with pytest.raises(ServerError, match="does not exist or is not a directory"):
        EmbeddedServer(tmp_path / "nowhere")


def test_no_code_unpickles_or_evaluates_data():
    """Request data (and any file we read) is parsed as data: JSON, numpy arrays without
    pickle, safetensors; never unpickled, eval'd or exec'd."""
    forbidden = re.compile(r"\bpickle\b|\bmarshal\b|\bshelve\b|(?<![.\w])eval\(|\bexec\(|"
                           r"allow_pickle\s*=\s*True|torch\.load\(|yaml\.load\(|literal_eval")
    offenders = []
    for package in ("models", "export", "engines", "triton_models", "runtime", "bench", "cli"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if forbidden.search(line):
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
