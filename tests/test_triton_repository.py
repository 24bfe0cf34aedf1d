"""The model repository generator: configs Triton accepts, engines linked, errors that guide."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

from cli import main as cli_main
from engines.gpu import GpuInfo
from engines.manifest import network_entry, new_manifest, write_manifest
from models.sim import sim_spec
from runtime.local_devices import ort_session
from runtime.pipeline import PipelineSpec, RequestError
from triton_models.pipeline_io import request_from_tensors
from triton_models.repository import (
    MARKER,
    RepositoryOptions,
    write_repository,
)
from triton_models.serve import CONTAINER_COMMAND, docker_commands

UNET_INPUTS = [
    {"name": "sample", "dtype": "float32", "shape": ["batch", 1, 8, 8]},
    {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
    {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 1, 11]},
]
UNET_OUTPUTS = [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]


def load_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt with Triton's own schema (fails on anything Triton would reject)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def identity_unet_onnx(path: Path, external_data: bool = False) -> None:
    """out_sample = sample * w (w a 1-element initializer), with the UNet's three inputs."""
    inputs = [helper.make_tensor_value_info(t["name"], TensorProto.FLOAT,
                                            [d if isinstance(d, int) else None for d in t["shape"]])
              for t in UNET_INPUTS]
    output = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [None, 1, 8, 8])
    weight = numpy_helper.from_array(np.ones(64, np.float32).reshape(1, 1, 8, 8), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["sample", "w"], ["out_sample"])],
                              "unet", inputs, [output], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=external_data,
                    all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=0)


def write_engines(root: Path, backend: str, profile: dict | None = None,
                  external_data: bool = False, key: str = "cpu") -> Path:
    """A fake engines model dir written with the engines package's own manifest writer."""
    engine_dir = root / key
    engine_dir.mkdir(parents=True)
    if backend == "onnxruntime":
        identity_unet_onnx(engine_dir / "unet.onnx", external_data)
        unet_file, gpu = "unet.onnx", None
    else:
        (engine_dir / "unet.plan").write_bytes(b"not a real plan")
        unet_file, gpu = "unet.plan", GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, "GPU-1234")
    manifest = new_manifest("tiny", backend, "test", gpu)
    manifest["networks"]["unet"] = network_entry(
        file=unet_file, onnx_sha256="0" * 64, precision="fp32", inputs=UNET_INPUTS,
        outputs=UNET_OUTPUTS, profile=profile or {}, build_seconds=0.0, optimization_level=3)
    write_manifest(engine_dir, manifest)
    (engine_dir / "pipeline.json").write_text(sim_spec().with_defaults(model="tiny").to_json())
    return root


def test_sim_repository_has_devices_encoder_and_pipeline_model(tmp_path):
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model="sim", devices=3, sim_latency_ms=12.5, pipeline_instances=2))
    assert repository.models == ["unet_sim", "text_encoder", "driffusion"]
    sim = load_config(repository.path / "unet_sim")
    assert sim.backend == "python" and sim.max_batch_size == RepositoryOptions().max_batch
    assert sim.HasField("dynamic_batching")
    timestep = sim.input[1]
    assert list(timestep.dims) == [1] and list(timestep.reshape.shape) == []
    assert sim.instance_group[0].count == 3
    assert parameters(sim)["latency_ms"] == "12.5" and parameters(sim)["batching"] == "true"
    assert (repository.path / "unet_sim" / "1" / "alphas_cumprod.npy").is_file()
    assert [tensor.name for tensor in sim.input] == ["sample", "timestep", "encoder_hidden_states"]

    pipeline = load_config(repository.path / "driffusion")
    names = {tensor.name: tensor for tensor in pipeline.input}
    assert {"PROMPT", "LABEL", "NEGATIVE_PROMPT", "SEED", "STEPS", "MODE", "WINDOW",
            "GUIDANCE"} <= set(names)
    assert all(tensor.optional for tensor in pipeline.input)
    assert names["LABEL"].data_type == model_config_pb2.TYPE_INT32
    assert names["PROMPT"].data_type == model_config_pb2.TYPE_STRING
    assert pipeline.instance_group[0].count == 2
    assert pipeline.output[0].name == "IMAGE"
    assert pipeline.output[0].data_type == model_config_pb2.TYPE_UINT8
    assert list(pipeline.output[0].dims) == [-1, -1, 3]  # IMAGE: uint8 RGB [H, W, 3]
    spec = PipelineSpec.from_json(parameters(pipeline)["pipeline"])
    assert spec.model == "sim" and spec.latent_shape == (1, 8, 8) and spec.null_label == 10
    (device,) = json.loads(parameters(pipeline)["devices"])
    assert (device["name"], device["instances"], device["max_batch"], device["batching"]) == (
        "unet_sim", 3, 64, True)
    assert device["dtypes"] == {"sample": "float32", "timestep": "float32",
                                "encoder_hidden_states": "float32"}
    for model in repository.models:
        assert (repository.path / model / "1" / "model.py").is_file()


