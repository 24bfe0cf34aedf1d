"""Precision per network: the one rule that turns `--precision` into each network's precision.

| network                          | --precision fp32 | fp16                        | bf16 |
|----------------------------------|------------------|-----------------------------|------|
| SD3 / Flux / Z-Image transformer | fp32             | fp16                        | bf16 |
| T5 encoder                       | fp32             | fp16 (`wo` kept fp32)       | bf16 |
| UNet (SD 1.x/2.x, SDXL)          | fp32             | fp16                        | fp16 |
| CLIP encoders, label encoder     | fp32             | fp16                        | fp16 |
| VAE decoder                      | fp32             | fp16; fp32 for SDXL with `force_upcast` | same as fp16 |

- bf16 goes to the models published and run in bf16 (the MMDiT transformers of SD3 and Flux,
  Z-Image's single-stream transformer, and T5). UNets, CLIP and the VAE are published in fp16,
  run in fp16 by diffusers, and lose three mantissa bits in bf16 without needing its range, so
  they take fp16 when bf16 is asked.
- The SDXL pipelines decode in fp32 when the VAE config says `force_upcast` (the SDXL VAE
  overflows in fp16); the other pipelines ignore the flag (diffusers' AutoencoderKL defaults it
  to true, so SD 1.x folders carry it too), and so does this rule.
- Modules a model class keeps in fp32 stay fp32 inside a reduced-precision network, as diffusers
  and transformers load them (`_keep_in_fp32_modules`: T5's feed-forward output `wo` in fp16).
- `--network-precision NAME=P` overrides the rule for one network.

A bf16 network takes and gives float32 at its boundary and casts inside (the wire and the
runtime stay fp32; TensorRT's strongly typed build honours the casts); an fp16 network takes
and gives float16. bf16 ONNX needs opset 22 (the first with bfloat16 Conv, Sin and Cos).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.pipeline_spec import NETWORK_PRECISIONS, STABLE_DIFFUSION_XL, T5_ENCODERS

PRECISIONS = NETWORK_PRECISIONS
# the model classes --precision bf16 applies to; every other network takes fp16 for bf16
BF16_MODELS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel",
               *T5_ENCODERS)
# families whose diffusers pipelines decode in fp32 when the VAE config says force_upcast
UPCAST_VAE_FAMILIES = (STABLE_DIFFUSION_XL,)
BF16_MIN_OPSET = 22
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch dtype names ("bfloat16") -> precision names ("bf16")
PRECISION_OF_DTYPE = {
    str(dtype).removeprefix("torch."): name for name, dtype in TORCH_DTYPES.items()
}


def checked_precision(precision: str) -> str:
    """`precision` itself when it is one of PRECISIONS, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {PRECISIONS}")
    return precision


def boundary_dtype(precision: str) -> str:
    """The dtype of a network's floating inputs and outputs: float16 at fp16, else float32."""
    return "float16" if checked_precision(precision) == "fp16" else "float32"


def network_precision(requested: str, model_class: str, *, upcast: bool = False) -> str:
    """The precision a network of `model_class` gets when `requested` is asked (the table
    above); `upcast`: a VAE that its family's pipeline decodes in fp32 when reduced."""
    if checked_precision(requested) == "fp32" or upcast:
        return "fp32"
    return "bf16" if requested == "bf16" and model_class in BF16_MODELS else "fp16"


def parse_network_precision(text: str) -> tuple[str, str]:
    """`vae_decoder=fp32` -> ("vae_decoder", "fp32"); ValueError says what is expected."""
    network, separator, precision = text.partition("=")
    if not separator or not network:
        raise ValueError(f"--network-precision {text!r} is not NETWORK=PRECISION "
                         f"(e.g. vae_decoder=fp32; precisions: {', '.join(PRECISIONS)})")
    return network, checked_precision(precision)


def apply_overrides(precisions: dict[str, str], overrides: dict[str, str],
                    networks: list[str]) -> dict[str, str]:
    """`precisions` with the per-network overrides applied; an override naming a network the
    model does not have is an error listing the ones it has."""
    unknown = sorted(set(overrides) - set(networks))
    if unknown:
        raise ValueError(f"--network-precision names {', '.join(unknown)}, which the model does "
                         f"not have; its networks: {', '.join(networks)}")
    for precision in overrides.values():
        checked_precision(precision)
    return {name: overrides.get(name, precision) for name, precision in precisions.items()}


def kept_in_fp32(module: nn.Module, precision: str) -> tuple[str, ...]:
    """Names of the submodules `module`'s class keeps in fp32 at `precision`, as its library
    loads it: diffusers keeps `_keep_in_fp32_modules` at any reduced dtype, transformers only at
    fp16 (and `_keep_in_fp32_modules_strict` at fp16 and bf16)."""
    if precision == "fp32":
        return ()
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    from_diffusers = type(module).__module__.startswith("diffusers")
    if precision == "fp16" or from_diffusers:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(keep))


def cast_module(module: nn.Module, precision: str) -> nn.Module:
    """Cast `module` in place to `precision`, keeping its class's fp32 modules in fp32."""
    keep = kept_in_fp32(module, precision)
    module.to(TORCH_DTYPES[checked_precision(precision)])
    for name, child in module.named_modules():
        if keep and set(name.split(".")) & set(keep):
            child.float()
    return module


def reduced_precision_copy(module: nn.Module, precision: str) -> nn.Module:
    """A copy of `module` at `precision` (the fp32 original stays the validation reference)."""
    reduced = cast_module(copy.deepcopy(module), precision)
    if hasattr(reduced, "set_attn_implementation"):
        # transformers' SDPA path traced in reduced precision on the CPU records fp32 casts that
        # leave LayerNormalization with mixed input types (an invalid graph); eager does not
        reduced.set_attn_implementation("eager")
    return reduced


def export_opset(opset: int, precision: str) -> int:
    """The opset a network is exported at: bf16 needs BF16_MIN_OPSET or newer."""
    return max(opset, BF16_MIN_OPSET) if precision == "bf16" else opset
