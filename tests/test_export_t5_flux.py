"""T5 encoders, SD3 with T5, SD3.5 and Flux.1 (dev and schnell): specs, export and validation,
pipeline.json contents, ONNX Runtime engines, and the bad folders that are refused.

Flux's transformer exports with the dynamo exporter (about 15 s even for a tiny model), so the
Flux-dev folder is exported and built once for the module; the schnell folder's full export
(its spec is checked without one) and Flux at bf16 (the SD3 transformer and T5 cover bf16 in
tests/test_precision.py) run under `-m slow`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers_folders import (
    flux_folder,
    load_pipeline,
    sd3_folder,
    sd3_t5_folder,
    sd35_folder,
    t5_tokenizer,
)

from cli import main as driffusion
from engines.manifest import read_manifest
from export.onnx_export import ExportOptions, export_network, external_data_path
from export.presets import ModelSourceError, load_bundle, pipeline_spec
from export.specs import (
    FluxTransformerSpec,
    T5EncoderSpec,
    UnsupportedModelError,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from export.validate import run_onnxruntime, run_torch
from models import tensors
from models.pipeline_spec import PipelineSpec, TextEncoder

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUIET = {"log": lambda message: None}
PROMPT = "a watercolor painting of a lighthouse at dusk"
MAX_DIFF = 4  # the parity tests' bound, in pixel levels of 255
SMALL = ["--height", "64", "--width", "64", "--batch-max", "4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-flux-folders")
    return {
        "sd3-t5": sd3_t5_folder(root / "sd3-t5"),
        "flux-dev": flux_folder(root / "flux-dev"),
        "flux-schnell": flux_folder(root / "flux-schnell", guidance_embeds=False),
    }


def graph_types(path: Path) -> dict[str, tuple[str, list]]:
    """{name: (dtype name, dims)} of an ONNX file's graph inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        value.name: (
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
        )
        for value in [*model.graph.input, *model.graph.output]
    }


# ---------------------------------------------------------------------------------------------
# The test folders make T5 matter


@pytest.mark.parametrize("family", ["sd3-t5", "flux-dev"])
def test_zeroing_the_t5_states_moves_diffusers_own_image(folders, family):
    """A served pipeline that dropped T5 could not pass a parity test on these folders."""
    pipeline = load_pipeline(folders[family])
    encoder = pipeline.text_encoder_3 if family == "sd3-t5" else pipeline.text_encoder_2

    def image() -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                        generator=generator).images[0]

    with_t5 = image()
    hook = encoder.encoder.final_layer_norm.register_forward_hook(
        lambda module, inputs, output: torch.zeros_like(output))
    try:
        without_t5 = image()
    finally:
        hook.remove()
    assert np.abs(with_t5 - without_t5).max() * 255 > MAX_DIFF


def test_the_offline_t5_tokenizer_numbers_tokens_as_t5(tmp_path):
    from transformers import AutoTokenizer

    t5_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    ids = loaded("a photo of a cat", padding="max_length", max_length=8).input_ids
    assert ids[-3:] == [1, 0, 0] and 2 not in ids  # words, </s>, padding; nothing unknown


# ---------------------------------------------------------------------------------------------
# T5


def test_t5_exports_validated_with_weights_in_external_data_above_the_threshold(folders, tmp_path):
    bundle = load_bundle(str(folders["sd3-t5"]), ["text_encoder_3"])
    spec = bundle.specs()["text_encoder_3"]
    assert isinstance(spec, T5EncoderSpec) and spec.sequence_length == 256
    options = ExportOptions(batch_range=(1, 2, 4), external_data_threshold=1024)
    path = tmp_path / "text_encoder_3.onnx"
    exported = export_network(spec, bundle.modules["text_encoder_3"], path, options, **QUIET)
    assert external_data_path(path).stat().st_size > path.stat().st_size
    assert exported.validation.ok
    assert graph_types(path) == {
        tensors.INPUT_IDS: ("int64", ["batch", 256]),
        tensors.TEXT_EMBEDDINGS: ("float32", ["batch", 256, 64]),
    }


