"""Precision per network: the rule, SDXL's force_upcast VAE kept fp32 at fp16, overrides, the
refusal of an fp16 network that overflows, bf16 exports (opset 22, fp32 boundary) and how far
they are validated on a CPU, and the engine builders following each network's precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers_folders import sd3_folder, sd3_t5_folder, sd_folder, sdxl_folder

from cli import main as driffusion
from engines.build import EngineBuildError, build_engines, ensure_exported
from engines.build import export_options_for as build_export_options
from engines.build_types import BuildRequest
from engines.gpu import GpuInfo
from engines.manifest import read_manifest
from engines.torch_build import (
    build_torch_engines,
    load_network,
    run_network,
    save_network,
    torch_device_key,
)
from export.onnx_export import ExportOptions, export_network, settings_change
from export.precision import (
    BF16_MIN_OPSET,
    apply_overrides,
    network_precision,
    parse_network_precision,
)
from export.presets import load_bundle
from export.validate import (
    OutputError,
    PrecisionError,
    ValidationError,
    ValidationReport,
    validate_onnx,
)
from models import tensors
from models.pipeline_spec import PipelineSpec

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUIET = {"log": lambda message: None}
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, "GPU-12345678-0000-0000-0000-000000000000")


def input_types(path: Path) -> dict[str, str]:
    """{graph input or output name: numpy dtype name} of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return {value.name: onnx.helper.tensor_dtype_to_np_dtype(
        value.type.tensor_type.elem_type).name
        for value in [*model.graph.input, *model.graph.output]}


def weight_types(path: Path) -> set[str]:
    model = onnx.load(str(path))
    return {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            for t in model.graph.initializer if t.dims and np.prod(t.dims) > 16}


# ---------------------------------------------------------------------------------------------
# The rule


def test_the_rule_gives_bf16_to_transformers_and_t5_and_fp16_to_the_rest():
    bf16_models = ("SD3Transformer2DModel", "FluxTransformer2DModel", "T5EncoderModel")
    for model_class in bf16_models:
        assert [network_precision(p, model_class) for p in ("fp32", "fp16", "bf16")] == [
            "fp32", "fp16", "bf16"]
    for model_class in ("UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL"):
        assert [network_precision(p, model_class) for p in ("fp32", "fp16", "bf16")] == [
            "fp32", "fp16", "fp16"]
    assert network_precision("fp16", "AutoencoderKL", upcast=True) == "fp32"
    assert network_precision("bf16", "AutoencoderKL", upcast=True) == "fp32"
    with pytest.raises(ValueError, match="precision 'int8' is not supported"):
        network_precision("int8", "UNet2DConditionModel")


def test_overrides_are_parsed_checked_and_applied():
    assert parse_network_precision("vae_decoder=fp32") == ("vae_decoder", "fp32")
    with pytest.raises(ValueError, match="is not NETWORK=PRECISION"):
        parse_network_precision("vae_decoder")
    with pytest.raises(ValueError, match="precision 'fp8'"):
        parse_network_precision("vae_decoder=fp8")
    rule = {"unet": "fp16", "vae_decoder": "fp16"}
    assert apply_overrides(rule, {"vae_decoder": "fp32"}, ["unet", "vae_decoder"]) == {
        "unet": "fp16", "vae_decoder": "fp32"}
    with pytest.raises(ValueError, match="names vae, which the model does not have; its "
                                         "networks: unet, vae_decoder"):
        apply_overrides(rule, {"vae": "fp32"}, ["unet", "vae_decoder"])
    with pytest.raises(ValueError, match="precision 'half'"):
        ExportOptions(network_precisions={"unet": "half"})
    with pytest.raises(SystemExit):  # argparse: "is not NETWORK=PRECISION"
        driffusion(["export", "--model", "tiny-sd", "--network-precision", "unet"])


def test_changed_overrides_or_t5_length_make_an_export_stale():
    entry = {"options": {"opset": 18, "exporter": "torchscript"},
             "profile_args": ExportOptions().profile_args()}
    assert settings_change(entry, ExportOptions()) is None  # an entry from before these options
    changed = "network precisions or T5 sequence length changed"
    assert settings_change(entry, ExportOptions(network_precisions={"unet": "fp32"})) == changed
    assert settings_change(entry, ExportOptions(max_sequence_length=64)) == changed


