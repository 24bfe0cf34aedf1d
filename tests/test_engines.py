"""Engine builds on a CPU machine: ONNX Runtime engines, manifests, keying and rebuild decisions."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from cli import main as driffusion
from engines.build import (
    BuildRequest,
    EngineBuildError,
    build_engines,
    choose_backend,
    export_staleness,
)
from engines.gpu import GpuInfo, format_uuid, list_gpus, short_name
from engines.manifest import (
    EngineMismatchError,
    check_plan_compatible,
    load_engines,
    network_entry,
    new_manifest,
    rebuild_reason,
    write_manifest,
)
from engines.tensorrt_build import tensorrt_status
from export.onnx_export import ExportOptions, onnx_sha256
from export.presets import source_fingerprint, tiny_sd

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUIET = {"log": lambda message: None}
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, format_uuid(bytes(range(16))))
A100 = GpuInfo(1, "NVIDIA A100-SXM4-80GB", 8, 0, format_uuid(bytes(range(16, 32))))
TENSORRT_HERE = tensorrt_status()[0] is not None and bool(list_gpus()[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`driffusion build-engines` for tiny-sd into a temporary engine root (exports first)."""
    root = tmp_path_factory.mktemp("build")
    code = driffusion(
        [
            "build-engines",
            "--model",
            "tiny-sd",
            "--backend",
            "onnxruntime",
            "--batch-max",
            "4",
            "--onnx",
            str(root / "onnx"),
            "--out",
            str(root / "engines"),
        ]
    )
    assert code == 0
    return SimpleNamespace(root=root, onnx=root / "onnx", engines=root / "engines")


def test_build_writes_ort_engines_with_a_manifest(built):
    cpu = built.engines / "tiny-sd" / "cpu"
    assert sorted(p.name for p in cpu.iterdir()) == [
        "manifest.json",
        "pipeline.json",  # the pipeline spec and the tokenizer it names, beside the engines
        "text_encoder.onnx",
        "tokenizer",
        "unet.onnx",
        "vae_decoder.onnx",
        "vae_encoder.onnx",
    ]
    manifest = json.loads((cpu / "manifest.json").read_text())
    assert manifest["model"] == "tiny-sd"
    assert manifest["backend"] == "onnxruntime"
    assert manifest["backend_version"] == onnxruntime.__version__
    assert manifest["gpu"] is None and manifest["created"]
    unet = manifest["networks"]["unet"]
    assert unet["file"] == "unet.onnx"
    assert unet["onnx_sha256"] == onnx_sha256(built.onnx / "unet.onnx")
    assert unet["precision"] == "fp32"
    assert unet["inputs"][0] == {
        "name": "sample",
        "dtype": "float32",
        "shape": ["batch", 4, "latent_height", "latent_width"],
    }
    assert unet["outputs"][0]["name"] == "out_sample"
    assert unet["profile"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8]]
    assert unet["build_seconds"] > 0


