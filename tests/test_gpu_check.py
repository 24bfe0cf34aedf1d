"""The GPU check's CPU dry run: every section runs and reports sane values, so it cannot rot."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check

from runtime.driffusion import round_pattern

DRY = gpu_check.DRY


def run_check(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )


def load_report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    done = run_check(out, "--dry-run", "--sections", "environment,unet,driffusion,tensorrt")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"report": load_report(out), "log": (out / "gpu_check.log").read_text(),
            "summary": (out / "gpu_check.md").read_text()}


def test_dry_run_records_every_requested_section(dry_run):
    report = dry_run["report"]
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert list(report["sections"]) == ["environment", "unet", "driffusion", "tensorrt"]
    for name, record in report["sections"].items():
        assert record["status"] in ("ok", "skipped"), (name, record)
        assert record["seconds"] >= 0
        assert f"== {name}" in dry_run["log"]


def test_summary_tables_every_measurement(dry_run):
    summary = dry_run["summary"]
    runs = dry_run["report"]["sections"]["driffusion"]["result"]["runs"]
    assert "| batch | eager ms | CUDA graph ms |" in summary
    assert summary.count("| aggressive |") == sum(run["mode"] == "aggressive" for run in runs)
    assert "tensorrt: skipped" in summary or "tensorrt: ok" in summary


def test_environment_names_versions(dry_run):
    result = dry_run["report"]["sections"]["environment"]["result"]
    assert result["python"] == ".".join(map(str, sys.version_info[:3]))
    assert result["torch"].split("+")[0].count(".") == 2
    assert result["cuda_available"] is False
    assert result["packages"]["diffusers"]
    assert result["tensorrt_present"] == (importlib.util.find_spec("tensorrt") is not None)


def test_unet_latency_per_batch(dry_run):
    result = dry_run["report"]["sections"]["unet"]["result"]
    assert list(result["batches"]) == [str(batch) for batch in DRY.batches]
    for entry in result["batches"].values():
        assert len(entry["eager"]["all_ms"]) == DRY.repeats
        assert 0 < entry["eager"]["min_ms"] <= entry["eager"]["median_ms"]
        assert entry["images_per_s_eager"] > 0
    assert result["parameters_m"] > 0.1
    assert result["cuda_graphs"] is False
    assert "CUDA device" in result["cuda_graph_error"]


def test_driffusion_runs_match_the_method(dry_run):
    result = dry_run["report"]["sections"]["driffusion"]["result"]
    runs = result["runs"]
    assert len(runs) == 2 * (1 + len(DRY.windows))
    for run in runs:
        pattern = round_pattern(run["mode"], run["window"], DRY.steps)
        assert run["rounds"] == run["unet_calls"] == len(pattern)
        assert run["max_rows_per_call"] == max(pattern) * (2 if run["cfg"] else 1)
        assert run["seconds"] > 0 and run["speedup_vs_sequential"] > 0 and run["finite"]
        if run["mode"] == "sequential":
            assert run["speedup_vs_sequential"] == 1.0
        else:
            # Drafts from a stale guide differ from sequential, but only by a fraction.
            assert 0 < run["max_abs_diff_vs_sequential"] < run["sequential_abs_max"]
    assert {run["cfg"] for run in runs} == {False, True}


def test_tensorrt_reported_present_or_absent(dry_run):
    record = dry_run["report"]["sections"]["tensorrt"]
    if importlib.util.find_spec("tensorrt") is None:
        assert record["status"] == "skipped"
        assert record["result"] == {"present": False}
        assert "absent" in record["reason"]
    else:
        assert record["result"]["present"] is True


def test_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(check):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "unet", broken)
    code = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--sections", "unet,environment"])
    report = load_report(tmp_path)
    assert code == 1
    assert report["sections"]["unet"]["status"] == "error"
    assert report["sections"]["unet"]["error"] == "RuntimeError: boom"
    assert report["sections"]["environment"]["status"] == "ok"


def test_exhausted_budget_skips_sections(tmp_path):
    code = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "0.5",
                           "--sections", "triton"])
    record = load_report(tmp_path)["sections"]["triton"]
    assert code == 0
    assert record["status"] == "skipped" and record["reason"].startswith("budget")


def test_no_gpu_says_so_and_suggests_dry_run(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "no CUDA GPU found" in message and "--dry-run" in message


@pytest.mark.parametrize("args, expected", [
    (["--sections", "unet,bogus"], "unknown section(s) bogus"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--triton-instances", "0"], "--triton-instances must be >= 1"),
])
def test_bad_options_name_what_is_allowed(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), *args])
    assert expected in capsys.readouterr().err


def test_triton_model_config_is_valid_protobuf_text():
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    text = gpu_check.model_config("unet_gpu0", gpu_check.FULL, "cuda", 3, cuda_graphs=True)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.instance_group[0].count == 3
    assert [tensor.name for tensor in config.input] == list(gpu_check.UNET_IO_NAMES)
    assert list(config.input[0].dims) == [-1, 4, 64, 64]
    assert list(config.input[2].dims) == [-1, 77, 768]
    assert json.loads(config.parameters["unet_config"].string_value) == gpu_check.SD15_UNET


def test_triton_warm_up_covers_every_row_count_of_the_full_run():
    assert gpu_check.triton_rows(gpu_check.FULL, lanes=2) == [1, 2, 4, 8, 16]
    assert gpu_check.triton_rows(gpu_check.FULL, lanes=3) == [1, 2, 3, 4, 6, 8, 16]


def test_stub_environment_exposes_this_sys_path(tmp_path):
    gpu_check.write_stub_environment(tmp_path / "env")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    pth = tmp_path / "env" / "lib" / version / "site-packages" / "gpu_check.pth"
    assert str(ROOT) in pth.read_text().splitlines()
    assert (tmp_path / "env" / "bin" / "python3").resolve().is_file()
    assert "include-system-site-packages = false" in (tmp_path / "env" / "pyvenv.cfg").read_text()


def triton_available() -> str | None:
    try:
        gpu_check.locate_triton()
    except gpu_check.SkipSection as reason:
        return str(reason)
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed"
    return None


def stray_servers(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "tritonserver" in text and marker in text:
            found.append(text)
    return found


@pytest.mark.triton
@pytest.mark.skipif(triton_available() is not None, reason=str(triton_available()))
def test_dry_run_through_a_real_triton_server(tmp_path):
    done = run_check(tmp_path, "--dry-run", "--sections", "driffusion,triton", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    record = load_report(tmp_path)["sections"]["triton"]
    assert record["status"] == "ok", record
    result = record["result"]
    assert result["model"] == "unet_cpu0" and result["instances"] == DRY.triton_instances
    assert set(result["call_latency"]) == {"1", str(2 * max(DRY.windows))}
    runs = result["runs"]
    assert len(runs) == 2 * (1 + 2 * len(DRY.windows))
    for run in runs:
        rounds = round_pattern(run["mode"], run["window"], DRY.steps)
        assert run["rounds"] == len(rounds) and run["finite"]
        if run["mode"] == "sequential":
            # Same seeded UNet, same device: Triton must reproduce the in-process result.
            assert run["max_abs_diff_vs_in_process"] < 1e-4
        elif run["placement"] == "spread":
            lanes = DRY.triton_instances
            assert run["requests"] == sum(min(items, lanes) for items in rounds)
        else:
            assert run["requests"] == len(rounds)
    assert not stray_servers("gpu_check_triton_")


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".whl").is_dir(), reason="no .whl/ folder of carried wheels")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_rehearsal_installs_carried_wheels(tmp_path):
    site, out = tmp_path / "site", tmp_path / "out"
    env = dict(os.environ, PY=sys.executable, SITE=str(site), BUDGET_S="60",
               GPU_CHECK_ARGS="--dry-run --sections environment")
    done = subprocess.run(["bash", "scripts/gpu_run.sh", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (site / "diffusers").is_dir() and (site / "tritonclient").is_dir()
    if (ROOT / ".whl" / "triton-min.tar.xz").is_file():
        assert (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file()
    assert "gpu_check.py exited with 0" in (out / "gpu_run.log").read_text()
    assert load_report(out)["sections"]["environment"]["status"] == "ok"
