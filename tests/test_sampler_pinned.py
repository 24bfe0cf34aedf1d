"""Pins the sampler's outputs to values recorded before its rewrite, within a float tolerance.

Every case runs the DRiffusion sampler over a closed-form Gaussian model and compares with
`tests/data/sampler_pins.json`: the 32 numbers of the final latents, a trace of every round
(its timesteps, and the sum and norm of each item the model was asked to evaluate, so drafts
that verified mode discards are covered too) and the progress reports.

Why a tolerance and not bytes: the recorded values came from another CPU. torch picks SIMD
kernels by CPU (AVX-512, AVX2, default, NEON), and their exp/log/sin and reduction orders differ
in the last bits. Measured between ATEN_CPU_CAPABILITY=avx512 and =default on one machine,
relative to max(1, largest recorded value):
- schedulers without noise (DDIM, DPM-Solver++, UniPC, flow Euler): at most 6e-7;
- stochastic ones (DDPM, Euler ancestral) add noise from torch.randn, whose Box-Muller kernel
  itself differs by 1e-6 between CPUs; Euler ancestral scales it by sigma_up (hundreds at the
  first steps): up to 3.4e-4.
TOLERANCE is 15-20x those, and still 50x or more below what a change of behaviour moves (drafts
of the other order, one window fewer: at least 7e-4 without noise, 0.5 with it), which
`test_a_behaviour_change_is_far_outside_the_tolerance` holds. Float64 runs differ by 1e-16-sized
ulps amplified the same way, hence 1e-9.

Exact comparisons stay where both results are computed in the same run (window 1 against
sequential, in test_driffusion.py). If torch or diffusers change what they compute, re-record
with `python tests/test_sampler_pinned.py --record` and say why in the commit.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from bench.methods import Setup, mixture_model, run_first_round_floor
from models.closed_form import GaussianMixtureModel
from runtime.driffusion import sample

PINS_FILE = Path(__file__).resolve().parent / "data" / "sampler_pins.json"
SHAPE = (2, 1, 4, 4)
STEPS = 10
WINDOW = 3
# largest difference allowed, relative to max(1, largest recorded value), by (stochastic
# scheduler, latent dtype); the module docstring says why
TOLERANCE = {(False, "float32"): 1e-5, (True, "float32"): 5e-3,
             (False, "float64"): 1e-9, (True, "float64"): 1e-9}
VP_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**VP_CONFIG, clip_sample=False),
    "ddpm": lambda: DDPMScheduler(**VP_CONFIG, clip_sample=False),
    "dpmpp2m": lambda: DPMSolverMultistepScheduler(**VP_CONFIG),
    "dpmpp2m-v": lambda: DPMSolverMultistepScheduler(**VP_CONFIG, prediction_type="v_prediction"),
    "unipc": lambda: UniPCMultistepScheduler(**VP_CONFIG),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**VP_CONFIG),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}
STOCHASTIC = ("ddpm", "euler_a")
# (scheduler, mode, draft_order, latent dtype)
CASES = [
    *[("ddim", mode, order, "float32") for mode in ("aggressive", "conservative", "verified")
      for order in (1, 2)],
    ("ddim", "sequential", 1, "float32"),
    *[("dpmpp2m", mode, order, "float32") for mode in ("aggressive", "conservative", "verified")
      for order in (1, 2)],
    ("dpmpp2m", "sequential", 1, "float32"),
    *[(kind, mode, 1, "float32") for kind in ("euler_a", "flow")
      for mode in ("sequential", "aggressive", "conservative", "verified")],
    *[("ddpm", mode, 2, "float32") for mode in ("aggressive", "conservative", "verified")],
    ("unipc", "conservative", 2, "float32"),
    ("unipc", "aggressive", 2, "float32"),
    ("dpmpp2m-v", "conservative", 2, "float32"),
    ("dpmpp2m-v", "verified", 2, "float32"),
    ("ddim", "aggressive", 2, "float64"),
    ("dpmpp2m", "conservative", 2, "float64"),
    ("euler_a", "conservative", 1, "float64"),
]
ORACLE_CASE = "first-round-floor-oracle"


def case_id(case: tuple) -> str:
    return "-".join(map(str, case))


def pinned_run(kind: str, mode: str, order: int, dtype: str,
               window: int = WINDOW) -> dict[str, Any]:
    """The final latents, every round's trace and the progress reports of one sampler run."""
    scheduler = SCHEDULERS[kind]()
    scheduler.set_timesteps(STEPS)
    if kind == "flow":
        model = GaussianMixtureModel.gaussian(0.3, 0.5, SHAPE[1:], prediction_type="flow")
    else:
        model = GaussianMixtureModel.gaussian(
            0.3, 0.5, SHAPE[1:], alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=scheduler.config.prediction_type,
        )
    rounds: list[dict[str, list[float]]] = []

    async def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        items = x.double().reshape(-1, *SHAPE).flatten(1)
        rounds.append({"t": t.double().tolist(), "sum": items.sum(1).tolist(),
                       "norm": items.norm(dim=1).tolist()})
        return model(x, t)

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0),
                          dtype=getattr(torch, dtype))
    latents = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))
    generator = torch.Generator().manual_seed(7) if kind in STOCHASTIC else None
    progress: list[int] = []
    result = asyncio.run(
        sample(
            denoise, scheduler, latents, mode=mode, window=window, generator=generator,
            draft_order=order, tolerance=0.05 if mode == "verified" else None,
            progress=progress.append,
        )
    )
    assert result.dtype == getattr(torch, dtype)
    return {"latents": result.double().flatten().tolist(), "rounds": rounds,
            "progress": progress}


