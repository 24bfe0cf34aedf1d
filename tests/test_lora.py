"""LoRA fused at build time (`--lora FILE[:SCALE]`): the served images are diffusers' with
`load_lora_weights` + `fuse_lora(lora_scale=SCALE)`, for UNet and text-encoder LoRAs; each LoRA
set has exports and engines of its own (switching LoRA builds, switching back reuses); a LoRA
matching no module, or holding NaN/inf, is refused naming the file; a LoRA at the ends of the
scale range exports and validates, and a wrong file still fails validation there."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers_folders import load_pipeline, sd_folder, sd_lora_file
from safetensors.torch import load_file, save_file
from servers import serving_folder
from test_text_to_image import Served, assert_matches, generate

from cli import main as driffusion
from export.lora import Lora, LoraError, lora_key, parse_lora
from export.presets import load_bundle
from export.validate import DEFAULT_TOLERANCES, ValidationError, validate_onnx

PROMPT, STEPS, GUIDANCE, SCALE = "a watercolor lighthouse", 6, 5.0, 0.8
TEXT_SCALE = 0.7  # the text-encoder LoRA's


@pytest.fixture(scope="module")
def folder_and_loras(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    folder = sd_folder(root / "tiny-sd")
    return (folder, sd_lora_file(folder, root / "style-a", seed=1),
            sd_lora_file(folder, root / "style-b", seed=2))


@pytest.fixture(scope="module")
def text_encoder_lora(folder_and_loras, tmp_path_factory) -> Path:
    """A LoRA of the SD folder's CLIP text encoder only, in diffusers' format, made with PEFT
    itself (transformers' `add_adapter` asks for a newer PEFT; diffusers' loader does not)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder, _, _ = folder_and_loras
    text_encoder = load_pipeline(folder).text_encoder
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(config, text_encoder)
    path = tmp_path_factory.mktemp("lora-text")
    StableDiffusionPipeline.save_lora_weights(
        path, text_encoder_lora_layers=get_peft_model_state_dict(text_encoder))
    return path / "pytorch_lora_weights.safetensors"


def test_lora_arguments_parse_file_and_scale(folder_and_loras):
    _, lora, _ = folder_and_loras
    assert parse_lora(str(lora)) == Lora(lora, 1.0)
    assert parse_lora(f"{lora}:0.5") == Lora(lora, 0.5)
    with pytest.raises(ValueError, match="no such file"):
        parse_lora("missing.safetensors:0.5")
    with pytest.raises(ValueError, match=f"is a directory; give the LoRA's .safetensors file, "
                                         f"e.g. {lora}"):
        parse_lora(f"{lora.parent}:0.5")
    with pytest.raises(ValueError, match="scale must be in -10..10"):
        parse_lora(f"{lora}:99")
    assert lora_key((Lora(lora, 0.5),)) != lora_key((Lora(lora, 0.8),))


@pytest.mark.parametrize("keys", [
    {"transformer.blocks.0.attn.to_q.lora_A.weight": (4, 8)},  # another family's LoRA
    {"unet.no_such_block.to_q.lora_A.weight": (4, 8)},  # this family, unknown module
], ids=["other-family", "unknown-module"])
def test_a_lora_matching_no_module_is_refused_naming_the_file(folder_and_loras, tmp_path, keys):
    folder, _, _ = folder_and_loras
    state = {}
    for key, shape in keys.items():
        state[key] = torch.zeros(shape)
        state[key.replace("lora_A", "lora_B")] = torch.zeros(shape[::-1])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(LoraError, match=f"--lora {bad}"):
        load_bundle(str(folder), None, (Lora(bad),))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_lora_with_non_finite_weights_is_refused_naming_the_tensor(
        folder_and_loras, tmp_path, capsys, bad_value):
    folder, style_a, _ = folder_and_loras
    state = load_file(str(style_a))
    name = sorted(state)[3]
    state[name][0, 0] = bad_value
    bad = tmp_path / "diverged.safetensors"
    save_file(state, str(bad))
    assert driffusion(["export", "--model", str(folder), "--lora", f"{bad}:{SCALE}",
                       "--networks", "unet", "--out", str(tmp_path / "onnx")]) == 2
    error = capsys.readouterr().err
    assert f"--lora {bad}: tensor {name!r} holds 1 NaN/inf value(s)" in error
    assert "must be finite" in error and "Traceback" not in error
    assert not (tmp_path / "onnx").exists()  # refused before anything was fused or exported


@pytest.mark.slow  # 27 s: two more builds; engine keys by fingerprint: tests/test_engines.py
def test_each_lora_set_builds_once_and_switching_back_reuses(folder_and_loras, tmp_path):
    from engines.build import build_engines
    from engines.build_types import BuildRequest
    from export.presets import model_name

    folder, style_a, style_b = folder_and_loras
    lines: list[str] = []

    def build(*loras: Lora):
        name = model_name(str(folder), loras)
        request = BuildRequest(source=str(folder), name=name, engines_root=tmp_path / "engines",
                               onnx_dir=tmp_path / "onnx" / name, backend="onnxruntime",
                               loras=loras)
        return build_engines(request, lines.append)

    first = build(Lora(style_a, SCALE))
    second = build(Lora(style_b, SCALE))
    again = build(Lora(style_a, SCALE))
    assert first.directories != second.directories and again.directories == first.directories
    assert first.built and second.built and not again.built and again.kept
    manifest = json.loads((first.directories[0] / "manifest.json").read_text())
    assert manifest["loras"] == [{"file": style_a.name, "sha256": Lora(style_a).sha256,
                                  "scale": SCALE}]
    rescaled = build(Lora(style_a, 0.3))
    assert rescaled.directories != first.directories and rescaled.built