def test_ort_engine_found_by_load_engines_computes_like_torch(built):
    (engine_set,) = load_engines(built.engines / "tiny-sd")
    assert (engine_set.device_key, engine_set.backend, engine_set.is_tensorrt) == (
        "cpu",
        "onnxruntime",
        False,
    )
    bundle = tiny_sd()  # the preset is seeded: the same weights the engines were built from
    spec = bundle.specs("fp32")["unet"]
    inputs = spec.sample_inputs(3, seed=11)
    session = onnxruntime.InferenceSession(
        str(engine_set.path("unet")), providers=["CPUExecutionProvider"]
    )
    (actual,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        expected = spec.wrap(bundle.modules["unet"])(*inputs.values()).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    with pytest.raises(KeyError, match="no engine for 'transformer'; it has text_encoder, unet"):
        engine_set.path("transformer")


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT and a GPU exist here: auto builds plans")
def test_auto_without_tensorrt_keeps_engines_and_says_why_in_one_line(built, capsys):
    code = driffusion(
        [
            "build-engines",
            "--model",
            "tiny-sd",
            "--batch-max",
            "4",
            "--onnx",
            str(built.onnx),
            "--out",
            str(built.engines),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    why = [line for line in lines if "no TensorRT plan" in line]
    assert len(why) == 1
    assert why[0].startswith("built ONNX Runtime")
    assert "0 built, 4 up to date: text_encoder, unet, vae_decoder, vae_encoder" in why[0]
    assert str(built.engines / "tiny-sd" / "cpu") in why[0]
    assert "TensorRT is not installed" in why[0] or "GPU" in why[0]


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT and a GPU exist here")
def test_tensorrt_backend_without_tensorrt_fails_clearly(built, capsys):
    with pytest.raises(EngineBuildError, match="cannot build TensorRT plans here"):
        choose_backend("tensorrt")
    code = driffusion(
        [
            "build-engines",
            "--model",
            "tiny-sd",
            "--backend",
            "tensorrt",
            "--onnx",
            str(built.onnx),
            "--out",
            str(built.engines),
        ]
    )
    assert code == 1
    assert "cannot build TensorRT plans here" in capsys.readouterr().err


def copy_build(built, tmp_path: Path) -> BuildRequest:
    shutil.copytree(built.root, tmp_path, dirs_exist_ok=True)
    return BuildRequest(
        source="tiny-sd",
        name="tiny-sd",
        engines_root=tmp_path / "engines",
        onnx_dir=tmp_path / "onnx",
        backend="onnxruntime",
        export=ExportOptions(batch_range=(1, 2, 4)),
    )


def test_changed_onnx_rebuilds_only_that_engine(built, tmp_path):
    request = copy_build(built, tmp_path)
    exported = request.export_dir / "text_encoder.onnx"
    model = onnx.load(str(exported))
    model.doc_string = "edited by hand"
    onnx.save(model, str(exported))
    outcome = build_engines(request, **QUIET)
    assert outcome.built == ["text_encoder"]
    assert outcome.kept == ["unet", "vae_decoder", "vae_encoder"]
    (engine_set,) = outcome.engine_sets()
    assert engine_set.networks["text_encoder"].onnx_sha256 == onnx_sha256(exported)
    forced = build_engines(BuildRequest(**{**request.__dict__, "force": True}), **QUIET)
    assert forced.built == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert forced.kept == []


def test_deleted_engine_file_is_rebuilt(built, tmp_path):
    request = copy_build(built, tmp_path)
    (request.engines_root / "tiny-sd" / "cpu" / "vae_decoder.onnx").unlink()
    outcome = build_engines(request, **QUIET)
    assert outcome.built == ["vae_decoder"]


def test_export_staleness_decides_when_to_export_again(built):
    unchanged = ExportOptions(batch_range=(1, 2, 4))
    assert export_staleness(built.onnx, unchanged, (), "tiny-sd") is None
    assert (
        export_staleness(built.onnx, ExportOptions(batch_range=(1, 2, 8)), (), "tiny-sd")
        == "profile ranges changed"
    )
    assert export_staleness(
        built.onnx, ExportOptions(batch_range=(1, 2, 4), opset=17), (), "tiny-sd"
    ) == (
        "opset changed (18 -> 17)"
    )
    fp16 = ExportOptions(precision="fp16")
    assert export_staleness(built.onnx, fp16, (), "tiny-sd") == "no fp16 export yet"
    assert (
        export_staleness(built.onnx, unchanged, ("transformer",), "tiny-sd")
        == "networks transformer not exported yet"
    )
    nowhere = built.onnx.parent / "nowhere"
    assert export_staleness(nowhere, unchanged, (), "tiny-sd") == "no export yet"


def test_an_export_of_other_weights_is_stale(tmp_path, built):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"one")
    unchanged = ExportOptions(batch_range=(1, 2, 4))
    assert export_staleness(built.onnx, unchanged, (), str(model)) == (
        "the model's weights (or its LoRAs) changed since the export"
    )
    first = source_fingerprint(str(model))
    (model / "weights.bin").write_bytes(b"other weights")
    assert source_fingerprint(str(model)) != first
    assert source_fingerprint("tiny-sd") == source_fingerprint("tiny-sd")


def test_partial_exports_merge_and_a_full_build_exports_the_rest(tmp_path):
    request = BuildRequest(
        source="tiny-sd",
        name="tiny-sd",
        engines_root=tmp_path / "engines",
        onnx_dir=tmp_path / "onnx",
        backend="onnxruntime",
        networks=("text_encoder",),
        export=ExportOptions(batch_range=(1, 2, 4)),
    )
    assert build_engines(request, **QUIET).built == ["text_encoder"]
    options = request.export
    assert export_staleness(request.export_dir, options, ("text_encoder",), "tiny-sd") is None
    assert export_staleness(request.export_dir, options, (), "tiny-sd") == (
        "only text_encoder exported so far"
    )
    vae_only = BuildRequest(**{**request.__dict__, "networks": ("vae_decoder",)})
    assert build_engines(vae_only, **QUIET).built == ["vae_decoder"]
    index = json.loads((request.export_dir / "export.json").read_text())
    assert sorted(index["exports"]["fp32"]["networks"]) == ["text_encoder", "vae_decoder"]
    (engine_set,) = load_engines(request.engines_root / "tiny-sd")
    assert sorted(engine_set.networks) == ["text_encoder", "vae_decoder"]


def plan_entry(**changes) -> dict:
    entry = network_entry(
        file="unet.plan",
        onnx_sha256="a" * 64,
        precision="fp16",
        inputs=[{"name": "sample", "dtype": "float16", "shape": ["batch", 4, 8, 8]}],
        outputs=[{"name": "out_sample", "dtype": "float16", "shape": ["batch", 4, 8, 8]}],
        profile={"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [8, 4, 8, 8]]},
        build_seconds=12.5,
        optimization_level=3,
    )
    entry.update(changes)
    return entry


def plan_manifest(directory: Path, gpu: GpuInfo = H100, version: str = "10.9.0") -> dict:
    manifest = new_manifest("tiny-sd", "tensorrt", version, gpu)
    manifest["networks"]["unet"] = plan_entry()
    write_manifest(directory, manifest)
    (directory / "unet.plan").write_bytes(b"plan")
    return manifest


def test_rebuild_reason_names_what_differs(tmp_path):
    manifest = plan_manifest(tmp_path)
    same = {"backend": "tensorrt", "backend_version": "10.9.0", "gpu": H100}
    assert rebuild_reason(manifest, tmp_path, "unet", plan_entry(build_seconds=0.0), **same) is None
    changed = {
        "onnx_sha256": "b" * 64,
        "precision": "fp32",
        "optimization_level": 5,
        "profile": {"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [16, 4, 8, 8]]},
    }
    for field, value in changed.items():
        reason = rebuild_reason(manifest, tmp_path, "unet", plan_entry(**{field: value}), **same)
        assert reason == f"{field.replace('_', ' ')} changed"
    assert (
        rebuild_reason(
            manifest, tmp_path, "unet", plan_entry(), **{**same, "backend_version": "10.13.0"}
        )
        == "tensorrt 10.9.0 -> 10.13.0"
    )
    assert rebuild_reason(
        manifest, tmp_path, "unet", plan_entry(), **{**same, "gpu": A100}
    ).startswith("GPU NVIDIA H100 80GB HBM3 (compute capability 9.0) -> NVIDIA A100")
    assert (
        rebuild_reason(manifest, tmp_path, "vae_decoder", plan_entry(), **same) == "not built yet"
    )
    (tmp_path / "unet.plan").unlink()
    assert (
        rebuild_reason(manifest, tmp_path, "unet", plan_entry(), **same) == "unet.plan is missing"
    )
    assert rebuild_reason(None, tmp_path, "unet", plan_entry(), **same) == "no manifest yet"


def test_check_plan_compatible_names_built_and_running_versions_and_gpus(tmp_path):
    manifest = plan_manifest(tmp_path)
    assert check_plan_compatible(manifest, tensorrt_version="10.9.0", gpus=[A100, H100]) == H100
    with pytest.raises(EngineMismatchError) as caught:
        check_plan_compatible(manifest, tensorrt_version="10.13.0", gpus=[H100])
    message = str(caught.value)
    assert (
        "built with TensorRT 10.9.0 for NVIDIA H100 80GB HBM3 (compute capability 9.0)" in message
    )
    assert "runs TensorRT 10.13.0 on NVIDIA H100 80GB HBM3" in message
    assert "driffusion build-engines --model tiny-sd --force" in message
    with pytest.raises(
        EngineMismatchError, match=r"runs TensorRT 10\.9\.0 on NVIDIA A100-SXM4-80GB"
    ):
        check_plan_compatible(manifest, tensorrt_version="10.9.0", gpus=[A100])
    with pytest.raises(EngineMismatchError, match="on no visible GPU"):
        check_plan_compatible(manifest, tensorrt_version="10.9.0", gpus=[])
    assert check_plan_compatible(new_manifest("tiny-sd", "onnxruntime", "1.20.0", None)) is None


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT exists here")
def test_check_plan_compatible_without_tensorrt_says_so(tmp_path):
    with pytest.raises(EngineMismatchError, match="runs no TensorRT"):
        check_plan_compatible(plan_manifest(tmp_path), gpus=[H100])


def test_load_engines_lists_gpu_sets_first_and_explains_missing_engines(built, tmp_path):
    model_dir = tmp_path / "tiny-sd"
    shutil.copytree(built.engines / "tiny-sd" / "cpu", model_dir / "cpu")
    plan_manifest(model_dir / A100.key, gpu=A100)
    plan_manifest(model_dir / H100.key, gpu=H100)
    sets = load_engines(model_dir)
    assert [s.device_key for s in sets] == [H100.key, A100.key, "cpu"]
    assert sets[0].gpu["uuid"] == H100.uuid and sets[0].is_tensorrt
    assert sets[0].path("unet") == model_dir / H100.key / "unet.plan"
    with pytest.raises(FileNotFoundError, match="driffusion build-engines --model nothing"):
        load_engines(tmp_path / "nothing")
    (tmp_path / "empty" / "cpu").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no manifest.json"):
        load_engines(tmp_path / "empty")


def test_gpu_keys_and_names():
    assert H100.key == "h100-sm90-00010203"
    assert H100.uuid == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert H100.to_json() == {
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "uuid": H100.uuid,
        "index": 0,
    }
    names = {
        "NVIDIA GeForce RTX 4090": "rtx4090",
        "NVIDIA A100-SXM4-80GB": "a100",
        "Tesla V100-PCIE-16GB": "v100",
        "NVIDIA RTX A6000": "rtxa6000",
        "NVIDIA L40S": "l40s",
    }
    assert {name: short_name(name) for name in names} == names


def test_list_gpus_reports_gpus_or_a_reason():
    gpus, reason = list_gpus()
    if gpus:
        assert reason is None and all(g.uuid.startswith("GPU-") for g in gpus)
    else:
        assert reason and ("CUDA" in reason or "cuda" in reason)


class FakeCudaRuntime:
    """The slice of cuda.bindings.runtime that list_gpus uses, reporting two GPUs."""

    class cudaError_t:
        cudaSuccess = 0

    def cudaGetDeviceCount(self):
        return 0, 2

    def cudaGetDeviceProperties(self, index):
        names = [b"NVIDIA H100 80GB HBM3\0\0\0", b"NVIDIA A100-SXM4-80GB\0"]
        uuid = SimpleNamespace(bytes=bytes(range(16 * index, 16 * index + 16)))
        return 0, SimpleNamespace(name=names[index], major=9 - index, minor=0, uuid=uuid)


def test_list_gpus_reads_name_capability_and_uuid(monkeypatch):
    monkeypatch.setattr("engines.gpu._cuda_runtime", FakeCudaRuntime)
    gpus, reason = list_gpus()
    assert reason is None
    assert [g.key for g in gpus] == ["h100-sm90-00010203", "a100-sm80-10111213"]
    assert gpus[1].describe() == "NVIDIA A100-SXM4-80GB (compute capability 8.0, " + A100.uuid + ")"


def test_a_second_build_of_one_model_waits_for_the_first(tmp_path):
    """Two builds of one model (two replicas starting together) never write at once: the second
    says it waits and enters only when the first has left."""
    import threading

    from engines.build_lock import exclusive_build

    events: list[str] = []
    first_inside = threading.Event()
    waiting: list[str] = []

    def second() -> None:
        first_inside.wait()
        with exclusive_build(tmp_path / "model", waiting.append):
            events.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with exclusive_build(tmp_path / "model", events.append):
        events.append("first in")
        first_inside.set()
        deadline = time.monotonic() + 10
        while not waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        events.append("first out")
    thread.join(10)
    assert events == ["first in", "first out", "second in"]
    assert len(waiting) == 1 and "waiting for another build" in waiting[0]
