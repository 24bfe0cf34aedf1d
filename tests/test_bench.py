"""The speed and quality benchmarks on tiny settings: timings, derived ratios, targets, outputs."""
from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest
import torch

from bench.quality import QualitySetup, check_target, make_denoiser
from bench.quality import run_benchmark as run_quality
from bench.speed import (
    BackendResult,
    SpeedSetup,
    Timings,
    build_records,
    check_targets,
    cores_obtained,
    denoiser_row_shapes,
    encode_condition,
    format_backend,
    format_targets,
    local_pipeline,
    onnx_call_ms,
    plot,
    time_runs,
)
from bench.speed import run_benchmark as run_speed
from models.reference import EMPTY_PROMPT, SCHEDULER_CONFIG, load_reference, prompt_for
from models.sim import SimDiffusion
from models.tensors import ENCODER_HIDDEN_STATES
from runtime.driffusion import round_pattern
from runtime.guidance import Conditioning
from runtime.local_devices import LocalDevice
from runtime.pool import DevicePool

SIM = SimDiffusion.from_scheduler_config(SCHEDULER_CONFIG)


def sleeping_sim(latency_s: float):
    def denoise(sample, timestep, context):
        time.sleep(latency_s)
        return SIM.denoise(sample, timestep, context)

    return denoise


def sim_pool(lanes: int, latency_s: float) -> DevicePool:
    return DevicePool([LocalDevice.from_function(f"sim{i}", sleeping_sim(latency_s))
                       for i in range(lanes)])


LABEL_3 = Conditioning({ENCODER_HIDDEN_STATES: SIM.encode(np.array([3]))},
                       {ENCODER_HIDDEN_STATES: SIM.encode(np.array([10]))}, 1.0)


# ---------------------------------------------------------------------------------------------
# speed


def test_time_runs_counts_the_method_rounds_and_parallel_rounds_pay_off():
    setup = SpeedSetup(steps=8, windows=(1, 2), repeat=1, sim_latency_ms=10.0)
    timings = asyncio.run(time_runs(sim_pool(2, 0.01), LABEL_3, setup))
    assert set(timings.seconds) == set(setup.runs())
    for mode, window in setup.runs():
        assert timings.rounds[(mode, window)] == len(round_pattern(mode, window, 8))
    records = build_records("sim-local", setup, 2, timings, lambda rows: 10.0)
    aggressive = next(r for r in records if (r.mode, r.window) == ("aggressive", 2))
    assert aggressive.ideal_speedup == pytest.approx(8 / 5)
    assert aggressive.speedup > 1.2 and 0.75 < aggressive.efficiency <= 1.15
    assert aggressive.overhead_ms_per_round == pytest.approx(aggressive.ms_per_round - 10.0)
    assert aggressive.cpu_ms_per_step > 0


def synthetic_timings(seconds: dict, steps: int) -> Timings:
    timings = Timings(seconds={key: [value] for key, value in seconds.items()})
    for (mode, window), value in seconds.items():
        timings.rounds[(mode, window)] = len(round_pattern(mode, window, steps))
        timings.cpu_seconds[(mode, window)] = value
        timings.client_cpu_seconds[(mode, window)] = 0.0
    return timings


def test_build_records_derives_speedup_ideal_efficiency_and_batched_calls():
    setup = SpeedSetup(steps=20, windows=(4,), modes=("aggressive",), guidance=1.5)
    timings = synthetic_timings({("sequential", 1): 2.0, ("aggressive", 4): 1.0}, 20)
    records = build_records("cpu", setup, 2, timings, lambda rows: float(rows))
    sequential, aggressive = records
    assert (sequential.speedup, sequential.efficiency) == (1.0, 1.0)
    assert aggressive.rounds == 6 and aggressive.ideal_speedup == pytest.approx(20 / 6)
    assert aggressive.speedup == pytest.approx(2.0)
    assert aggressive.efficiency == pytest.approx(2.0 / (20 / 6))
    # window 4 on 2 lanes: two items per call, each a cond/uncond pair (guidance 1.5)
    assert aggressive.items_per_call == 2
    # rounds [1, 4, 4, 4, 4, 3]: the largest call holds 1, then 2 items of 2 rows
    assert aggressive.model_ms_per_round == pytest.approx((2 + 4 * 5) / 6)
    assert aggressive.cores_busy == pytest.approx(1.0)


def test_build_records_refuses_rounds_that_differ_from_the_method():
    setup = SpeedSetup(steps=10, windows=(2,), modes=("aggressive",))
    timings = synthetic_timings({("sequential", 1): 1.0, ("aggressive", 2): 0.6}, 10)
    timings.rounds[("aggressive", 2)] = 10
    with pytest.raises(RuntimeError, match="counted 10 rounds, the method has 6"):
        build_records("sim", setup, 2, timings, lambda rows: 1.0)


