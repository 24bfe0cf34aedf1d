"""A non-editable install runs the demo from another directory and writes nothing into itself."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_files(site: Path) -> set[str]:
    return {str(path.relative_to(site)) for path in site.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(driffusion executable, site-packages) of a fresh venv holding a plain `pip install .`;
    its dependencies come from the test's own environment through a .pth file."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-build-isolation", str(ROOT)], check=True)
    return venv / "bin" / "driffusion", site


@pytest.mark.triton
@pytest.mark.slow  # 40 s: a plain install's package data; `make demo` runs the editable install
def test_installed_package_runs_the_demo_from_another_directory(installed, tmp_path):
    driffusion, site = installed
    before = package_files(site)
    env = {key: value for key, value in os.environ.items() if key != "DRIFFUSION_HOME"}
    where = subprocess.run([str(driffusion.parent / "python"), "-c",
                            "import runtime, models; print(runtime.__file__, models.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    assert all(path.startswith(str(site)) for path in where.stdout.split())
    done = subprocess.run([str(driffusion), "demo", "--quick", "--repeat", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "out" / "demo" / "grid.png").is_file()
    assert (tmp_path / "engines" / "reference" / "cpu" / "manifest.json").is_file()
    assert package_files(site) == before  # nothing written inside the installed package
