"""Beyond the paper: second-order drafts, verified mode, and the methods benchmark (issue 7)."""
from __future__ import annotations

import asyncio
import functools
import importlib
import json
import math

import pytest
import torch

from bench.methods import (
    Setup,
    make_scheduler,
    mixture_model,
    run_benchmark,
    run_driffusion,
    run_first_round_floor,
    run_paradigms,
)
from runtime.driffusion import Schedule, sample

SETUP = Setup()  # 4-component mixture, std 0.3, batch 16 of 1x8x8, window 4
MODEL = mixture_model(SETUP)


def deviation(kind, steps, mode, order=1, tolerance=None):
    """RMS distance to the sequential run, and the call counts."""
    sequential, _ = run_driffusion(MODEL, SETUP, kind, steps, "sequential")
    result, calls = run_driffusion(MODEL, SETUP, kind, steps, mode, order, tolerance)
    return (result - sequential).double().pow(2).mean().sqrt().item(), calls


@pytest.mark.parametrize("steps", [20, 50])
def test_second_order_drafts_bring_dpmsolver_aggressive_closer_to_sequential(steps):
    # Issue target: >= 3x. Measured 1.27x (20 steps) and 1.28x (50): the first drafting round
    # stays first-order and dominates (see the oracle test below). Bound the measured gain.
    first, _ = deviation("dpmpp2m", steps, "aggressive", order=1)
    second, _ = deviation("dpmpp2m", steps, "aggressive", order=2)
    assert first / second >= 1.2, (first, second)


@pytest.mark.parametrize("kind, steps", [("dpmpp2m", 20), ("ddim", 20), ("dpmpp2m", 50)])
def test_second_order_drafts_bring_conservative_closer_to_sequential(kind, steps):
    first, _ = deviation(kind, steps, "conservative", order=1)
    second, _ = deviation(kind, steps, "conservative", order=2)
    assert first / second >= 1.2, (first, second)


def test_exact_drafts_after_the_first_round_leave_most_of_the_deviation():
    # With exact drafts after the first drafting round, aggressive DPM-Solver++ 20 steps keeps
    # over 90% of its first-order deviation: better later drafts alone cannot reach 3x.
    sequential, _ = run_driffusion(MODEL, SETUP, "dpmpp2m", 20, "sequential")
    first_order, _ = run_driffusion(MODEL, SETUP, "dpmpp2m", 20, "aggressive")
    floor, calls = run_first_round_floor(MODEL, SETUP, "dpmpp2m", 20)
    assert calls.rounds == 6
    first_error = (first_order - sequential).pow(2).mean().sqrt()
    floor_error = (floor - sequential).pow(2).mean().sqrt()
    assert floor_error >= 0.9 * first_error, (floor_error, first_error)