def test_max_sequence_length_sets_the_t5_tokens_and_the_transformer_sequence(folders):
    bundle = load_bundle(str(folders["sd3-t5"]))
    default = bundle.specs()
    assert default["text_encoder_3"].sequence_length == 256
    assert default["transformer"].sequence_length == 77 + 256
    shorter = bundle.specs(max_sequence_length=64)
    assert shorter["text_encoder_3"].inputs[0].shape == ("batch", 64)
    assert shorter["transformer"].inputs[2].shape == ("batch", 77 + 64, 64)
    spec = pipeline_spec(bundle, max_sequence_length=64)
    assert spec.t5_tokens == 64 and spec.text_encoders[2].max_length == 64
    flux = load_bundle(str(folders["flux-dev"]), ["transformer"])
    assert flux.specs(max_sequence_length=128)["transformer"].sequence_length == 128
    with pytest.raises(ValueError, match="Flux takes at most 512 T5 tokens"):
        flux.specs(max_sequence_length=600)


def test_max_sequence_length_reaches_export_and_serve_flags(folders, tmp_path):
    out = tmp_path / "onnx"
    code = driffusion(["export", "--model", str(folders["sd3-t5"]), "--networks",
                       "text_encoder_3", "--max-sequence-length", "32", "--out", str(out)])
    assert code == 0
    entry = json.loads((out / "export.json").read_text())["exports"]["fp32"]
    assert entry["options"]["max_sequence_length"] == 32
    assert entry["networks"]["text_encoder_3"]["inputs"][0]["shape"] == ["batch", 32]

    from cli import build_parser
    from triton_models.serve import build_arguments

    for command in ("serve", "triton-repo"):
        args = build_parser(command).parse_args(
            [command, "--max-sequence-length", "64", "--precision", "bf16",
             "--network-precision", "vae_decoder=fp32"])
        built = build_arguments(args)
        assert built["precision"] == "bf16"
        assert built["export"].max_sequence_length == 64
        assert built["export"].network_precisions == {"vae_decoder": "fp32"}


def test_a_t5_encoder_without_its_tokenizer_files_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["sd3-t5"], tmp_path / "no-tokenizer")
    (folder / "tokenizer_3" / "tokenizer.json").unlink()
    with pytest.raises(ModelSourceError, match=r"text_encoder_3 \(T5EncoderModel\) needs its "
                       r"tokenizer in tokenizer_3/ with tokenizer.json and "
                       r"tokenizer_config.json .*lacks tokenizer.json"):
        load_bundle(str(folder))
    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(ModelSourceError, match="lacks tokenizer.json, tokenizer_config.json"):
        load_bundle(str(folder))


def test_an_unknown_transformer_class_is_refused_naming_it_and_the_supported(folders, tmp_path):
    folder = shutil.copytree(folders["sd3-t5"], tmp_path / "hunyuan")
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "HunyuanDiT2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match=r"transformer: model class HunyuanDiT2DModel "
                       r"is not supported .*FluxTransformer2DModel.*SD3Transformer2DModel"):
        load_bundle(str(folder))


# ---------------------------------------------------------------------------------------------
# SD3 with T5 and SD3.5


