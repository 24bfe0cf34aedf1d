"""What an engine build is asked (`BuildRequest`), finds exported (`ExportedOnnx`) and gives
(`BuildOutcome`): the records shared by every backend's builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.manifest import EngineSet, load_engines
from export.lora import Lora
from export.onnx_export import ExportOptions
from models import paths

GPU_PRECISION = "fp16"  # what GPU engines are built at unless another precision is asked


@dataclass(frozen=True)
class BuildRequest:
    """Everything `build-engines` needs to know."""

    source: str
    name: str
    engines_root: Path = field(default_factory=paths.engines_root)
    onnx_dir: Path | None = None
    backend: str = "auto"
    # the precision asked for (each network gets its own, export/precision.py); None: fp16 for
    # GPU engines, fp32 for ONNX Runtime CPU engines
    precision: str | None = None
    optimization_level: int = 3
    force: bool = False
    networks: tuple[str, ...] = ()
    export: ExportOptions = field(default_factory=ExportOptions)
    loras: tuple[Lora, ...] = ()  # fused into the source's weights before export

    @property
    def export_dir(self) -> Path:
        return self.onnx_dir or paths.onnx_dir(self.name)


@dataclass
class BuildOutcome:
    """What was built, what was kept, and the one-line summary printed for it."""

    backend: str
    directories: list[Path]
    built: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    summary: str = ""

    def engine_sets(self) -> list[EngineSet]:
        return [
            s for s in load_engines(self.directories[0].parent) if s.directory in self.directories
        ]


@dataclass(frozen=True)
class ExportedOnnx:
    """One exported network as recorded in export.json, with the file's current sha256."""

    name: str
    path: Path
    sha256: str
    precision: str  # this network's, as exported
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profile: dict[str, Any]
    model_class: str = ""
    torch_only: bool = False  # served by torch on every backend: `path` holds its weights