class Spy:
    """Records every model input (the drafts) and every state the scheduler stepped from."""

    def __init__(self, scheduler):
        self.drafts: list[tuple[float, torch.Tensor]] = []
        self.refined: dict[float, torch.Tensor] = {}
        original = scheduler.step

        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, **kwargs):
            self.refined[float(timestep)] = sample.clone()
            return original(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step

    async def __call__(self, x, t):
        for item, timestep in zip(x.split(SETUP.batch), t[:: SETUP.batch]):
            self.drafts.append((float(timestep), item.clone()))
        return MODEL(x, t)

    def relative_errors(self, schedule: Schedule) -> list[float]:
        """RMS(draft - refined state) / noise level, per drafted item, in round order."""
        steps = {float(t): i for i, t in enumerate(schedule.timesteps)}
        return [
            ((draft - self.refined[t]).pow(2).mean().sqrt() / schedule.sigma[steps[t]]).item()
            for t, draft in self.drafts
        ]


def draft_errors(kind, steps, mode, order):
    scheduler = make_scheduler(kind, steps)
    spy = Spy(scheduler)
    latents = torch.randn((SETUP.batch, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    asyncio.run(sample(spy, scheduler, latents, mode=mode, window=4, draft_order=order))
    return spy.relative_errors(Schedule.from_scheduler(scheduler))


@pytest.mark.parametrize("steps, gain", [(20, 1.25), (50, 2.0)])  # measured 1.30 and 2.27
def test_second_order_drafts_after_the_first_round_are_closer(steps, gain):
    first = draft_errors("dpmpp2m", steps, "aggressive", 1)
    second = draft_errors("dpmpp2m", steps, "aggressive", 2)
    # items 0..4 are round 0 and the first drafting round, first-order in both
    assert first[:5] == pytest.approx(second[:5], abs=1e-6)
    later_first, later_second = sum(first[5:]), sum(second[5:])
    assert later_first >= gain * later_second, (later_first, later_second)


@pytest.mark.parametrize("kind", ["dpmpp2m", "unipc", "ddim"])
def test_conservative_second_order_first_draft_is_the_refined_state(kind):
    # The first draft of a conservative round is the scheduler's own step with the fresh output,
    # so it IS the refined state, for multistep schedulers too (first-order drafts miss it).
    errors = draft_errors(kind, 20, "conservative", 2)
    # rounds [1, 4, 1, 4, ...]: item 1 + 5r is the first draft of draft round r
    first_drafts = errors[1::5]
    assert len(first_drafts) == 4
    assert max(first_drafts[1:]) < 1e-5, first_drafts
    if kind != "ddim":
        assert max(draft_errors(kind, 20, "conservative", 1)[6::5]) > 1e-3


def test_aggressive_window_1_with_second_order_drafts_is_sequential():
    sequential, _ = run_driffusion(MODEL, SETUP, "dpmpp2m", 12, "sequential")
    scheduler = make_scheduler("dpmpp2m", 12)
    latents = torch.randn((SETUP.batch, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    async def denoise(x, t):
        return MODEL(x, t)

    result = asyncio.run(
        sample(denoise, scheduler, latents, mode="aggressive", window=1, draft_order=2)
    )
    assert torch.equal(result, sequential)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_output_for_an_x0_converts_back_to_that_x0(prediction_type):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    schedule = Schedule.from_scheduler(scheduler)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for step in (1, 5, 9):
        output = schedule.output_for(x, x0, step)
        torch.testing.assert_close(schedule.split(x, output, step)[0], x0)


def ddpm_noise_draws(mode, order, monkeypatch):
    """Noise drawn inside the real scheduler's steps, and noise drawn anywhere else."""
    from diffusers import DDPMScheduler

    module = importlib.import_module("diffusers.schedulers.scheduling_ddpm")
    original_randn = module.randn_tensor
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    scheduler.set_timesteps(12)
    inside_real_step, real, elsewhere = [False], [], []

    def recording_randn(*args, **kwargs):
        noise = original_randn(*args, **kwargs)
        (real if inside_real_step[0] else elsewhere).append(noise.clone())
        return noise

    original_step = scheduler.step

    @functools.wraps(original_step)  # keeps the signature: the sampler passes `generator` by it
    def real_step(*args, **kwargs):
        inside_real_step[0] = True
        try:
            return original_step(*args, **kwargs)
        finally:
            inside_real_step[0] = False

    monkeypatch.setattr(module, "randn_tensor", recording_randn)
    scheduler.step = real_step
    latents = torch.randn((SETUP.batch, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    async def denoise(x, t):
        return MODEL(x, t)

    window = 1 if mode == "sequential" else 4
    asyncio.run(
        sample(denoise, scheduler, latents, mode=mode, window=window, draft_order=order,
               generator=torch.Generator().manual_seed(5))
    )
    monkeypatch.setattr(module, "randn_tensor", original_randn)
    return real, elsewhere


def test_stochastic_scheduler_draws_the_same_noise_with_second_order_drafts(monkeypatch):
    # Conservative second-order drafts replay the scheduler on a replica: the replica draws
    # exactly the noise the real steps draw next, without consuming the caller's generator.
    sequential, _ = ddpm_noise_draws("sequential", 1, monkeypatch)
    real, replica = ddpm_noise_draws("conservative", 2, monkeypatch)
    assert len(real) == len(sequential) == 11  # no noise after the last step
    assert all(torch.equal(a, b) for a, b in zip(real, sequential))
    assert replica, "the replica drew no noise: the test no longer covers it"
    assert all(any(torch.equal(draw, r) for r in real) for draw in replica)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("kind", ["ddim", "dpmpp2m", "unipc"])
def test_verified_tolerance_0_is_sequential_and_huge_tolerance_is_aggressive(kind, order):
    sequential, sequential_calls = run_driffusion(MODEL, SETUP, kind, 20, "sequential")
    aggressive, aggressive_calls = run_driffusion(MODEL, SETUP, kind, 20, "aggressive", order)
    strict, strict_calls = run_driffusion(MODEL, SETUP, kind, 20, "verified", order, 0.0)
    loose, loose_calls = run_driffusion(MODEL, SETUP, kind, 20, "verified", order, math.inf)
    assert torch.equal(strict, sequential)
    assert strict_calls.rounds == sequential_calls.rounds == 20
    assert torch.equal(loose, aggressive)
    assert (loose_calls.rounds, loose_calls.evaluations) == (
        aggressive_calls.rounds,
        aggressive_calls.evaluations,
    ) == (6, 20)


@pytest.mark.parametrize("order", [1, 2])
def test_verified_rounds_fall_and_deviation_grows_with_the_tolerance(order):
    tolerances = [0.0, 0.03, 0.1, 0.3, 1.0, math.inf]
    rounds, deviations = [], []
    for tolerance in tolerances:
        error, calls = deviation("dpmpp2m", 20, "verified", order, tolerance)
        rounds.append(calls.rounds)
        deviations.append(error)
    assert rounds == sorted(rounds, reverse=True) and rounds[0] > rounds[-1], rounds
    assert deviations[0] == 0.0
    # monotone up to small non-monotone wiggles of accepted-step patterns
    for looser, tighter in zip(deviations[1:], deviations):
        assert looser >= 0.5 * tighter, deviations
    assert deviations[-1] > 2 * deviations[1], deviations


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "verified"}, "mode 'verified' needs a tolerance >= 0, got None"),
        ({"mode": "verified", "tolerance": -0.1}, "needs a tolerance >= 0, got -0.1"),
        ({"mode": "verified", "tolerance": float("nan")}, "needs a tolerance >= 0, got nan"),
        ({"mode": "verified", "tolerance": "0.1"}, "needs a tolerance >= 0, got '0.1'"),
        ({"mode": "aggressive", "tolerance": 0.1}, "tolerance applies to mode 'verified' only"),
        ({"draft_order": 3}, "draft_order must be 1 or 2, got 3"),
        ({"draft_order": "2"}, "draft_order must be 1 or 2, got '2'"),
    ],
)
def test_bad_tolerance_or_draft_order_is_refused(kwargs, message):
    scheduler = make_scheduler("dpmpp2m", 10)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(sample(None, scheduler, torch.zeros(2, 1, 8, 8), window=4, **kwargs))


def test_second_order_drafts_need_a_vp_scheduler():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="draft_order=2 needs a VP scheduler.*EulerDiscrete"):
        asyncio.run(sample(None, scheduler, torch.zeros(2, 1, 8, 8), window=4, draft_order=2))


def test_paradigms_runs_from_diffusers_on_the_closed_form_model():
    # tolerance 0 is sequential DDIM: it must agree with our sequential DDIM on the same model
    setup = Setup(batch=4)
    sequential, _ = run_driffusion(MODEL, setup, "ddim", 10, "sequential")
    strict, strict_calls = run_paradigms(MODEL, setup, "ddim", 10, 0.0)
    torch.testing.assert_close(strict, sequential, rtol=0, atol=1e-5)
    assert strict_calls.rounds == 10
    assert strict_calls.evaluations > 10  # it evaluates a window of drafts per round
    loose, loose_calls = run_paradigms(MODEL, setup, "ddim", 10, 1.0)
    assert loose_calls.rounds < 10
    assert not torch.equal(loose, strict)


def test_methods_benchmark_writes_json_and_plot(tmp_path):
    from cli import main

    code = main([
        "bench", "methods", "--schedulers", "dpmpp2m", "--steps", "6", "--batch", "2",
        "--tolerances", "0", "inf", "--paradigms-tolerances", "0", "0.1",
        "--reference-steps", "50", "--out", str(tmp_path),
    ])
    assert code == 0
    results = json.loads((tmp_path / "methods.json").read_text())
    assert (tmp_path / "methods.png").stat().st_size > 10_000
    assert {"machine", "setup", "records", "order_ratios"} <= set(results)
    verified = [r for r in results["records"] if r["mode"] == "verified"]
    assert [r["tolerance"] for r in verified] == [0.0, "inf", 0.0, "inf"]
    assert all(r["deviation"] == 0.0 for r in verified if r["tolerance"] == 0.0)
    schedulers = {r["scheduler"] for r in results["records"]}
    assert schedulers == {"dpmpp2m", "paradigms-ddim", "paradigms-ddpm"}
    sequential = next(r for r in results["records"] if r["mode"] == "sequential")
    assert (sequential["rounds"], sequential["evaluations"]) == (6, 6)
    assert 0 < sequential["reference_distance"] < 1


def test_run_benchmark_counts_match_the_round_pattern():
    from argparse import Namespace

    args = Namespace(
        schedulers=["ddim"], steps=[8], window=4, batch=2, seed=1, tolerances=[0.1],
        paradigms_tolerances=[0.1], no_paradigms=True, reference_steps=20,
    )
    records = run_benchmark(args)["records"]
    aggressive = next(r for r in records if r.mode == "aggressive" and r.draft_order == 1)
    conservative = next(r for r in records if r.mode == "conservative" and r.draft_order == 2)
    assert (aggressive.rounds, aggressive.evaluations) == (3, 8)  # [1, 4, 3]
    assert (conservative.rounds, conservative.evaluations) == (4, 8)  # [1, 4, 1, 2]