def test_the_stream_model_is_opt_in_for_an_image_model_and_decoupled(tmp_path, capsys):
    """An image model gets driffusion_stream only with --stream-model: the same model.py and
    parameters as driffusion plus `stream`, decoupled, the progress outputs added."""
    assert cli_main(["triton-repo", "--model", "sim", "--repository", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "driffusion_stream").exists()
    assert cli_main(["triton-repo", "--model", "sim", "--repository", str(tmp_path / "repo"),
                     "--stream-model", "--pipeline-instances", "3", "--max-queue-size", "5"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["driffusion", "driffusion_stream"]
    plain = load_config(tmp_path / "repo" / "driffusion")
    stream = load_config(tmp_path / "repo" / "driffusion_stream")
    assert stream.model_transaction_policy.decoupled and not plain.model_transaction_policy.decoupled
    assert list(stream.input) == list(plain.input)
    assert [tensor.name for tensor in stream.output] == [
        "IMAGE", "ROUNDS", "EVALUATIONS", "STEPS_DONE", "STEPS_TOTAL"]
    # one stub running --pipeline-instances requests at once (its execute runs in the background)
    assert stream.instance_group[0].count == 1 and plain.instance_group[0].count == 3
    assert parameters(stream) == {**parameters(plain), "stream": "true", "concurrency": "3",
                                  "max_queue_size": "5"}
    assert ((tmp_path / "repo" / "driffusion_stream" / "1" / "model.py").read_bytes()
            == (tmp_path / "repo" / "driffusion" / "1" / "model.py").read_bytes())


@pytest.mark.parametrize("external_data", [False, True])
def test_onnxruntime_engines_become_one_cpu_model_per_device(tmp_path, external_data):
    engines = write_engines(tmp_path / "engines", "onnxruntime", external_data=external_data)
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=2, cpu_threads=3))
    assert [device.name for device in repository.devices] == ["unet_cpu0", "unet_cpu1"]
    for index in range(2):
        model_dir = repository.path / f"unet_cpu{index}"
        config = load_config(model_dir)
        assert config.backend == "python"
        assert config.instance_group[0].count == 1
        assert parameters(config) == {"onnx_file": "unet.onnx", "intra_op_threads": "3",
                                      "batching": "true"}
        assert config.max_batch_size == 64 and list(config.input[0].dims) == [1, 8, 8]
        session = ort_session(model_dir / "1" / "unet.onnx")  # loads with its external data
        ones = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                for i in session.get_inputs()}
        assert session.run(None, ones)[0].sum() == 64
        assert (model_dir / "1" / "unet.onnx.data").is_file() == external_data
    assert PipelineSpec.from_json(
        parameters(load_config(repository.path / "driffusion"))["pipeline"]).model == "tiny"


def test_tensorrt_plans_become_gpu_models_with_cuda_graphs(tmp_path):
    static = {"sample": [[1, 1, 8, 8], [2, 1, 8, 8], [4, 1, 8, 8]],
              "timestep": [[1], [2], [4]],
              "encoder_hidden_states": [[1, 1, 11], [2, 1, 11], [4, 1, 11]]}
    engines = write_engines(tmp_path / "engines", "tensorrt", profile=static, key="H100-sm90")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=2, backend="tensorrt"))
    for index in range(2):
        model_dir = repository.path / f"unet_gpu{index}"
        config = load_config(model_dir)
        assert config.platform == "tensorrt_plan"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert list(config.instance_group[0].gpus) == [index]
        assert (model_dir / "1" / "model.plan").read_bytes() == b"not a real plan"
        cuda = config.optimization.cuda
        assert cuda.graphs
        # batched: max_batch_size is the profile's largest batch; graphs per batch size
        assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
        assert [spec.batch_size for spec in cuda.graph_spec] == [1, 2]
        assert [list(spec.input["sample"].dim) for spec in cuda.graph_spec] == [[1, 8, 8]] * 2
        assert [list(spec.input["timestep"].dim) for spec in cuda.graph_spec] == [[], []]


