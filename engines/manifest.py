"""Engine manifests: what each built engine is keyed by, how to find engines, when to rebuild.

Layout: `engines/<model>/<device-key>/<network>.plan|.onnx` plus `manifest.json`, where the
device key is a GPU key such as `h100-sm90-1a2b3c4d` (TensorRT) or `cpu` (ONNX Runtime), or
`torch-<GPU key|cpu>` for the torch backend (engines/torch_build.py: `<denoiser>.safetensors`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engines.gpu import GpuInfo, list_gpus

MANIFEST = "manifest.json"
CPU_KEY = "cpu"
BACKENDS = ("tensorrt", "onnxruntime", "torch")


class EngineMismatchError(RuntimeError):
    """A TensorRT plan built for another TensorRT version or GPU than the running ones."""


@dataclass(frozen=True)
class NetworkEngine:
    """One built engine file and the facts it was built from."""

    name: str
    path: Path
    onnx_sha256: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profile: dict[str, list[list[int]]]
    build_seconds: float


@dataclass(frozen=True)
class EngineSet:
    """All engines of one model for one device (a GPU, or the CPU)."""

    model: str
    device_key: str
    directory: Path
    backend: str
    backend_version: str
    gpu: dict[str, Any] | None
    networks: dict[str, NetworkEngine]
    created: str
    manifest: dict[str, Any]

    @property
    def is_tensorrt(self) -> bool:
        return self.backend == "tensorrt"

    def path(self, network: str) -> Path:
        """The engine file of `network`; KeyError names the networks that exist."""
        if network not in self.networks:
            raise KeyError(
                f"{self.directory} has no engine for {network!r}; it has {', '.join(self.networks)}"
            )
        return self.networks[network].path


def manifest_path(directory: Path) -> Path:
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an engine directory, or None when there is none yet."""
    path = manifest_path(directory)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rebuild with --force") from error
    missing = {"model", "backend", "backend_version", "networks"} - set(manifest)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}; rebuild with --force")
    return manifest


def new_manifest(model: str, backend: str, backend_version: str, gpu: GpuInfo | None) -> dict:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    return {
        "model": model,
        "backend": backend,
        "backend_version": backend_version,
        "gpu": gpu.to_json() if gpu else None,
        "networks": {},
        "created": _now(),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write atomically, so a reader never sees half a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest["created"] = _now()
    path = manifest_path(directory)
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(manifest, indent=2) + "\n")
    scratch.replace(path)
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def network_entry(
    *,
    file: str,
    onnx_sha256: str,
    precision: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    profile: dict[str, Any],
    build_seconds: float,
    optimization_level: int | str,
) -> dict[str, Any]:
    """The manifest record of one network's engine."""
    return {
        "file": file,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "inputs": inputs,
        "outputs": outputs,
        "profile": {name: [list(shape) for shape in shapes] for name, shapes in profile.items()},
        "build_seconds": round(build_seconds, 3),
        "optimization_level": optimization_level,
    }


# the fields of a network entry whose change means the engine must be rebuilt
KEY_FIELDS = ("onnx_sha256", "precision", "profile", "optimization_level", "inputs", "outputs")


def rebuild_reason(
    manifest: dict[str, Any] | None,
    directory: Path,
    network: str,
    wanted: dict[str, Any],
    *,
    backend: str,
    backend_version: str,
    gpu: GpuInfo | None,
) -> str | None:
    """Why `network` must be (re)built, or None when the existing engine matches exactly."""
    if manifest is None:
        return "no manifest yet"
    mismatch = manifest_mismatch(
        manifest, backend=backend, backend_version=backend_version, gpu=gpu
    )
    if mismatch:
        return mismatch
    entry = manifest.get("networks", {}).get(network)
    if entry is None:
        return "not built yet"
    if not (directory / entry.get("file", "")).is_file():
        return f"{entry.get('file')} is missing"
    for field in KEY_FIELDS:
        if entry.get(field) != wanted.get(field):
            return f"{field.replace('_', ' ')} changed"
    return None


