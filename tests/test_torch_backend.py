"""The torch backend: `build-engines --backend torch`, the `torch_model` device model, serving.

Pure parts (placement, graph-cache keys, input checks, config reading, backend choice, encoder
precision), the build of tiny-sd's torch engines (UNet and CLIP text encoder), the LLM encoders
(Qwen3, Qwen2.5-VL, Mistral3) saved and reloaded with their spec's hidden-state layers, the
device model in-process (with a stand-in for `triton_python_backend_utils`) for the UNet and the
text encoder, `--encoder-gpu` on the torch backend, and a real tritonserver serving the torch
engines on the CPU (FP32), compared with the diffusers module in-process and with the ONNX
Runtime backend's image. CUDA-only parts (FP16/BF16, CUDA graphs) are marked `gpu` and skipped
without CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from cli import main as driffusion
from engines import build as engines_build
from engines.gpu import GpuInfo
from engines.manifest import load_engines, read_manifest
from engines.torch_build import (
    TORCH_SUFFIX,
    TorchEngineError,
    is_denoiser,
    load_network,
    read_metadata,
    run_network,
    save_network,
    torch_device_key,
    torch_precision,
)
from export.presets import tiny_sd
from export.specs import LLMEncoderSpec, T5EncoderSpec
from triton_models.repository import RepositoryOptions, write_repository
from triton_models.torch_device import (
    BadInput,
    GraphCache,
    Placement,
    TensorIO,
    TorchRunner,
    check_feeds,
    choose_placement,
    config_tensors,
    graph_key,
    graphs_allowed,
    load_runner,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TEMPLATE = Path(__file__).resolve().parents[1] / "triton_models/templates/torch_model/1/model.py"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, "GPU-12345678-0000-0000-0000-000000000000")
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE = "a red lighthouse", "blurry", 3, 8, 4.0


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_placement_is_the_gpu_in_its_precision_or_fp32_on_the_cpu():
    on_gpu = choose_placement(1, "fp16", True, cuda_available=True, device_count=2)
    assert on_gpu == Placement("cuda:1", "float16", True)
    assert choose_placement(0, "fp32", False, cuda_available=True, device_count=1) == Placement(
        "cuda:0", "float32", False)
    assert choose_placement(0, "bf16", True, cuda_available=True, device_count=1) == Placement(
        "cuda:0", "bfloat16", True)
    # no GPU at all: FP32 eager on the CPU, whatever the repository asked for
    assert choose_placement(3, "fp16", True, cuda_available=False, device_count=0) == Placement(
        "cpu", "float32", False)
    with pytest.raises(ValueError, match="GPU 2 is not visible: this process sees 1"):
        choose_placement(2, "fp16", True, cuda_available=True, device_count=1)
    with pytest.raises(ValueError, match="precision"):
        choose_placement(0, "int8", True, cuda_available=True, device_count=1)


def test_graphs_only_where_the_profile_fixes_every_non_batch_dim():
    fixed = {"profile": {"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [8, 4, 8, 8]],
                         "timestep": [[1], [2], [8]]}}
    sized = {"profile": {"sample": [[1, 4, 8, 8], [2, 4, 16, 16], [8, 4, 32, 32]],
                         "timestep": [[1], [2], [8]]}}
    assert graphs_allowed(fixed) and not graphs_allowed(sized)
    static = {"inputs": [{"name": "sample", "shape": ["batch", 4, 8, 8]}]}
    dynamic = {"inputs": [{"name": "sample", "shape": ["batch", 4, "latent_height", 8]}]}
    assert graphs_allowed(static) and not graphs_allowed(dynamic)


def test_graph_key_is_batch_shapes_and_dtypes():
    def feeds(batch: int, side: int = 8, dtype=np.float32):
        return {"sample": np.zeros((batch, 4, side, side), dtype),
                "timestep": np.zeros((batch,), np.float32)}

    key = graph_key(feeds(2), "float16")
    assert key == (2, (("sample", (4, 8, 8), "float32"), ("timestep", (), "float32")), "float16")
    assert graph_key(dict(reversed(feeds(2).items())), "float16") == key  # order-free
    assert graph_key(feeds(3), "float16") != key
    assert graph_key(feeds(2, side=16), "float16") != key
    assert graph_key(feeds(2, dtype=np.float16), "float16") != key
    assert graph_key(feeds(2), "float32") != key
    tensors = {"sample": torch.zeros(2, 4, 8, 8, dtype=torch.float16),
               "timestep": torch.zeros(2)}
    assert graph_key(tensors, "float16")[1][0] == ("sample", (4, 8, 8), "float16")
    with pytest.raises(BadInput, match="disagree on the batch"):
        graph_key({"sample": np.zeros((2, 4)), "timestep": np.zeros(3)}, "float32")


def test_config_tensors_put_the_batch_first_and_read_reshapes():
    config = {"max_batch_size": "8", "input": [
        {"name": "sample", "data_type": "TYPE_FP32", "dims": ["4", "8", "8"]},
        {"name": "timestep", "data_type": "TYPE_FP32", "dims": ["1"], "reshape": {}}],
        "output": [{"name": "out_sample", "data_type": "TYPE_FP16", "dims": [4, 8, 8]}]}
    assert config_tensors(config, "input") == [TensorIO("sample", "float32", (-1, 4, 8, 8)),
                                               TensorIO("timestep", "float32", (-1,))]
    assert config_tensors(config, "output") == [TensorIO("out_sample", "float16", (-1, 4, 8, 8))]
    unbatched = {"input": [{"name": "sample", "data_type": "TYPE_FP32", "dims": [-1, 4, 8, 8]}]}
    assert config_tensors(unbatched, "input") == [TensorIO("sample", "float32", (-1, 4, 8, 8))]


def test_check_feeds_names_what_does_not_fit():
    expected = [TensorIO("sample", "float32", (-1, 4, 8, 8)), TensorIO("timestep", "float32", (-1,))]
    good = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32)}
    check_feeds(good, expected)
    cases = {
        "missing input timestep": {"sample": good["sample"]},
        "unknown input extra": {**good, "extra": good["timestep"]},
        "timestep is float64, expected float32": {**good, "timestep": np.zeros(2)},
        r"sample has shape \[2, 4, 16, 16\], expected \[-1, 4, 8, 8\]":
            {**good, "sample": np.zeros((2, 4, 16, 16), np.float32)},
    }
    for message, feeds in cases.items():
        with pytest.raises(BadInput, match=message):
            check_feeds(feeds, expected)


def test_failed_capture_runs_eager_and_a_full_cache_too():
    """A key whose capture fails (here: no CUDA stream on this device) runs eager from then on;
    so does every key once the cache holds `limit` graphs."""
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return x * 2

    cache = GraphCache(forward, "cpu")
    x = torch.ones(2, 3)
    key = graph_key({"x": x}, "float32")
    if not CUDA:
        torch.testing.assert_close(cache(key, {"x": x})[0], x * 2)
        assert key in cache.failed and not cache.graphs and cache.eager_calls == 1
        cache(key, {"x": x})
        assert cache.eager_calls == 2 and len(cache.failed) == 1  # not captured again
    full = GraphCache(forward, "cpu", limit=0)
    torch.testing.assert_close(full(key, {"x": x})[0], x * 2)
    assert not full.failed and full.eager_calls == 1


def test_auto_backend_is_torch_on_a_gpu_without_tensorrt(monkeypatch):
    monkeypatch.setattr(engines_build, "list_gpus", lambda: ([H100], None))
    monkeypatch.setattr(engines_build, "tensorrt_status", lambda: (None, "no TensorRT module"))
    monkeypatch.setattr(engines_build, "torch_cuda_available", lambda: True)
    backend, gpus, _, why = engines_build.choose_backend("auto")
    assert (backend, gpus, why) == ("torch", [H100], "no TensorRT module")
    # TensorRT and a GPU: plans, as before
    monkeypatch.setattr(engines_build, "tensorrt_status", lambda: ("10.5.0", None))
    assert engines_build.choose_backend("auto")[0] == "tensorrt"
    assert engines_build.choose_backend("torch")[:2] == ("torch", [H100])
    # a GPU that torch cannot use (CPU-only torch) and no TensorRT: ONNX Runtime
    monkeypatch.setattr(engines_build, "tensorrt_status", lambda: (None, "no TensorRT module"))
    monkeypatch.setattr(engines_build, "torch_cuda_available", lambda: False)
    assert engines_build.choose_backend("auto")[0] == "onnxruntime"
    assert engines_build.choose_backend("torch")[:2] == ("torch", [])
    # no GPU at all: ONNX Runtime, as before
    monkeypatch.setattr(engines_build, "list_gpus", lambda: ([], "no CUDA device"))
    monkeypatch.setattr(engines_build, "torch_cuda_available", lambda: True)
    monkeypatch.setattr(engines_build, "torch_gpus", list)
    assert engines_build.choose_backend("auto")[0] == "onnxruntime"


def test_torch_directories_are_keyed_by_the_gpu_or_cpu():
    assert torch_device_key(H100) == "torch-h100-sm90-12345678"
    assert torch_device_key(None) == "torch-cpu"
    denoiser = ([{"name": "sample"}, {"name": "timestep"}], [{"name": "out_sample"}])
    assert is_denoiser(*denoiser)
    assert not is_denoiser([{"name": "input_ids"}], [{"name": "text_embeddings"}])


def test_t5_and_llm_encoders_take_bf16_on_a_gpu_and_clip_the_precision_rule():
    for encoder in ("T5EncoderModel", "UMT5EncoderModel", "Qwen3Model",
                    "Mistral3ForConditionalGeneration"):
        assert torch_precision("fp16", encoder) == torch_precision("bf16", encoder) == "bf16"
        assert torch_precision("fp32", encoder) == "fp32"
    assert torch_precision("bf16", "CLIPTextModel") == "fp16"  # as export/precision.py says
    assert torch_precision("bf16", "FluxTransformer2DModel") == "bf16"


def test_a_file_that_is_not_a_torch_engine_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(TorchEngineError, match="is not a torch engine"):
        read_metadata(path)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TorchEngineError, match="not a readable safetensors"):
        read_metadata(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# The build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-sd built with `--backend torch` (no GPU here: FP32 on the CPU) and, from the same
    export, with `--backend onnxruntime`; batch up to 8 (a window of 4 with guidance)."""
    root = tmp_path_factory.mktemp("torch-build")
    common = ["--model", "tiny-sd", "--batch-max", "8", "--onnx", str(root / "onnx"),
              "--out", str(root / "engines")]
    assert driffusion(["build-engines", "--backend", "torch", *common]) == 0
    assert driffusion(["build-engines", "--backend", "onnxruntime", *common]) == 0
    model_dir = root / "engines" / "tiny-sd"
    return SimpleNamespace(root=root, model_dir=model_dir,
                           torch_dir=model_dir / torch_device_key(None),
                           export=json.loads((root / "onnx" / "export.json").read_text()))