def backend_result(backend: str, seconds: dict, lanes: int = 4) -> BackendResult:
    setup = SpeedSetup(steps=50, windows=(2, 4), modes=("aggressive",))
    records = build_records(backend, setup, lanes, synthetic_timings(seconds, 50),
                            lambda rows: 20.0)
    return BackendResult(backend, "test", lanes, {1: 20.0}, records, load_before=[1.0] * 3,
                         load_after=[1.0] * 3, cores_obtained=1.1)


def test_targets_are_checked_where_measured():
    setup = SpeedSetup(steps=50, windows=(2, 4), modes=("aggressive",))
    sim = backend_result("sim", {("sequential", 1): 1.0, ("aggressive", 2): 0.53,
                                 ("aggressive", 4): 0.29})
    cpu = backend_result("cpu", {("sequential", 1): 1.0, ("aggressive", 2): 0.8,
                                 ("aggressive", 4): 0.5}, lanes=2)
    sim_target, cpu_target = check_targets([sim, cpu], setup)
    assert sim_target["value"] == pytest.approx((1 / 0.29) / (50 / 14)) and sim_target["met"]
    assert cpu_target["value"] == pytest.approx(1.25) and not cpu_target["met"]
    text = format_targets([sim_target, cpu_target])
    assert "0.97 met" in text and "1.25x MISSED" in text and "got 1.10 of" in text
    assert check_targets([cpu], SpeedSetup(windows=(1,))) == [cpu_target]
    assert "items/call" in format_backend(cpu, setup)


def test_server_goals_count_ms_above_the_set_device_latency():
    setup = SpeedSetup(steps=50, windows=(2, 4), modes=("aggressive",))
    server = backend_result("server", {("sequential", 1): 1.1, ("aggressive", 2): 0.6,
                                       ("aggressive", 4): 0.42})
    efficiency, sequential, aggressive = check_targets([server], setup)
    assert "efficiency" in efficiency["name"]
    # 1.1 s / 50 rounds = 22 ms per round: 2 ms above the 20 ms devices, at the goal
    assert sequential["value"] == pytest.approx(2.0) and sequential["met"]
    assert aggressive["value"] == pytest.approx(420 / 14 - 20) and not aggressive["met"]
    assert "<= 3" in aggressive["name"] and "window 4" in aggressive["name"]


