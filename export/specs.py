"""Network specs: names, dtypes, dynamic axes, profiles and sample inputs of exportable networks.

One spec object per network kind drives export (input/output names, dynamic axes), validation
(sample inputs) and engine builds (min/opt/max shapes of the optimisation profile).

Shapes hold ints for static dims and strings for symbolic ones. The symbolic names used are
`batch`, `latent_height`, `latent_width`, `image_height` and `image_width`. Profile and sample
sizes are given in *image pixels*; a spec converts them to latent sizes with its
`vae_scale_factor` (8 for Stable Diffusion, 1 for pixel-space models such as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import tensors

BATCH = "batch"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"

PRECISIONS = ("fp32", "fp16")

Range = tuple[int, int, int]
Shape = tuple[int | str, ...]
ProfileShapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class UnsupportedModelError(ValueError):
    """A model class or configuration that no spec can export."""


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype as a string, shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: Shape

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def checked_precision(precision: str) -> str:
    """`precision` itself when it is one of PRECISIONS, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {PRECISIONS}")
    return precision


def float_dtype(precision: str) -> str:
    """The ONNX/torch dtype name of a network's floating activations at `precision`."""
    return "float16" if checked_precision(precision) == "fp16" else "float32"


def as_range(value: int | Range | tuple[int, ...] | list[int], what: str) -> Range:
    """Normalise an int or a (min, opt, max) triple, checking min <= opt <= max and > 0."""
    triple = (value, value, value) if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(v, int) for v in triple):
        raise ValueError(
            f"{what} must be an int or a (min, opt, max) triple of ints, got {value!r}"
        )
    low, opt, high = triple
    if not 0 < low <= opt <= high:
        raise ValueError(f"{what} must satisfy 0 < min <= opt <= max, got {triple}")
    return low, opt, high


def cfg_batch_range(max_window: int, guidance: bool = True) -> Range:
    """Batch range covering 1..window items, doubled for classifier-free guidance pairs."""
    if max_window < 1:
        raise ValueError(f"max_window must be >= 1, got {max_window}")
    per_item = 2 if guidance else 1
    return 1, per_item, per_item * max_window


@dataclass
class NetworkSpec:
    """What every network spec shares: profiles, dynamic axes and sample inputs from shapes."""

    name: str
    precision: str
    vae_scale_factor: int
    image_size: tuple[int, int]
    latent_multiple: int

    @property
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    @property
    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def wrap(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: symbolic dim}} for every input and output with symbolic dims."""
        axes: dict[str, dict[int, str]] = {}
        for tensor in [*self.inputs, *self.outputs]:
            symbolic = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if symbolic:
                axes[tensor.name] = symbolic
        return axes

    def dim_ranges(
        self,
        batch_range: int | Range,
        height: int | Range | None = None,
        width: int | Range | None = None,
    ) -> dict[str, Range]:
        """Ranges of every symbolic dim for image sizes in pixels (defaults: native size)."""
        heights = as_range(self.image_size[0] if height is None else height, "height")
        widths = as_range(self.image_size[1] if width is None else width, "width")
        return {
            BATCH: as_range(batch_range, "batch_range"),
            IMAGE_HEIGHT: heights,
            IMAGE_WIDTH: widths,
            LATENT_HEIGHT: tuple(self._latent_size(h, "height") for h in heights),
            LATENT_WIDTH: tuple(self._latent_size(w, "width") for w in widths),
        }

    def _latent_size(self, pixels: int, what: str) -> int:
        multiple = self.vae_scale_factor * self.latent_multiple
        if pixels % multiple:
            raise ValueError(
                f"{self.name}: image {what} {pixels} is not a multiple of {multiple} "
                f"(VAE scale factor {self.vae_scale_factor} x "
                f"latent multiple {self.latent_multiple})"
            )
        return pixels // self.vae_scale_factor

    def profile(
        self,
        batch_range: int | Range,
        height: int | Range | None = None,
        width: int | Range | None = None,
    ) -> dict[str, ProfileShapes]:
        """{input name: (min_shape, opt_shape, max_shape)} for a TensorRT optimisation profile."""
        ranges = self.dim_ranges(batch_range, height, width)
        return {
            tensor.name: tuple(
                tuple(ranges[d][level] if isinstance(d, str) else d for d in tensor.shape)
                for level in range(3)
            )
            for tensor in self.inputs
        }

    def concrete_shape(self, tensor: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in tensor.shape)

    def sample_inputs(
        self,
        batch: int,
        height: int | None = None,
        width: int | None = None,
        *,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Random inputs in input order, in realistic value ranges, for a batch and image size."""
        ranges = self.dim_ranges(batch, height, width)
        dims = {name: triple[1] for name, triple in ranges.items()}
        generator = torch.Generator().manual_seed(seed)
        return {
            tensor.name: self.sample_value(tensor, self.concrete_shape(tensor, dims), generator)
            for tensor in self.inputs
        }

    def sample_value(
        self, tensor: TensorSpec, shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """A random tensor for one input; subclasses override for ids, labels and timesteps."""
        dtype = getattr(torch, tensors.dtype_named(tensor.dtype).name)
        if tensor.name == tensors.TIMESTEP:
            return torch.rand(shape, generator=generator).mul(999.0).to(dtype)
        return torch.randn(shape, generator=generator).to(dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "name": self.name,
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dynamic_axes": {
                k: {str(a): d for a, d in v.items()} for k, v in self.dynamic_axes.items()
            },
        }


