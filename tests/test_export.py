"""ONNX export of every network kind from tiny configs, checked numerically against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DModel
from tiny_models import small_sdxl_unet, small_unet

from cli import main as driffusion
from export.onnx_export import (
    ExportOptions,
    export_model,
    export_network,
    external_data_path,
    onnx_sha256,
    read_export_index,
)
from export.presets import ModelSourceError, load_bundle, pipeline_spec, tiny_sd
from export.specs import (
    LabelEncoderSpec,
    SD3TransformerSpec,
    TextEncoderSpec,
    UNet2DSpec,
    UNetSpec,
    VAEDecoderSpec,
)
from export.validate import ValidationError, run_onnxruntime, validate_onnx

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUIET = {"log": lambda message: None}


def graph_io(path: Path) -> dict[str, tuple[int, list]]:
    """{name: (elem_type, dims)} of the graph inputs and outputs of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        value.name: (
            value.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
        )
        for value in [*model.graph.input, *model.graph.output]
    }


@pytest.fixture(scope="module")
def tiny_sd_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-sd-onnx")
    bundle = tiny_sd()
    result = export_model(bundle, out, ExportOptions(batch_range=(1, 2, 4)), **QUIET)
    return bundle, result


def test_tiny_sd_exports_every_network_validated(tiny_sd_export):
    _bundle, result = tiny_sd_export
    assert list(result.networks) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name, exported in result.networks.items():
        assert exported.path.name == f"{name}.onnx"
        onnx.checker.check_model(str(exported.path), full_check=True)
        report = exported.validation
        assert report.ok
        # validated at batch 1 although traced at batch 2: the batch axis really is dynamic
        assert next(iter(report.input_shapes.values()))[0] == 1
        for output in report.outputs:
            assert output.max_abs < 1e-4, (name, output)
    io = graph_io(result.networks["unet"].path)
    assert io["sample"] == (onnx.TensorProto.FLOAT, ["batch", 4, "latent_height", "latent_width"])
    assert io["timestep"] == (onnx.TensorProto.FLOAT, ["batch"])
    assert io["out_sample"][1] == ["batch", 4, "latent_height", "latent_width"]


def test_exported_unet_runs_at_other_sizes_like_torch(tiny_sd_export):
    bundle, result = tiny_sd_export
    spec = result.networks["unet"].spec
    # a size never traced: 128x64 pixels -> 16x8 latents, batch 3
    report = validate_onnx(
        result.networks["unet"].path,
        spec,
        bundle.modules["unet"],
        batch=3,
        height=128,
        width=64,
        seed=5,
    )
    assert report.input_shapes["sample"] == (3, 4, 16, 8)
    assert report.outputs[0].max_abs < 1e-4


def test_export_index_records_files_profiles_and_errors(tiny_sd_export):
    _, result = tiny_sd_export
    index = read_export_index(result.directory)
    entry = index["exports"]["fp32"]
    assert index["model"] == "tiny-sd"
    assert entry["profile_args"]["batch_range"] == [1, 2, 4]
    unet = entry["networks"]["unet"]
    assert unet["sha256"] == onnx_sha256(result.directory / "unet.onnx")
    assert unet["profile"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8]]
    assert unet["validation"]["outputs"]["out_sample"]["max_abs"] < 1e-4


def test_validation_fails_with_the_error_numbers(tiny_sd_export, tmp_path):
    bundle, result = tiny_sd_export
    exported = result.networks["text_encoder"]
    model = onnx.load(str(exported.path))
    # break the final layer norm's bias: outputs move by 0.5 everywhere
    bias = next(t for t in model.graph.initializer if t.name.endswith("final_layer_norm.bias"))
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.5, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ValidationError) as caught:
        validate_onnx(broken, exported.spec, bundle.modules["text_encoder"], batch=2)
    message = str(caught.value)
    assert "text_embeddings: max abs err 0.5" in message
    assert "max rel err" in message and "ABOVE TOLERANCE" in message
    assert caught.value.report.outputs[0].max_abs == pytest.approx(0.5, abs=1e-3)