def test_build_writes_the_denoiser_and_encoder_for_torch_and_the_vae_for_onnxruntime(built):
    names = sorted(p.name for p in built.torch_dir.iterdir())
    assert names == ["manifest.json", "pipeline.json", "text_encoder.safetensors", "tokenizer",
                     "unet.safetensors", "vae_decoder.onnx", "vae_encoder.onnx"]
    manifest = read_manifest(built.torch_dir)
    assert manifest["backend"] == "torch" and manifest["gpu"] is None
    assert manifest["backend_version"].startswith(f"torch {torch.__version__} + onnxruntime ")
    unet = manifest["networks"]["unet"]
    exported = built.export["exports"]["fp32"]["networks"]["unet"]
    assert unet["file"] == "unet" + TORCH_SUFFIX
    assert (unet["precision"], unet["optimization_level"]) == ("fp32", "eager")
    # the export spec's names, dtypes and profile, keyed by the ONNX of the same weights
    for field in ("inputs", "outputs", "profile"):
        assert unet[field] == exported[field]
    assert unet["onnx_sha256"] == exported["sha256"]
    encoder = manifest["networks"]["text_encoder"]
    assert encoder["file"] == "text_encoder" + TORCH_SUFFIX
    assert (encoder["precision"], encoder["optimization_level"]) == ("fp32", "eager")
    assert encoder["onnx_sha256"] == built.export["exports"]["fp32"]["networks"][
        "text_encoder"]["sha256"]
    assert manifest["networks"]["vae_decoder"]["file"] == "vae_decoder.onnx"
    sets = {s.device_key: s.backend for s in load_engines(built.model_dir)}
    assert sets == {"cpu": "onnxruntime", "torch-cpu": "torch"}