def fused_pipeline(folder: Path, loras: tuple[Lora, ...]):
    """diffusers' own pipeline of `folder` with `loras` loaded and fused, each at its scale."""
    pipeline = load_pipeline(folder)
    for index, lora in enumerate(loras):
        pipeline.load_lora_weights(str(lora.path), adapter_name=f"lora{index}")
    for index, lora in enumerate(loras):
        pipeline.fuse_lora(lora_scale=lora.scale, adapter_names=[f"lora{index}"])
    return pipeline


@pytest.fixture(scope="module")
def served(folder_and_loras, text_encoder_lora, tmp_path_factory,
           torch_single_thread) -> Iterator[Served]:
    """The SD folder served with a UNet LoRA and a text-encoder LoRA fused."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    folder, style_a, _ = folder_and_loras
    root = tmp_path_factory.mktemp("lora-serve")
    loras = (Lora(style_a, SCALE), Lora(text_encoder_lora, TEXT_SCALE))
    with serving_folder(folder, root, loras=loras) as server:
        yield Served("sd-lora", folder, server.grpc_url, fused_pipeline(folder, loras))


def diffusers_image(pipeline, seed: int) -> np.ndarray:
    with torch.no_grad():
        images = pipeline(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np").images
    return (images[0] * 255).round().astype(np.uint8)


def differs_beyond_parity(image: np.ndarray, expected: np.ndarray) -> bool:
    diff = np.abs(image.astype(int) - expected.astype(int))
    return diff.max() > 4 and diff.mean() > 0.5


@pytest.mark.triton
def test_served_loras_match_diffusers_fused_loras(served, folder_and_loras, text_encoder_lora):
    """UNet and text-encoder LoRAs both fused, as diffusers fuses them; each one matters."""
    folder, style_a, _ = folder_and_loras
    expected = diffusers_image(served.pipeline, 51)
    result = generate(served, PROMPT=PROMPT, STEPS=STEPS, GUIDANCE=GUIDANCE, SEED=51,
                      MODE="sequential")
    assert_matches(result.image, expected, "sd + UNet and text-encoder LoRAs")
    assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
    unet_lora_only = fused_pipeline(folder, (Lora(style_a, SCALE),))
    assert differs_beyond_parity(diffusers_image(unet_lora_only, 51), expected)
    text_lora_only = fused_pipeline(folder, (Lora(text_encoder_lora, TEXT_SCALE),))
    assert differs_beyond_parity(diffusers_image(text_lora_only, 51), expected)
    parallel = generate(served, PROMPT=PROMPT, STEPS=STEPS, GUIDANCE=GUIDANCE, SEED=51,
                        MODE="aggressive", WINDOW=4)
    assert parallel.rounds < result.rounds  # (PNDM: STEPS + 1 evaluations)


@pytest.fixture(scope="module")
def scale_limit_exports(folder_and_loras, tmp_path_factory,
                        torch_single_thread) -> dict[float, Path]:
    """The UNet exported (fp32, validated) with the LoRA at each end of the scale range."""
    folder, style_a, _ = folder_and_loras
    outs = {}
    for scale in (10.0, -10.0):
        outs[scale] = tmp_path_factory.mktemp("lora-limit")
        assert driffusion(["export", "--model", str(folder), "--lora", f"{style_a}:{scale}",
                           "--networks", "unet", "--out", str(outs[scale])]) == 0
    return outs


@pytest.mark.parametrize("scale", [10.0, pytest.param(-10.0, marks=pytest.mark.slow)])
def test_export_at_the_scale_limits_validates_and_records_the_loras(
        folder_and_loras, scale_limit_exports, scale):
    """The fused UNet amplifies fp32 rounding beyond the plain fp32 rtol (its outputs differ
    from torch's by more than 2e-3 of their range), which the measured fp32 noise allows."""
    _, style_a, _ = folder_and_loras
    index = json.loads((scale_limit_exports[scale] / "export.json").read_text())
    (entry,) = index["exports"].values()
    assert entry["loras"] == [Lora(style_a, scale).to_json()]
    assert entry["source_fingerprint"].endswith(f"+lora:{lora_key((Lora(style_a, scale),))}")
    error = entry["networks"]["unet"]["validation"]["outputs"]["out_sample"]
    assert error["max_rel"] > 2 * DEFAULT_TOLERANCES["fp32"][1]
    assert error["reference_noise"] > 0 and error["max_abs"] <= error["allowed_abs"]


def test_a_wrong_export_at_the_scale_limit_still_fails_validation(
        folder_and_loras, scale_limit_exports, tmp_path):
    """conv_out's bias moved by 0.25 (a quarter of the outputs' range) fails even with the
    tolerance widened by the fused UNet's fp32 noise."""
    folder, style_a, _ = folder_and_loras
    model = onnx.load(str(scale_limit_exports[10.0] / "unet.onnx"))
    bias = next(t for t in model.graph.initializer if t.name.endswith("conv_out.bias"))
    moved = onnx.numpy_helper.to_array(bias) + 0.25
    bias.CopyFrom(onnx.numpy_helper.from_array(moved, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    bundle = load_bundle(str(folder), ["unet"], (Lora(style_a, 10.0),))
    spec = bundle.specs("fp32", {}, None)["unet"]
    with pytest.raises(ValidationError, match="ABOVE TOLERANCE") as caught:
        validate_onnx(broken, spec, bundle.modules["unet"], batch=1)
    (error,) = caught.value.report.outputs
    assert error.reference_noise > 0 and error.max_abs == pytest.approx(0.25, abs=0.05)
