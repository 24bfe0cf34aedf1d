"""`driffusion export`: a diffusers model (preset or folder) to validated ONNX files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.lora import Lora, parse_lora
from export.onnx_export import EXPORTERS, MIN_OPSET, ExportOptions
from export.precision import PRECISIONS, parse_network_precision
from export.presets import PRESETS, ModelSourceError, model_name
from export.specs import UnsupportedModelError
from export.validate import ValidationError
from models import paths

DEFAULT_BATCH_MAX = 8  # window 4 x 2 for classifier-free guidance pairs


def parse_size(text: str) -> int | tuple[int, int, int]:
    """`64` or `64,64,128` (min,opt,max) in image pixels."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN,OPT,MAX (integers)") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN,OPT,MAX (three integers)")
    return tuple(parts)


def network_precision_argument(text: str) -> tuple[str, str]:
    """`NETWORK=PRECISION` for --network-precision."""
    try:
        return parse_network_precision(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_precision_arguments(parser: argparse.ArgumentParser, default: str | None,
                            default_help: str) -> None:
    """--precision, --network-precision and --max-sequence-length (export, build-engines,
    serve and triton-repo): what decides each network's ONNX besides the profile."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="precision asked for; each network gets its own by the rule in README.md, "
        "'Precision per network' (bf16: SD3/Flux transformers and T5, fp16 for the rest; "
        f"SDXL's force_upcast VAE stays fp32) ({default_help})",
    )
    parser.add_argument(
        "--network-precision",
        type=network_precision_argument,
        action="append",
        default=[],
        metavar="NETWORK=PRECISION",
        help="override one network's precision, e.g. vae_decoder=fp32 (repeatable)",
    )
    parser.add_argument(
        "--lora",
        type=lora_argument,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="fuse a LoRA into the weights before export (diffusers' load_lora_weights + "
        "fuse_lora(lora_scale=SCALE), default scale 1; repeatable); the LoRA set gets exports "
        "and engines of its own, keyed by each file's sha256 and scale",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        metavar="N",
        help="T5 or LLM prompt tokens (default: the family's, as diffusers: SD3 256, "
        "Flux-dev 512, Flux-schnell 256, Flux.2, Z-Image and Qwen-Image 512; Qwen-Image's "
        "encoder takes its template's 34 dropped tokens more)",
    )


def lora_argument(text: str) -> Lora:
    """`FILE[:SCALE]` for --lora."""
    try:
        return parse_lora(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --name and --networks, shared by export and build-engines."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="SRC",
        help=f"a preset ({', '.join(PRESETS)}) or a local diffusers pipeline/model folder",
    )
    parser.add_argument(
        "--name", help="model name for output folders (default: the preset or folder name)"
    )
    parser.add_argument(
        "--networks",
        type=lambda s: [n for n in s.split(",") if n],
        default=None,
        metavar="A,B",
        help="export only these networks, e.g. unet,text_encoder (default: all)",
    )


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Exporter, opset, profile range and tolerance options, shared by export and build-engines."""
    parser.add_argument(
        "--opset", type=int, default=18, help=f"ONNX opset, >= {MIN_OPSET} (default 18)"
    )
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torch.onnx exporter: torchscript (fast) or dynamo (needs opset >= 18)",
    )
    parser.add_argument(
        "--batch-max",
        type=int,
        default=DEFAULT_BATCH_MAX,
        help="largest engine batch: window x 2 for classifier-free guidance (default 8)",
    )
    parser.add_argument(
        "--batch-opt",
        type=int,
        default=None,
        help="batch TensorRT tunes for (default 2, one CFG pair, or --batch-max if smaller)",
    )
    parser.add_argument(
        "--batch-min", type=int, default=1, help="smallest engine batch (default 1)"
    )
    parser.add_argument(
        "--height",
        type=parse_size,
        default=None,
        metavar="H|MIN,OPT,MAX",
        help="image height range in pixels (default: the model's native size)",
    )
    parser.add_argument(
        "--width",
        type=parse_size,
        default=None,
        metavar="W|MIN,OPT,MAX",
        help="image width range in pixels (default: the model's native size)",
    )
    parser.add_argument("--atol", type=float, default=None, help="validation absolute tolerance")
    parser.add_argument(
        "--rtol", type=float, default=None, help="validation tolerance relative to max|output|"
    )


def export_options(
    args: argparse.Namespace, precision: str, validate: bool = True
) -> ExportOptions:
    """ExportOptions from parsed arguments; raises ValueError naming a bad value."""
    return ExportOptions(
        precision=precision,
        opset=args.opset,
        exporter=args.exporter,
        batch_range=(args.batch_min, args.batch_opt or min(2, args.batch_max), args.batch_max),
        height=args.height,
        width=args.width,
        validate=validate,
        atol=args.atol,
        rtol=args.rtol,
        network_precisions=dict(args.network_precision),
        max_sequence_length=args.max_sequence_length,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a diffusers model to validated ONNX",
        description="Export every network of a diffusers model (text encoder, UNet/transformer, "
        "VAE decoder) to ONNX, clean the graph, and validate it against PyTorch in ONNX Runtime.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: out/onnx/<model>); reduced-precision files are named "
        "<network>.fp16.onnx / <network>.bf16.onnx",
    )
    add_precision_arguments(parser, "fp32", "default fp32")
    add_export_arguments(parser)
    parser.add_argument(
        "--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from export.onnx_export import export_model
    from export.presets import load_bundle

    try:
        options = export_options(args, args.precision, validate=not args.no_validate)
        loras = tuple(args.lora)
        name = args.name or model_name(args.model, loras)
        bundle = load_bundle(args.model, args.networks, loras)
    except (ModelSourceError, UnsupportedModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bundle.name = name
    out_dir = args.out or paths.onnx_dir(name)
    try:
        result = export_model(bundle, out_dir, options)
    except ValidationError as error:
        print(f"error: validation failed: {error}", file=sys.stderr)
        return 1
    except (ModelSourceError, UnsupportedModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"exported {len(result.networks)} network(s) of {name} ({options.precision}) to {out_dir}"
    )
    return 0
