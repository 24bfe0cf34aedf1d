"""The bundled flow-matching reference: an SD3 diffusers folder of 8x8 digits (diffusers' own
pipeline loads it offline and draws the digits asked for), the exact folding of its zero T5
tokens, the spec export derives, and the folder served by a real tritonserver."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bench.metrics import class_accuracy
from models import reference_flow
from models.reference import load_classifier, prompt_for, to_gray
from models.reference_flow import (
    ASSET_DIR,
    SCHEDULER_CONFIG,
    FlowReferenceModel,
    load_flow_reference,
    load_pipeline,
    sd3_t5_tokens,
)

DIGITS = torch.arange(10)
# one torch thread: diffusers' pipeline ran 10x slower on two threads of the shared 2-core box
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def model() -> FlowReferenceModel:
    return load_flow_reference()


def test_folder_is_a_small_sd3_pipeline_without_t5():
    weights = list(ASSET_DIR.rglob("*.safetensors"))
    assert {path.parent.name for path in weights} == {
        "text_encoder", "text_encoder_2", "transformer", "vae"}
    assert sum(path.stat().st_size for path in weights) <= 10 * 10**6
    index = json.loads((ASSET_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert index["text_encoder"] == index["text_encoder_2"] == [
        "transformers", "CLIPTextModelWithProjection"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = json.loads((ASSET_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert {key: scheduler[key] for key in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    for name in ("tokenizer", "tokenizer_2"):
        assert {p.name for p in (ASSET_DIR / name).iterdir()} >= {"vocab.json", "merges.txt"}
    record = json.loads((ASSET_DIR / "training.json").read_text())
    assert record["flow"]["final_loss"] < record["flow"]["initial_loss"]


def test_vae_latents_are_standardised_by_the_sd3_factors(model):
    from models.reference import real_digits

    images, labels = real_digits()
    latents = model.encode_images(images)
    assert abs(latents.mean().item()) < 0.05 and 0.95 < latents.std().item() < 1.05
    assert model.pipeline.vae.config.shift_factor is not None
    reconstructed = to_gray(model.decode(latents)).clamp(-1, 1)
    assert class_accuracy(model.classifier, reconstructed, labels) > 0.97


def test_folded_t5_tokens_give_the_full_sequence_output(model):
    """256 zero T5 tokens (diffusers' conditioning) equal one folded token, to float rounding,
    and a wrong fold (no log-count bias) would not."""
    prompts = [prompt_for(3), "the digit 7", ""]
    x = model.initial_noise(3, torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 20.0])
    full = model.denoise(x, t, **model.denoiser_inputs(prompts))
    assert model.denoiser_inputs(prompts)["encoder_hidden_states"].shape == (
        3, 77 + sd3_t5_tokens(), 32)
    folded = load_flow_reference(fold=True)
    assert folded.t5_tokens == 1
    inputs = folded.denoiser_inputs(prompts)
    assert inputs["encoder_hidden_states"].shape == (3, 78, 32)
    torch.testing.assert_close(folded.denoise(x, t, **inputs), full, atol=1e-5, rtol=1e-4)
    reference_flow.fold_t5_tokens(folded.transformer, 1)  # one token standing for one
    assert not torch.allclose(folded.denoise(x, t, **inputs), full, atol=1e-3)


def test_diffusers_sd3_pipeline_draws_the_digits_the_prompts_ask_for():
    """diffusers' own StableDiffusion3Pipeline, offline, with the folder's scheduler: most
    digits are recognised (a modest bar: each digit once, 10 steps, guidance 2)."""
    pipeline = load_pipeline()
    assert pipeline.vae_scale_factor == 1 and pipeline.text_encoder_3 is None
    prompts = [prompt_for(int(digit)) for digit in DIGITS]
    with torch.no_grad():
        output = pipeline(prompts, num_inference_steps=10, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0), output_type="np")
    images = torch.from_numpy(np.asarray(output.images)).permute(0, 3, 1, 2)
    assert images.shape == (10, 3, 8, 8)
    gray = to_gray(images.float() * 2 - 1)
    assert class_accuracy(load_classifier(), gray, DIGITS) >= 0.8


def test_export_derives_an_sd3_spec_from_the_folder():
    from export.presets import load_bundle, pipeline_spec

    spec = pipeline_spec(load_bundle("reference-flow"))
    assert spec.model == "reference-flow"
    assert (spec.family, spec.decoder, spec.latent_shape, spec.image_size) == (
        "sd3", "vae", (1, 8, 8), (8, 8))
    assert [(e.tokenizer, e.network, e.hidden_size) for e in spec.text_encoders] == [
        ("tokenizer", "text_encoder", 16), ("tokenizer_2", "text_encoder_2", 8)]
    assert spec.joint_attention_dim == 32
    assert spec.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    vae = json.loads((ASSET_DIR / "vae" / "config.json").read_text())
    assert (spec.shift_factor, spec.scaling_factor) == (vae["shift_factor"],
                                                        vae["scaling_factor"])


def test_source_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    from export.presets import source_fingerprint

    before = source_fingerprint("reference-flow")
    assert before.startswith("reference-flow:")
    assert before.split(":")[1] != source_fingerprint("reference").split(":")[1]
    copy = tmp_path / "reference_flow"
    shutil.copytree(ASSET_DIR, copy)
    monkeypatch.setattr(reference_flow, "ASSET_DIR", copy)
    assert source_fingerprint("reference-flow") == before
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert source_fingerprint("reference-flow") != before


# ---------------------------------------------------------------------------------------------
# served


@pytest.fixture(scope="module")
def served(tmp_path_factory, torch_single_thread) -> Iterator:
    """`driffusion serve --model reference-flow` as the server runs it: exported and built on
    fp32 ONNX Runtime engines under a temporary DRIFFUSION_HOME, 2 CPU devices."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    from test_text_to_image import Served

    from triton_models.repository import RepositoryOptions
    from triton_models.serve import prepare_model, serving

    root = tmp_path_factory.mktemp("reference-flow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFFUSION_HOME", str(root))
        options = prepare_model(RepositoryOptions(model="reference-flow", devices=2,
                                                  backend="onnxruntime"), log=lambda line: None)
        with serving(options, root / "repo", root / "server.log") as (server, _):
            yield Served("reference-flow", ASSET_DIR, server.grpc_url, load_pipeline())


@pytest.mark.slow
@pytest.mark.triton
def test_served_sequential_is_diffusers_image_and_aggressive_takes_fewer_rounds(served):
    from test_text_to_image import assert_matches, generate, reference

    prompt, steps = prompt_for(7), 20
    for guidance, seed in ((1.0, 3), (2.0, 4)):
        expected = reference(served, prompt, None, steps, guidance, seed)
        result = generate(served, PROMPT=prompt, STEPS=steps, GUIDANCE=guidance, SEED=seed,
                          MODE="sequential")
        assert_matches(result.image, expected, f"reference-flow guidance={guidance}")
        assert result.rounds == steps
    # the bounds tell the prompts apart: another digit moves diffusers' image beyond them
    other = reference(served, prompt_for(1), None, steps, 2.0, 4)
    diff = np.abs(other.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() > 4 and diff.mean() > 0.5
    aggressive = generate(served, PROMPT=prompt, STEPS=steps, GUIDANCE=1.0, SEED=3,
                          MODE="aggressive", WINDOW=2)
    assert aggressive.rounds < steps and aggressive.evaluations == steps
    assert aggressive.image.shape == (8, 8, 3) and aggressive.image.dtype == np.uint8


@pytest.mark.slow  # 9 s of training in small; the trained folder itself is tested above
def test_training_script_writes_a_loadable_folder_and_its_record(tmp_path):
    """`make train-reference-flow` on a few steps: the folder loads with diffusers' pipeline,
    the record names what was trained, and the transformer left the adaLN-Zero start."""
    from models.train_reference_flow import main

    out = tmp_path / "flow"
    assert main(["--steps", "3", "--batch-size", "8", "--warmup", "1", "--eval-per-class", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["flow"]["steps"] == 3 and record["threads"] == 1
    assert set(record["sample_accuracy_euler20"]) == {"guidance_1", "guidance_2"}
    assert record["vae"]["shift_factor"] == pytest.approx(record["vae"]["latent_mean"])
    pipeline = load_pipeline(out)
    assert pipeline.transformer.proj_out.weight.abs().max() > 0
    assert pipeline.vae.config.shift_factor == record["vae"]["shift_factor"]
