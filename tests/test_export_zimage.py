"""Z-Image's export wrapper (export/zimage.py) against diffusers' own ZImageTransformer2DModel:
the batched, real-rotary forward equals the list forward ZImagePipeline calls, with its
timestep map and negation, for text lengths on both sides of the 32-token padding; the ONNX
export takes any text length."""
from __future__ import annotations

import pytest
import torch
from llm_folders import ZIMAGE_TEXT_WIDTH, zimage_transformer

from export.specs import (
    TEXT_LENGTH,
    UnsupportedModelError,
    ZImageTransformerSpec,
    spec_class_named,
)
from models import tensors

CHANNELS = 16


@pytest.fixture(scope="module")
def transformer():
    return zimage_transformer(seed=3)


def pipeline_velocity(transformer, sample, timestep, states):
    """What ZImagePipeline steps its scheduler with: the list forward at (1000 - t) / 1000,
    negated."""
    output = transformer(list(sample.unsqueeze(2).unbind(0)), (1000 - timestep) / 1000,
                         list(states.unbind(0)), return_dict=False)[0]
    return -torch.stack(output).squeeze(2)


def random_inputs(batch: int, text_length: int, height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, CHANNELS, height, width, generator=generator),
            torch.rand(batch, generator=generator) * 1000,
            torch.randn(batch, text_length, ZIMAGE_TEXT_WIDTH, generator=generator))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("text_length", [1, 7, 32, 45])
def test_wrapper_equals_the_pipelines_transformer_call(transformer, batch, text_length):
    spec = ZImageTransformerSpec.from_model(transformer, latent_size=(8, 8))
    wrapped = spec.wrap(transformer).eval()
    for height, width in ((8, 8), (8, 12), (4, 6)):  # 16, 24 and 6 patches (padded to 32)
        inputs = random_inputs(batch, text_length, height, width, seed=text_length + height)
        with torch.no_grad():
            expected = pipeline_velocity(transformer, *inputs)
            actual = wrapped(*inputs)
        assert actual.shape == (batch, CHANNELS, height, width)
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


def test_bf16_wrapper_equals_the_bf16_transformer_call():
    """At bf16 (the precision Z-Image is published in and export/precision.py gives it), the
    float32 boundary casts around the wrapper give diffusers' bf16 result."""
    transformer = zimage_transformer(seed=3).to(torch.bfloat16)
    spec = ZImageTransformerSpec.from_model(transformer, precision="bf16", latent_size=(8, 8))
    sample, timestep, states = random_inputs(2, 9, 8, 12, seed=5)
    with torch.no_grad():
        actual = spec.wrap_for_export(transformer)(sample, timestep, states)
        expected = pipeline_velocity(transformer, sample.bfloat16(), timestep, states.bfloat16())
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected.float(), atol=1e-2, rtol=1e-2)


def test_the_padding_tokens_reach_the_output(transformer):
    """The comparison above would not see a wrapper that skipped the caption padding: it does,
    since the tiny transformer's pad tokens are random and change the output."""
    inputs = random_inputs(1, 7, 8, 8, seed=0)
    with torch.no_grad():
        before = pipeline_velocity(transformer, *inputs)
        saved = transformer.cap_pad_token.clone()
        transformer.cap_pad_token.add_(1.0)
        try:
            after = pipeline_velocity(transformer, *inputs)
        finally:
            transformer.cap_pad_token.copy_(saved)
    assert (after - before).abs().max() > 1e-2


def test_spec_has_a_dynamic_text_length_up_to_the_family_maximum(transformer):
    spec = ZImageTransformerSpec.from_model(transformer, max_text_length=512, latent_size=(8, 8))
    states = next(t for t in spec.inputs if t.name == tensors.ENCODER_HIDDEN_STATES)
    assert states.shape == ("batch", TEXT_LENGTH, ZIMAGE_TEXT_WIDTH)
    assert spec.input_names == [tensors.SAMPLE, tensors.TIMESTEP, tensors.ENCODER_HIDDEN_STATES]
    low, _, high = spec.profile((1, 2, 8))[tensors.ENCODER_HIDDEN_STATES]
    assert (low[1], high[1]) == (1, 512)
    assert spec_class_named("ZImageTransformer2DModel") is ZImageTransformerSpec


def test_other_patch_sizes_are_refused():
    from diffusers import ZImageTransformer2DModel

    other = ZImageTransformer2DModel(
        all_patch_size=(4,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=8, axes_dims=[8, 4, 4],
        axes_lens=[64, 32, 32])
    with pytest.raises(UnsupportedModelError, match="patch size 2"):
        ZImageTransformerSpec.from_model(other)


# the dynamo export takes minutes on a 2-core box; tests/test_zimage_serving.py's served folder
# exports the same wrapper and runs it at two text lengths (the prompt and the negative prompt)
@pytest.mark.slow
def test_onnx_export_takes_any_text_length(transformer, tmp_path):
    from export.onnx_export import trace_to_onnx
    from export.validate import run_onnxruntime

    spec = ZImageTransformerSpec.from_model(transformer, latent_size=(8, 8))
    path = tmp_path / "transformer.onnx"
    trace_to_onnx(spec, transformer, spec.sample_inputs(2, seed=1), path, "dynamo", 18)
    for batch, text_length, height, width in ((1, 5, 8, 8), (2, 40, 8, 12), (3, 512, 4, 6)):
        inputs = random_inputs(batch, text_length, height, width, seed=batch)
        with torch.no_grad():
            expected = pipeline_velocity(transformer, *inputs)
        names = spec.input_names
        (actual,) = run_onnxruntime(path, dict(zip(names, inputs)))
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=5e-5, rtol=1e-4)
