"""Tensor names and dtypes shared by every layer: one definition from export to the device client.

The export specs name each network's inputs and outputs with these constants; the manifest and
the model repository carry them on; the device client and the pipeline address tensors by the
same names. A denoiser has `sample` and `timestep` in and `out_sample` out; every other input
of it is conditioning, which the pipeline supplies by name.
"""
from __future__ import annotations

from dataclasses import dataclass

# denoisers (UNet, UNet2D, SD3 and Flux transformers)
SAMPLE = "sample"
TIMESTEP = "timestep"
OUT_SAMPLE = "out_sample"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TEXT_EMBEDS = "text_embeds"  # SDXL: pooled text embedding
TIME_IDS = "time_ids"  # SDXL: original size, crop corner, target size
POOLED_PROJECTIONS = "pooled_projections"  # SD3, Flux: pooled CLIP embeddings
GUIDANCE = "guidance"  # Flux-dev: the guidance scale the transformer embeds, [B]
MASK = "mask"  # 9-channel inpainting UNet: the repaint mask at latent size, [B, 1, h, w]
MASKED_IMAGE_LATENTS = "masked_image_latents"  # and the kept region's latents, [B, C, h, w]
CLASS_LABELS = "class_labels"  # class-conditional UNet2DModel

# text encoders
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"  # LLM encoders: 1 for prompt tokens, 0 for padding, [N, S]
LABEL = "label"
TEXT_EMBEDDINGS = "text_embeddings"  # last hidden state (CLIP and T5); an LLM's chosen states
PENULTIMATE_HIDDEN_STATES = "penultimate_hidden_states"  # SDXL / SD3 use the layer before last
POOLED = "pooled"  # CLIPTextModel pooler output, or CLIPTextModelWithProjection text_embeds

# VAE decoder (latent -> images) and encoder (images -> latent_parameters: the posterior's
# mean and log-variance along channels)
LATENT = "latent"
IMAGES = "images"
LATENT_PARAMETERS = "latent_parameters"


@dataclass(frozen=True)
class DType:
    """One element type under its names in numpy/ONNX specs, Triton configs and on the wire."""

    name: str  # numpy / torch name, as the specs and manifests write it
    triton_config: str  # config.pbtxt data_type
    wire: str  # KServe v2 datatype
    onnx: str  # ONNX Runtime's type string


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", "TYPE_FP32", "FP32", "tensor(float)"),
        DType("float16", "TYPE_FP16", "FP16", "tensor(float16)"),
        DType("bfloat16", "TYPE_BF16", "BF16", "tensor(bfloat16)"),
        DType("int64", "TYPE_INT64", "INT64", "tensor(int64)"),
        DType("int32", "TYPE_INT32", "INT32", "tensor(int32)"),
        DType("uint8", "TYPE_UINT8", "UINT8", "tensor(uint8)"),
        DType("bool", "TYPE_BOOL", "BOOL", "tensor(bool)"),
        DType("bytes", "TYPE_STRING", "BYTES", "tensor(string)"),
    )
}


def dtype_named(name: str) -> DType:
    """The DType of a numpy name; ValueError lists the supported ones."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_of_triton_config(data_type: str) -> DType:
    """The DType of a config.pbtxt data_type (e.g. TYPE_FP16)."""
    for dtype in DTYPES.values():
        if dtype.triton_config == data_type:
            return dtype
    raise ValueError(f"Triton data_type {data_type!r} is not supported")


def dtype_of_onnx(type_string: str) -> DType:
    """The DType of an ONNX Runtime type string (e.g. tensor(float))."""
    for dtype in DTYPES.values():
        if dtype.onnx == type_string:
            return dtype
    raise ValueError(f"ONNX type {type_string!r} is not supported")
