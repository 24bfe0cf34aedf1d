"""The scheduler factory: a diffusers scheduler by name, built with `from_config` on a model's config.

Every part of the product that needs a scheduler (the pipeline, the benchmarks, the GPU check)
builds it here, so a name means the same update everywhere. `default` is the class the model's
own scheduler config names (what diffusers' pipeline would run).
"""
from __future__ import annotations

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
    model_is_flow = config.get("_class_name") in FLOW_MATCHING
    return (scheduler_class_name(name, config) in FLOW_MATCHING) == model_is_flow


def make_scheduler(name: str, num_steps: int, config: dict[str, Any], *,
                   class_name: str | None = None):
    """Scheduler `name` (or the diffusers `class_name`) from `config`, `set_timesteps` done."""
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
    scheduler.set_timesteps(num_steps)
    return scheduler