class _Wrapper(nn.Module):
    """Base of the export wrappers: forward takes the spec's inputs by their names, in order."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _downsampling_factor(config: Any) -> int:
    return 2 ** (len(config.block_out_channels) - 1)


class _LatentDenoiser:
    """What every denoising network shares: `sample` and `timestep` in, `out_sample` out."""

    def latent_inputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [
            TensorSpec(tensors.SAMPLE, act, (BATCH, self.in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
            TensorSpec(tensors.TIMESTEP, "float32", (BATCH,)),
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [
            TensorSpec(tensors.OUT_SAMPLE, act, (BATCH, self.out_channels, LATENT_HEIGHT, LATENT_WIDTH))
        ]


@dataclass
class UNetSpec(_LatentDenoiser, NetworkSpec):
    """diffusers UNet2DConditionModel (SD 1.x/2.x; SDXL with `text_embeds`/`time_ids`)."""

    in_channels: int = 4
    out_channels: int = 4
    sequence_length: int = 77
    cross_attention_dim: int = 768
    text_embeds_dim: int | None = None
    time_ids_count: int | None = None
    # a 9-channel inpainting UNet: `mask` and `masked_image_latents` join the latents
    masked_inputs: bool = False

    @classmethod
    def from_model(
        cls,
        unet: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 77,
        vae_scale_factor: int = 8,
        text_embeds_dim: int | None = None,
        name: str = "unet",
    ) -> UNetSpec:
        config = unet.config
        for option in ("class_embed_type", "encoder_hid_dim_type"):
            if getattr(config, option, None) is not None:
                raise UnsupportedModelError(
                    f"UNet2DConditionModel with {option}={getattr(config, option)!r} is not "
                    "supported; supported: plain SD UNets and SDXL addition_embed_type='text_time'"
                )
        addition = getattr(config, "addition_embed_type", None)
        if addition not in (None, "text_time"):
            raise UnsupportedModelError(
                f"UNet2DConditionModel with addition_embed_type={addition!r} is not supported; "
                "supported: None and 'text_time' (SDXL)"
            )
        time_ids_count = None
        if addition == "text_time":
            text_embeds_dim, time_ids_count = _sdxl_added_dims(config, text_embeds_dim)
        cross_dim = config.cross_attention_dim
        # inpainting UNets take [latents, mask, masked image latents] along the channels
        masked = config.in_channels == 2 * config.out_channels + 1
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(config.sample_size, vae_scale_factor),
            latent_multiple=_downsampling_factor(config),
            in_channels=config.out_channels if masked else config.in_channels,
            out_channels=config.out_channels,
            masked_inputs=masked,
            sequence_length=sequence_length,
            cross_attention_dim=cross_dim if isinstance(cross_dim, int) else cross_dim[0],
            text_embeds_dim=text_embeds_dim,
            time_ids_count=time_ids_count,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        specs = [
            *self.latent_inputs(),
            TensorSpec(
                tensors.ENCODER_HIDDEN_STATES,
                act,
                (BATCH, self.sequence_length, self.cross_attention_dim),
            ),
        ]
        if self.time_ids_count is not None:
            specs += [
                TensorSpec(tensors.TEXT_EMBEDS, act, (BATCH, self.text_embeds_dim)),
                TensorSpec(tensors.TIME_IDS, "float32", (BATCH, self.time_ids_count)),
            ]
        if self.masked_inputs:
            latent = (LATENT_HEIGHT, LATENT_WIDTH)
            specs += [
                TensorSpec(tensors.MASK, act, (BATCH, 1, *latent)),
                TensorSpec(tensors.MASKED_IMAGE_LATENTS, act, (BATCH, self.in_channels, *latent)),
            ]
        return specs

    def wrap(self, module: nn.Module) -> nn.Module:
        return _UNetForward(module, self.input_names)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.TIME_IDS:
            height, width = self.image_size
            row = [height, width, 0, 0, height, width][: shape[1]]
            return torch.tensor([row] * shape[0], dtype=torch.float32)
        if tensor.name == tensors.MASK:
            return (torch.rand(shape, generator=generator) > 0.5).to(torch.float32)
        return super().sample_value(tensor, shape, generator)


class _UNetForward(_Wrapper):
    """The UNet call of diffusers' SD/SDXL pipelines; an inpainting UNet's mask and masked image
    latents are joined to the latents along the channels, as the inpaint pipeline does."""

    def __init__(self, module: nn.Module, input_names: list[str]) -> None:
        super().__init__(module)
        self.input_names = input_names

    def forward(self, *inputs):
        named = dict(zip(self.input_names, inputs))
        sample = named[tensors.SAMPLE]
        if tensors.MASK in named:
            sample = torch.cat([sample, named[tensors.MASK], named[tensors.MASKED_IMAGE_LATENTS]],
                               dim=1)
        added_cond = None
        if tensors.TEXT_EMBEDS in named:
            added_cond = {tensors.TEXT_EMBEDS: named[tensors.TEXT_EMBEDS],
                          tensors.TIME_IDS: named[tensors.TIME_IDS]}
        output = self.module(sample, named[tensors.TIMESTEP],
                             named[tensors.ENCODER_HIDDEN_STATES], added_cond_kwargs=added_cond,
                             return_dict=False)
        return _first(output)


def _sdxl_added_dims(config: Any, text_embeds_dim: int | None) -> tuple[int, int]:
    """(text_embeds dim, number of time ids) of an SDXL UNet; base SDXL uses 6 time ids."""
    total = config.projection_class_embeddings_input_dim
    per_id = config.addition_time_embed_dim
    if text_embeds_dim is None:
        return total - 6 * per_id, 6
    count, remainder = divmod(total - text_embeds_dim, per_id)
    if remainder or count < 1:
        raise UnsupportedModelError(
            f"SDXL UNet: projection_class_embeddings_input_dim {total} does not split into "
            f"text_embeds {text_embeds_dim} + n x addition_time_embed_dim {per_id}"
        )
    return text_embeds_dim, count


def _image_size(sample_size: Any, vae_scale_factor: int) -> tuple[int, int]:
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return height * vae_scale_factor, width * vae_scale_factor


@dataclass
class UNet2DSpec(_LatentDenoiser, NetworkSpec):
    """diffusers UNet2DModel (unconditional or class-conditional with integer `class_labels`)."""

    in_channels: int = 3
    out_channels: int = 3
    num_class_embeds: int | None = None

    @classmethod
    def from_model(
        cls,
        unet: nn.Module,
        *,
        precision: str = "fp32",
        vae_scale_factor: int = 1,
        name: str = "unet",
    ) -> UNet2DSpec:
        config = unet.config
        if getattr(config, "class_embed_type", None) is not None:
            raise UnsupportedModelError(
                f"UNet2DModel with class_embed_type={config.class_embed_type!r} is not supported; "
                "supported: no class conditioning or num_class_embeds (integer labels)"
            )
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(config.sample_size, vae_scale_factor),
            latent_multiple=_downsampling_factor(config),
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            num_class_embeds=config.num_class_embeds,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        specs = self.latent_inputs()
        if self.num_class_embeds is not None:
            specs.append(TensorSpec(tensors.CLASS_LABELS, "int64", (BATCH,)))
        return specs

    def wrap(self, module: nn.Module) -> nn.Module:
        return _UNet2DForward(module)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.CLASS_LABELS:
            return torch.randint(0, self.num_class_embeds, shape, generator=generator)
        return super().sample_value(tensor, shape, generator)


class _UNet2DForward(_Wrapper):
    def forward(self, sample, timestep, class_labels=None):
        return _first(self.module(sample, timestep, class_labels=class_labels, return_dict=False))


@dataclass
class TextEncoderSpec(NetworkSpec):
    """CLIP text encoder: `input_ids` [B, S] int64 -> last and penultimate hidden states and the
    pooled embedding (CLIPTextModel's pooler output, CLIPTextModelWithProjection's text_embeds),
    so that every pipeline family finds what its diffusers pipeline reads."""

    sequence_length: int = 77
    hidden_size: int = 768
    vocab_size: int = 49408
    pooled_size: int = 768

    @classmethod
    def from_model(
        cls, encoder: nn.Module, *, precision: str = "fp32", name: str = "text_encoder"
    ) -> TextEncoderSpec:
        config = encoder.config
        projected = hasattr(encoder, "text_projection")
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=1,
            image_size=(1, 1),
            latent_multiple=1,
            sequence_length=config.max_position_embeddings,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            pooled_size=config.projection_dim if projected else config.hidden_size,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(tensors.INPUT_IDS, "int64", (BATCH, self.sequence_length))]

    @property
    def outputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        states = (BATCH, self.sequence_length, self.hidden_size)
        return [
            TensorSpec(tensors.TEXT_EMBEDDINGS, act, states),
            TensorSpec(tensors.PENULTIMATE_HIDDEN_STATES, act, states),
            TensorSpec(tensors.POOLED, act, (BATCH, self.pooled_size)),
        ]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _TextEncoderForward(module)

    def sample_value(self, tensor, shape, generator):
        return torch.randint(0, self.vocab_size, shape, generator=generator)


class _TextEncoderForward(_Wrapper):
    def forward(self, input_ids):
        output = self.module(input_ids=input_ids, output_hidden_states=True)
        pooled = getattr(output, "text_embeds", None)
        if pooled is None:
            pooled = output.pooler_output
        return output.last_hidden_state, output.hidden_states[-2], pooled


@dataclass
class LabelEncoderSpec(NetworkSpec):
    """Label-embedding "text encoder" of the reference model: `label` [B] -> [B, 1, D]."""

    num_labels: int = 11
    embedding_dim: int = 64

    @classmethod
    def from_model(
        cls, encoder: nn.Module, *, precision: str = "fp32", name: str = "text_encoder"
    ) -> LabelEncoderSpec:
        embeddings = [m for m in encoder.modules() if isinstance(m, nn.Embedding)]
        if len(embeddings) != 1:
            raise UnsupportedModelError(
                f"a label encoder must hold exactly one nn.Embedding, "
                f"{type(encoder).__name__} holds {len(embeddings)}"
            )
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=1,
            image_size=(1, 1),
            latent_multiple=1,
            num_labels=embeddings[0].num_embeddings,
            embedding_dim=embeddings[0].embedding_dim,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(tensors.LABEL, "int64", (BATCH,))]

    @property
    def outputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [TensorSpec(tensors.TEXT_EMBEDDINGS, act, (BATCH, 1, self.embedding_dim))]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _LabelEncoderForward(module)

    def sample_value(self, tensor, shape, generator):
        return torch.randint(0, self.num_labels, shape, generator=generator)


class _LabelEncoderForward(_Wrapper):
    def forward(self, label):
        embeddings = _first(self.module(label))
        # accept encoders that return [B, D] as well as [B, 1, D]
        return embeddings.reshape(embeddings.shape[0], 1, embeddings.shape[-1])


@dataclass
class VAEDecoderSpec(NetworkSpec):
    """AutoencoderKL decoder: `latent` (already divided by the VAE scaling factor) -> `images`.

    `images` are in [-1, 1] (unclamped), as `AutoencoderKL.decode` returns them.
    """

    latent_channels: int = 4
    out_channels: int = 3
    scaling_factor: float = 0.18215

    @classmethod
    def from_model(
        cls,
        vae: nn.Module,
        *,
        precision: str = "fp32",
        latent_size: tuple[int, int] | None = None,
        name: str = "vae_decoder",
    ) -> VAEDecoderSpec:
        config = vae.config
        factor = _downsampling_factor(config)
        native = (config.sample_size // factor,) * 2 if latent_size is None else latent_size
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=factor,
            image_size=_image_size(native, factor),
            latent_multiple=1,
            latent_channels=config.latent_channels,
            out_channels=config.out_channels,
            scaling_factor=config.scaling_factor,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [
            TensorSpec(tensors.LATENT, act, (BATCH, self.latent_channels, LATENT_HEIGHT, LATENT_WIDTH))
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [TensorSpec(tensors.IMAGES, act, (BATCH, self.out_channels, IMAGE_HEIGHT, IMAGE_WIDTH))]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _VAEDecoderForward(module)


class _VAEDecoderForward(_Wrapper):
    def forward(self, latent):
        return _first(self.module.decode(latent, return_dict=False))


@dataclass
class VAEEncoderSpec(VAEDecoderSpec):
    """AutoencoderKL encoder: `images` in [-1, 1] -> `latent_parameters`, the posterior's mean
    and log-variance along channels ([B, 2C, h, w], `latent_dist.parameters`). Sampling from the
    posterior is the pipeline's, with the request's generator."""

    @classmethod
    def from_model(cls, vae: nn.Module, *, precision: str = "fp32",
                   latent_size: tuple[int, int] | None = None,
                   name: str = "vae_encoder") -> VAEEncoderSpec:
        decoder = VAEDecoderSpec.from_model(vae, precision=precision, latent_size=latent_size,
                                            name=name)
        return cls(**vars(decoder))

    @property
    def inputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [TensorSpec(tensors.IMAGES, act, (BATCH, self.out_channels, IMAGE_HEIGHT,
                                                 IMAGE_WIDTH))]

    @property
    def outputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [TensorSpec(tensors.LATENT_PARAMETERS, act,
                           (BATCH, 2 * self.latent_channels, LATENT_HEIGHT, LATENT_WIDTH))]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _VAEEncoderForward(module)


class _VAEEncoderForward(_Wrapper):
    def forward(self, images):
        return _first(self.module.encode(images, return_dict=False)).parameters


@dataclass
class SD3TransformerSpec(_LatentDenoiser, NetworkSpec):
    """SD3Transformer2DModel (MMDiT): sample, timestep, text states and pooled projections."""

    in_channels: int = 16
    out_channels: int = 16
    sequence_length: int = 333
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048

    @classmethod
    def from_model(
        cls,
        transformer: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 333,
        vae_scale_factor: int = 8,
        name: str = "transformer",
    ) -> SD3TransformerSpec:
        config = transformer.config
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(config.sample_size, vae_scale_factor),
            latent_multiple=config.patch_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels or config.in_channels,
            sequence_length=sequence_length,
            joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=config.pooled_projection_dim,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        act = float_dtype(self.precision)
        return [
            *self.latent_inputs(),
            TensorSpec(
                tensors.ENCODER_HIDDEN_STATES,
                act,
                (BATCH, self.sequence_length, self.joint_attention_dim),
            ),
            TensorSpec(tensors.POOLED_PROJECTIONS, act, (BATCH, self.pooled_projection_dim)),
        ]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _SD3Forward(module)


class _SD3Forward(_Wrapper):
    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        output = self.module(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )
        return _first(output)


# SD3 pipelines concatenate the CLIP tokens with 256 T5 tokens (their max_sequence_length default)
SD3_T5_TOKENS = 256

SPEC_BY_CLASS: dict[str, type[NetworkSpec]] = {
    "UNet2DConditionModel": UNetSpec,
    "UNet2DModel": UNet2DSpec,
    "CLIPTextModel": TextEncoderSpec,
    "CLIPTextModelWithProjection": TextEncoderSpec,
    "AutoencoderKL": VAEDecoderSpec,
    "SD3Transformer2DModel": SD3TransformerSpec,
}


def spec_class_for(module: nn.Module, component: str = "model") -> type[NetworkSpec]:
    """The spec class for a module, or UnsupportedModelError naming the supported classes."""
    return spec_class_named(type(module).__name__, component)


def spec_class_named(class_name: str, component: str = "model") -> type[NetworkSpec]:
    """The spec class for a model class name, or UnsupportedModelError naming the supported."""
    if class_name not in SPEC_BY_CLASS:
        raise UnsupportedModelError(
            f"{component}: model class {class_name} is not supported for export; "
            f"supported: {', '.join(sorted(SPEC_BY_CLASS))} (and the reference label encoder)"
        )
    return SPEC_BY_CLASS[class_name]


@dataclass
class SpecContext:
    """Pipeline facts a spec cannot read from its own module's config."""

    precision: str = "fp32"
    vae_scale_factor: int = 1
    sequence_length: int = 77
    text_embeds_dim: int | None = None
    latent_size: tuple[int, int] | None = None


