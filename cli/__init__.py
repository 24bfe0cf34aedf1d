"""The `driffusion` command line: one subcommand per stage, each module loaded only when it runs.

`driffusion --help` and `--version` import nothing heavy: the root knows each subcommand by
name and one line of help, and imports a subcommand's module (torch, diffusers, Triton...)
only when that subcommand is the one asked for.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

# subcommand -> (module defining `register(subparsers)`, one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("export.cli", "export a diffusers model to validated ONNX"),
    "build-engines": ("engines.cli",
                      "build TensorRT plans per GPU (ONNX Runtime engines on a CPU machine)"),
    "triton-repo": ("triton_models.cli",
                    "write the Triton model repository (unet_* devices, encoders, driffusion)"),
    "serve": ("triton_models.serve",
              "serve a model on Triton: builds what is missing, then runs the server"),
    "generate": ("runtime.generate",
                 "generate an image on Triton endpoints with DRiffusion (client-side sampler)"),
    "bench": ("bench.cli", "measure speed, quality, load and method variants side by side"),
    "demo": ("bench.demo", "the main job: the bundled model behind Triton, sequential vs DRiffusion"),
}


def _version() -> str:
    try:
        return metadata.version("driffusion-trt")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run `make setup`)"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `selected` subcommand's module is imported and registered."""
    parser = argparse.ArgumentParser(
        prog="driffusion",
        description="Parallel diffusion sampling (DRiffusion draft-and-refine) on ONNX Runtime, "
        "TensorRT and Triton Inference Server. `driffusion COMMAND --help` explains a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name != selected:
            subparsers.add_parser(name, help=summary)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            subparsers.add_parser(name, help=f"{summary} (unavailable: {error}; run `make setup`)")
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not hasattr(args, "run"):
        parser.error(f"`{args.command}` is unavailable here; install the project with `make setup`")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
