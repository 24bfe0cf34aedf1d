"""The layering rules of docs/ARCHITECTURE.md hold on the tree, and the CLI root stays light."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "export", "engines", "runtime", "triton_models", "bench", "cli")
APPS = {"bench", "cli", "scripts"}
# package -> the project packages it must not import (imports inside functions count too)
FORBIDDEN = {
    "models": {"export", "engines", "runtime", "triton_models"} | APPS,
    "export": {"runtime", "engines", "triton_models"} | APPS,
    "engines": {"runtime", "triton_models"} | APPS,
    "runtime": {"export", "engines", "triton_models"} | APPS,
    "triton_models": APPS,
}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every absolute import in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((str(node.args[0].value), []))
    return found


def sources(*packages: str) -> list[Path]:
    return [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    breaches = [f"{path.relative_to(ROOT)} -> {module}"
                for path in sources(package) for module, _ in imports(path)
                if module.split(".")[0] in FORBIDDEN[package]]
    assert breaches == []


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (inside functions too)."""
    known = {module_name(path) for path in sources(*PACKAGES)}
    graph = {}
    for path in sources(*PACKAGES):
        targets = {f"{module}.{name}" if f"{module}.{name}" in known else module
                   for module, names in imports(path) for name in names or [""]}
        graph[module_name(path)] = (targets & known) - {module_name(path)}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the graph (its modules in order, the first repeated), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for target in sorted(graph[module]):
            circle = visit(target, path + [module])
            if circle:
                return circle
        done.add(module)
        return []

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return []


def test_no_import_circles():
    """No two modules import each other, directly or around a circle, even inside a function."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle(import_graph()) == []


def test_no_module_imports_a_private_name_of_another():
    private = [f"{path.relative_to(ROOT)}: {module}.{name}"
               for path in sources(*PACKAGES, "tests", "scripts")
               for module, names in imports(path) if module.split(".")[0] in PACKAGES
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_no_comment_cites_a_file_outside_the_repository():
    outside = re.compile(r"DESIGN\.md|REFERENCE_MODEL\.md|\.\./shared")
    citing = [f"{path.relative_to(ROOT)}:{number}"
              for path in sources(*PACKAGES, "tests", "scripts")
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if outside.search(line) and path.name != "test_layers.py"]
    assert citing == []


def test_cli_root_imports_no_heavy_module_for_help():
    code = ("import sys, cli; cli.build_parser().format_help(); "
            "print(sorted({'torch', 'diffusers', 'tritonclient', 'onnx'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
