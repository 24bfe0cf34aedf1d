"""The draft-and-refine sampler against every exactness property of docs/METHOD.md."""
from __future__ import annotations

import asyncio
import functools
import itertools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from models.closed_form import GaussianMixtureModel
from runtime.driffusion import round_pattern, sample

SHAPE = (2, 1, 4, 4)
VP_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


def make_scheduler(kind: str, steps: int, prediction_type: str = "epsilon"):
    if kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        klass, extra = {
            "ddim": (DDIMScheduler, {"clip_sample": False}),
            "ddpm": (DDPMScheduler, {"clip_sample": False}),
            "dpmpp2m": (DPMSolverMultistepScheduler, {}),
            "unipc": (UniPCMultistepScheduler, {}),
            "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
            "euler": (EulerDiscreteScheduler, {}),
            "euler_a": (EulerAncestralDiscreteScheduler, {}),
        }[kind]
        scheduler = klass(**VP_CONFIG, prediction_type=prediction_type, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


def init_sigma(scheduler) -> float:
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def make_model(scheduler, mean=0.3, std=0.5):
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return GaussianMixtureModel.gaussian(mean, std, SHAPE[1:], prediction_type="flow")
    return GaussianMixtureModel.gaussian(
        mean,
        std,
        SHAPE[1:],
        alphas_cumprod=scheduler.alphas_cumprod,
        prediction_type=scheduler.config.prediction_type,
    )


class Recorder:
    """An async `denoise` over a closed-form model that records every round."""

    def __init__(self, model):
        self.model = model
        self.rounds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    async def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = self.model(x, t)
        self.rounds.append((x.clone(), t.clone(), output.clone()))
        return output

    def items_per_round(self, batch: int) -> list[int]:
        return [x.shape[0] // batch for x, _, _ in self.rounds]


def spy_steps(scheduler) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """Record (timestep, sample, prev_sample) of every scheduler.step call."""
    calls = []
    original = scheduler.step

    @functools.wraps(original)
    def step(model_output, timestep, sample, *args, **kwargs):
        result = original(model_output, timestep, sample, *args, **kwargs)
        calls.append((float(timestep), sample.clone(), result.prev_sample.clone()))
        return result

    scheduler.step = step
    return calls


def run(kind, mode, window, steps=20, seed=0, prediction_type="epsilon", generator_seed=None):
    scheduler = make_scheduler(kind, steps, prediction_type)
    recorder = Recorder(make_model(scheduler))
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    latents = latents * init_sigma(scheduler)
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    result = asyncio.run(
        sample(recorder, scheduler, latents, mode=mode, window=window, generator=generator)
    )
    return result, recorder, scheduler


ALL_KINDS = ["ddim", "ddpm", "dpmpp2m", "unipc", "pndm", "euler", "euler_a", "flow"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_aggressive_window_1_is_bit_identical_to_sequential(kind):
    sequential, seq_calls, scheduler = run(kind, "sequential", 1, generator_seed=7)
    aggressive, agg_calls, _ = run(kind, "aggressive", 1, generator_seed=7)
    assert torch.equal(sequential, aggressive)
    assert len(seq_calls.rounds) == len(agg_calls.rounds) == len(scheduler.timesteps)


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp2m"])
def test_drafts_from_a_fresh_output_agree_across_prediction_types(kind):
    # (x0, eps) recovered from a fresh output is the same whatever the parametrisation, so the
    # first conservative draft round must not depend on the prediction type.
    rounds = {
        prediction_type: run(kind, "conservative", 4, prediction_type=prediction_type)[1].rounds
        for prediction_type in ["epsilon", "v_prediction", "sample"]
    }
    drafts = {prediction_type: r[1][0] for prediction_type, r in rounds.items()}
    for prediction_type in ["v_prediction", "sample"]:
        # float32 conditioning at the largest sigmas allows ~1e-4; a wrong conversion is O(1)
        torch.testing.assert_close(drafts[prediction_type], drafts["epsilon"], rtol=0, atol=1e-3)


def test_round_patterns_for_20_steps_window_4():
    assert round_pattern("aggressive", 4, 20) == [1, 4, 4, 4, 4, 3]
    assert round_pattern("conservative", 4, 20) == [1, 4, 1, 4, 1, 4, 1, 4]
    assert round_pattern("sequential", 4, 20) == [1] * 20


@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_call_pattern_matches_round_pattern_and_never_exceeds_window(mode):
    _, recorder, _ = run("ddim", mode, 4)
    items = recorder.items_per_round(SHAPE[0])
    assert items == round_pattern(mode, 4, 20)
    assert max(items) <= 4


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_scheduler_step_is_called_once_per_timestep_in_order(kind, mode):
    scheduler = make_scheduler(kind, 12)
    calls = spy_steps(scheduler)
    latents = torch.randn(SHAPE) * init_sigma(scheduler)
    asyncio.run(sample(Recorder(make_model(scheduler)), scheduler, latents, mode=mode, window=3))
    assert [t for t, _, _ in calls] == [float(t) for t in scheduler.timesteps]


def test_items_are_stacked_item_major_with_their_own_timesteps():
    _, recorder, scheduler = run("ddim", "aggressive", 4)
    x, t, _ = recorder.rounds[1]
    steps = scheduler.timesteps[1:5].to(torch.float32)
    assert torch.equal(t, steps.repeat_interleave(SHAPE[0]))
    assert x.shape == (4 * SHAPE[0], *SHAPE[1:])


def test_ddim_conservative_first_draft_equals_refined_state():
    scheduler = make_scheduler("ddim", 20)
    calls = spy_steps(scheduler)
    recorder = Recorder(make_model(scheduler))
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    asyncio.run(sample(recorder, scheduler, latents, mode="conservative", window=4))
    refined = {t: prev for t, _, prev in calls}  # state after the step at t
    timesteps = [float(t) for t in scheduler.timesteps]
    draft_rounds = recorder.rounds[1::2]
    assert len(draft_rounds) == 4
    for x, t, _ in draft_rounds:
        first_draft = x[: SHAPE[0]]
        # the draft is x~_{i+1}; the refined x_{i+1} came from step i
        step = timesteps.index(float(t[0]))
        torch.testing.assert_close(first_draft, refined[timesteps[step - 1]], rtol=0, atol=1e-5)


def test_aggressive_drafts_jump_from_the_anchor_with_the_previous_rounds_last_output():
    scheduler = make_scheduler("euler", 20)
    sigmas = scheduler.sigmas.to(torch.float64)
    calls = spy_steps(scheduler)
    recorder = Recorder(make_model(scheduler))
    latents = torch.randn(SHAPE) * init_sigma(scheduler)
    asyncio.run(sample(recorder, scheduler, latents, mode="aggressive", window=4))
    anchor = 1
    for (_, _, previous), (x, _, _) in zip(recorder.rounds, recorder.rounds[1:]):
        guide = previous[-SHAPE[0]:].to(torch.float64)
        state = calls[anchor - 1][2].to(torch.float64)  # x_anchor, refined
        x0 = state - sigmas[anchor] * guide
        for k, item in enumerate(x.split(SHAPE[0])):
            sigma = sigmas[anchor + k]
            expected = (x0 + sigma * guide) if k else state
            # the model input of each item is scaled by its own sigma
            torch.testing.assert_close(
                item.to(torch.float64), expected / (sigma**2 + 1).sqrt(), rtol=1e-5, atol=1e-5
            )
        anchor += x.shape[0] // SHAPE[0]


def test_sigma_family_sequential_matches_the_diffusers_loop():
    scheduler = make_scheduler("euler", 15)
    model = make_model(scheduler)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = latents * init_sigma(scheduler)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t.repeat(SHAPE[0])), t, x).prev_sample
    ours, _, _ = run("euler", "sequential", 1, steps=15, seed=1)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "euler_a"])