def test_folders_read_as_diffusers_does(tmp_path):
    sdxl = load_bundle(str(sdxl_folder(tmp_path / "sdxl")))
    assert sdxl.modules["vae_decoder"].config.force_upcast
    assert sdxl.precisions("fp16") == {"text_encoder": "fp16", "text_encoder_2": "fp16",
                                       "unet": "fp16", "vae_decoder": "fp32",
                                       "vae_encoder": "fp32"}
    assert sdxl.precisions("bf16") == sdxl.precisions("fp16")  # UNets run in fp16
    assert set(sdxl.precisions("fp32").values()) == {"fp32"}
    # StableDiffusionPipeline ignores force_upcast (AutoencoderKL's default): its VAE is fp16
    sd = load_bundle(str(sd_folder(tmp_path / "sd")))
    assert sd.modules["vae_decoder"].config.force_upcast
    assert sd.precisions("fp16")["vae_decoder"] == "fp16"
    sd3 = load_bundle(str(sd3_t5_folder(tmp_path / "sd3-t5")))
    assert sd3.precisions("bf16") == {"text_encoder": "fp16", "text_encoder_2": "fp16",
                                      "text_encoder_3": "bf16", "transformer": "bf16",
                                      "vae_decoder": "fp16", "vae_encoder": "fp16"}
    assert sd3.precisions("bf16", {"transformer": "fp32"})["transformer"] == "fp32"


# ---------------------------------------------------------------------------------------------
# fp16


def test_sdxl_exported_at_fp16_keeps_its_vae_decoder_fp32(tmp_path):
    folder = sdxl_folder(tmp_path / "sdxl")
    out = tmp_path / "onnx"
    assert driffusion(["export", "--model", str(folder), "--precision", "fp16", "--batch-max",
                       "4", "--out", str(out)]) == 0
    assert input_types(out / "vae_decoder.onnx") == {tensors.LATENT: "float32",
                                                     tensors.IMAGES: "float32"}
    assert weight_types(out / "vae_decoder.onnx") == {"float32"}
    assert input_types(out / "unet.fp16.onnx")[tensors.SAMPLE] == "float16"
    assert not (out / "vae_decoder.fp16.onnx").exists()
    spec = PipelineSpec.from_json((out / "pipeline.json").read_text())
    assert spec.precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16",
                               "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    networks = json.loads((out / "export.json").read_text())["exports"]["fp16"]["networks"]
    assert {name: entry["precision"] for name, entry in networks.items()} == spec.precisions


def overflowing_sd_folder(path: Path) -> Path:
    """sd_folder with a VAE whose last conv gives images around 1e6: inf in fp16."""
    from diffusers import AutoencoderKL

    folder = sd_folder(path)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)
    vae.save_pretrained(folder / "vae")
    return folder


def test_an_fp16_network_that_overflows_is_refused_naming_what_works(tmp_path, capsys):
    folder = overflowing_sd_folder(tmp_path / "sd")
    common = ["export", "--model", str(folder), "--networks", "vae_decoder", "--precision",
              "fp16", "--out", str(tmp_path / "onnx")]
    assert driffusion(common) == 1
    error = capsys.readouterr().err
    assert ("vae_decoder: fp16 gives inf/NaN in `images`; export it at fp32 with "
            "--network-precision vae_decoder=fp32") in error
    assert driffusion([*common, "--network-precision", "vae_decoder=fp32"]) == 0


def test_the_refusal_names_bf16_for_an_overflowing_bf16_model():
    report = ValidationReport("text_encoder_3", "fp16", {"input_ids": (1, 8)}, [
        OutputError("text_embeddings", float("inf"), float("inf"), 1.0, 0.1)])
    message = str(PrecisionError(Path("t.fp16.onnx"), report, "T5EncoderModel"))
    assert message.startswith("text_encoder_3: fp16 gives inf/NaN in `text_embeddings`; export "
                              "it at fp32 or bf16 (fp32's range) with --network-precision "
                              "text_encoder_3=fp32")
    missed = ValidationReport("unet", "fp16", {}, [OutputError("out_sample", 0.5, 0.5, 1, 0.1)])
    assert "fp16 gives an error of 0.5 (allowed 0.1) in `out_sample`; export it at fp32 " in str(
        PrecisionError(Path("u.onnx"), missed, "UNet2DConditionModel"))


# ---------------------------------------------------------------------------------------------
# bf16


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory):
    return load_bundle(str(sd3_t5_folder(tmp_path_factory.mktemp("sd3-t5") / "sd3-t5")))