def test_plot_writes_a_png(tmp_path):
    setup = SpeedSetup(steps=50, windows=(2, 4), modes=("aggressive",))
    result = backend_result("sim", {("sequential", 1): 1.0, ("aggressive", 2): 0.53,
                                    ("aggressive", 4): 0.29})
    plot([result], setup, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cores_obtained_is_at_most_the_workers():
    cores = cores_obtained(1, seconds=0.2)
    assert 0.0 < cores <= 1.1


@pytest.mark.triton
@pytest.mark.slow  # 30 s; the bench's parts are tested on their own (floor, quality, load)
def test_speed_bench_on_unet_sim_client_and_server_paths_writes_json(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    setup = SpeedSetup(steps=6, windows=(1, 2), repeat=1, sim_latency_ms=10.0)
    run_speed(setup, ["sim", "server"], tmp_path)
    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report) == {"setup", "machine", "backends", "targets"}
    sim, server = report["backends"]
    for backend in (sim, server):
        assert backend["lanes"] == 2 and 0 < backend["cores_obtained"]
        assert {(r["mode"], r["window"]) for r in backend["records"]} == set(setup.runs())
        aggressive = next(r for r in backend["records"]
                          if (r["mode"], r["window"]) == ("aggressive", 2))
        # rounds as the method counts them: the pool's count (sim), the ROUNDS output (server)
        assert aggressive["rounds"] == 4 and aggressive["ideal_speedup"] == pytest.approx(1.5)
        assert 0.5 < aggressive["efficiency"] <= 1.2
        # what the devices took, from Triton's statistics: at least their 10 ms sleep
        assert 10.0 <= aggressive["model_ms_per_round"] < 15.0
        assert aggressive["ms_per_round"] > aggressive["model_ms_per_round"]
        assert aggressive["overhead_ms_per_round"] > 0
        assert aggressive["device_calls_per_run"] == 6  # one call per model evaluation
    assert [b["backend"] for b in report["backends"]] == ["sim", "server"]
    for backend in (sim, server):  # this process's CPU over the run's device calls
        assert all(0 < r["client_cpu_ms_per_call"] < 50 for r in backend["records"])
    assert "over http" in sim["description"]  # the client path's default transport
    names = [target["name"] for target in report["targets"]]
    assert len(names) == 2 and "server, sequential window 1" in names[0]  # window 4 not run
    assert "client CPU per device call" in names[1]
    assert not report["targets"][0]["setting_matches"]  # 10 ms and 6 steps, not 20 and 50
    assert not [pid for pid in _process_ids() if str(tmp_path) in _cmdline(pid)]


@pytest.mark.triton
def test_floor_bench_measures_bls_grpc_sampler_and_sleep(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from bench.floor import FloorSetup, format_report
    from bench.floor import run_benchmark as run_floor

    report = run_floor(FloorSetup(latency_ms=2.0, calls=2, rounds=3, repeat=1, guard=True),
                       tmp_path)
    assert json.loads((tmp_path / "floor.json").read_text()) == report
    kinds = [(r["path"], r["calls_per_round"]) for r in report["records"]]
    clients = ("grpc", "http", "grpc-guard", "http-guard")
    assert kinds == [("bls", 1), ("bls", 1), ("bls", 2), ("bls", 2),
                     *((client, calls) for calls in (1, 2) for client in clients),
                     ("sampler", 1), ("sampler", 2), ("sleep", 1)]
    for record in report["records"]:
        if record["path"] in ("bls", *clients):  # a real call costs more than its sleep
            assert 0 < record["ms_per_round"] < 1000
        if record["path"] in (*clients, "sampler"):
            assert record["cpu_ms_per_call"] > 0
    assert "is_cancelled() each round" in format_report(report)
    assert not [pid for pid in _process_ids() if str(tmp_path) in _cmdline(pid)]


@pytest.fixture(scope="module")
def reference_engines():
    from bench.common import ensure_reference_engines

    return ensure_reference_engines(lambda line: None)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_speed_bench_encodes_the_prompt_once_with_the_reference_engines(
        reference_engines, reference, guidance):
    """cpu-local: the engines' tokenizer and ONNX text encoder give the torch model's states
    for "a handwritten three" (the empty prompt as the negative, with guidance only)."""
    pool = DevicePool([LocalDevice.from_onnx(reference_engines.path("unet"))])
    pipeline = local_pipeline(reference_engines, pool)
    conditioning = asyncio.run(encode_condition(pipeline, 3, guidance))
    expected = reference.encode_prompts([prompt_for(3)]).numpy()
    np.testing.assert_allclose(conditioning.cond[ENCODER_HIDDEN_STATES], expected, atol=1e-4)
    if guidance == 1.0:
        assert conditioning.uncond is None
    else:
        np.testing.assert_allclose(conditioning.uncond[ENCODER_HIDDEN_STATES],
                                   reference.encode_prompts([EMPTY_PROMPT]).numpy(), atol=1e-4)
    shapes = denoiser_row_shapes(pipeline.spec)
    assert shapes == {"sample": (1, 8, 8), "encoder_hidden_states": (77, 16)}
    assert onnx_call_ms(reference_engines.path("unet"), 1, shapes)(2) > 0
    setup = SpeedSetup(steps=4, windows=(2,), repeat=1)
    timings = asyncio.run(time_runs(pool, conditioning, setup, latent_shape=(1, 8, 8),
                                    scheduler_config=pipeline.spec.scheduler_config))
    assert timings.rounds[("aggressive", 2)] == len(round_pattern("aggressive", 2, 4))


@pytest.mark.slow
@pytest.mark.triton
def test_speed_bench_on_the_reference_engines_behind_triton(tmp_path):
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    setup = SpeedSetup(steps=4, windows=(2,), modes=("aggressive",), repeat=1)
    run_speed(setup, ["cpu", "cpu-local"], tmp_path)
    report = json.loads((tmp_path / "speed.json").read_text())
    for backend in report["backends"]:
        assert backend["lanes"] == 2 and set(backend["model_call_ms"]) == {"1", "2", "4", "8"}
        rounds = {(r["mode"], r["window"]): r["rounds"] for r in backend["records"]}
        assert rounds == {("sequential", 1): 4, ("aggressive", 2): 3}
    assert not [pid for pid in _process_ids() if str(tmp_path) in _cmdline(pid)]


def _process_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# quality


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_quality_bench_on_a_handful_of_samples(tmp_path, reference, torch_single_thread):
    """Both bundled models in one run: the UNet with DDIM and the SD3 transformer with
    flow-matching Euler, each from the same noise."""
    models = ("reference", "reference-flow")
    setup = QualitySetup(models=models, per_class=1, steps=(4,), windows=(1, 2),
                         guidance=(1.0,), backend="torch")
    report, records = run_quality(setup, tmp_path)
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written) >= {"setup", "machine", "records", "real_vs_real_fd", "target"}
    assert len(written["records"]) == len(models) * len(setup.runs())
    assert (tmp_path / "quality.png").is_file()
    for model in models:
        runs = {(r.mode, r.window): r for r in records if r.model == model}
        assert list(runs) == setup.runs()
        sequential = runs[("sequential", 1)]
        assert sequential.distance_to_sequential == 0.0 and sequential.fd_ratio == 1.0
        # window 1 aggressive is sequential sampling, bit for bit
        assert runs[("aggressive", 1)].distance_to_sequential == 0.0
        assert runs[("aggressive", 2)].rounds == len(round_pattern("aggressive", 2, 4))
        assert runs[("aggressive", 2)].distance_to_sequential > 0
        for record in runs.values():
            assert 0.0 <= record.accuracy <= 1.0 and record.fd > 0
    flow, unet = (next(r for r in records if r.model == m and r.mode == "sequential")
                  for m in ("reference-flow", "reference"))
    assert flow.fd != unet.fd  # two models sampled, not one twice
    assert written["target"] == {model: None for model in models}


def test_quality_command_measures_the_flow_model(tmp_path, torch_single_thread, capsys):
    """`driffusion bench quality --model reference-flow` in a quick mode: its own
    flow-matching scheduler by default; a noise-prediction scheduler is refused."""
    from cli import main as cli_main

    quick = ["--per-class", "1", "--steps", "3", "--windows", "2", "--modes", "aggressive",
             "--guidance", "1", "--backend", "torch", "--no-plot"]
    assert cli_main(["bench", "quality", "--model", "reference-flow", *quick,
                     "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "quality.json").read_text())
    assert written["setup"]["models"] == ["reference-flow"]
    assert [(r["model"], r["mode"], r["rounds"]) for r in written["records"]] == [
        ("reference-flow", "sequential", 3), ("reference-flow", "aggressive", 2)]
    assert "reference-flow, guidance 1, 3 steps" in capsys.readouterr().out
    assert cli_main(["bench", "quality", "--model", "reference-flow", "--scheduler", "ddim",
                     *quick, "--out", str(tmp_path / "ddim")]) == 1
    assert "does not fit reference-flow" in capsys.readouterr().err


def test_quality_target_uses_guidance_one_at_fifty_steps(reference):
    from bench.quality import QualityRecord

    def record(guidance, accuracy_delta, fd_ratio):
        return QualityRecord(guidance, 50, "aggressive", 4, 14, 0.97, accuracy_delta, 3.5,
                             fd_ratio, 0.05, 0.5, 1.0)

    target = check_target([record(1.5, -3.0, 1.5), record(1.0, -0.5, 1.04)])
    assert target["met"] and target["accuracy_delta_points"] == -0.5
    assert not check_target([record(1.0, -1.5, 1.04)])["met"]
    assert not check_target([record(1.0, 0.0, 1.2)])["met"]


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_onnx_denoiser_matches_the_torch_model(reference, reference_engines, guidance):
    prompts = [prompt_for(1), "the digit 7", "four"]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 items
    t = torch.tensor([900.0] * 3 + [500.0] * 3)
    unet = reference_engines.path("unet")
    onnx = asyncio.run(make_denoiser(reference, QualitySetup(), prompts, guidance, unet)(x, t))
    torch_setup = QualitySetup(backend="torch")
    expected = asyncio.run(make_denoiser(reference, torch_setup, prompts, guidance)(x, t))
    torch.testing.assert_close(onnx, expected, atol=2e-4, rtol=1e-3)


def test_quality_setup_asks_for_each_digit_by_prompt():
    setup = QualitySetup(per_class=2)
    assert setup.prompts()[:3] == ["a handwritten zero"] * 2 + ["a handwritten one"]
    assert QualitySetup(per_class=1, template="number {digit}").prompts()[7] == "number 7"
    with pytest.raises(ValueError, match="template"):
        QualitySetup(template="a digit").validate()


def test_bench_images_reports_rounds_accuracy_and_differences_per_run(tmp_path):
    """`bench images` tables each run against its task's sequential run and draws the grid."""
    from bench.demo import gray
    from bench.images import ImageSettings, Run, real_digit_images, report, write_picture

    digits = [gray(image) for image in real_digit_images()]
    shifted = digits[1:] + digits[:1]  # img2img asks for d+1: the real d+1 scores 1.0
    runs = [Run("img2img", 1, [9] * 10, shifted), Run("img2img", 2, [5] * 10, shifted),
            Run("inpaint", 1, [10] * 10, digits), Run("inpaint", 4, [3] * 10, digits[::-1])]
    rows = {row["run"]: row for row in report(runs)}
    assert rows["img2img sequential"]["accuracy"] == 1.0
    assert rows["img2img w2"]["max_pixel_diff"] == 0 and rows["img2img w2"]["rounds"] == 5
    assert rows["inpaint w4"]["accuracy"] < 1.0 and rows["inpaint w4"]["mean_pixel_diff"] > 0
    write_picture(tmp_path / "grid.png", runs, ImageSettings())
    assert (tmp_path / "grid.png").stat().st_size > 1000