def test_stochastic_schedulers_draw_the_same_noise_in_every_mode(kind, monkeypatch):
    module = {
        "ddpm": "diffusers.schedulers.scheduling_ddpm",
        "euler_a": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    }[kind]
    draws_by_mode = {}
    for mode in ["sequential", "conservative", "aggressive"]:
        import importlib

        scheduler_module = importlib.import_module(module)
        original = scheduler_module.randn_tensor
        draws: list[torch.Tensor] = []

        def recording_randn(*args, _draws=draws, _original=original, **kwargs):
            noise = _original(*args, **kwargs)
            _draws.append(noise.clone())
            return noise

        monkeypatch.setattr(scheduler_module, "randn_tensor", recording_randn)
        run(kind, mode, 4, generator_seed=11)
        monkeypatch.setattr(scheduler_module, "randn_tensor", original)
        draws_by_mode[mode] = draws
    reference = draws_by_mode["sequential"]
    assert len(reference) >= 19
    for mode, draws in draws_by_mode.items():
        assert len(draws) == len(reference), mode
        assert all(torch.equal(a, b) for a, b in zip(draws, reference)), mode


def test_window_larger_than_steps():
    assert round_pattern("aggressive", 8, 3) == [1, 2]
    assert round_pattern("conservative", 8, 3) == [1, 2]
    for mode in ["aggressive", "conservative"]:
        result, recorder, _ = run("ddim", mode, 8, steps=3)
        assert recorder.items_per_round(SHAPE[0]) == [1, 2]
        assert torch.isfinite(result).all()


