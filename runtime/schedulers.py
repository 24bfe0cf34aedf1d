"""The scheduler factory: a diffusers scheduler by name, built with `from_config` on a model's config.

Every part of the product that needs a scheduler (the pipeline, the benchmarks, the GPU check)
builds it here, so a name means the same update everywhere. `default` is the class the model's
own scheduler config names (what diffusers' pipeline would run).
"""
from __future__ import annotations

import functools
import inspect
import json
from typing import Any

DEFAULT = "default"
# request name -> (diffusers class name, options applied over the model's config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
FLOW_MATCHING = frozenset({"FlowMatchEulerDiscreteScheduler"})
# multistep solvers that run on flow-matching sigmas when the config says `use_flow_sigmas`
# (Wan ships UniPC so, with prediction_type "flow_prediction")
FLOW_SIGMA_SOLVERS = frozenset({"UniPCMultistepScheduler", "DPMSolverMultistepScheduler"})
MAX_STEP_PROBES = 16  # step counts below the limit tried before giving up


def scheduler_names() -> tuple[str, ...]:
    """Every name `make_scheduler` accepts."""
    return (DEFAULT, *SCHEDULERS)


def scheduler_class_name(name: str, config: dict[str, Any]) -> str:
    """The diffusers class behind `name` for a model whose scheduler config is `config`."""
    if name == DEFAULT:
        class_name = config.get("_class_name")
        if not class_name:
            raise ValueError("the model's scheduler config names no class (_class_name); "
                             f"choose a scheduler by name: {', '.join(SCHEDULERS)}")
        return class_name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")
    return SCHEDULERS[name][0]


def compatible(name: str, config: dict[str, Any]) -> bool:
    """True when scheduler `name` fits the model's kind (flow matching or noise prediction)."""
    model_is_flow = is_flow(config.get("_class_name", ""), config)
    return is_flow(scheduler_class_name(name, config), config) == model_is_flow


def is_flow(class_name: str, config: dict[str, Any]) -> bool:
    """True when the diffusers scheduler `class_name` built from `config` is a flow-matching
    one (its class, or a multistep solver on flow sigmas)."""
    return class_name in FLOW_MATCHING or (bool(config.get("use_flow_sigmas"))
                                           and class_name in FLOW_SIGMA_SOLVERS)


def make_scheduler(name: str, num_steps: int, config: dict[str, Any], *,
                   class_name: str | None = None, **timestep_options: Any):
    """Scheduler `name` (or the diffusers `class_name`) from `config`, `set_timesteps` done
    (with `timestep_options` such as the custom sigmas and shift `mu` a model family sets)."""
    import diffusers

    class_name = class_name or scheduler_class_name(name, config)
    options = SCHEDULERS[name][1] if name in SCHEDULERS else {}
    klass = getattr(diffusers, class_name, None)
    if klass is None:
        raise ValueError(f"diffusers has no scheduler class {class_name!r}")
    limit = int(config.get("num_train_timesteps", 1000))
    if not 1 <= num_steps <= limit:
        raise ValueError(f"num_steps must be in 1..{limit}; got {num_steps}")
    scheduler = klass.from_config({**config, **options})
    scheduler.set_timesteps(num_steps, **timestep_options)
    return scheduler


def max_steps(name: str, config: dict[str, Any], limit: int) -> int:
    """The most steps (at most `limit`) that scheduler `name` runs for a model with `config`.

    Some diffusers schedulers break near num_train_timesteps (DPM-Solver++ and UniPC index past
    their sigmas, a steps_offset pushes a timestep out of range); a dry run of the scheduler's
    own update finds the largest step count that works, once per (name, config, limit).
    """
    limit = min(limit, int(config.get("num_train_timesteps", 1000)))
    return _max_steps(name, json.dumps(config, sort_keys=True, default=str), limit)


@functools.lru_cache(maxsize=256)
def _max_steps(name: str, config_json: str, limit: int) -> int:
    config = json.loads(config_json)
    for steps in range(limit, max(0, limit - MAX_STEP_PROBES), -1):
        if _runs(name, steps, config):
            return steps
    # far below the limit (flow sigmas on integer timesteps repeat a timestep there): the
    # largest count that runs, by bisection between one that runs and one that does not
    low, high = 1, max(1, limit - MAX_STEP_PROBES)
    if not _runs(name, low, config):
        raise ValueError(f"scheduler {name} does not run for this model")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _runs(name, middle, config) else (low, middle)
    return low


def _probe_options(config: dict[str, Any]) -> dict[str, Any]:
    """Timestep options for a dry run: a scheduler that shifts its sigmas by the image size
    needs a shift `mu`; the step limit does not depend on which."""
    return {"mu": 1.0} if config.get("use_dynamic_shifting") else {}


def _runs(name: str, steps: int, config: dict[str, Any]) -> bool:
    """True if `steps` updates of the scheduler run on a zero model output without an error and
    keep the latents finite."""
    import torch

    try:
        scheduler = make_scheduler(name, steps, config, **_probe_options(config))
        timesteps = scheduler.timesteps.tolist()
        if config.get("use_flow_sigmas") and len(set(timesteps)) < len(timesteps):
            return False  # a repeated flow timestep: the solver's step size is zero there
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        options = {"generator": torch.Generator().manual_seed(0)} if accepts_generator else {}
        x = torch.ones(1, 1, 1, 1)
        for timestep in scheduler.timesteps:
            scheduler.is_scale_input_called = True  # the sampler scales inputs itself
            x = scheduler.step(torch.zeros_like(x), timestep, x, **options).prev_sample
    except Exception:  # noqa: BLE001 - any failure means "does not run"
        return False
    return bool(torch.isfinite(x).all())