def oracle_run() -> dict[str, Any]:
    """The first-round-floor oracle of bench.methods: its result and call counts."""
    setup = Setup(window=WINDOW, batch=4)
    result, calls = run_first_round_floor(mixture_model(setup), setup, "dpmpp2m", STEPS)
    return {"latents": result.double().flatten().tolist(), "rounds": calls.rounds,
            "evaluations": calls.evaluations}


def recorded() -> dict[str, Any]:
    return json.loads(PINS_FILE.read_text())


def tolerance(case: tuple) -> float:
    kind, _, _, dtype = case
    return TOLERANCE[(kind in STOCHASTIC, dtype)]


def relative_distance(actual, expected) -> float:
    """Largest difference, relative to max(1, largest expected magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected))))


def assert_close(actual, expected, allowed: float, what: str) -> None:
    distance = relative_distance(actual, expected)
    assert distance <= allowed, (f"{what}: {distance:.3g} from the recorded values, beyond the "
                                 f"tolerance {allowed:g}")


@pytest.fixture(scope="module")
def pins() -> dict[str, Any]:
    return recorded()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_sampler_matches_the_pinned_run(case, pins):
    expected = pins[case_id(case)]
    actual = pinned_run(*case)
    allowed = tolerance(case)
    assert actual["progress"] == expected["progress"]
    assert [len(r["t"]) for r in actual["rounds"]] == [len(r["t"]) for r in expected["rounds"]]
    for index, (got, want) in enumerate(zip(actual["rounds"], expected["rounds"])):
        for key in ("t", "sum", "norm"):
            assert_close(got[key], want[key], allowed, f"round {index} {key}")
    assert_close(actual["latents"], expected["latents"], allowed, "final latents")


def test_the_first_round_floor_oracle_matches_the_pinned_run(pins):
    expected = pins[ORACLE_CASE]
    actual = oracle_run()
    assert (actual["rounds"], actual["evaluations"]) == (4, STEPS)
    assert (actual["rounds"], actual["evaluations"]) == (expected["rounds"],
                                                        expected["evaluations"])
    assert_close(actual["latents"], expected["latents"], TOLERANCE[(False, "float32")],
                 "oracle latents")


# (pinned case, the change of behaviour): the smallest changes found, with and without noise
BEHAVIOUR_CHANGES = [
    (("unipc", "conservative", 2, "float32"), {"order": 1}),
    (("flow", "conservative", 1, "float32"), {"window": 2}),
    (("dpmpp2m-v", "verified", 2, "float32"), {"order": 1}),
    (("ddpm", "aggressive", 2, "float32"), {"window": 2}),
    (("euler_a", "conservative", 1, "float32"), {"window": 2}),
]


@pytest.mark.parametrize("case, change", BEHAVIOUR_CHANGES,
                         ids=[case_id(case) for case, _ in BEHAVIOUR_CHANGES])
def test_a_behaviour_change_is_far_outside_the_tolerance(case, change, pins):
    """The tolerance is no blind spot: a run with drafts of the other order, or one draft fewer
    per round, lands at least 50x the tolerance away from the pinned latents."""
    kind, mode, order, dtype = case
    changed = pinned_run(kind, mode, change.get("order", order), dtype,
                         window=change.get("window", WINDOW))
    distance = relative_distance(changed["latents"], pins[case_id(case)]["latents"])
    assert distance > 50 * tolerance(case)


def record() -> None:
    """Write the pins file from this machine's runs (after an intended change of behaviour)."""
    pins = {case_id(case): pinned_run(*case) for case in CASES}
    pins[ORACLE_CASE] = oracle_run()
    PINS_FILE.parent.mkdir(exist_ok=True)
    lines = [f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}"
             for key, value in pins.items()]
    PINS_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one pinned run per line
    print(f"wrote {len(pins)} pinned runs to {PINS_FILE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_sampler_pinned.py --record")
    record()
