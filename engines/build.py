"""`build-engines`: export if needed, then build TensorRT plans per GPU or ONNX Runtime engines.

Each engine is keyed by its manifest entry (ONNX sha256, backend version, GPU, profile,
precision, optimisation level); an engine whose entry matches is kept, anything else rebuilds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from engines.build_lock import exclusive_build
from engines.build_types import GPU_PRECISION, BuildOutcome, BuildRequest, ExportedOnnx
from engines.gpu import GpuInfo, list_gpus
from engines.manifest import (
    CPU_KEY,
    manifest_mismatch,
    network_entry,
    new_manifest,
    read_manifest,
    rebuild_reason,
    write_manifest,
)
from engines.ort_build import ORT_OPTIMIZATION_LEVEL, build_ort_engine, onnxruntime_version
from engines.tensorrt_build import build_plan, tensorrt_status
from engines.torch_build import (
    CPU_LEVEL,
    TORCH_SUFFIX,
    build_torch_engine,
    build_torch_engines,
    torch_backend_version,
    torch_cuda_available,
    torch_gpus,
)
from export.lora import Lora
from export.onnx_export import (
    EXPORT_LAYOUT,
    ExportOptions,
    export_model,
    onnx_sha256,
    read_export_index,
    settings_change,
)
from export.presets import source_fingerprint
from models.pipeline_spec import SPEC_FILE, PipelineSpec

BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime", "torch")
TIMING_CACHE_DIR = ".timing-cache"


class EngineBuildError(RuntimeError):
    """The requested backend cannot be built here, or a build step failed."""


def choose_backend(requested: str) -> tuple[str, list[GpuInfo], str | None, str | None]:
    """(backend, GPUs, TensorRT version, why no TensorRT plan) for --backend `requested`.

    auto: TensorRT plans where TensorRT imports and a GPU exists; the torch backend where a GPU
    exists without TensorRT (torch with CUDA); else ONNX Runtime CPU engines. torch: the GPUs
    torch can use (none: FP32 on the CPU).
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend {requested!r} is not one of {BACKEND_CHOICES}")
    gpus, gpu_reason = list_gpus()
    trt_version, trt_reason = tensorrt_status()
    reasons = [r for r in (trt_reason, gpu_reason) if r]
    if requested == "onnxruntime":
        return "onnxruntime", gpus, trt_version, "--backend onnxruntime was requested"
    if requested == "torch":
        return "torch", _torch_gpus(gpus), trt_version, "--backend torch was requested"
    if not reasons:
        return "tensorrt", gpus, trt_version, None
    if requested == "tensorrt":
        raise EngineBuildError(f"cannot build TensorRT plans here: {' and '.join(reasons)}")
    if trt_reason and _torch_gpus(gpus):  # a GPU without TensorRT: torch on the GPU
        return "torch", _torch_gpus(gpus), trt_version, " and ".join(reasons)
    return "onnxruntime", gpus, trt_version, " and ".join(reasons)