def test_sd3_pipeline_spec_with_and_without_t5(folders, tmp_path):
    spec = pipeline_spec(load_bundle(str(folders["sd3-t5"])))
    assert spec.family == "sd3" and spec.t5_tokens == 256 and spec.joint_attention_dim == 64
    assert [(e.network, e.tokenizer, e.kind, e.max_length, e.hidden_size)
            for e in spec.text_encoders] == [
        ("text_encoder", "tokenizer", "CLIPTextModelWithProjection", 77, 32),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", 77, 16),
        ("text_encoder_3", "tokenizer_3", "T5EncoderModel", 256, 64),
    ]
    assert spec.text_encoders[2].is_t5 and not spec.guidance_embeds
    assert (spec.default_steps, spec.default_guidance) == (28, 7.0)
    without = pipeline_spec(load_bundle(str(sd3_folder(tmp_path / "sd3"))))
    assert [e.network for e in without.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert without.t5_tokens == 256  # zeros for diffusers' 256 T5 tokens


def test_sd35_transformer_with_qk_norm_and_dual_attention_exports_validated(tmp_path):
    folder = sd35_folder(tmp_path / "sd35")
    bundle = load_bundle(str(folder), ["transformer"])
    config = bundle.modules["transformer"].config
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0]
    spec = bundle.specs()["transformer"]
    exported = export_network(spec, bundle.modules["transformer"], tmp_path / "t.onnx",
                              ExportOptions(batch_range=(1, 2, 4)), **QUIET)
    assert exported.validation.ok
    full = pipeline_spec(load_bundle(str(folder)))
    assert full.family == "sd3" and full.text_encoders[2].kind == "T5EncoderModel"


@pytest.fixture(scope="module")
def sd3_t5_engines(folders, tmp_path_factory):
    """The SD3-with-T5 folder built as ONNX Runtime engines at fp16, its VAE decoder kept fp32."""
    root = tmp_path_factory.mktemp("sd3-t5-engines")
    code = driffusion(["build-engines", "--model", str(folders["sd3-t5"]), "--backend",
                       "onnxruntime", "--precision", "fp16", "--network-precision",
                       "vae_decoder=fp32", "--batch-max", "4", "--onnx", str(root / "onnx"),
                       "--out", str(root / "engines")])
    assert code == 0
    return root


def test_sd3_t5_engines_record_each_networks_precision(sd3_t5_engines):
    directory = sd3_t5_engines / "engines" / "sd3-t5" / "cpu"
    manifest = read_manifest(directory)
    precisions = {name: entry["precision"] for name, entry in manifest["networks"].items()}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16",
                          "text_encoder_3": "fp16", "transformer": "fp16", "vae_decoder": "fp32",
                          "vae_encoder": "fp16"}
    spec = PipelineSpec.from_json((directory / "pipeline.json").read_text())
    assert spec.precisions == precisions
    assert (directory / "tokenizer_3" / "tokenizer.json").is_file()
    exported = sd3_t5_engines / "onnx"
    assert sorted(p.name for p in exported.glob("*.onnx")) == [
        "text_encoder.fp16.onnx", "text_encoder_2.fp16.onnx", "text_encoder_3.fp16.onnx",
        "transformer.fp16.onnx", "vae_decoder.onnx", "vae_encoder.fp16.onnx"]
    index = json.loads((exported / "export.json").read_text())["exports"]["fp16"]
    assert index["options"]["network_precisions"] == {"vae_decoder": "fp32"}
    assert graph_types(exported / "transformer.fp16.onnx")[tensors.SAMPLE][0] == "float16"
    assert graph_types(exported / "vae_decoder.onnx")[tensors.LATENT][0] == "float32"


# ---------------------------------------------------------------------------------------------
# Flux