def test_a_second_build_keeps_the_torch_engines(built, capsys):
    code = driffusion(["build-engines", "--model", "tiny-sd", "--backend", "torch",
                       "--batch-max", "8", "--onnx", str(built.root / "onnx"),
                       "--out", str(built.root / "engines")])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0 built, 4 up to date" in summary and "no GPU: fp32 on the CPU" in summary


def unet_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {"sample": generator.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "timestep": np.linspace(900, 100, batch).astype(np.float32),
            "encoder_hidden_states": generator.standard_normal((batch, 77, 32)).astype(np.float32)}


def diffusers_unet(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The preset's own UNet (seeded: the weights the engines were built from), in-process."""
    unet = tiny_sd().modules["unet"]
    with torch.no_grad():
        return unet(*(torch.from_numpy(v) for v in inputs.values()), return_dict=False)[0].numpy()


def test_torch_engine_and_runner_compute_what_diffusers_does(built):
    inputs = unet_inputs(3)
    expected = diffusers_unet(inputs)
    network = load_network(built.torch_dir / "unet.safetensors")
    assert network.class_name == "UNet2DConditionModel" and network.device == "cpu"
    assert network.half_inputs == {"sample", "encoder_hidden_states"}  # timestep stays fp32
    np.testing.assert_allclose(run_network(network, inputs, ["out_sample"])["out_sample"],
                               expected, rtol=0, atol=1e-5)
    runner = load_runner(built.torch_dir / "unet.safetensors", gpu=0, precision="fp16",
                         cuda_graphs=True, outputs=[TensorIO("out_sample", "float32", (-1,))])
    if not CUDA:
        assert runner.placement == Placement("cpu", "float32", False) and runner.graphs is None
        np.testing.assert_allclose(runner(inputs)["out_sample"], expected, rtol=0, atol=1e-5)


def diffusers_text_encoder(input_ids: np.ndarray) -> list[np.ndarray]:
    """The preset's CLIP text encoder in-process: last, penultimate hidden states, pooled."""
    encoder = tiny_sd().modules["text_encoder"]
    with torch.no_grad():
        output = encoder(torch.from_numpy(input_ids), output_hidden_states=True)
    return [value.numpy() for value in (output.last_hidden_state, output.hidden_states[-2],
                                        output.pooler_output)]


def prompt_ids(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, (batch, 77)).astype(np.int64)


def test_torch_text_encoder_computes_what_diffusers_does(built):
    network = load_network(built.torch_dir / "text_encoder.safetensors")
    assert network.class_name == "CLIPTextModel" and network.half_inputs == frozenset()
    ids = prompt_ids(2)
    names = ["text_embeddings", "penultimate_hidden_states", "pooled"]
    outputs = run_network(network, {"input_ids": ids}, names)
    for name, expected in zip(names, diffusers_text_encoder(ids)):
        np.testing.assert_allclose(outputs[name], expected, rtol=0, atol=1e-5)


def test_the_builds_check_refuses_an_encoder_that_computes_otherwise(built, tmp_path):
    from engines.build_types import ExportedOnnx
    from engines.torch_build import check_against_onnx

    entry = built.export["exports"]["fp32"]["networks"]["text_encoder"]
    onnx = ExportedOnnx("text_encoder", built.root / "onnx" / entry["file"], entry["sha256"],
                        "fp32", entry["inputs"], entry["outputs"], entry["profile"],
                        entry["model_class"])
    bundle = tiny_sd()
    encoder, spec = bundle.modules["text_encoder"], bundle.specs()["text_encoder"]
    path = tmp_path / "text_encoder.safetensors"
    save_network(encoder, path, spec)
    assert check_against_onnx(path, onnx) < 1e-4
    with torch.no_grad():
        encoder.final_layer_norm.bias.add_(0.5)
    save_network(encoder, path, spec)
    with pytest.raises(TorchEngineError, match="output text_embeddings differs from the ONNX"):
        check_against_onnx(path, onnx)


LLM_LAYERS = {"qwen3": (1, 3), "qwen25_vl": (-1,), "mistral3": (10, 20, 30)}


def llm_encoder(kind: str) -> torch.nn.Module:
    from llm_folders import _qwen3, _qwen25_vl, mistral3

    return {"qwen3": lambda: _qwen3(1, layers=4, hidden_size=24, with_head=False),
            "qwen25_vl": lambda: _qwen25_vl(2), "mistral3": lambda: mistral3(3)}[kind]()


def saved_llm_encoder(kind: str, directory: Path):
    """(module, spec, sample inputs, the wrapper's hidden states, the saved engine's path) of a
    tiny LLM encoder of `kind` saved as a torch engine."""
    module = llm_encoder(kind)
    spec = LLMEncoderSpec.from_model(module, sequence_length=12, layers=LLM_LAYERS[kind])
    inputs = spec.sample_inputs(2)
    with torch.no_grad():
        expected = spec.wrap(module)(**inputs).numpy()
    path = directory / f"{kind}.safetensors"
    save_network(module, path, spec)
    return module, spec, inputs, expected, path


def by_suffix(named: dict, name: str):
    """The entry of `named` (a wrapper's names) that is the model's `name`."""
    (found,) = [value for key, value in named.items() if key == name or key.endswith("." + name)]
    return found


def test_a_reduced_precision_load_casts_each_weight_once_keeping_ties_and_buffers(tmp_path):
    """load_network builds the model with its parameters on the meta device and casts each weight
    once on its way in: at fp16 a T5 encoder's kept-fp32 `wo` weights are the file's fp32
    values exactly (no round trip through fp16), the others the file's in fp16, the tied
    embedding stays one tensor; an LLM encoder's rotary frequencies (a non-persistent buffer,
    not in the file) are the model's own."""
    from diffusers_folders import _t5
    from safetensors.torch import load_file

    register = torch.nn.Module.register_parameter
    t5 = _t5(0, d_model=32)
    path = tmp_path / "t5.safetensors"
    save_network(t5, path, T5EncoderSpec.from_model(t5, sequence_length=8))
    loaded = load_network(path, dtype="float16").module
    assert torch.nn.Module.register_parameter is register  # the meta construction is undone
    parameters = dict(loaded.named_parameters(remove_duplicate=False))
    assert all(value.device.type == "cpu" for value in parameters.values())
    for name, stored in load_file(str(path)).items():
        value = by_suffix(parameters, name)
        if ".wo." in name:
            assert value.dtype == torch.float32 and torch.equal(value, stored), name
        else:
            assert value.dtype == torch.float16 and torch.equal(value, stored.half()), name
    assert by_suffix(parameters, "shared.weight") is by_suffix(parameters,
                                                              "encoder.embed_tokens.weight")
    module, _, _, _, llm_path = saved_llm_encoder("qwen3", tmp_path)
    frequencies = dict(load_network(llm_path).module.named_buffers())
    for name, buffer in module.named_buffers():
        if name.endswith("inv_freq"):
            assert torch.equal(by_suffix(frequencies, name), buffer), name


@pytest.mark.parametrize("kind", sorted(LLM_LAYERS))
def test_llm_encoder_engine_gives_its_specs_hidden_states(kind, tmp_path):
    """A saved LLM encoder reloads with the spec's stacked layers (not the model's last state
    alone), right-padded prompts masked as the export masks them."""
    module, spec, inputs, expected, path = saved_llm_encoder(kind, tmp_path)
    assert read_metadata(path)["library"] == "transformers"
    feeds = {name: value.numpy() for name, value in inputs.items()}
    loaded = run_network(load_network(path), feeds, ["text_embeddings"])["text_embeddings"]
    assert loaded.shape == expected.shape == (2, 12, len(spec.layers) * spec.hidden_size)
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-5)
    if spec.layers != (-1,):  # the wrong layers would be caught
        with torch.no_grad():
            last = LLMEncoderSpec.from_model(module, sequence_length=12).wrap(module)(**inputs)
        assert last.shape[-1] != loaded.shape[-1] or not np.allclose(last.numpy(), loaded)