def spec_for(module: nn.Module, component: str, context: SpecContext) -> NetworkSpec:
    """Build the spec of one pipeline component (`unet`, `text_encoder`, `vae`, ...)."""
    spec_class = spec_class_for(module, component)
    precision = context.precision
    if spec_class is UNetSpec:
        return UNetSpec.from_model(
            module,
            precision=precision,
            sequence_length=context.sequence_length,
            vae_scale_factor=context.vae_scale_factor,
            text_embeds_dim=context.text_embeds_dim,
        )
    if spec_class is UNet2DSpec:
        return UNet2DSpec.from_model(
            module, precision=precision, vae_scale_factor=context.vae_scale_factor
        )
    if spec_class is TextEncoderSpec:
        return TextEncoderSpec.from_model(module, precision=precision, name=component)
    if spec_class is VAEDecoderSpec and component == "vae_encoder":
        return VAEEncoderSpec.from_model(
            module, precision=precision, latent_size=context.latent_size
        )
    if spec_class is VAEDecoderSpec:
        return VAEDecoderSpec.from_model(
            module, precision=precision, latent_size=context.latent_size
        )
    return SD3TransformerSpec.from_model(
        module,
        precision=precision,
        sequence_length=context.sequence_length + SD3_T5_TOKENS,
        vae_scale_factor=context.vae_scale_factor,
    )