def test_a_single_step():
    sequential, _, _ = run("ddim", "sequential", 1, steps=1)
    for mode in ["aggressive", "conservative"]:
        result, recorder, _ = run("ddim", mode, 4, steps=1)
        assert recorder.items_per_round(SHAPE[0]) == [1]
        assert torch.equal(result, sequential)


def test_ddim_50_steps_aggressive_window_4_is_as_close_to_the_exact_ode_as_sequential():
    steps, shape = 50, (64, 1, 8, 8)
    scheduler = make_scheduler("ddim", steps)
    model = GaussianMixtureModel.gaussian(
        0.3, 0.5, shape[1:], alphas_cumprod=scheduler.alphas_cumprod
    )
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a0 = scheduler.alphas_cumprod[scheduler.timesteps[0]].double()
    start = (a0.sqrt().item(), (1 - a0).sqrt().item())
    exact = model.exact_ode_solution(latents, start, (1.0, 0.0))

    async def denoise(x, t):
        return model(x, t)

    errors = {}
    for mode in ["sequential", "aggressive"]:
        scheduler = make_scheduler("ddim", steps)
        result = asyncio.run(sample(denoise, scheduler, latents, mode=mode, window=4))
        errors[mode] = (result - exact).pow(2).mean().sqrt().item()
    assert errors["aggressive"] <= 1.1 * errors["sequential"], errors


def test_unsupported_scheduler_is_refused_with_the_supported_list():
    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler is not supported.*DDIMScheduler"):
        asyncio.run(sample(Recorder(None), scheduler, torch.zeros(SHAPE)))


def test_unsupported_prediction_type_is_refused():
    scheduler = DDIMScheduler(prediction_type="flow_prediction")
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'.*epsilon"):
        asyncio.run(sample(Recorder(None), scheduler, torch.zeros(SHAPE)))


def test_scheduler_without_timesteps_is_refused():
    with pytest.raises(ValueError, match="set_timesteps"):
        asyncio.run(sample(Recorder(None), DDPMScheduler(), torch.zeros(SHAPE)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "fast"}, "mode 'fast' is not supported; choose one of sequential"),
        ({"window": 0}, "window must be an integer >= 1"),
        ({"window": 2.0}, "window must be an integer >= 1"),
        ({"window": True}, "window must be an integer >= 1"),
    ],
)
def test_bad_mode_or_window_is_refused(kwargs, message):
    scheduler = make_scheduler("ddim", 10)
    with pytest.raises(ValueError, match=message):
        denoise = Recorder(make_model(scheduler))
        asyncio.run(sample(denoise, scheduler, torch.zeros(SHAPE), **kwargs))