@pytest.mark.parametrize("network", ["text_encoder_3", "transformer"])
def test_bf16_exports_at_opset_22_with_a_float32_boundary_validated_two_ways(
        sd3_t5, tmp_path, network):
    spec = sd3_t5.specs("bf16")[network]
    assert spec.precision == "bf16"
    path = tmp_path / f"{network}.bf16.onnx"
    exported = export_network(spec, sd3_t5.modules[network], path,
                              ExportOptions(batch_range=(1, 2, 4)), **QUIET)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == (
        BF16_MIN_OPSET)
    assert set(input_types(path).values()) <= {"float32", "int64"}
    assert "bfloat16" in weight_types(path)
    report = exported.validation
    assert report.ok and "widened to float32" in report.method
    names = [output.name for output in report.outputs]
    assert any("(torch bf16 vs fp32)" in name for name in names)
    assert any("(ONNX graph widened to fp32)" in name for name in names)
    assert json.loads(json.dumps(exported.to_json()))["opset"] == BF16_MIN_OPSET


def test_bf16_validation_catches_a_file_that_computes_something_else(sd3_t5, tmp_path):
    spec = sd3_t5.specs("bf16")["text_encoder_3"]
    module = sd3_t5.modules["text_encoder_3"]
    path = tmp_path / "t5.bf16.onnx"
    export_network(spec, module, path, ExportOptions(validate=False), **QUIET)
    other = load_bundle(str(sd3_t5.source), ["text_encoder_3"]).modules["text_encoder_3"]
    with torch.no_grad():
        other.shared.weight.mul_(1.5)
    from export.precision import reduced_precision_copy

    with pytest.raises(ValidationError, match="ONNX graph widened to fp32") as caught:
        validate_onnx(path, spec, other, batch=1,
                      reduced_module=reduced_precision_copy(other, "bf16"))
    assert not isinstance(caught.value, PrecisionError)


def test_onnxruntime_engines_refuse_bf16_naming_the_networks(tmp_path):
    request = BuildRequest(source=str(sd3_folder(tmp_path / "sd3")), name="sd3",
                           engines_root=tmp_path / "engines", onnx_dir=tmp_path / "onnx",
                           backend="onnxruntime", precision="bf16", networks=("transformer",),
                           export=ExportOptions(batch_range=(1, 2, 4)))
    with pytest.raises(EngineBuildError, match=r"no bf16 CPU kernels .*so transformer cannot "
                       r"run as ONNX Runtime engines.*--network-precision transformer=fp32"):
        build_engines(request, **QUIET)


def test_torch_backend_runs_a_transformer_in_bf16(sd3_t5, tmp_path):
    spec = sd3_t5.specs()["transformer"]
    path = tmp_path / "transformer.safetensors"
    save_network(sd3_t5.modules["transformer"], path, spec)
    inputs = {name: value.numpy() for name, value in spec.sample_inputs(2).items()}
    fp32 = run_network(load_network(path), inputs, spec.output_names)[tensors.OUT_SAMPLE]
    network = load_network(path, "cpu", "bfloat16")
    assert network.half_inputs == {tensors.SAMPLE, tensors.ENCODER_HIDDEN_STATES,
                                   tensors.POOLED_PROJECTIONS}
    assert next(network.module.parameters()).dtype == torch.bfloat16
    bf16 = run_network(network, inputs, spec.output_names)[tensors.OUT_SAMPLE]
    assert bf16.dtype == np.float32
    scale = np.abs(fp32).max()
    assert 0 < np.abs(bf16 - fp32).max() <= 0.02 + 0.06 * scale


def test_torch_engines_record_the_rules_precision_per_gpu(tmp_path):
    """On a GPU (faked: the build itself runs on the CPU) the transformer and T5 take bf16,
    CLIP the rule's fp16; the VAE stays an ONNX Runtime engine."""
    request = BuildRequest(source=str(sd3_t5_folder(tmp_path / "sd3")), name="sd3",
                           engines_root=tmp_path / "engines", onnx_dir=tmp_path / "onnx",
                           backend="torch", precision="bf16",
                           networks=("transformer", "text_encoder", "text_encoder_3",
                                     "vae_decoder"),
                           export=ExportOptions(batch_range=(1, 2, 4)))
    exported = ensure_exported(request, build_export_options(request, "torch"), QUIET["log"])
    assert {onnx.name: onnx.precision for onnx in exported} == dict.fromkeys(
        ("transformer", "text_encoder", "text_encoder_3", "vae_decoder"), "fp32")
    build_torch_engines(request, exported, [H100], QUIET["log"])
    manifest = read_manifest(request.engines_root / "sd3" / torch_device_key(H100))
    assert {name: (entry["precision"], entry["file"]) for name, entry in
            manifest["networks"].items()} == {
        "transformer": ("bf16", "transformer.safetensors"),
        "text_encoder": ("fp16", "text_encoder.safetensors"),
        "text_encoder_3": ("bf16", "text_encoder_3.safetensors"),
        "vae_decoder": ("fp32", "vae_decoder.onnx")}
    assert manifest["networks"]["text_encoder_3"]["optimization_level"] == "eager"
