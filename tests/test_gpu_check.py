"""The GPU check's CPU dry run: every section runs through the product and reports sane values,
so the check cannot rot; a broken section fails these tests."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.driffusion import round_pattern

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check

DRY = gpu_check.DRY


def run_check(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def load_report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def tritonservers_in(folder_prefix: str) -> list[str]:
    """Command lines of running tritonserver processes whose arguments name `folder_prefix`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "tritonserver" in text and folder_prefix in text:
            found.append(text)
    return found


# the dry run takes a minute: its tests are slow-marked (make test-all; run them before a GPU
# session with `make gpu-check GPU_CHECK_ARGS=--dry-run` too)
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """One full dry run in a subprocess, as `make gpu-check GPU_CHECK_ARGS=--dry-run` runs it."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    pytest.importorskip("tritonclient.grpc")
    out = tmp_path_factory.mktemp("gpu_check")
    done = run_check(out, "--dry-run", "--sizes", "sd15,sdxl")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"report": load_report(out), "log": (out / "gpu_check.log").read_text(),
            "summary": (out / "gpu_check.md").read_text(), "out": out}


def result(dry_run: dict, section: str) -> dict:
    record = dry_run["report"]["sections"][section]
    assert record["status"] == "ok", record
    return record["result"]


@pytest.mark.triton
@pytest.mark.slow
def test_dry_run_runs_every_section_and_stops_its_server(dry_run):
    report = dry_run["report"]
    assert report["dry_run"] is True
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, record in report["sections"].items():
        assert record["status"] in ("ok", "skipped"), (name, record)
        assert record["seconds"] >= 0 and f"== {name}" in dry_run["log"]
    assert report["sections"]["layouts"]["status"] == report["sections"]["sizes"]["status"] == "ok"
    serving = report["serving"]
    assert serving["size"] == "tiny" and serving["backend"] == "onnxruntime"
    assert "no usable CUDA GPU" in serving["why"] or "TensorRT" in serving["why"], serving["why"]
    assert "CPU" in serving["note"] and "no TensorRT plan" in serving["engines"]
    assert {"unet_cpu0", "driffusion"} <= set(serving["models"])
    assert (dry_run["out"] / "tritonserver.log").is_file()
    assert not tritonservers_in("gpu_check_"), "the check left its tritonserver running"


@pytest.mark.triton
@pytest.mark.slow
def test_environment_names_machine_and_missing_gpu(dry_run):
    env = result(dry_run, "environment")
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch"].split("+")[0].count(".") == 2
    assert env["cuda_available"] is False and env["gpus"] == [] and env["no_gpu_reason"]
    assert (env["tensorrt"] is None) == (importlib.util.find_spec("tensorrt") is None)
    assert Path(env["tritonserver"]).is_file()


@pytest.mark.triton
@pytest.mark.slow
def test_unet_latency_per_batch_served(dry_run):
    unet = result(dry_run, "unet")
    assert unet["model"] == "unet_cpu0" and unet["backend"] == "onnxruntime"
    assert list(unet["batches"]) == [str(batch) for batch in DRY.batches]
    for entry in unet["batches"].values():
        assert len(entry["all_ms"]) == DRY.repeats
        assert 0 < entry["min_ms"] <= entry["median_ms"] < 10_000


def assert_versus(entry: dict) -> None:
    """Sequential and aggressive window 4 with CFG were both timed, and the speedup is theirs."""
    assert entry["sequential_ms"] > 0 and entry["aggressive_w4_ms"] > 0
    assert entry["speedup"] == pytest.approx(entry["sequential_ms"] / entry["aggressive_w4_ms"],
                                             abs=2e-3)


@pytest.mark.triton
@pytest.mark.slow
def test_layouts_serve_both_one_gpu_layouts_and_name_the_fastest(dry_run):
    from triton_models.repository import GPU_LAYOUTS

    layouts = result(dry_run, "layouts")
    assert layouts["backend"] == "onnxruntime" and layouts["devices"] == 4
    assert list(layouts["layouts"]) == list(GPU_LAYOUTS)
    for entry in layouts["layouts"].values():
        assert_versus(entry)
    # batched: one device model takes each round as one call; instances: 4 device models
    assert [m for m in layouts["layouts"]["batched"]["models"] if m.startswith("unet_")] == [
        "unet_cpu0"]
    assert {f"unet_cpu{i}" for i in range(4)} <= set(layouts["layouts"]["instances"]["models"])
    assert layouts["fastest"] == min(
        GPU_LAYOUTS, key=lambda name: layouts["layouts"][name]["aggressive_w4_ms"])


@pytest.mark.triton
@pytest.mark.slow
def test_sizes_time_sd15_and_scaled_down_sdxl(dry_run):
    sizes = result(dry_run, "sizes")
    assert sizes["backend"] == "onnxruntime" and list(sizes["sizes"]) == ["sd15", "sdxl"]
    sd15, sdxl = sizes["sizes"]["sd15"], sizes["sizes"]["sdxl"]
    assert "error" not in sd15 and "error" not in sdxl, sizes
    assert (sd15["model"], sdxl["model"]) == ("tiny", "tiny-xl")  # a dry run: both tiny
    assert sd15["scaled_down"] is False and sdxl["scaled_down"] is False
    for entry in (sd15, sdxl):
        assert_versus(entry)
        assert entry["seconds"] > 0
    assert "tritonserver-tiny-xl.log" in {p.name for p in dry_run["out"].iterdir()}


def test_sdxl_size_is_sdxl_shaped_and_marked_scaled_down():
    for size in ("sdxl", "tiny-xl"):
        config = gpu_check.SIZES[size]
        unet, first, second = config["unet"], config["clip"], config["clip2"]
        assert unet["addition_embed_type"] == "text_time" and second["projection_dim"] > 0
        assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
        assert unet["projection_class_embeddings_input_dim"] == (
            second["projection_dim"] + 6 * unet["addition_time_embed_dim"])
    assert gpu_check.TINY_OF == {"sd15": "tiny", "sdxl": "tiny-xl"}


@pytest.mark.triton
@pytest.mark.slow
def test_driffusion_runs_match_the_method(dry_run):
    driffusion = result(dry_run, "driffusion")
    runs = driffusion["runs"]
    assert driffusion["steps"] == DRY.steps and "truncated" not in driffusion
    assert [(run["cfg"], run["mode"], run["window"]) for run in runs] == [
        (cfg, mode, window) for cfg in (False, True)
        for mode, window in [("sequential", 1)] + [("aggressive", w) for w in DRY.windows]]
    for run in runs:
        pattern = round_pattern(run["mode"], run["window"], DRY.steps)
        assert run["rounds"] == len(pattern) and run["evaluations"] == sum(pattern)
        assert run["ms"] > 0 and len(run["all_ms"]) == DRY.repeats and run["speedup"] > 0
        # the UNet's share is measured, so the rest per round is a fraction of a round's time
        assert abs(run["overhead_ms_per_round"]) < run["ms"] / run["rounds"]
        if run["mode"] == "sequential":
            assert run["speedup"] == 1.0 and run["max_pixel_diff_vs_sequential"] == 0
        else:  # drafts from a stale guide: close to sequential, not equal bit for bit
            assert run["max_pixel_diff_vs_sequential"] < 64
        if not run["cfg"]:
            assert run["max_pixel_diff_vs_plain_sequential"] == run["max_pixel_diff_vs_sequential"]
    cfg_sequential = next(run for run in runs if run["cfg"] and run["mode"] == "sequential")
    assert cfg_sequential["max_pixel_diff_vs_plain_sequential"] > 0, "GUIDANCE 7.5 was ignored"


@pytest.mark.triton
@pytest.mark.slow
def test_tensorrt_builds_plans_or_says_why_not(dry_run):
    record = dry_run["report"]["sections"]["tensorrt"]
    if importlib.util.find_spec("tensorrt") is None:
        assert record["status"] == "skipped" and record["result"]["present"] is False
        assert "TensorRT is not installed" in record["reason"]
    else:
        assert record["status"] in ("ok", "skipped") and record["result"]["present"] is True


@pytest.mark.triton
@pytest.mark.slow
def test_summary_tables_every_measurement(dry_run):
    summary, report = dry_run["summary"], dry_run["report"]
    assert "| batch | unet_cpu0 ms |" in summary
    assert "| batched | 4 devices |" in summary and "| instances | 4 devices |" in summary
    assert "| sdxl | tiny-xl |" in summary and "layouts: ok" in summary
    runs = report["sections"]["driffusion"]["result"]["runs"]
    assert summary.count("| aggressive |") == sum(run["mode"] == "aggressive" for run in runs)
    assert "onnxruntime engines (the device models run ONNX Runtime on the CPU" in summary
    assert "tensorrt: skipped" in summary or "tensorrt: ok" in summary


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
    assert "unet: error RuntimeError: boom" in (tmp_path / "gpu_check.md").read_text()


def test_exhausted_budget_skips_sections(tmp_path):
    code = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "1",
                           "--sections", "driffusion"])
    record = load_report(tmp_path)["sections"]["driffusion"]
    assert code == 0
    assert record["status"] == "skipped" and record["reason"].startswith("budget")


def test_no_gpu_says_so_and_suggests_dry_run(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "no CUDA GPU found" in message and "--dry-run" in message


@pytest.mark.parametrize("args, expected", [
    (["--sections", "unet,bogus"], "unknown section(s) bogus"),
    (["--budget-s", "0"], "must be an integer >= 1"),
    (["--devices", "0"], "must be an integer >= 1"),
    (["--backend", "cuda"], "invalid choice: 'cuda'"),
    (["--sizes", "sd15,sd3"], "unknown size(s) sd3"),
])
def test_bad_options_name_what_is_allowed(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), *args])
    assert expected in capsys.readouterr().err


def test_gpu_run_calls_the_check_with_flags_it_accepts(tmp_path):
    script = (ROOT / "scripts" / "gpu_run.sh").read_text()
    assert 'scripts/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET_S"' in script
    args = gpu_check.parse_args(["--out", str(tmp_path), "--budget-s", "240", "--dry-run"])
    assert args.budget_s == 240 and args.sections == gpu_check.SECTIONS


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