# slow (an LLM's ONNX export, about 30 s): the build path of an LLM encoder; the default suite
# covers its save and load (test_llm_encoder_engine_gives_its_specs_hidden_states) and the
# build's check against ONNX on tiny-sd's CLIP
# (test_the_builds_check_refuses_an_encoder_that_computes_otherwise)
@pytest.mark.slow
def test_klein_build_saves_its_qwen3_encoder_checked_against_its_onnx(tmp_path):
    from llm_folders import KLEIN_LAYERS, flux2_klein_folder

    from engines.build import ensure_exported, export_options_for
    from engines.build_types import BuildRequest
    from engines.torch_build import build_torch_engines
    from export.onnx_export import ExportOptions

    request = BuildRequest(source=str(flux2_klein_folder(tmp_path / "klein")), name="klein",
                           engines_root=tmp_path / "engines", onnx_dir=tmp_path / "onnx",
                           backend="torch", networks=("text_encoder",),
                           export=ExportOptions(batch_range=(1, 2, 2)))
    exported = ensure_exported(request, export_options_for(request, "torch"), lambda line: None)
    build_torch_engines(request, exported, [], lambda line: None)
    directory = tmp_path / "engines" / "klein" / torch_device_key(None)
    entry = read_manifest(directory)["networks"]["text_encoder"]
    assert (entry["file"], entry["precision"]) == ("text_encoder.safetensors", "fp32")
    assert json.loads(read_metadata(directory / entry["file"])["spec"])["layers"] == list(
        KLEIN_LAYERS)