def test_a_one_percent_error_fails_though_the_fp32_noise_is_measured(tiny_sd_export, tmp_path):
    """A well-conditioned network's fp32 noise is tiny, so the widened tolerance still catches
    an error of about 1% of the outputs' range (the UNet's conv_out bias moved by 0.01)."""
    bundle, result = tiny_sd_export
    exported = result.networks["unet"]
    model = onnx.load(str(exported.path))
    bias = next(t for t in model.graph.initializer if t.name.endswith("conv_out.bias"))
    moved = onnx.numpy_helper.to_array(bias) + 0.01
    bias.CopyFrom(onnx.numpy_helper.from_array(moved, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ValidationError, match="fp32 noise") as caught:
        validate_onnx(broken, exported.spec, bundle.modules["unet"], batch=2)
    (error,) = caught.value.report.outputs
    assert 0 < error.reference_noise < 1e-4 and error.max_abs == pytest.approx(0.01, abs=1e-4)


def test_fp16_export_is_strongly_typed_fp16(tmp_path):
    unet = small_unet()
    spec = UNetSpec.from_model(unet, precision="fp16", sequence_length=7, vae_scale_factor=1)
    exported = export_network(
        spec, unet, tmp_path / "unet.fp16.onnx", ExportOptions(precision="fp16"), **QUIET
    )
    io = graph_io(exported.path)
    assert io["sample"][0] == onnx.TensorProto.FLOAT16
    assert io["encoder_hidden_states"][0] == onnx.TensorProto.FLOAT16
    assert io["timestep"][0] == onnx.TensorProto.FLOAT
    assert io["out_sample"][0] == onnx.TensorProto.FLOAT16
    weights = [t for t in onnx.load(str(exported.path)).graph.initializer if np.prod(t.dims) >= 64]
    # every weight is fp16 (fp32 stays only in tiny constants such as the timestep frequencies)
    assert {t.data_type for t in weights} == {onnx.TensorProto.FLOAT16}
    assert exported.validation.ok
    assert exported.validation.outputs[0].max_rel < 2e-2
    # the torch module the caller passed stays fp32 (it is the validation reference)
    assert next(unet.parameters()).dtype == torch.float32


def test_fp16_text_encoder_export_is_a_valid_graph(tmp_path):
    bundle = tiny_sd()
    spec = bundle.specs("fp16")["text_encoder"]
    exported = export_network(
        spec,
        bundle.modules["text_encoder"],
        tmp_path / "te.onnx",
        ExportOptions(precision="fp16"),
        **QUIET,
    )
    onnx.checker.check_model(str(exported.path), full_check=True)
    assert exported.validation.ok


def test_sdxl_unet_export_with_added_conditioning(tmp_path):
    unet = small_sdxl_unet()
    spec = UNetSpec.from_model(unet, sequence_length=7, vae_scale_factor=8)
    exported = export_network(spec, unet, tmp_path / "unet.onnx", ExportOptions(), **QUIET)
    assert list(graph_io(exported.path)) == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
        "out_sample",
    ]
    assert exported.validation.outputs[0].max_abs < 1e-4


def test_unet2d_export_with_class_labels(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=4,
        num_class_embeds=10,
    ).eval()
    spec = UNet2DSpec.from_model(unet)
    exported = export_network(spec, unet, tmp_path / "unet.onnx", ExportOptions(), **QUIET)
    assert graph_io(exported.path)["class_labels"] == (onnx.TensorProto.INT64, ["batch"])
    assert exported.validation.outputs[0].max_abs < 1e-4


def test_sd3_transformer_export(tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
    ).eval()
    spec = SD3TransformerSpec.from_model(transformer, sequence_length=7, vae_scale_factor=1)
    exported = export_network(
        spec, transformer, tmp_path / "transformer.onnx", ExportOptions(), **QUIET
    )
    assert list(graph_io(exported.path))[:4] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
    ]
    assert exported.validation.outputs[0].max_abs < 1e-4
    # 16x16 latents also run: the patch grid is not baked in
    validate_onnx(exported.path, spec, transformer, batch=1, height=16, width=16)


def test_label_encoder_export_matches_the_embedding(tmp_path):
    encoder = torch.nn.Embedding(11, 64)
    spec = LabelEncoderSpec.from_model(encoder)
    exported = export_network(
        spec, encoder, tmp_path / "text_encoder.onnx", ExportOptions(), **QUIET
    )
    (embeddings,) = run_onnxruntime(exported.path, {"label": torch.tensor([3, 10])})
    np.testing.assert_array_equal(embeddings[:, 0], encoder.weight.detach().numpy()[[3, 10]])


def test_reference_preset_is_the_bundled_diffusers_folder(tmp_path):
    bundle = load_bundle("reference")
    assert sorted(bundle.modules) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    specs = bundle.specs("fp32")
    assert isinstance(specs["text_encoder"], TextEncoderSpec)
    assert isinstance(specs["vae_decoder"], VAEDecoderSpec)
    assert specs["unet"].profile((1, 2, 8))["encoder_hidden_states"][2] == (8, 77, 16)
    assert specs["unet"].profile((1, 2, 8))["sample"][2] == (8, 1, 8, 8)
    assert pipeline_spec(bundle).family == "sd"
    result = export_model(bundle, tmp_path, ExportOptions(), **QUIET)
    assert all(n.validation.ok for n in result.networks.values())