def _torch_gpus(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """The GPUs torch can run on: those found (when torch has CUDA), else torch's own list."""
    if not torch_cuda_available():
        return []
    return gpus or torch_gpus()


def build_engines(request: BuildRequest, log: Callable[[str], None] = print) -> BuildOutcome:
    """Build (or keep) every engine of the model for every device; print one summary line. A
    second build of the same model waits for the first (engines/build_lock.py)."""
    with exclusive_build(request.engines_root / request.name, log):
        return _build_engines(request, log)


def _build_engines(request: BuildRequest, log: Callable[[str], None]) -> BuildOutcome:
    backend, gpus, trt_version, no_plan_reason = choose_backend(request.backend)
    exported = ensure_exported(request, export_options_for(request, backend), log)
    if backend == "torch":
        outcome = build_torch_engines(request, exported, gpus, log)
        where = (f"{len(gpus)} GPU(s), {request.precision or GPU_PRECISION} asked" if gpus
                 else "no GPU: fp32 on the CPU")
        outcome.summary = (
            f"built {torch_backend_version()} engines for {request.name} ({where}) in "
            f"{outcome.directories[0]} ({_counts(outcome)}); no TensorRT plan: {no_plan_reason}"
        )
    elif backend == "tensorrt":
        outcome = _build_tensorrt(request, exported, gpus, trt_version, log)
        outcome.summary = (
            f"built TensorRT {trt_version} plans ({_described(exported)}) for {request.name} on "
            f"{len(gpus)} GPU(s) in {', '.join(str(d) for d in outcome.directories)} "
            f"({_counts(outcome)})"
        )
    else:
        _check_onnxruntime_precisions(exported)
        outcome = _build_onnxruntime(request, exported, log)
        outcome.summary = (
            f"built ONNX Runtime {onnxruntime_version()} CPU engines for {request.name} in "
            f"{outcome.directories[0]} ({_counts(outcome)}); no TensorRT plan: {no_plan_reason}"
        )
    for directory in outcome.directories:
        copy_pipeline_files(request.export_dir, directory)
        _record_loras(directory, request.loras)
    log(outcome.summary)
    return outcome


def _record_loras(directory: Path, loras: tuple[Lora, ...]) -> None:
    """The manifest names the LoRAs fused into the engines' weights (file, sha256, scale)."""
    manifest = read_manifest(directory)
    if manifest is not None:
        manifest["loras"] = [lora.to_json() for lora in loras]
        write_manifest(directory, manifest)


def export_options_for(request: BuildRequest, backend: str) -> ExportOptions:
    """How the ONNX is exported for `backend`: at the asked precision (default fp16 for TensorRT
    plans, fp32 for ONNX Runtime CPU engines); all fp32 for the torch backend (its encoders and
    decoder run in ONNX Runtime on the CPU, the denoiser in torch at its own precision)."""
    if backend == "torch":
        return replace(request.export, precision="fp32", network_precisions={})
    precision = request.precision or (GPU_PRECISION if backend == "tensorrt" else "fp32")
    return replace(request.export, precision=precision)


def _check_onnxruntime_precisions(exported: list[ExportedOnnx]) -> None:
    """EngineBuildError naming the bf16 networks: ONNX Runtime has no bf16 CPU kernels."""
    bf16 = [onnx.name for onnx in exported if onnx.precision == "bf16"]
    if bf16:
        raise EngineBuildError(
            f"ONNX Runtime has no bf16 CPU kernels (MatMul, Add, Softmax ...), so "
            f"{', '.join(bf16)} cannot run as ONNX Runtime engines; build bf16 with TensorRT or "
            f"--backend torch on a GPU, or ask --precision fp16/fp32 (or "
            f"{' '.join(f'--network-precision {name}=fp32' for name in bf16)})"
        )


def _described(exported: list[ExportedOnnx]) -> str:
    """`unet fp16, vae_decoder fp32`: each network's precision."""
    return ", ".join(f"{onnx.name} {onnx.precision}" for onnx in exported)


def copy_pipeline_files(export_dir: Path, directory: Path) -> None:
    """Put the export's pipeline spec and the tokenizers it names beside the engines; the spec's
    `precisions` become the engines' (the manifest's, where it differs from the export's: a
    torch denoiser runs at its own precision on a GPU)."""
    spec_file = export_dir / SPEC_FILE
    if not spec_file.is_file():
        return
    spec = PipelineSpec.from_json(spec_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    for encoder in spec.text_encoders:
        target = directory / encoder.tokenizer
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(export_dir / encoder.tokenizer, target)
    manifest = read_manifest(directory)
    if manifest is not None:
        engines = {name: entry["precision"] for name, entry in manifest["networks"].items()}
        spec = spec.with_defaults(precisions={**spec.precisions, **engines})
    (directory / SPEC_FILE).write_text(spec.to_json() + "\n")


def _counts(outcome: BuildOutcome) -> str:
    kept = f", {len(outcome.kept)} up to date" if outcome.kept else ""
    return (
        f"{len(outcome.built)} built{kept}: {', '.join(sorted(set(outcome.built + outcome.kept)))}"
    )


def ensure_exported(
    request: BuildRequest, options: ExportOptions, log: Callable[[str], None]
) -> list[ExportedOnnx]:
    """The exported ONNX of every network for `options`, exporting first when missing or stale."""
    precision = options.precision
    stale = export_staleness(request.export_dir, options, request.networks, request.source,
                             request.loras)
    if stale:
        log(f"exporting {request.name} ({precision} asked) to {request.export_dir}: {stale}")
        from export.presets import load_bundle

        bundle = load_bundle(request.source, list(request.networks) or None, request.loras)
        bundle.name = request.name
        export_model(bundle, request.export_dir, options, log)
    entry = read_export_index(request.export_dir)["exports"][precision]
    wanted = request.networks or tuple(entry["networks"])
    return [_exported(request.export_dir, name, entry["networks"][name]) for name in wanted]


def export_staleness(
    directory: Path, options: ExportOptions, networks: tuple[str, ...], source: str,
    loras: tuple[Lora, ...] = (),
) -> str | None:
    """Why the export in `directory` cannot serve `options` for `source`, or None when it can."""
    index = read_export_index(directory)
    if index is None:
        return "no export yet"
    if "servable" not in index:
        return "no pipeline spec yet (an export from an older version)"
    if index.get("layout", 1) < EXPORT_LAYOUT:
        return "an export from an older version (no VAE encoder for image inputs)"
    entry = index.get("exports", {}).get(options.precision)
    if entry is None:
        return f"no {options.precision} export yet"
    change = settings_change(entry, options)
    if change:
        return change
    if entry.get("source_fingerprint") != source_fingerprint(source, loras):
        return "the model's weights (or its LoRAs) changed since the export"
    missing = [n for n in networks if n not in entry.get("networks", {})]
    if missing:
        return f"networks {', '.join(missing)} not exported yet"
    if not networks and not entry.get("complete"):
        return f"only {', '.join(entry.get('networks', {}))} exported so far"
    for network in entry.get("networks", {}).values():
        if not (directory / network["file"]).is_file():
            return f"{network['file']} is missing"
    return None


def _exported(directory: Path, name: str, entry: dict[str, Any]) -> ExportedOnnx:
    path = directory / entry["file"]
    return ExportedOnnx(
        name=name,
        path=path,
        sha256=onnx_sha256(path),
        precision=entry["precision"],
        inputs=entry["inputs"],
        outputs=entry["outputs"],
        profile=entry["profile"],
        model_class=entry.get("model_class", ""),
        torch_only=entry.get("torch_only", False),
    )


def _wanted_entry(
    onnx: ExportedOnnx, file: str, seconds: float, level: int | str
) -> dict[str, Any]:
    return network_entry(
        file=file,
        onnx_sha256=onnx.sha256,
        precision=onnx.precision,
        inputs=onnx.inputs,
        outputs=onnx.outputs,
        profile=onnx.profile,
        build_seconds=seconds,
        optimization_level=level,
    )


def _current_manifest(directory: Path, model: str, backend: str, version: str, gpu: GpuInfo | None):
    """The existing manifest if it is for this backend version and device, else a fresh one."""
    manifest = read_manifest(directory)
    if manifest is not None and not manifest_mismatch(
        manifest, backend=backend, backend_version=version, gpu=gpu
    ):
        manifest["gpu"] = gpu.to_json() if gpu else None
        return manifest
    return new_manifest(model, backend, version, gpu)


def _build_onnxruntime(request: BuildRequest, exported: list[ExportedOnnx], log) -> BuildOutcome:
    directory = request.engines_root / request.name / CPU_KEY
    version = onnxruntime_version()
    manifest = _current_manifest(directory, request.name, "onnxruntime", version, None)
    outcome = BuildOutcome("onnxruntime", [directory])
    for onnx in exported:
        if onnx.torch_only:
            _torch_only(request, onnx, directory, manifest, version, None, outcome, log)
            continue
        file = f"{onnx.name}.onnx"
        wanted = _wanted_entry(onnx, file, 0.0, ORT_OPTIMIZATION_LEVEL)
        reason = _build_reason(request, manifest, directory, onnx.name, wanted, version, None)
        if reason is None:
            outcome.kept.append(onnx.name)
            log(f"{onnx.name}: ONNX Runtime engine is up to date")
            continue
        log(f"{onnx.name}: building ONNX Runtime engine ({reason})")
        built = build_ort_engine(onnx.path, directory / file, onnx.profile, onnx.inputs)
        log(
            f"{onnx.name}: wrote {built.engine_path} in {built.seconds:.1f} s (max difference "
            f"from the source ONNX {built.max_abs_difference:.2g})"
        )
        manifest["networks"][onnx.name] = _wanted_entry(
            onnx, file, built.seconds, ORT_OPTIMIZATION_LEVEL
        )
        write_manifest(directory, manifest)
        outcome.built.append(onnx.name)
    write_manifest(directory, manifest)
    return outcome


def _torch_only(request: BuildRequest, onnx: ExportedOnnx, directory: Path,
                manifest: dict[str, Any], version: str, gpu: GpuInfo | None,
                outcome: BuildOutcome, log: Callable[[str], None]) -> None:
    """A network served by torch on every backend (its spec's torch_only: Wan's VAE decoder,
    whose frame loop a traced graph would fix): its weights as a torch engine in `directory`,
    run eager (its frame axis is dynamic)."""
    file = f"{onnx.name}{TORCH_SUFFIX}"
    reason = _build_reason(request, manifest, directory, onnx.name,
                           _wanted_entry(onnx, file, 0.0, CPU_LEVEL), version, gpu)
    if reason is None:
        outcome.kept.append(onnx.name)
        log(f"{onnx.name}: torch engine is up to date")
        return
    log(f"{onnx.name}: saving a torch engine ({reason}; served by torch on every backend)")
    built = build_torch_engine(request.source, onnx, directory / file, request.loras)
    manifest["networks"][onnx.name] = _wanted_entry(onnx, file, built.seconds, CPU_LEVEL)
    write_manifest(directory, manifest)
    outcome.built.append(onnx.name)


def _build_reason(
    request: BuildRequest,
    manifest: dict[str, Any],
    directory: Path,
    network: str,
    wanted: dict[str, Any],
    version: str,
    gpu: GpuInfo | None,
) -> str | None:
    """Why this engine must be (re)built, or None when the one on disk matches."""
    if request.force:
        return "--force"
    return rebuild_reason(
        manifest,
        directory,
        network,
        wanted,
        backend=manifest["backend"],
        backend_version=version,
        gpu=gpu,
    )


def _build_tensorrt(
    request: BuildRequest, exported: list[ExportedOnnx], gpus: list[GpuInfo], version: str, log
) -> BuildOutcome:
    cache_dir = request.engines_root / TIMING_CACHE_DIR
    outcome = BuildOutcome("tensorrt", [])
    # a plan runs on every GPU of the same model: build once per (name, arch), copy to the rest
    built_for_model: dict[tuple[str, str, str], tuple[Path, dict[str, Any]]] = {}
    for gpu in gpus:
        directory = request.engines_root / request.name / gpu.key
        outcome.directories.append(directory)
        manifest = _current_manifest(directory, request.name, "tensorrt", version, gpu)
        for onnx in exported:
            if onnx.torch_only:
                _torch_only(request, onnx, directory, manifest, version, gpu, outcome, log)
                continue
            file = f"{onnx.name}.plan"
            wanted = _wanted_entry(onnx, file, 0.0, request.optimization_level)
            reason = _build_reason(request, manifest, directory, onnx.name, wanted, version, gpu)
            if reason is None:
                outcome.kept.append(onnx.name)
                log(f"{onnx.name}: TensorRT plan for {gpu.key} is up to date")
                continue
            sibling = built_for_model.get((gpu.name, gpu.arch, onnx.name))
            if sibling is not None:
                log(f"{onnx.name}: copying the plan built for the same GPU model to {gpu.key}")
                shutil.copyfile(sibling[0], directory / file)
                manifest["networks"][onnx.name] = dict(sibling[1])
            else:
                log(f"{onnx.name}: building TensorRT plan for {gpu.describe()} ({reason})")
                built = build_plan(
                    onnx.path,
                    directory / file,
                    gpu=gpu,
                    profile=onnx.profile,
                    optimization_level=request.optimization_level,
                    cache_dir=cache_dir,
                )
                log(
                    f"{onnx.name}: wrote {built.plan_path} in {built.seconds:.1f} s "
                    f"(timing cache {built.timing_cache_path})"
                )
                manifest["networks"][onnx.name] = _wanted_entry(
                    onnx, file, built.seconds, request.optimization_level
                )
                built_for_model[(gpu.name, gpu.arch, onnx.name)] = (
                    directory / file,
                    manifest["networks"][onnx.name],
                )
            write_manifest(directory, manifest)
            outcome.built.append(onnx.name)
        write_manifest(directory, manifest)
    return outcome
