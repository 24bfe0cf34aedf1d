"""Helpers shared by the python-backend models (light: no torch, importable without the stub).

The model sources in `templates/` run inside `triton_python_backend_stub`; what does not need
`triton_python_backend_utils` lives in importable modules so that it is tested in-process.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt as plain strings (from initialize's args)."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def version_dir(args: Mapping[str, str]) -> Path:
    """The model version directory (where the repository generator put the model's files)."""
    return Path(args["model_repository"]) / str(args["model_version"])