def manifest_mismatch(
    manifest: dict[str, Any], *, backend: str, backend_version: str, gpu: GpuInfo | None
) -> str | None:
    """How a manifest's backend, backend version or GPU differ from the wanted ones, if they do."""
    if manifest.get("backend") != backend:
        return f"backend {manifest.get('backend')} -> {backend}"
    if manifest.get("backend_version") != backend_version:
        return f"{backend} {manifest.get('backend_version')} -> {backend_version}"
    built_gpu = manifest.get("gpu")
    wanted_gpu = gpu.to_json() if gpu else None
    if _gpu_identity(built_gpu) != _gpu_identity(wanted_gpu):
        return f"GPU {_describe_gpu(built_gpu)} -> {_describe_gpu(wanted_gpu)}"
    return None


def _gpu_identity(gpu: dict[str, Any] | None) -> tuple | None:
    return (
        None if gpu is None else (gpu.get("name"), gpu.get("compute_capability"), gpu.get("uuid"))
    )


def _describe_gpu(gpu: dict[str, Any] | None) -> str:
    if gpu is None:
        return "none (CPU)"
    return f"{gpu.get('name')} (compute capability {gpu.get('compute_capability')})"


def load_engines(model_dir: Path | str) -> list[EngineSet]:
    """One EngineSet per device directory under `engines/<model>/`, GPUs first, then CPU."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"no engines at {model_dir}; build them with "
            f"`driffusion build-engines --model {model_dir.name}`"
        )
    sets = [
        _engine_set(directory, manifest)
        for directory in sorted(p for p in model_dir.iterdir() if p.is_dir())
        if (manifest := read_manifest(directory)) is not None
    ]
    if not sets:
        raise FileNotFoundError(
            f"{model_dir} holds no {MANIFEST}; build engines with "
            f"`driffusion build-engines --model {model_dir.name}`"
        )
    return sorted(sets, key=lambda s: (not s.is_tensorrt, _gpu_index(s), s.device_key))


def _gpu_index(engine_set: EngineSet) -> int:
    return engine_set.gpu.get("index", 0) if engine_set.gpu else 0


def _engine_set(directory: Path, manifest: dict[str, Any]) -> EngineSet:
    networks = {
        name: NetworkEngine(
            name=name,
            path=directory / entry["file"],
            onnx_sha256=entry["onnx_sha256"],
            precision=entry["precision"],
            inputs=entry["inputs"],
            outputs=entry["outputs"],
            profile=entry["profile"],
            build_seconds=entry["build_seconds"],
        )
        for name, entry in manifest["networks"].items()
    }
    return EngineSet(
        model=manifest["model"],
        device_key=directory.name,
        directory=directory,
        backend=manifest["backend"],
        backend_version=manifest["backend_version"],
        gpu=manifest.get("gpu"),
        networks=networks,
        created=manifest.get("created", ""),
        manifest=manifest,
    )


def installed_tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def check_plan_compatible(
    manifest: dict[str, Any],
    *,
    tensorrt_version: str | None = None,
    gpus: list[GpuInfo] | None = None,
) -> GpuInfo | None:
    """Raise EngineMismatchError unless this process can load the manifest's TensorRT plans.

    Plans load only on the TensorRT version and GPU model (name and compute capability) they
    were built with. Returns the visible GPU that matches (the same UUID when present), or
    None for ONNX Runtime manifests, which need no such match. `tensorrt_version` and `gpus`
    default to the running TensorRT and the visible GPUs.
    """
    if manifest.get("backend") != "tensorrt":
        return None
    built_version = manifest.get("backend_version")
    built_gpu = manifest.get("gpu") or {}
    running_version = tensorrt_version or installed_tensorrt_version()
    if gpus is None:
        gpus, _ = list_gpus()
    same_model = [
        g
        for g in gpus
        if g.name == built_gpu.get("name")
        and g.compute_capability == built_gpu.get("compute_capability")
    ]
    match = next((g for g in same_model if g.uuid == built_gpu.get("uuid")), None)
    match = match or (same_model[0] if same_model else None)
    if running_version == built_version and match is not None:
        return match
    running = "no TensorRT" if running_version is None else f"TensorRT {running_version}"
    visible = ", ".join(g.describe() for g in gpus) or "no visible GPU"
    raise EngineMismatchError(
        f"TensorRT plans of model {manifest.get('model')!r} were built with TensorRT "
        f"{built_version} for {_describe_gpu(built_gpu or None)}, but this process runs "
        f"{running} on {visible}; rebuild them here with "
        f"`driffusion build-engines --model {manifest.get('model')} --force`"
    )