def test_latents_must_be_4d():
    scheduler = make_scheduler("ddim", 10)
    with pytest.raises(ValueError, match=r"latents must be \[B, C, H, W\]"):
        asyncio.run(sample(Recorder(None), scheduler, torch.zeros(1, 4, 4)))


def test_a_denoise_returning_the_wrong_shape_is_reported():
    scheduler = make_scheduler("ddim", 10)

    async def broken(x, t):
        return x[:1]

    with pytest.raises(ValueError, match="denoise returned shape"):
        asyncio.run(sample(broken, scheduler, torch.zeros(SHAPE), mode="aggressive", window=2))


@pytest.mark.parametrize("mode", ["sequential", "conservative", "aggressive"])
def test_callback_reports_every_refined_step_with_the_round_that_evaluated_it(mode):
    scheduler = make_scheduler("ddim", 12)
    recorder = Recorder(make_model(scheduler))
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    steps: list[dict] = []
    result = asyncio.run(
        sample(recorder, scheduler, latents, mode=mode, window=3, callback=steps.append)
    )
    assert [info["step"] for info in steps] == list(range(12))
    assert torch.equal(steps[0]["x_prev"], latents) and torch.equal(steps[-1]["x"], result)
    for before, after in itertools.pairwise(steps):
        assert torch.equal(after["x_prev"], before["x"])
    for info in steps:
        x, t, outputs = recorder.rounds[info["round"]]
        items = [float(timestep) for timestep in t[:: SHAPE[0]]]
        k = items.index(float(info["timestep"]))  # DDIM: the model input is the draft itself
        assert torch.equal(x.split(SHAPE[0])[k], info["draft"])
        assert torch.equal(outputs.split(SHAPE[0])[k], info["output"])
        if mode == "sequential":
            assert torch.equal(info["draft"], info["x_prev"])


def test_an_identity_draft_hook_changes_nothing_and_sees_every_drafting_round():
    plain, _, _ = run("dpmpp2m", "aggressive", 4)
    seen: list[dict] = []

    def keep(info):
        seen.append(info)
        return info["drafts"]

    scheduler = make_scheduler("dpmpp2m", 20)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    hooked = asyncio.run(
        sample(Recorder(make_model(scheduler)), scheduler, latents, window=4, draft=keep)
    )
    assert torch.equal(hooked, plain)
    assert [info["round"] for info in seen] == [1, 2, 3, 4, 5]
    assert [info["steps"][0] for info in seen] == [info["anchor"] for info in seen]
    assert [len(info["steps"]) for info in seen] == round_pattern("aggressive", 4, 20)[1:]
    assert all(torch.equal(info["drafts"][0], info["x"]) for info in seen)


def test_the_draft_hook_decides_what_a_drafting_round_evaluates():
    scheduler = make_scheduler("ddim", 8)
    recorder = Recorder(make_model(scheduler))

    def zeros(info):
        return [torch.zeros_like(x) for x in info["drafts"]]

    asyncio.run(
        sample(recorder, scheduler, torch.randn(SHAPE), mode="conservative", window=3, draft=zeros)
    )
    assert recorder.items_per_round(SHAPE[0]) == round_pattern("conservative", 3, 8)
    for x, _, _ in recorder.rounds[1::2]:  # the drafting rounds
        assert not x.any()
    for x, _, _ in recorder.rounds[::2]:  # the anchors are evaluated as they are
        assert x.any()


def test_a_draft_hook_returning_the_wrong_number_of_drafts_is_reported():
    scheduler = make_scheduler("ddim", 8)
    with pytest.raises(ValueError, match="the draft hook returned 1 drafts for 4 steps"):
        asyncio.run(
            sample(Recorder(make_model(scheduler)), scheduler, torch.randn(SHAPE), window=4,
                   draft=lambda info: info["drafts"][:1])
        )
