"""`driffusion bench`: the benchmarks, one module per kind, each printing side-by-side ratios."""
from __future__ import annotations

import argparse
import importlib

# benchmark -> module defining `register(subparsers)`
BENCHMARKS: dict[str, str] = {
    "speed": "bench.speed",
    "quality": "bench.quality",
    "load": "bench.load",
    "methods": "bench.methods",
    "floor": "bench.floor",
    "images": "bench.images",
    "transport": "bench.transport",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speed, quality, load and method variants side by side",
        description="Benchmarks. Each writes JSON (and a PNG where a picture helps) and prints "
        "ratios measured side by side in one run.",
    )
    benches = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            benches.add_parser(name, help="(not built yet)")
            continue
        module.register(benches)