def test_external_data_above_the_threshold(tmp_path):
    unet = small_unet()
    spec = UNetSpec.from_model(unet, sequence_length=7, vae_scale_factor=1)
    options = ExportOptions(external_data_threshold=0)
    exported = export_network(spec, unet, tmp_path / "unet.onnx", options, **QUIET)
    data = external_data_path(exported.path)
    model = onnx.load(str(exported.path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and data.stat().st_size >= sum(np.prod(t.dims) * 4 for t in external)
    assert exported.validation.ok  # ONNX Runtime found the weights beside the file
    sha_before = onnx_sha256(exported.path)
    data.write_bytes(data.read_bytes()[:-1] + b"\x00")
    assert onnx_sha256(exported.path) != sha_before  # the hash covers the weights too


@pytest.mark.slow
def test_dynamo_exporter_at_opset_18(tmp_path):
    unet = small_unet()
    spec = UNetSpec.from_model(unet, sequence_length=7, vae_scale_factor=1)
    options = ExportOptions(exporter="dynamo", opset=18)
    exported = export_network(spec, unet, tmp_path / "unet.onnx", options, **QUIET)
    # the spec's dim names replace the ones dynamo invents (e.g. "2*((s1 - 1)//2) + 2")
    assert graph_io(exported.path)["out_sample"][1] == ["batch", 4, "latent_height", "latent_width"]
    assert exported.validation.outputs[0].max_abs < 1e-4
    validate_onnx(exported.path, spec, unet, batch=3, height=16, width=8)


def test_export_options_reject_bad_values():
    with pytest.raises(ValueError, match="opset 16 is too old"):
        ExportOptions(opset=16)
    with pytest.raises(ValueError, match="dynamo exporter needs opset >= 18"):
        ExportOptions(exporter="dynamo", opset=17)
    with pytest.raises(ValueError, match="exporter 'jit'"):
        ExportOptions(exporter="jit")


def write_pipeline_folder(root: Path, bundle, index_extra: dict | None = None) -> Path:
    """A diffusers pipeline folder as save_pretrained lays it out, from a tiny bundle."""
    bundle.modules["text_encoder"].save_pretrained(root / "text_encoder")
    bundle.modules["unet"].save_pretrained(root / "unet")
    bundle.modules["vae_decoder"].save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundle.scheduler_config))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        **(index_extra or {}),
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_local_pipeline_folder_loads_like_the_preset(tmp_path):
    preset = tiny_sd()
    folder = write_pipeline_folder(tmp_path / "my-model", preset)
    bundle = load_bundle(str(folder))
    assert bundle.name == "my-model"
    assert list(bundle.modules) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert bundle.context.vae_scale_factor == 8 and bundle.context.sequence_length == 77
    assert bundle.scheduler_config["beta_schedule"] == "scaled_linear"
    preset_profile = preset.specs("fp32")["unet"].profile((1, 2, 8))
    assert bundle.specs("fp32")["unet"].profile((1, 2, 8)) == preset_profile
    only = load_bundle(str(folder), ["unet"])
    assert list(only.modules) == ["unet"]


def test_single_model_folder_loads_as_its_network(tmp_path):
    small_unet().save_pretrained(tmp_path / "just-a-unet")
    bundle = load_bundle(str(tmp_path / "just-a-unet"))
    assert list(bundle.modules) == ["unet"]
    assert bundle.specs("fp32")["unet"].input_names == [
        "sample",
        "timestep",
        "encoder_hidden_states",
    ]


def test_cli_export_from_a_folder(tmp_path, capsys):
    folder = write_pipeline_folder(tmp_path / "sd", tiny_sd())
    out = tmp_path / "onnx"
    code = driffusion(
        [
            "export",
            "--model",
            str(folder),
            "--out",
            str(out),
            "--networks",
            "text_encoder",
            "--batch-max",
            "4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "text_embeddings: max abs err" in printed
    assert "exported 1 network(s) of sd (fp32)" in printed
    assert (out / "text_encoder.onnx").is_file()


def test_bad_sources_and_unsupported_classes_are_named(tmp_path, capsys):
    with pytest.raises(
        ModelSourceError, match="neither a preset .*tiny-sd.* nor an existing directory"
    ):
        load_bundle(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="neither model_index.json"):
        load_bundle(str(tmp_path))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "prior": ["diffusers", "PriorTransformer"]})
    )
    with pytest.raises(ValueError, match="prior are not supported for export"):
        load_bundle(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match="PriorTransformer is not supported"):
        load_bundle(str(tmp_path / "odd"), ["prior"])
    code = driffusion(
        ["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "neither a preset" in capsys.readouterr().err
    with pytest.raises(ModelSourceError, match="has no network nope"):
        load_bundle("tiny-sd", ["nope"])


def test_a_component_the_product_cannot_serve_is_named_with_what_is_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "controlnet": ["diffusers", "ControlNetModel"]}))
    supported = "text_encoder, text_encoder_2, text_encoder_3, unet, transformer, vae"
    with pytest.raises(ValueError, match=f"controlnet are not supported .*supported: {supported}"):
        load_bundle(str(tmp_path))
