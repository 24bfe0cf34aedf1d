"""GPU enumeration with cuda-python: name, compute capability and UUID of each visible GPU."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# words of a marketing name that say nothing about the chip ("NVIDIA GeForce RTX 4090")
VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
# words from which on the name describes memory or form factor ("H100 80GB HBM3", "A100-SXM4")
PACKAGING_WORD = re.compile(r"^(\d+gb|hbm\d*e?|pcie|sxm\d*|nvl|mig.*|\d+c)$")


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as this process sees it (index is relative to CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    major: int
    minor: int
    uuid: str

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def arch(self) -> str:
        """`sm90` for compute capability 9.0: what a TensorRT plan and timing cache depend on."""
        return f"sm{self.major}{self.minor}"

    @property
    def key(self) -> str:
        """Directory key of this GPU's engines, e.g. `h100-sm90-1a2b3c4d`."""
        return f"{short_name(self.name)}-{self.arch}-{self.uuid.removeprefix('GPU-')[:8]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compute_capability": self.compute_capability,
            "uuid": self.uuid,
            "index": self.index,
        }

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability}, {self.uuid})"


def short_name(name: str) -> str:
    """`h100` for "NVIDIA H100 80GB HBM3", `rtx4090` for "NVIDIA GeForce RTX 4090"."""
    words = [w for w in re.split(r"[\s_\-]+", name.lower()) if w and w not in VENDOR_WORDS]
    kept: list[str] = []
    for word in words:
        if PACKAGING_WORD.match(word) and kept:
            break
        kept.append(re.sub(r"[^a-z0-9]", "", word))
    return "".join(kept)[:24] or "gpu"


def format_uuid(raw: bytes) -> str:
    """nvidia-smi's spelling of a 16-byte CUDA UUID: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    text = raw.hex()
    return f"GPU-{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:32]}"


def _cuda_runtime():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError:
            return None
    return runtime


def _error_name(runtime, error) -> str:
    _status, name = runtime.cudaGetErrorName(error)
    return name.decode() if isinstance(name, bytes) else str(error)


def list_gpus() -> tuple[list[GpuInfo], str | None]:
    """(visible GPUs, None) or ([], why there are none) -- never raises for a missing GPU."""
    runtime = _cuda_runtime()
    if runtime is None:
        return [], "cuda-python is not installed (pip install cuda-python)"
    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess:
        return [], f"no usable CUDA GPU ({_error_name(runtime, error)})"
    if count == 0:
        return [], "no CUDA GPU is visible (cudaGetDeviceCount returned 0)"
    gpus = []
    for index in range(count):
        error, props = runtime.cudaGetDeviceProperties(index)
        if error != runtime.cudaError_t.cudaSuccess:
            return [], f"cudaGetDeviceProperties({index}) failed ({_error_name(runtime, error)})"
        name = (
            props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else props.name
        )
        gpus.append(
            GpuInfo(index, name, props.major, props.minor, format_uuid(bytes(props.uuid.bytes)))
        )
    return gpus, None


def set_device(index: int) -> None:
    """Make GPU `index` current for this thread, so a TensorRT builder builds for it."""
    runtime = _cuda_runtime()
    (error,) = runtime.cudaSetDevice(index)
    if error != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaSetDevice({index}) failed: {_error_name(runtime, error)}")
