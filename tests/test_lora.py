"""LoRA fused at build time (`--lora FILE[:SCALE]`): the served images are diffusers' with
`load_lora_weights` + `fuse_lora(lora_scale=SCALE)`; each LoRA set has exports and engines of
its own (switching LoRA builds, switching back reuses); a LoRA matching no module is refused
naming the file."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_folders import load_pipeline, sd_folder, sd_lora_file
from safetensors.torch import save_file
from servers import serving_folder
from test_text_to_image import Served, assert_matches, generate

from cli import main as driffusion
from export.lora import Lora, LoraError, lora_key, parse_lora
from export.presets import load_bundle

PROMPT, STEPS, GUIDANCE, SCALE = "a watercolor lighthouse", 6, 5.0, 0.8


@pytest.fixture(scope="module")
def folder_and_loras(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    folder = sd_folder(root / "tiny-sd")
    return (folder, sd_lora_file(folder, root / "style-a", seed=1),
            sd_lora_file(folder, root / "style-b", seed=2))


def test_lora_arguments_parse_file_and_scale(folder_and_loras):
    _, lora, _ = folder_and_loras
    assert parse_lora(str(lora)) == Lora(lora, 1.0)
    assert parse_lora(f"{lora}:0.5") == Lora(lora, 0.5)
    with pytest.raises(ValueError, match="no such file"):
        parse_lora("missing.safetensors:0.5")
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


def test_each_lora_set_builds_once_and_switching_back_reuses(folder_and_loras, tmp_path):
    from engines.build import BuildRequest, build_engines
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


@pytest.fixture(scope="module")
def served(folder_and_loras, tmp_path_factory, torch_single_thread) -> Iterator[Served]:
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the embedded tritonserver)")
    folder, style_a, _ = folder_and_loras
    root = tmp_path_factory.mktemp("lora-serve")
    with serving_folder(folder, root, loras=(Lora(style_a, SCALE),)) as server:
        pipeline = load_pipeline(folder)
        pipeline.load_lora_weights(str(style_a))
        pipeline.fuse_lora(lora_scale=SCALE)
        yield Served("sd-lora", folder, server.grpc_url, pipeline)


def diffusers_image(pipeline, seed: int) -> np.ndarray:
    with torch.no_grad():
        images = pipeline(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np").images
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.triton
def test_served_lora_matches_diffusers_fused_lora(served, folder_and_loras):
    folder, _, _ = folder_and_loras
    expected = diffusers_image(served.pipeline, 51)
    result = generate(served, PROMPT=PROMPT, STEPS=STEPS, GUIDANCE=GUIDANCE, SEED=51,
                      MODE="sequential")
    assert_matches(result.image, expected, "sd + LoRA")
    without = diffusers_image(load_pipeline(folder), 51)
    diff = np.abs(without.astype(int) - expected.astype(int))
    assert diff.max() > 4 and diff.mean() > 0.5  # the LoRA matters at the parity bounds
    parallel = generate(served, PROMPT=PROMPT, STEPS=STEPS, GUIDANCE=GUIDANCE, SEED=51,
                        MODE="aggressive", WINDOW=4)
    assert parallel.rounds < result.rounds  # (PNDM: STEPS + 1 evaluations)


def test_export_records_the_loras(folder_and_loras, tmp_path):
    folder, style_a, _ = folder_and_loras
    out = tmp_path / "onnx"
    assert driffusion(["export", "--model", str(folder), "--lora", f"{style_a}:{SCALE}",
                       "--networks", "unet", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "export.json").read_text())["exports"].values()
    assert entry["loras"] == [Lora(style_a, SCALE).to_json()]
    assert entry["source_fingerprint"].endswith(f"+lora:{lora_key((Lora(style_a, SCALE),))}")
