"""The `driffusion` command line: one subcommand per stage of the pipeline."""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

# subcommand -> module that defines `register(subparsers)`; imported lazily so that
# `driffusion --help` stays fast and a missing optional dependency only breaks its command.
SUBCOMMANDS: dict[str, str] = {
    "export": "export.cli",
    "build-engines": "engines.cli",
    "triton-repo": "triton_models.cli",
    "serve": "triton_models.serve",
    "generate": "runtime.generate",
    "bench": "runtime.bench",
    "demo": "runtime.demo",
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _version() -> str:
    try:
        return metadata.version("driffusion-trt")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run `make setup`)"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driffusion",
        description="Parallel diffusion sampling (DRiffusion draft-and-refine) on ONNX Runtime, "
        "TensorRT and Triton Inference Server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if selected is not None and name != selected:
            subparsers.add_parser(name, help=f"(see `driffusion {name} --help`)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            reason = "not built yet" if error.name == module_name else f"unavailable: {error}"
            subparsers.add_parser(name, help=f"({reason}; run `make setup`)")
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
