"""`driffusion build-engines`: TensorRT plans for every GPU here, or ONNX Runtime CPU engines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.build import BACKEND_CHOICES, EngineBuildError, build_engines
from engines.build_types import BuildRequest
from engines.tensorrt_build import OPTIMIZATION_LEVELS
from export.cli import (
    add_export_arguments,
    add_model_arguments,
    add_precision_arguments,
    export_options,
)
from export.presets import ModelSourceError, model_name
from export.specs import UnsupportedModelError
from export.validate import ValidationError
from models import paths


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-engines",
        help="build TensorRT plans per GPU (or ONNX Runtime engines on a CPU machine)",
        description="Export the model to ONNX if needed, then build one TensorRT plan per network "
        "for every visible GPU (engines/<model>/<gpu-key>/) with a manifest.json. Without "
        "TensorRT or a GPU, build ONNX Runtime CPU engines (engines/<model>/cpu/) instead. "
        "--backend torch (auto's choice on a GPU without TensorRT) saves the denoiser for PyTorch "
        "(FP16 or BF16 + CUDA graphs on a GPU, FP32 on the CPU) in "
        "engines/<model>/torch-<gpu-key|cpu>/, with ONNX Runtime engines for the text encoders "
        "and the VAE decoder. "
        "Engines whose manifest entry matches are kept; anything that differs is rebuilt.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DIR",
        help="exported ONNX folder, filled by an export if missing (default: out/onnx/<model>)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=paths.engines_root(),
        metavar="DIR",
        help="engine root; engines go to DIR/<model>/<device-key>/ (default: engines)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="auto: TensorRT where TensorRT and a GPU exist, torch where a GPU exists without "
        "TensorRT, else ONNX Runtime (default auto)",
    )
    add_precision_arguments(
        parser, None, "default: fp16 for TensorRT plans and the torch denoiser on a GPU, fp32 "
        "for ONNX Runtime CPU engines, which cannot run bf16; torch on the CPU is always fp32",
    )
    parser.add_argument(
        "--opt-level",
        type=int,
        default=3,
        choices=list(OPTIMIZATION_LEVELS),
        help="TensorRT builder optimisation level 0-5 (default 3)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even up-to-date engines")
    add_export_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        request = BuildRequest(
            source=args.model,
            name=args.name or model_name(args.model, tuple(args.lora)),
            engines_root=args.out,
            onnx_dir=args.onnx,
            backend=args.backend,
            precision=args.precision,
            optimization_level=args.opt_level,
            force=args.force,
            networks=tuple(args.networks or ()),
            export=export_options(args, "fp32"),  # build_engines sets the precision
            loras=tuple(args.lora),
        )
        build_engines(request)
    except ValidationError as error:
        print(f"error: validation failed: {error}", file=sys.stderr)
        return 1
    except EngineBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ModelSourceError, UnsupportedModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
