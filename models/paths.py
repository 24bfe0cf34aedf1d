"""Where artifacts live: ONNX exports, engines, model repositories and outputs.

Every default is relative to one root: `$DRIFFUSION_HOME` if set, else the current directory.
Flags override single paths. Nothing is ever written inside the installed package, so a
non-editable install works from any directory.
"""
from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "DRIFFUSION_HOME"


def home() -> Path:
    """The root of every default artifact path."""
    return Path(os.environ.get(HOME_VARIABLE) or ".")


def onnx_dir(model: str) -> Path:
    """Exported ONNX of `model` (`driffusion export`)."""
    return home() / "out" / "onnx" / model


def engines_root() -> Path:
    """Engines of every model: `<root>/engines/<model>/<device key>/`."""
    return home() / "engines"


def engines_dir(model: str) -> Path:
    """Engines of one model."""
    return engines_root() / model


def repository_dir() -> Path:
    """The Triton model repository that `triton-repo` and `serve` write."""
    return home() / "out" / "triton-repository"


def output_dir(*parts: str) -> Path:
    """Results of the apps: `out/demo`, `out/bench/speed`, ..."""
    return home().joinpath("out", *parts)


def source_checkout() -> Path | None:
    """The project's source checkout this code runs from, or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None