def test_flux_wrapper_is_fluxpipelines_own_packed_call(folders):
    from diffusers import FluxPipeline

    bundle = load_bundle(str(folders["flux-dev"]), ["transformer"])
    transformer = bundle.modules["transformer"]
    spec = bundle.specs()["transformer"]
    inputs = spec.sample_inputs(2, 64, 48)
    sample = inputs[tensors.SAMPLE]
    batch, channels, height, width = sample.shape
    packed = FluxPipeline._pack_latents(sample, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu",
                                                       torch.float32)
    assert torch.equal(pack_latents(sample), packed)
    assert torch.equal(latent_image_ids(height // 2, width // 2, torch.float32), image_ids)
    with torch.no_grad():
        reference = transformer(
            hidden_states=packed, timestep=inputs[tensors.TIMESTEP] / 1000,
            guidance=inputs[tensors.GUIDANCE],
            pooled_projections=inputs[tensors.POOLED_PROJECTIONS],
            encoder_hidden_states=inputs[tensors.ENCODER_HIDDEN_STATES],
            txt_ids=torch.zeros(spec.sequence_length, 3), img_ids=image_ids,
            return_dict=False)[0]
        wrapped = spec.wrap(transformer)(*inputs.values())
    expected = FluxPipeline._unpack_latents(reference, height * 8, width * 8, 8)
    assert torch.equal(unpack_latents(reference, height, width), expected)
    assert wrapped.shape == sample.shape
    torch.testing.assert_close(wrapped, expected, atol=1e-6, rtol=0)


def test_flux_specs_dev_takes_guidance_and_schnell_does_not(folders):
    dev = load_bundle(str(folders["flux-dev"]), ["transformer"]).specs()["transformer"]
    schnell = load_bundle(str(folders["flux-schnell"]), ["transformer"]).specs()["transformer"]
    assert isinstance(dev, FluxTransformerSpec)
    assert dev.input_names == [tensors.SAMPLE, tensors.TIMESTEP, tensors.ENCODER_HIDDEN_STATES,
                               tensors.POOLED_PROJECTIONS, tensors.GUIDANCE]
    assert schnell.input_names == dev.input_names[:-1]
    assert dev.inputs[0].shape == ("batch", 16, "latent_height", "latent_width")
    assert dev.inputs[2].shape == ("batch", 512, 32) and schnell.inputs[2].shape[1] == 256
    assert dev.image_size == (1024, 1024)  # FluxPipeline's 128 latents under an 8x VAE
    with pytest.raises(ValueError, match="not a multiple of 16"):
        dev.dim_ranges(1, 72, 64)


def test_flux_pipeline_specs_follow_fluxpipeline_and_the_schnell_card(folders):
    dev = pipeline_spec(load_bundle(str(folders["flux-dev"])))
    schnell = pipeline_spec(load_bundle(str(folders["flux-schnell"])))
    assert dev.family == schnell.family == "flux"
    assert dev.text_encoders == (
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", 77, 32),
        TextEncoder("text_encoder_2", "tokenizer_2", "T5EncoderModel", 512, 32),
    )
    assert (dev.guidance_embeds, dev.default_steps, dev.default_guidance, dev.t5_tokens) == (
        True, 28, 3.5, 512)
    assert (schnell.guidance_embeds, schnell.default_steps, schnell.default_guidance,
            schnell.t5_tokens) == (False, 4, 0.0, 256)
    assert (dev.latent_channels, dev.latent_size, dev.vae_scale_factor, dev.size_multiple) == (
        16, (128, 128), 8, 16)
    assert (dev.decoder, dev.scaling_factor, dev.shift_factor) == ("vae", 0.3611, 0.1159)
    assert dev.joint_attention_dim == 32
    assert dev.scheduler_config["use_dynamic_shifting"] is True
    assert schnell.scheduler_config["shift"] == 1.0
    assert not schnell.scheduler_config["use_dynamic_shifting"]


@pytest.fixture(scope="module")
def flux_dev_engines(folders, tmp_path_factory):
    """The Flux-dev folder exported for 48 to 80-pixel images and built as ONNX Runtime
    engines."""
    root = tmp_path_factory.mktemp("flux-dev-engines")
    sizes = ["--height", "48,64,80", "--width", "48,64,80", "--batch-max", "4"]
    code = driffusion(["build-engines", "--model", str(folders["flux-dev"]), "--backend",
                       "onnxruntime", *sizes, "--onnx", str(root / "onnx"),
                       "--out", str(root / "engines")])
    assert code == 0
    return root


@pytest.mark.slow  # Flux-dev is exported and served in test_t5_flux_serving
def test_flux_dev_exports_validated_with_its_guidance_input(flux_dev_engines):
    index = json.loads((flux_dev_engines / "onnx" / "export.json").read_text())
    networks = index["exports"]["fp32"]["networks"]
    assert sorted(networks) == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder",
                                "vae_encoder"]
    for entry in networks.values():
        assert all(error["max_abs"] <= error["allowed_abs"]
                   for error in entry["validation"]["outputs"].values())
    transformer = graph_types(flux_dev_engines / "onnx" / "transformer.onnx")
    assert transformer[tensors.GUIDANCE] == ("float32", ["batch"])
    assert transformer[tensors.OUT_SAMPLE] == ("float32", ["batch", 16, "latent_height",
                                                           "latent_width"])
    assert networks["transformer"]["model_class"] == "FluxTransformer2DModel"


@pytest.mark.slow  # Flux-dev is exported and served in test_t5_flux_serving
def test_flux_onnx_runs_at_other_batches_and_sizes_like_torch(folders, flux_dev_engines):
    bundle = load_bundle(str(folders["flux-dev"]), ["transformer"])
    spec = bundle.specs()["transformer"]
    inputs = spec.sample_inputs(3, 80, 48, seed=5)  # traced at batch 2, 64 x 64 pixels
    actual = run_onnxruntime(flux_dev_engines / "onnx" / "transformer.onnx", inputs)[0]
    expected = run_torch(spec, bundle.modules["transformer"], inputs)[0]
    assert actual.shape == (3, 16, 10, 6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # Flux-dev is exported and served in test_t5_flux_serving
def test_flux_dev_engines_and_pipeline_json(flux_dev_engines):
    directory = flux_dev_engines / "engines" / "flux-dev" / "cpu"
    manifest = read_manifest(directory)
    precisions = {name: entry["precision"] for name, entry in manifest["networks"].items()}
    assert precisions == dict.fromkeys(
        ["text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"], "fp32")
    spec = PipelineSpec.from_json((directory / "pipeline.json").read_text())
    assert spec.family == "flux" and spec.guidance_embeds and spec.latent_size == (8, 8)
    assert spec.height_range == spec.width_range == (48, 80)
    assert spec.precisions == dict.fromkeys(manifest["networks"], "fp32")
    assert (directory / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.slow  # 15 s alone, 30 s on a busy machine: the spec test covers schnell's inputs
def test_flux_schnell_exports_validated_without_a_guidance_input(folders, tmp_path):
    out = tmp_path / "onnx"
    code = driffusion(["export", "--model", str(folders["flux-schnell"]), *SMALL,
                       "--out", str(out)])
    assert code == 0
    assert tensors.GUIDANCE not in graph_types(out / "transformer.onnx")
    spec = PipelineSpec.from_json((out / "pipeline.json").read_text())
    assert (spec.guidance_embeds, spec.default_steps, spec.t5_tokens) == (False, 4, 256)


@pytest.mark.slow
def test_flux_dev_exports_at_bf16_with_a_float32_boundary(folders, tmp_path):
    out = tmp_path / "onnx"
    code = driffusion(["export", "--model", str(folders["flux-dev"]), *SMALL, "--precision",
                       "bf16", "--out", str(out)])
    assert code == 0
    spec = PipelineSpec.from_json((out / "pipeline.json").read_text())
    assert spec.precisions == {"text_encoder": "fp16", "text_encoder_2": "bf16",
                               "transformer": "bf16", "vae_decoder": "fp16",
                               "vae_encoder": "fp16"}
    transformer = graph_types(out / "transformer.bf16.onnx")
    assert {dtype for dtype, _ in transformer.values()} == {"float32"}
    entry = json.loads((out / "export.json").read_text())["exports"]["bf16"]["networks"]
    assert entry["transformer"]["opset"] == 22
    assert "widened" in entry["transformer"]["validation"]["method"]