def test_cuda_graphs_are_skipped_when_spatial_dims_are_dynamic(tmp_path):
    dynamic = {"sample": [[1, 1, 8, 8], [1, 1, 16, 16], [2, 1, 32, 32]]}
    engines = write_engines(tmp_path / "engines", "tensorrt", profile=dynamic, key="gpu")
    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(engines), devices=1, backend="tensorrt"))
    assert not load_config(repository.path / "unet_gpu0").optimization.cuda.graphs


def test_rewriting_replaces_stale_models_but_never_foreign_directories(tmp_path):
    target = tmp_path / "repo"
    write_repository(target, RepositoryOptions(model="sim", devices=1))
    (target / "unet_cpu5").mkdir()
    write_repository(target, RepositoryOptions(model="sim", devices=1))
    assert not (target / "unet_cpu5").exists() and (target / MARKER).exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by"):
        write_repository(foreign, RepositoryOptions(model="sim"))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_options_and_missing_engines_are_explained(tmp_path):
    with pytest.raises(ValueError, match="devices must be in 1..64"):
        write_repository(tmp_path / "a", RepositoryOptions(model="sim", devices=0))
    with pytest.raises(FileNotFoundError, match="no engines for model"):
        write_repository(tmp_path / "b", RepositoryOptions(model=str(tmp_path / "nowhere")))
    engines = write_engines(tmp_path / "engines", "onnxruntime")
    with pytest.raises(FileNotFoundError, match="no tensorrt engines"):
        write_repository(tmp_path / "c", RepositoryOptions(model=str(engines), backend="tensorrt"))
    (engines / "cpu" / "pipeline.json").unlink()
    with pytest.raises(FileNotFoundError, match="pipeline.json is missing"):
        write_repository(tmp_path / "d", RepositoryOptions(model=str(engines)))


def test_triton_repo_command_writes_the_repository(tmp_path, capsys):
    assert cli_main(["triton-repo", "--model", "sim", "--devices", "2",
                     "--repository", str(tmp_path / "repo")]) == 0
    assert "unet_sim" in capsys.readouterr().out
    assert cli_main(["triton-repo", "--model", str(tmp_path / "none"),
                     "--repository", str(tmp_path / "repo")]) == 2
    assert "no engines for model" in capsys.readouterr().err


def test_docker_commands_for_one_server_or_one_per_gpu(tmp_path):
    (single,) = docker_commands(tmp_path, gpus=2, per_gpu=False)
    assert "--gpus all" in single and "nvcr.io/nvidia/tritonserver:" in single
    assert f"-v {tmp_path}:/models" in single and "-p 127.0.0.1:8001:8001" in single
    per_gpu = docker_commands(tmp_path, gpus=2, per_gpu=True)
    assert len(per_gpu) == 2
    assert '--gpus "device=1"' in per_gpu[1] and "-p 127.0.0.1:8011:8001" in per_gpu[1]


def test_compose_file_runs_the_same_container_command_as_print_docker():
    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "triton_models" / "docker-compose.yml").read_text())
    triton = compose["services"]["triton"]
    assert triton["command"] == ["bash", "-c", CONTAINER_COMMAND]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "./repository:/models:ro" in triton["volumes"]


def test_serve_prints_one_container_per_gpu_on_a_one_device_repository(tmp_path, capsys):
    assert cli_main(["serve", "--model", "sim", "--devices", "3", "--print-docker", "--per-gpu",
                     "--repository", str(tmp_path / "repo")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("docker run") for line in lines) == 3
    assert "--endpoints 127.0.0.1:8001,127.0.0.1:8011,127.0.0.1:8021" in lines[-1]
    sim = load_config(tmp_path / "repo" / "unet_sim")
    assert sim.instance_group[0].count == 1


def test_driffusion_inputs_parse_into_a_request():
    request = request_from_tensors({
        "PROMPT": np.array([b"a handwritten seven"], dtype=object),
        "SEED": np.array([42], np.int64), "GUIDANCE": np.array([1.5], np.float32),
        "MODE": np.array([b"conservative"], dtype=object), "LABEL": None,
    })
    assert (request.prompt, request.seed, request.guidance, request.mode) == (
        "a handwritten seven", 42, 1.5, "conservative")
    assert request.label is None and request.steps is None
    with pytest.raises(RequestError, match="STEPS must hold exactly one value") as error:
        request_from_tensors({"STEPS": np.array([1, 2], np.int32)})
    assert error.value.field == "steps"
