"""`driffusion triton-repo`: write the Triton model repository for a model's engines."""
from __future__ import annotations

import argparse
import sys

from triton_models.repository import write_repository
from triton_models.serve import (
    add_repository_arguments,
    build_arguments,
    options_from_args,
    prepare_model,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "triton-repo",
        help="write the Triton model repository (unet_* devices, text_encoder, driffusion)",
        description="Write a Triton model repository from a model's engines and manifests: "
        "unet_cpu<i> (ONNX Runtime, python backend) or unet_gpu<i> (TensorRT plan, or a torch "
        "engine with --backend torch, on GPU i), "
        "text_encoder, vae_decoder, the driffusion pipeline model; or the closed-form unet_sim "
        "with --model sim.",
    )
    add_repository_arguments(parser)
    parser.set_defaults(run=run_triton_repo)


def run_triton_repo(args: argparse.Namespace) -> int:
    try:
        options = prepare_model(options_from_args(args), **build_arguments(args))
        repository = write_repository(args.repository, options)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {repository.path}")
    for name in repository.models:
        print(f"  {name}")
    return 0
