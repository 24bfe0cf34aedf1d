"""The scheduler factory, and that every accepted (scheduler, steps, mode, window) really runs."""
from __future__ import annotations

import asyncio

import pytest
import torch

from models.reference import SCHEDULER_CONFIG
from models.sim import sim_spec
from runtime.driffusion import MODES, sample
from runtime.pipeline import GenerationRequest, RequestError, resolve
from runtime.schedulers import compatible, make_scheduler, max_steps, scheduler_names

SD_CONFIG = {  # Stable Diffusion 1.5's scheduler config (steps_offset 1, leading spacing)
    "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "prediction_type": "epsilon", "clip_sample": False,
}
FLOW_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
               "shift": 3.0}
CONFIGS = {"reference": SCHEDULER_CONFIG, "sd": SD_CONFIG, "flow": FLOW_CONFIG}
MAX_WINDOW = 64


async def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def run(name: str, steps: int, config: dict, mode: str, window: int) -> torch.Tensor:
    scheduler = make_scheduler(name, steps, config)
    tolerance = 0.05 if mode == "verified" else None
    return asyncio.run(sample(zero, scheduler, torch.randn(1, 1, 2, 2), mode=mode, window=window,
                              tolerance=tolerance, generator=torch.Generator().manual_seed(0)))


# 1000 steps in every mode and window per scheduler: 90 s in all, so the VP configs run under the
# slow marker (the step limits themselves are checked below, fast)
CASES = [pytest.param(config, name, marks=[pytest.mark.slow] if config != "flow" else [])
         for config in CONFIGS for name in scheduler_names()
         if compatible(name, CONFIGS[config])]


@pytest.mark.parametrize("config, name", CASES)
def test_every_accepted_boundary_runs_in_every_mode(config, name):
    limit = max_steps(name, CONFIGS[config], 1000)
    assert limit >= 990  # only the very top of the schedule can break
    for steps in (1, limit):
        for mode in MODES:
            for window in (1, MAX_WINDOW):
                assert torch.isfinite(run(name, steps, CONFIGS[config], mode, window)).all()


def test_the_step_limit_is_per_scheduler_and_the_error_says_so():
    spec = sim_spec()
    dpm_limit = max_steps("dpmpp2m", spec.scheduler_config, spec.max_steps)
    assert dpm_limit < max_steps("ddim", spec.scheduler_config, spec.max_steps) == 1000
    with pytest.raises(RequestError, match=f"dpmpp2m runs at most {dpm_limit} steps"):
        resolve(GenerationRequest(label=1, steps=dpm_limit + 1, scheduler="dpmpp2m"), spec, 2)
    resolve(GenerationRequest(label=1, steps=dpm_limit, scheduler="dpmpp2m"), spec, 2)


def test_default_is_the_models_own_class_and_flow_models_take_flow_schedulers_only():
    assert type(make_scheduler("default", 5, SD_CONFIG)).__name__ == "PNDMScheduler"
    assert [n for n in scheduler_names() if compatible(n, FLOW_CONFIG)] == ["default",
                                                                              "flow_euler"]
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_scheduler("heun", 5, SD_CONFIG)
