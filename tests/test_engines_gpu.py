"""TensorRT plans and GPU enumeration on a real GPU; skipped with a reason where one is missing."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from engines.gpu import list_gpus
from engines.manifest import check_plan_compatible, load_engines, read_manifest
from engines.tensorrt_build import load_plan, tensorrt_status

GPUS, NO_GPU_REASON = list_gpus()
TRT_VERSION, NO_TRT_REASON = tensorrt_status()
needs_gpu = pytest.mark.skipif(not GPUS, reason=f"needs a CUDA GPU: {NO_GPU_REASON}")
needs_tensorrt = pytest.mark.skipif(TRT_VERSION is None, reason=f"needs TensorRT: {NO_TRT_REASON}")


@pytest.mark.gpu
@needs_gpu
def test_list_gpus_matches_nvidia_smi():
    if shutil.which("nvidia-smi") is None:
        pytest.skip("needs nvidia-smi to compare with")
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,compute_cap,uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    expected = [
        tuple(part.strip() for part in line.split(",")) for line in query.splitlines() if line
    ]
    # CUDA_VISIBLE_DEVICES may hide some GPUs from CUDA but not from nvidia-smi
    seen = [(g.name, g.compute_capability, g.uuid) for g in GPUS]
    assert set(seen) <= set(expected)
    assert all(g.key.split("-")[1] == g.arch for g in GPUS)


@pytest.fixture(scope="module")
def trt_build(tmp_path_factory):
    from engines.build import build_engines
    from engines.build_types import BuildRequest
    from export.onnx_export import ExportOptions

    root = tmp_path_factory.mktemp("trt")
    request = BuildRequest(
        source="tiny-sd",
        name="tiny-sd",
        engines_root=root / "engines",
        onnx_dir=root / "onnx",
        backend="tensorrt",
        precision="fp16",
        optimization_level=0,
        export=ExportOptions(batch_range=(1, 2, 4)),
    )
    return request, build_engines(request)


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@needs_tensorrt
def test_plans_for_every_gpu_with_manifest_and_timing_cache(trt_build):
    request, outcome = trt_build
    assert outcome.backend == "tensorrt"
    assert sorted(d.name for d in outcome.directories) == sorted(g.key for g in GPUS)
    for gpu in GPUS:
        directory = request.engines_root / "tiny-sd" / gpu.key
        manifest = read_manifest(directory)
        assert manifest["backend"] == "tensorrt" and manifest["backend_version"] == TRT_VERSION
        assert manifest["gpu"]["uuid"] == gpu.uuid
        assert sorted(manifest["networks"]) == ["text_encoder", "unet", "vae_decoder"]
        assert all(entry["precision"] == "fp16" for entry in manifest["networks"].values())
        assert all((directory / f"{name}.plan").stat().st_size > 0 for name in manifest["networks"])
        assert check_plan_compatible(manifest).uuid in {g.uuid for g in GPUS}
    caches = list((request.engines_root / ".timing-cache").glob(f"sm*-trt{TRT_VERSION}.cache"))
    assert {c.name.split("-")[0] for c in caches} == {g.arch for g in GPUS}


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@needs_tensorrt
def test_unchanged_plans_are_kept_and_a_new_opt_level_rebuilds(trt_build):
    from engines.build import build_engines
    from engines.build_types import BuildRequest

    request, _ = trt_build
    again = build_engines(request)
    assert again.built == [] and len(again.kept) == 3 * len(GPUS)
    changed = build_engines(
        BuildRequest(**{**request.__dict__, "optimization_level": 1, "networks": ("text_encoder",)})
    )
    assert set(changed.built) == {"text_encoder"}
    for gpu in GPUS:
        manifest = read_manifest(request.engines_root / "tiny-sd" / gpu.key)
        assert manifest["networks"]["text_encoder"]["optimization_level"] == 1
        assert manifest["networks"]["unet"]["optimization_level"] == 0


def run_plan(engine, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Execute a deserialized plan with torch CUDA buffers; outputs in engine I/O order."""
    import tensorrt as trt
    import torch

    context = engine.create_execution_context()
    buffers = {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(value).cuda()
        context.set_input_shape(name, tuple(value.shape))
        context.set_tensor_address(name, buffers[name].data_ptr())
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.empty(
            tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda"
        )
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return [buffers[name].cpu().numpy() for name in outputs]


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@needs_tensorrt
def test_fp16_unet_plan_computes_like_onnxruntime(trt_build):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch to hold the plan's buffers")
    import onnxruntime

    request, _ = trt_build
    engine_set = load_engines(request.engines_root / "tiny-sd")[0]
    engine = load_plan(engine_set, "unet")
    generator = np.random.default_rng(0)
    feeds = {
        "sample": generator.standard_normal((3, 4, 8, 8)).astype(np.float16),
        "timestep": np.array([10.0, 500.0, 990.0], dtype=np.float32),
        "encoder_hidden_states": generator.standard_normal((3, 77, 32)).astype(np.float16),
    }
    (actual,) = run_plan(engine, feeds)
    source = onnxruntime.InferenceSession(
        str(request.export_dir / "unet.fp16.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = source.run(None, feeds)
    scale = float(np.abs(expected.astype(np.float32)).max())
    np.testing.assert_allclose(
        actual.astype(np.float32), expected.astype(np.float32), atol=1e-2 + 2e-2 * scale
    )


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@needs_tensorrt
def test_loading_a_plan_built_by_another_tensorrt_names_both_versions(trt_build, tmp_path):
    from engines.manifest import EngineMismatchError, write_manifest

    request, _ = trt_build
    source = load_engines(request.engines_root / "tiny-sd")[0].directory
    foreign = tmp_path / "tiny-sd" / source.name
    shutil.copytree(source, foreign)
    manifest = read_manifest(foreign)
    manifest["backend_version"] = "9.0.0"
    write_manifest(foreign, manifest)
    (engine_set,) = load_engines(tmp_path / "tiny-sd")
    with pytest.raises(EngineMismatchError) as caught:
        load_plan(engine_set, "unet")
    assert "built with TensorRT 9.0.0" in str(caught.value)
    assert f"runs TensorRT {TRT_VERSION}" in str(caught.value)
