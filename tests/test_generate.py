"""The pipeline (label/prompt -> image) on in-process models: request checks and sampling."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.sim import SimDiffusion, sim_spec
from runtime.local_devices import LocalDevice, LocalModel
from runtime.pipeline import GenerationRequest, Pipeline, PipelineSpec, RequestError
from runtime.pool import DevicePool

SPEC = sim_spec()
SIM = SimDiffusion.from_scheduler_config(SPEC.scheduler_config)


def sim_pipeline(devices: int = 2) -> Pipeline:
    encoder = LocalModel("text_encoder",
                         lambda label: {"text_embeddings": SIM.encode(label.reshape(-1))})
    pool = DevicePool([LocalDevice.from_function(f"sim{i}", SIM.denoise) for i in range(devices)])
    return Pipeline(SPEC, pool, {"text_encoder": encoder})


def generate(request: GenerationRequest, devices: int = 2) -> np.ndarray:
    return asyncio.run(sim_pipeline(devices).generate(request)).image


def test_spec_survives_json():
    assert PipelineSpec.from_json(SPEC.to_json()) == SPEC


def test_image_is_deterministic_and_follows_the_label():
    request = GenerationRequest(label=3, seed=1, steps=10, guidance=2.0)
    image = generate(request)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, generate(request))
    other = generate(GenerationRequest(label=8, seed=1, steps=10, guidance=2.0))
    assert np.abs(image.astype(int) - other.astype(int)).max() > 50


def test_prompt_naming_a_class_equals_its_label():
    by_label = generate(GenerationRequest(label=7, seed=2, steps=6))
    by_prompt = generate(GenerationRequest(prompt="A handwritten SEVEN, please", seed=2, steps=6))
    np.testing.assert_array_equal(by_label, by_prompt)


def test_aggressive_window_one_equals_sequential():
    sequential = generate(GenerationRequest(label=4, seed=3, steps=8, mode="sequential"))
    aggressive = generate(GenerationRequest(label=4, seed=3, steps=8, window=1))
    np.testing.assert_array_equal(sequential, aggressive)


def test_default_window_is_the_pool_width():
    assert sim_pipeline(3).resolve(GenerationRequest(label=1)).window == 3


@pytest.mark.parametrize("request_fields, field", [
    ({}, "label"),
    ({"label": 1, "prompt": "one"}, "label"),
    ({"label": 10}, "label"),
    ({"prompt": "a cat or a dog"}, "prompt"),
    ({"prompt": "one or two"}, "prompt"),
    ({"label": 1, "negative_prompt": "nothing"}, "negative_prompt"),
    ({"label": 1, "steps": 0}, "steps"),
    ({"label": 1, "mode": "fast"}, "mode"),
    ({"label": 1, "window": 0}, "window"),
    ({"label": 1, "guidance": float("nan")}, "guidance"),
    ({"label": 1, "scheduler": "magic"}, "scheduler"),
    ({"label": 1, "seed": -5}, "seed"),
    ({"label": 1, "mode": "verified"}, "tolerance"),
    ({"label": 1, "tolerance": 0.5}, "tolerance"),
    ({"label": 1, "draft_order": 3}, "draft_order"),
])
def test_bad_requests_name_their_field(request_fields, field):
    with pytest.raises(RequestError) as error:
        sim_pipeline().resolve(GenerationRequest(**request_fields))
    assert error.value.field == field


def test_verified_mode_with_zero_tolerance_reproduces_sequential():
    sequential = generate(GenerationRequest(label=5, seed=4, steps=8, mode="sequential"))
    verified = generate(GenerationRequest(label=5, seed=4, steps=8, mode="verified",
                                          tolerance=0.0))
    np.testing.assert_array_equal(sequential, verified)


def test_concurrent_requests_through_one_pipeline_equal_their_solo_runs():
    """Nothing of a request is kept on the Pipeline or its pool: 8 concurrent requests with
    different labels, seeds, guidance and modes each give their solo image."""
    pipeline = sim_pipeline()
    requests = [GenerationRequest(label=label, seed=10 + label, steps=8, guidance=1.0 + label % 3,
                                  mode=("aggressive", "sequential", "conservative")[label % 3])
                for label in range(8)]
    solo = [asyncio.run(pipeline.generate(request)).image for request in requests]

    async def together():
        return await asyncio.gather(*(pipeline.generate(request) for request in requests))

    for alone, result in zip(solo, asyncio.run(together())):
        np.testing.assert_array_equal(alone, result.image)


def test_an_empty_mode_or_scheduler_means_the_default():
    from triton_models.pipeline_io import request_from_tensors

    request = request_from_tensors({"LABEL": np.array([3], np.int32),
                                    "MODE": np.array([b""], dtype=object),
                                    "SCHEDULER": np.array([b""], dtype=object),
                                    "PROMPT": None})
    assert (request.mode, request.scheduler) == (GenerationRequest().mode, None)
    empty_prompt = request_from_tensors({"PROMPT": np.array([b""], dtype=object)})
    assert empty_prompt.prompt == ""