# ---------------------------------------------------------------------------------------------
# The device model in-process, with a stand-in for triton_python_backend_utils


class FakeTritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {tensor.name: tensor.value for tensor in output_tensors}
        self.error = error


class FakeTensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def as_numpy(self):
        return self.value


FAKE_PB_UTILS = SimpleNamespace(
    TritonError=FakeTritonError, InferenceResponse=FakeResponse, Tensor=FakeTensor,
    get_input_tensor_by_name=lambda request, name: (
        FakeTensor(name, request[name]) if name in request else None),
    Logger=SimpleNamespace(log_info=lambda message: None),
)


def in_process_model(model_dir: Path, monkeypatch):
    """The device model of a written repository, initialised as Triton would."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FAKE_PB_UTILS)
    spec = importlib.util.spec_from_file_location("torch_model_under_test", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(
                          config, preserving_proto_field_name=True)),
                      "model_repository": str(model_dir), "model_version": "1"})
    return model


@pytest.fixture(scope="module")
def torch_repository(built, tmp_path_factory):
    options = RepositoryOptions(model=str(built.model_dir), backend="torch", devices=2,
                                fail_calls=(3,))
    return write_repository(tmp_path_factory.mktemp("torch-repo") / "repo", options)


def test_repository_writes_torch_devices_and_encoder_and_an_ort_vae(torch_repository):
    from test_triton_repository import load_config, parameters

    path = torch_repository.path
    assert [d.name for d in torch_repository.devices] == ["unet_gpu0", "unet_gpu1"]
    for index in range(2):
        model_dir = path / f"unet_gpu{index}"
        config = load_config(model_dir)
        assert config.backend == "python" and config.max_batch_size == 8
        assert [group.kind for group in config.instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_CPU]  # the model itself picks cuda:<gpu>
        assert (model_dir / "1" / "unet.safetensors").is_file()
        assert (model_dir / "1" / "model.py").read_text() == TEMPLATE.read_text()
        params = parameters(config)
        assert params["torch_file"] == "unet.safetensors" and params["gpu"] == str(index)
        assert params["precision"] == "fp32" and params["cuda_graphs"] == "true"
        assert params["batching"] == "true"
        assert [i.name for i in config.input] == ["sample", "timestep", "encoder_hidden_states"]
        assert [o.name for o in config.output] == ["out_sample"]
    assert parameters(load_config(path / "unet_gpu0"))["fail_calls"] == "3"
    assert "fail_calls" not in parameters(load_config(path / "unet_gpu1"))
    encoder = parameters(load_config(path / "text_encoder"))
    assert encoder["torch_file"] == "text_encoder.safetensors" and encoder["gpu"] == "0"
    assert (encoder["precision"], encoder["cuda_graphs"]) == ("fp32", "false")  # eager
    assert (path / "text_encoder" / "1" / "model.py").read_text() == TEMPLATE.read_text()
    assert "onnx_file" in parameters(load_config(path / "vae_decoder"))


def test_encoder_gpu_holds_the_torch_encoders_and_no_device(built, tmp_path):
    from test_triton_repository import load_config, parameters

    repository = write_repository(tmp_path / "repo", RepositoryOptions(
        model=str(built.model_dir), backend="torch", devices=2, encoder_gpu=1))
    assert [d.name for d in repository.devices] == ["unet_gpu0", "unet_gpu2"]
    assert parameters(load_config(repository.path / "text_encoder"))["gpu"] == "1"
    assert parameters(load_config(repository.path / "unet_gpu2"))["gpu"] == "2"
    with pytest.raises(ValueError, match="needs --backend tensorrt or torch"):
        RepositoryOptions(model=str(built.model_dir), backend="onnxruntime",
                          encoder_gpu=1).validate()


def test_text_encoder_device_model_answers_by_the_manifests_names(torch_repository,
                                                                   monkeypatch):
    model = in_process_model(torch_repository.path / "text_encoder", monkeypatch)
    ids = prompt_ids(2, seed=5)
    (response,) = model.execute([{"input_ids": ids}])
    assert response.error is None
    names = ["text_embeddings", "penultimate_hidden_states", "pooled"]
    assert list(response.outputs) == names
    for name, expected in zip(names, diffusers_text_encoder(ids)):
        np.testing.assert_allclose(response.outputs[name], expected, rtol=0, atol=1e-5)
    (bad,) = model.execute([{"input_ids": ids[:, :10]}])
    assert bad.error.code == FakeTritonError.INVALID_ARG
    assert "input_ids has shape" in bad.error.message


def test_device_model_batches_requests_and_classifies_errors(torch_repository, monkeypatch):
    model = in_process_model(torch_repository.path / "unet_gpu0", monkeypatch)
    first, second = unet_inputs(2, seed=1), unet_inputs(1, seed=2)
    responses = model.execute([first, second])  # one batched call of 3 rows
    assert all(response.error is None for response in responses)
    np.testing.assert_allclose(responses[0].outputs["out_sample"], diffusers_unet(first),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(responses[1].outputs["out_sample"], diffusers_unet(second),
                               rtol=0, atol=1e-5)
    missing = {"sample": first["sample"], "timestep": first["timestep"]}
    wrong = {**first, "timestep": first["timestep"].astype(np.float64)}
    bad, worse, good = model.execute([missing, wrong, first])
    assert bad.error.code == worse.error.code == FakeTritonError.INVALID_ARG
    assert "missing input encoder_hidden_states" in bad.error.message
    assert "timestep is float64" in worse.error.message
    assert good.error is None  # a bad request does not fail the others
    with pytest.raises(RuntimeError, match="injected fault on call 3"):
        model.execute([first])  # fail_calls=3: the stub's failure, INTERNAL to the caller

    def broken(feeds):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.runner = broken
    (crashed,) = model.execute([first])
    assert crashed.error.code == FakeTritonError.INTERNAL and "illegal memory" in crashed.error.message


# ---------------------------------------------------------------------------------------------
# A real tritonserver: torch (batched one-GPU layout) next to ONNX Runtime


def driffusion_request(url: str, **fields) -> tuple[np.ndarray, int]:
    import tritonclient.grpc as grpc_client

    types = {str: ("BYTES", np.object_), int: ("INT32", np.int32), float: ("FP32", np.float32)}
    inputs = []
    for name, value in fields.items():
        wire, dtype = ("INT64", np.int64) if name == "SEED" else types[type(value)]
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        tensor = grpc_client.InferInput(name, [1], wire)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpc_client.InferenceServerClient(url)
    try:
        result = client.infer("driffusion", inputs, client_timeout=300)
    finally:
        client.close()
    return result.as_numpy("IMAGE"), int(result.as_numpy("ROUNDS").reshape(-1)[0])


def executions(url: str, model: str) -> int:
    import tritonclient.grpc as grpc_client

    client = grpc_client.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("execution_count", 0))


@pytest.fixture(scope="module")
def servers(built, triton_server, tmp_path_factory):
    """The torch engines in the batched one-GPU layout (one device model, rounds of 4 items)
    and the ONNX Runtime engines on two device models, each on a real tritonserver."""
    root = tmp_path_factory.mktemp("torch-served")
    torch_repo = write_repository(root / "torch", RepositoryOptions(
        model=str(built.model_dir), backend="torch", devices=4, gpu_layout="batched"))
    ort_repo = write_repository(root / "ort", RepositoryOptions(
        model=str(built.model_dir), backend="onnxruntime", devices=2))
    return SimpleNamespace(torch=triton_server(torch_repo.path).grpc_url,
                           ort=triton_server(ort_repo.path).grpc_url,
                           torch_devices=[d.name for d in torch_repo.devices])


@pytest.mark.triton
def test_served_torch_unet_matches_the_diffusers_module(servers):
    import tritonclient.grpc as grpc_client

    assert servers.torch_devices == ["unet_gpu0"]
    inputs = unet_inputs(3, seed=4)
    tensors = []
    for name, value in inputs.items():
        value = value.reshape(-1, 1) if name == "timestep" else value  # batched: [N, 1]
        tensor = grpc_client.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = grpc_client.InferenceServerClient(servers.torch)
    try:
        output = client.infer("unet_gpu0", tensors).as_numpy("out_sample")
    finally:
        client.close()
    np.testing.assert_allclose(output, diffusers_unet(inputs), rtol=0, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["sequential", "aggressive"])
def test_served_torch_image_matches_the_onnxruntime_backend(servers, mode):
    request = {"PROMPT": PROMPT, "NEGATIVE_PROMPT": NEGATIVE, "SEED": SEED, "STEPS": STEPS,
               "GUIDANCE": GUIDANCE, "MODE": mode, "WINDOW": 4}
    encoder_calls = executions(servers.torch, "text_encoder")
    torch_image, torch_rounds = driffusion_request(servers.torch, **request)
    assert executions(servers.torch, "text_encoder") > encoder_calls  # the torch encoder ran
    ort_image, ort_rounds = driffusion_request(servers.ort, **request)
    assert torch_image.shape == ort_image.shape and torch_image.dtype == np.uint8
    difference = np.abs(torch_image.astype(np.int16) - ort_image.astype(np.int16))
    assert difference.max() <= 1, f"max pixel difference {difference.max()}"
    assert torch_rounds == ort_rounds
    assert (torch_rounds == STEPS) == (mode == "sequential")


@pytest.mark.triton
def test_batched_layout_keeps_the_window_with_one_call_per_round(servers):
    before = executions(servers.torch, "unet_gpu0")
    request = {"PROMPT": PROMPT, "SEED": SEED, "STEPS": STEPS, "GUIDANCE": GUIDANCE,
               "MODE": "aggressive"}
    image, rounds = driffusion_request(servers.torch, **request)  # the default window: 4
    assert rounds < STEPS  # DRiffusion is on, not collapsed to a window of 1
    assert executions(servers.torch, "unet_gpu0") - before == rounds
    same_image, same_rounds = driffusion_request(servers.torch, **request, WINDOW=4)
    assert same_rounds == rounds and np.array_equal(same_image, image)


# ---------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_replay_what_eager_fp16_computes(built):
    path = built.torch_dir / "unet.safetensors"
    outputs = [TensorIO("out_sample", "float32", (-1, 4, 8, 8))]
    graphs = load_runner(path, gpu=0, precision="fp16", cuda_graphs=True, outputs=outputs)
    eager = TorchRunner(graphs.network, Placement("cuda:0", "float16", False), outputs)
    assert graphs.placement == Placement("cuda:0", "float16", True)
    for batch in (1, 2, 2, 4, 1):
        inputs = unet_inputs(batch, seed=batch)
        np.testing.assert_allclose(graphs(inputs)["out_sample"], eager(inputs)["out_sample"],
                                   rtol=0, atol=1e-3)
    assert sorted(key[0] for key in graphs.graphs.graphs) == [1, 2, 4]
    assert graphs.graphs.replays == 5 and not graphs.graphs.failed
    # fp16 on the GPU stays close to the fp32 diffusers module
    inputs = unet_inputs(2)
    np.testing.assert_allclose(graphs(inputs)["out_sample"], diffusers_unet(inputs),
                               rtol=0, atol=5e-2)


@pytest.mark.gpu
@needs_cuda
def test_text_encoder_runs_eager_on_the_gpu_in_fp16(built):
    names = ["text_embeddings", "penultimate_hidden_states", "pooled"]
    runner = load_runner(built.torch_dir / "text_encoder.safetensors", gpu=0, precision="fp16",
                         cuda_graphs=False,
                         outputs=[TensorIO(name, "float32", (-1,)) for name in names])
    assert runner.placement == Placement("cuda:0", "float16", False)
    ids = prompt_ids(2)
    outputs = runner({"input_ids": ids})
    for name, expected in zip(names, diffusers_text_encoder(ids)):
        np.testing.assert_allclose(outputs[name], expected, rtol=0, atol=5e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["qwen3", "mistral3"])
def test_llm_encoder_runs_in_bf16_on_the_gpu(kind, tmp_path):
    _, _, inputs, expected, path = saved_llm_encoder(kind, tmp_path)
    runner = load_runner(path, gpu=0, precision="bf16", cuda_graphs=False,
                         outputs=[TensorIO("text_embeddings", "float32", (-1,))])
    assert next(runner.network.module.parameters()).dtype == torch.bfloat16
    got = runner({name: value.numpy() for name, value in inputs.items()})["text_embeddings"]
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= 0.05 * max(scale, 1.0)


@pytest.mark.gpu
@needs_cuda
def test_dynamic_shapes_run_eager_on_the_gpu(built):
    path = built.torch_dir / "unet.safetensors"
    runner = load_runner(path, gpu=0, precision="fp16", cuda_graphs=False,
                         outputs=[TensorIO("out_sample", "float32", (-1, 4, 8, 8))])
    assert runner.graphs is None
    inputs = unet_inputs(2)
    np.testing.assert_allclose(runner(inputs)["out_sample"], diffusers_unet(inputs),
                               rtol=0, atol=5e-2)
