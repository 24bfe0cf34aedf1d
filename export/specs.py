"""Network specs: names, dtypes, dynamic axes, profiles and sample inputs of exportable networks.

One spec object per network kind drives export (input/output names, dynamic axes), validation
(sample inputs) and engine builds (min/opt/max shapes of the optimisation profile).

Shapes hold ints for static dims and strings for symbolic ones. The symbolic names used are
`batch`, `latent_height`, `latent_width`, `image_height`, `image_width` and `text_length`. Profile and sample
sizes are given in *image pixels*; a spec converts them to latent sizes with its
`vae_scale_factor` (8 for Stable Diffusion, 1 for pixel-space models such as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from export.precision import boundary_dtype, checked_precision
from models import tensors
from models.pipeline_spec import LLM_ENCODERS

BATCH = "batch"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"
# the text tokens of an LLM-conditioned denoiser's `encoder_hidden_states` (axis 1): a prompt's
# real length, different per request and between a prompt and its negative prompt
TEXT_LENGTH = "text_length"
TEXT_LENGTH_OPT = 128  # the profile's optimal text length (capped by the family's maximum)

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
    # a network activation: float16 in and out of an fp16 network, float32 at a bf16 network's
    # boundary and cast to bf16 inside; timesteps, guidance, time ids and ids are not
    activation: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


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
    model_class: str = ""  # the diffusers/transformers class it exports (set by the bundle)
    # True where the torchscript exporter cannot keep the dynamic dims (export uses dynamo)
    needs_dynamo: ClassVar[bool] = False
    # True for a network served by torch on every backend: export saves its weights (no ONNX)
    torch_only: ClassVar[bool] = False

    @property
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    @property
    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module as a forward over the spec's inputs, in the module's own dtype."""
        raise NotImplementedError

    def wrap_for_export(self, module: nn.Module) -> nn.Module:
        """What is traced: `wrap(module)` for a module already at this spec's precision; at
        bf16, float32 activations are cast to bf16 on the way in and outputs to float32 on the
        way out, so the ONNX boundary stays float32."""
        wrapped = self.wrap(module)
        if self.precision != "bf16":
            return wrapped
        cast = tuple(tensor.activation for tensor in self.inputs)
        return _BoundaryCasts(wrapped, cast, torch.bfloat16)

    def activation(self, name: str, shape: Shape) -> TensorSpec:
        """An activation input or output of this network at its precision's boundary dtype."""
        return TensorSpec(name, boundary_dtype(self.precision), shape, activation=True)

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
            TEXT_LENGTH: self.text_lengths(),
        }

    def text_lengths(self) -> Range:
        """(min, opt, max) of the `text_length` dim; a spec with such an axis overrides it."""
        return 1, 1, 1

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
            "model_class": self.model_class,
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


class _BoundaryCasts(nn.Module):
    """Casts the activation inputs to `dtype` before `wrapped` and every output to float32."""

    def __init__(self, wrapped: nn.Module, cast: tuple[bool, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.cast = cast
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor):
        inner = [x.to(self.dtype) if cast else x for x, cast in zip(inputs, self.cast)]
        outputs = self.wrapped(*inner)
        if isinstance(outputs, (tuple, list)):
            return tuple(output.float() for output in outputs)
        return outputs.float()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _downsampling_factor(config: Any) -> int:
    return 2 ** (len(config.block_out_channels) - 1)


class _LatentDenoiser:
    """What every denoising network shares: `sample` and `timestep` in, `out_sample` out."""

    def latent_inputs(self) -> list[TensorSpec]:
        return [
            self.activation(tensors.SAMPLE, (BATCH, self.in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
            TensorSpec(tensors.TIMESTEP, "float32", (BATCH,)),
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [
            self.activation(
                tensors.OUT_SAMPLE, (BATCH, self.out_channels, LATENT_HEIGHT, LATENT_WIDTH)
            )
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
        specs = [
            *self.latent_inputs(),
            self.activation(
                tensors.ENCODER_HIDDEN_STATES,
                (BATCH, self.sequence_length, self.cross_attention_dim),
            ),
        ]
        if self.time_ids_count is not None:
            specs += [
                self.activation(tensors.TEXT_EMBEDS, (BATCH, self.text_embeds_dim)),
                TensorSpec(tensors.TIME_IDS, "float32", (BATCH, self.time_ids_count)),
            ]
        if self.masked_inputs:
            latent = (LATENT_HEIGHT, LATENT_WIDTH)
            specs += [
                self.activation(tensors.MASK, (BATCH, 1, *latent)),
                self.activation(tensors.MASKED_IMAGE_LATENTS, (BATCH, self.in_channels, *latent)),
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

    def forward(self, *inputs, **by_name):
        named = {**dict(zip(self.input_names, inputs)), **by_name}
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
        states = (BATCH, self.sequence_length, self.hidden_size)
        return [
            self.activation(tensors.TEXT_EMBEDDINGS, states),
            self.activation(tensors.PENULTIMATE_HIDDEN_STATES, states),
            self.activation(tensors.POOLED, (BATCH, self.pooled_size)),
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
        return [self.activation(tensors.TEXT_EMBEDDINGS, (BATCH, 1, self.embedding_dim))]

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
        return [
            self.activation(
                tensors.LATENT, (BATCH, self.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
            )
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [
            self.activation(tensors.IMAGES, (BATCH, self.out_channels, IMAGE_HEIGHT, IMAGE_WIDTH))
        ]

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
        return [self.activation(tensors.IMAGES,
                                (BATCH, self.out_channels, IMAGE_HEIGHT, IMAGE_WIDTH))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self.activation(tensors.LATENT_PARAMETERS,
                                (BATCH, 2 * self.latent_channels, LATENT_HEIGHT, LATENT_WIDTH))]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _VAEEncoderForward(module)


class _VAEEncoderForward(_Wrapper):
    def forward(self, images):
        return _first(self.module.encode(images, return_dict=False)).parameters


# QwenImagePipeline.default_sample_size: 128 latents (1024 pixels under an 8x VAE), and its
# __call__'s max_sequence_length: the prompt tokens the transformer sees at most
QWEN_IMAGE_DEFAULT_SAMPLE_SIZE = 128
QWEN_IMAGE_MAX_TEXT_LENGTH = 512


@dataclass
class QwenImageVAEDecoderSpec(VAEDecoderSpec):
    """AutoencoderKLQwenImage's decoder, a causal 3-D (video) VAE, on one frame: `latent`
    [B, C, h, w] (already de-normalised by the VAE's latents_mean / latents_std, as
    QwenImagePipeline does before decoding) -> `images` [B, 3, H, W] in [-1, 1]. The wrapper
    adds and removes the frame axis; with one frame the causal convolutions' cache of earlier
    frames is empty, so the decode is a plain function of the latent (the traced graph)."""

    # the torchscript exporter has no aten::_upsample_nearest_exact2d (its upsamplers)
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(cls, vae: nn.Module, *, precision: str = "fp32",
                   latent_size: tuple[int, int] | None = None,
                   name: str = "vae_decoder") -> QwenImageVAEDecoderSpec:
        config = vae.config
        factor = 2 ** len(config.temperal_downsample)
        native = latent_size or (QWEN_IMAGE_DEFAULT_SAMPLE_SIZE,) * 2
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=factor,
            image_size=_image_size(native, factor),
            latent_multiple=1,
            latent_channels=config.z_dim,
            out_channels=config.input_channels,
            scaling_factor=1.0,
        )

    def wrap(self, module: nn.Module) -> nn.Module:
        return _OneFrameDecoderForward(module)


class _OneFrameDecoderForward(_Wrapper):
    def forward(self, latent):
        frames = _first(self.module.decode(latent.unsqueeze(2), return_dict=False))
        return frames[:, :, 0]


@dataclass
class QwenImageVAEEncoderSpec(QwenImageVAEDecoderSpec):
    """AutoencoderKLQwenImage's encoder on one frame: `images` [B, 3, H, W] in [-1, 1] ->
    `latent_parameters` [B, 2C, h, w] (the posterior's mean and log-variance, as VAEEncoderSpec);
    normalising a sample by latents_mean / latents_std is the family's, as the pipeline's."""

    inputs = VAEEncoderSpec.inputs
    outputs = VAEEncoderSpec.outputs

    def wrap(self, module: nn.Module) -> nn.Module:
        return _OneFrameEncoderForward(module)


class _OneFrameEncoderForward(_Wrapper):
    def forward(self, images):
        posterior = _first(self.module.encode(images.unsqueeze(2), return_dict=False))
        return posterior.parameters[:, :, 0]


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
        return [
            *self.latent_inputs(),
            self.activation(
                tensors.ENCODER_HIDDEN_STATES,
                (BATCH, self.sequence_length, self.joint_attention_dim),
            ),
            self.activation(tensors.POOLED_PROJECTIONS, (BATCH, self.pooled_projection_dim)),
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


# FluxPipeline.default_sample_size: 128 latents (1024 pixels under an 8x VAE)
FLUX_DEFAULT_SAMPLE_SIZE = 128


@dataclass
class FluxTransformerSpec(_LatentDenoiser, NetworkSpec):
    """FluxTransformer2DModel behind the denoiser contract: `sample` [B, C, h, w] latents (C =
    in_channels / 4), `timestep` t (sigma x 1000, FluxPipeline's loop variable), T5 states,
    pooled CLIP projections and, for guidance-distilled models (Flux-dev), `guidance` [B].

    The wrapper does FluxPipeline's work around its transformer call: 2x2-packs the latents,
    builds the image ids of the (h/2, w/2) grid and zero text ids, divides t by 1000, and
    unpacks the output, so the runtime handles Flux latents as any other [B, C, h, w] latents.
    """

    in_channels: int = 16
    out_channels: int = 16
    sequence_length: int = 512
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    # diffusers' Flux attention unflattens heads and reshapes by `x.shape[:-1]` for its rotary
    # embedding; torchscript tracing records those sizes as constants (batch 2 baked in)
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(
        cls,
        transformer: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 512,
        vae_scale_factor: int = 8,
        latent_size: tuple[int, int] | None = None,
        name: str = "transformer",
    ) -> FluxTransformerSpec:
        config = transformer.config
        packed = config.in_channels
        if packed % 4:
            raise UnsupportedModelError(
                f"FluxTransformer2DModel with in_channels={packed} is not supported: Flux packs "
                "2x2 latent patches, so in_channels must be a multiple of 4"
            )
        latent = latent_size or (FLUX_DEFAULT_SAMPLE_SIZE, FLUX_DEFAULT_SAMPLE_SIZE)
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(latent, vae_scale_factor),
            latent_multiple=2,  # 2x2 packing
            in_channels=packed // 4,
            out_channels=(config.out_channels or packed) // 4,
            sequence_length=sequence_length,
            joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=config.pooled_projection_dim,
            guidance_embeds=bool(config.guidance_embeds),
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        specs = [
            *self.latent_inputs(),
            self.activation(
                tensors.ENCODER_HIDDEN_STATES,
                (BATCH, self.sequence_length, self.joint_attention_dim),
            ),
            self.activation(tensors.POOLED_PROJECTIONS, (BATCH, self.pooled_projection_dim)),
        ]
        if self.guidance_embeds:
            specs.append(TensorSpec(tensors.GUIDANCE, "float32", (BATCH,)))
        return specs

    def wrap(self, module: nn.Module) -> nn.Module:
        return _FluxForward(module)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.GUIDANCE:  # guidance scales around FluxPipeline's 3.5
            return torch.rand(shape, generator=generator).mul(6.0).add(1.0)
        return super().sample_value(tensor, shape, generator)


class _FluxForward(_Wrapper):
    """FluxPipeline's transformer call (diffusers 0.42) on unpacked latents.

    TensorRT: FluxPosEmbed computes the rotary embedding of the ids in float64 on CPU and CUDA
    (diffusers' maybe_adjust_dtype_for_device), so the graph holds float64 Sin/Cos/Mul nodes
    between the ids and the attention; TensorRT has no float64 kernels and may refuse or narrow
    them. The ids depend on the latent size only, so a TensorRT build that fails there can fold
    them per profile shape or compute that embedding in float32 as diffusers does on MPS.
    """

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None):
        height, width = sample.shape[2:]
        packed = pack_latents(sample)
        output = self.module(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=text_ids(encoder_hidden_states),
            img_ids=latent_image_ids(height // 2, width // 2, encoder_hidden_states.dtype),
            return_dict=False,
        )
        return unpack_latents(_first(output), height, width)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: FluxPipeline._pack_latents, sizes read off the tensor."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, h, w] for latent height and width: FluxPipeline._unpack_latents
    (which takes pixel sizes and the VAE factor instead)."""
    batch, _, packed_channels = packed.shape
    patches = packed.view(batch, height // 2, width // 2, packed_channels // 4, 2, 2)
    patches = patches.permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed_channels // 4, height, width)


def latent_image_ids(height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[height * width, 3] ids (0, row, column) of the packed grid, row-major:
    FluxPipeline._prepare_latent_image_ids, built without in-place writes so that it traces with
    dynamic sizes."""
    rows = torch.arange(height).unsqueeze(1).expand(height, width).reshape(-1)
    columns = torch.arange(width).unsqueeze(0).expand(height, width).reshape(-1)
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1)
    return ids.to(dtype)


def text_ids(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """[S, 3] zeros, FluxPipeline.encode_prompt's text ids for S T5 tokens."""
    return encoder_hidden_states.new_zeros(encoder_hidden_states.shape[1], 3)


@dataclass
class QwenImageTransformerSpec(_LatentDenoiser, NetworkSpec):
    """QwenImageTransformer2DModel behind the denoiser contract: `sample` [B, C, h, w] latents
    (C = in_channels / 4), `timestep` t (sigma x 1000, QwenImagePipeline's loop variable) and the
    prompt's Qwen2.5-VL states `encoder_hidden_states` [B, text_length, D], trimmed to the
    prompt's real length (no mask: rows of one call share their length, QwenImagePipeline's
    case of a mask of ones).

    The wrapper does QwenImagePipeline's work around its transformer call (2x2-packs the
    latents, divides t by 1000, unpacks the output) and replaces the model's complex rotary
    embedding (torch.polar, view_as_complex: no ONNX export) by the same rotation on cos/sin
    tables built from the latent grid and the text length, so every size stays dynamic.
    """

    in_channels: int = 16
    out_channels: int = 16
    max_text_length: int = QWEN_IMAGE_MAX_TEXT_LENGTH
    joint_attention_dim: int = 3584
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(
        cls,
        transformer: nn.Module,
        *,
        precision: str = "fp32",
        max_text_length: int = QWEN_IMAGE_MAX_TEXT_LENGTH,
        vae_scale_factor: int = 8,
        latent_size: tuple[int, int] | None = None,
        name: str = "transformer",
    ) -> QwenImageTransformerSpec:
        config = transformer.config
        unsupported = [option for option in ("guidance_embeds", "zero_cond_t",
                                             "use_additional_t_cond", "use_layer3d_rope")
                       if getattr(config, option, False)]
        if unsupported or config.patch_size != 2 or config.in_channels % 4:
            raise UnsupportedModelError(
                f"QwenImageTransformer2DModel with {', '.join(unsupported) or 'this patching'} "
                "is not supported; supported: Qwen-Image's text-to-image transformer (2x2 "
                "patches, no guidance embedding, no edit-model timestep conditions)"
            )
        latent = latent_size or (QWEN_IMAGE_DEFAULT_SAMPLE_SIZE, QWEN_IMAGE_DEFAULT_SAMPLE_SIZE)
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(latent, vae_scale_factor),
            latent_multiple=2,  # 2x2 packing
            in_channels=config.in_channels // 4,
            out_channels=config.out_channels or config.in_channels // 4,
            max_text_length=max_text_length,
            joint_attention_dim=config.joint_attention_dim,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        states = (BATCH, TEXT_LENGTH, self.joint_attention_dim)
        return [*self.latent_inputs(), self.activation(tensors.ENCODER_HIDDEN_STATES, states)]

    def text_lengths(self) -> Range:
        return 1, min(TEXT_LENGTH_OPT, self.max_text_length), self.max_text_length

    def wrap(self, module: nn.Module) -> nn.Module:
        return _QwenImageForward(module)


class _QwenImageForward(_Wrapper):
    """QwenImagePipeline's transformer call (diffusers 0.42) on unpacked latents, with the
    rotary embedding in real arithmetic: the model's own submodules in the order of its forward
    (for the supported config: no guidance, no edit conditions, no text mask), its blocks'
    joint attention run by `RealRotaryJointAttention` (installed on the module's blocks)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        module.set_attn_processor(RealRotaryJointAttention())

    def forward(self, sample, timestep, encoder_hidden_states):
        model = self.module
        height, width = sample.shape[2:]
        image = model.img_in(pack_latents(sample))
        text = model.txt_in(model.txt_norm(encoder_hidden_states))
        embedding = model.time_text_embed((timestep / 1000).to(image.dtype), image)
        rotary = qwen_rotary_tables(height // 2, width // 2, text.shape[1],
                                    model.pos_embed.axes_dim, model.pos_embed.theta)
        for block in model.transformer_blocks:
            text, image = block(hidden_states=image, encoder_hidden_states=text,
                                encoder_hidden_states_mask=None, temb=embedding,
                                image_rotary_emb=rotary)
        output = model.proj_out(model.norm_out(image, embedding))
        return unpack_latents(output, height, width)


RotaryTable = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [tokens, head_dim / 2]


def qwen_rotary_tables(rows: int, columns: int, text_length: int, axes_dim: list[int],
                       theta: float) -> tuple[RotaryTable, RotaryTable]:
    """(image, text) cos/sin tables of Qwen-Image's 3-axis rotary embedding (QwenEmbedRope with
    scale_rope, one frame): image token (r, c) of the rows x columns grid sits at (frame 0,
    r - ceil(rows / 2), c - ceil(columns / 2)); text token j at max(rows // 2, columns // 2) + j
    on all three axes. Angles are position x theta^(-2k / axis_dim) in float32."""
    row = torch.arange(rows) - (rows - rows // 2)
    column = torch.arange(columns) - (columns - columns // 2)
    image_positions = torch.stack([
        torch.zeros(rows, columns, dtype=row.dtype),
        row.unsqueeze(1).expand(rows, columns),
        column.unsqueeze(0).expand(rows, columns),
    ], dim=-1).reshape(rows * columns, 3)
    start = torch.maximum(torch.tensor(rows // 2), torch.tensor(columns // 2))
    text_positions = (torch.arange(text_length) + start).unsqueeze(1).expand(text_length, 3)
    return (_rotary_table(image_positions, axes_dim, theta),
            _rotary_table(text_positions, axes_dim, theta))


def _rotary_table(positions: torch.Tensor, axes_dim: list[int], theta: float) -> RotaryTable:
    angles = torch.cat([
        positions[:, axis:axis + 1].float()
        * (1.0 / torch.pow(theta, torch.arange(0, dim, 2).float().div(dim)))
        for axis, dim in enumerate(axes_dim)
    ], dim=-1)
    return torch.cos(angles), torch.sin(angles)


def rotate_pairs(x: torch.Tensor, table: RotaryTable) -> torch.Tensor:
    """x [B, S, heads, D] with each pair (x[2k], x[2k+1]) rotated by its angle: the complex
    product (x[2k] + i x[2k+1]) e^(i angle) of diffusers' apply_rotary_emb_qwen, in float32."""
    cos, sin = (part[None, :, None, :] for part in table)
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imaginary = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class RealRotaryJointAttention:
    """Qwen-Image's joint text-image attention (an Attention processor) with the rotary
    embedding given as real cos/sin tables (`qwen_rotary_tables`): per stream, q/k/v
    projections, per-head RMS norms of q and k, the rotation; one attention over [text, image];
    the image part through `to_out`, the text part through `to_add_out`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("the exported Qwen-Image attention takes no text mask: rows of one "
                             "call share their text length")
        image_table, text_table = image_rotary_emb
        head_dim = attn.inner_dim // attn.heads
        image = self._heads(attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k,
                            hidden_states, head_dim, image_table)
        text = self._heads(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                           attn.norm_added_k, encoder_hidden_states, head_dim, text_table)
        query, key, value = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(text, image))
        joint = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        joint = joint.transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_length = encoder_hidden_states.shape[1]
        image_out = attn.to_out[0](joint[:, text_length:].contiguous())
        for layer in attn.to_out[1:]:
            image_out = layer(image_out)
        return image_out, attn.to_add_out(joint[:, :text_length].contiguous())

    @staticmethod
    def _heads(to_q, to_k, to_v, norm_q, norm_k, states, head_dim, table):
        query, key, value = (project(states).unflatten(-1, (-1, head_dim))
                             for project in (to_q, to_k, to_v))
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)
        return rotate_pairs(query, table), rotate_pairs(key, table), value


@dataclass
class ZImageTransformerSpec(_LatentDenoiser, NetworkSpec):
    """ZImageTransformer2DModel behind the denoiser contract: `sample` [B, C, h, w] latents,
    `timestep` t (sigma x 1000, the scheduler's), the caption states `encoder_hidden_states`
    [B, text_length, cap_feat_dim] of rows that share one text length (the prompt's real token
    count; the pool stacks only rows of one shape) -> `out_sample`, the flow-matching velocity
    the scheduler steps with. export/zimage.py (`ZImageForward`) does the pipeline's work around
    the call: the caption and patch padding, the rotary embedding in real form, the timestep
    map (1000 - t) / 1000 and the output's negation."""

    in_channels: int = 16
    out_channels: int = 16
    max_text_length: int = 512  # ZImagePipeline's max_sequence_length
    cap_feat_dim: int = 2560
    # the paddings to multiples of 32 are sizes computed from the text length and latent size
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(
        cls,
        transformer: nn.Module,
        *,
        precision: str = "fp32",
        max_text_length: int = 512,
        vae_scale_factor: int = 8,
        latent_size: tuple[int, int] | None = None,
        name: str = "transformer",
    ) -> ZImageTransformerSpec:
        from export.zimage import FRAME_PATCH, PATCH

        config = transformer.config
        if PATCH not in config.all_patch_size or FRAME_PATCH not in config.all_f_patch_size:
            raise UnsupportedModelError(
                f"ZImageTransformer2DModel with all_patch_size={config.all_patch_size}, "
                f"all_f_patch_size={config.all_f_patch_size} is not supported: ZImagePipeline "
                f"calls it with patch size {PATCH} and frame patch size {FRAME_PATCH}"
            )
        latent = latent_size or (ZIMAGE_DEFAULT_SAMPLE_SIZE, ZIMAGE_DEFAULT_SAMPLE_SIZE)
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(latent, vae_scale_factor),
            latent_multiple=PATCH,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            max_text_length=max_text_length,
            cap_feat_dim=config.cap_feat_dim,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        return [
            *self.latent_inputs(),
            self.activation(tensors.ENCODER_HIDDEN_STATES,
                            (BATCH, TEXT_LENGTH, self.cap_feat_dim)),
        ]

    def text_lengths(self) -> Range:
        return 1, min(TEXT_LENGTH_OPT, self.max_text_length), self.max_text_length

    def wrap(self, module: nn.Module) -> nn.Module:
        from export.zimage import ZImageForward

        return ZImageForward(module)


# ZImagePipeline's default size: 1024 pixels, 128 latents under an 8x VAE
ZIMAGE_DEFAULT_SAMPLE_SIZE = 128


@dataclass
class T5EncoderSpec(NetworkSpec):
    """T5EncoderModel: `input_ids` [B, S] int64 -> `text_embeddings` [B, S, d_model], the last
    hidden state, called without an attention mask as the SD3 and Flux pipelines call it.
    S is the family's max_sequence_length (SD3 256, Flux-dev 512, Flux-schnell 256)."""

    sequence_length: int = 256
    hidden_size: int = 4096
    vocab_size: int = 32128

    @classmethod
    def from_model(
        cls,
        encoder: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 256,
        name: str = "text_encoder_3",
    ) -> T5EncoderSpec:
        config = encoder.config
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=1,
            image_size=(1, 1),
            latent_multiple=1,
            sequence_length=sequence_length,
            hidden_size=config.d_model,
            vocab_size=config.vocab_size,
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(tensors.INPUT_IDS, "int64", (BATCH, self.sequence_length))]

    @property
    def outputs(self) -> list[TensorSpec]:
        states = (BATCH, self.sequence_length, self.hidden_size)
        return [self.activation(tensors.TEXT_EMBEDDINGS, states)]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _T5EncoderForward(module)

    def sample_value(self, tensor, shape, generator):
        return torch.randint(0, self.vocab_size, shape, generator=generator)


class _T5EncoderForward(_Wrapper):
    def forward(self, input_ids):
        return self.module(input_ids=input_ids)[0]


@dataclass
class LLMEncoderSpec(NetworkSpec):
    """An LLM as a text encoder (Qwen3, Qwen2.5-VL's and Mistral3's language models):
    `input_ids` and `attention_mask` [B, S] int64 -> `text_embeddings` [B, S, len(layers) x
    hidden], the hidden states of `layers` (indices into transformers' `hidden_states`, the
    embeddings' output being 0) stacked per token in that order, as Flux.2's pipelines stack
    them; one index gives that state alone. S is the family's max_sequence_length: the tokenizer
    pads to it on the right and the mask marks the prompt's tokens.

    The language model is called without its head (no logits): the hidden states are the ones
    the full model returns with `output_hidden_states=True, use_cache=False`.
    """

    sequence_length: int = 512
    hidden_size: int = 4096
    vocab_size: int = 151936
    layers: tuple[int, ...] = (-1,)

    @classmethod
    def from_model(
        cls,
        encoder: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 512,
        layers: tuple[int, ...] = (-1,),
        name: str = "text_encoder",
    ) -> LLMEncoderSpec:
        config = encoder.config.get_text_config()
        check_layers(layers, config.num_hidden_layers, f"{name} ({type(encoder).__name__})")
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=1,
            image_size=(1, 1),
            latent_multiple=1,
            sequence_length=sequence_length,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            layers=tuple(layers),
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        tokens = (BATCH, self.sequence_length)
        return [TensorSpec(tensors.INPUT_IDS, "int64", tokens),
                TensorSpec(tensors.ATTENTION_MASK, "int64", tokens)]

    @property
    def outputs(self) -> list[TensorSpec]:
        states = (BATCH, self.sequence_length, len(self.layers) * self.hidden_size)
        return [self.activation(tensors.TEXT_EMBEDDINGS, states)]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _LLMEncoderForward(getattr(module, "model", module), self.layers)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.ATTENTION_MASK:  # a prompt of random length, right-padded
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
            return (torch.arange(shape[1]).unsqueeze(0) < lengths).to(torch.int64)
        return torch.randint(0, self.vocab_size, shape, generator=generator)


def check_layers(layers: tuple[int, ...], depth: int, component: str) -> None:
    """UnsupportedModelError naming `component` unless `layers` index hidden states of a model
    `depth` layers deep (depth + 1 states: the embeddings', then each layer's)."""
    if not layers:
        raise UnsupportedModelError(f"{component}: no hidden-state layers chosen")
    outside = [layer for layer in layers if not -(depth + 1) <= layer <= depth]
    if outside:
        raise UnsupportedModelError(
            f"{component}: hidden-state layers {', '.join(map(str, outside))} do not exist; "
            f"the encoder has {depth} layers, so layers -{depth + 1}..{depth} are supported")


class _LLMEncoderForward(_Wrapper):
    def __init__(self, module: nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__(module)
        self.layers = layers

    def forward(self, input_ids, attention_mask):
        states = self.module(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True, use_cache=False).hidden_states
        chosen = torch.stack([states[layer] for layer in self.layers], dim=2)  # [B, S, L, H]
        return chosen.flatten(2)


@dataclass
class Flux2TransformerSpec(_LatentDenoiser, NetworkSpec):
    """Flux2Transformer2DModel behind the denoiser contract: `sample` [B, C, h, w] (C =
    in_channels: Flux.2's latents are already 2x2-patchified, h and w are image pixels / 16),
    `timestep` t (sigma x 1000, the pipelines' loop variable), the LLM's stacked states and, for
    the guidance-distilled dev model, `guidance` [B].

    The wrapper does Flux2Pipeline's work around its transformer call: packs [B, C, h, w] to
    [B, h w, C] tokens, builds the (t, h, w, l) = (0, row, column, 0) image ids and the
    (0, 0, 0, token) text ids, divides t by 1000 and unpacks the output (the ids are row-major,
    so the pipeline's scatter by ids is the reshape back).
    """

    in_channels: int = 128
    out_channels: int = 128
    sequence_length: int = 512
    joint_attention_dim: int = 15360
    guidance_embeds: bool = False
    # as Flux.1's: attention reshapes by traced sizes; the dynamo exporter keeps them symbolic
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(
        cls,
        transformer: nn.Module,
        *,
        precision: str = "fp32",
        sequence_length: int = 512,
        vae_scale_factor: int = 16,
        latent_size: tuple[int, int] | None = None,
        name: str = "transformer",
    ) -> Flux2TransformerSpec:
        config = transformer.config
        if config.patch_size != 1:
            raise UnsupportedModelError(
                f"{name}: Flux2Transformer2DModel with patch_size={config.patch_size} is not "
                "supported; Flux.2's pipelines patchify the latents themselves (patch_size 1)")
        latent = latent_size or (FLUX_DEFAULT_SAMPLE_SIZE // 2,) * 2
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=vae_scale_factor,
            image_size=_image_size(latent, vae_scale_factor),
            latent_multiple=1,
            in_channels=config.in_channels,
            out_channels=config.out_channels or config.in_channels,
            sequence_length=sequence_length,
            joint_attention_dim=config.joint_attention_dim,
            guidance_embeds=bool(config.guidance_embeds),
        )

    @property
    def inputs(self) -> list[TensorSpec]:
        specs = [
            *self.latent_inputs(),
            self.activation(tensors.ENCODER_HIDDEN_STATES,
                            (BATCH, self.sequence_length, self.joint_attention_dim)),
        ]
        if self.guidance_embeds:
            specs.append(TensorSpec(tensors.GUIDANCE, "float32", (BATCH,)))
        return specs

    def wrap(self, module: nn.Module) -> nn.Module:
        return _Flux2Forward(module)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.GUIDANCE:  # guidance scales around Flux2Pipeline's 4.0
            return torch.rand(shape, generator=generator).mul(6.0).add(1.0)
        return super().sample_value(tensor, shape, generator)


class _Flux2Forward(_Wrapper):
    """Flux2Pipeline's and Flux2KleinPipeline's transformer call (diffusers 0.42).

    The rotary embedding is real-valued (cos and sin, no complex ops), computed from the ids in
    float64 as Flux.1's is: see _FluxForward for what that means for TensorRT.
    """

    def forward(self, sample, timestep, encoder_hidden_states, guidance=None):
        batch, channels, height, width = sample.shape
        tokens = sample.reshape(batch, channels, height * width).permute(0, 2, 1)
        output = self.module(
            hidden_states=tokens,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep / 1000,
            img_ids=flux2_image_ids(height, width),
            txt_ids=flux2_text_ids(encoder_hidden_states),
            guidance=guidance,
            return_dict=False,
        )
        out = _first(output)
        return out.permute(0, 2, 1).reshape(batch, out.shape[-1], height, width)


def flux2_image_ids(height: int, width: int) -> torch.Tensor:
    """[h w, 4] ids (0, row, column, 0) of the latent grid, row-major (Flux2 pipelines'
    _prepare_latent_ids), built without cartesian products so that it traces with dynamic
    sizes."""
    rows = torch.arange(height).unsqueeze(1).expand(height, width).reshape(-1)
    columns = torch.arange(width).unsqueeze(0).expand(height, width).reshape(-1)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1)


def flux2_text_ids(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """[S, 4] ids (0, 0, 0, token) of S text tokens (Flux2 pipelines' _prepare_text_ids)."""
    tokens = torch.arange(encoder_hidden_states.shape[1], device=encoder_hidden_states.device)
    zeros = torch.zeros_like(tokens)
    return torch.stack([zeros, zeros, zeros, tokens], dim=-1)


@dataclass
class Flux2VAEDecoderSpec(VAEDecoderSpec):
    """AutoencoderKLFlux2's decoder behind Flux.2's latents: `latent` [B, 4C, h, w] as the
    transformer denoises them (2x2-patchified, normalised by the VAE's batch-norm running
    statistics) -> `images` [B, 3, 16h, 16w] in [-1, 1].

    The wrapper does what the pipelines do after the loop: x * sqrt(running_var + eps) +
    running_mean per channel, unpatchify to [B, C, 2h, 2w], decode. The statistics are the
    VAE's own buffers, so they travel with its weights.
    """

    @classmethod
    def from_model(
        cls,
        vae: nn.Module,
        *,
        precision: str = "fp32",
        latent_size: tuple[int, int] | None = None,
        name: str = "vae_decoder",
    ) -> Flux2VAEDecoderSpec:
        config = vae.config
        factor = 2 * _downsampling_factor(config)
        native = (FLUX_DEFAULT_SAMPLE_SIZE // 2,) * 2 if latent_size is None else latent_size
        return cls(
            name=name,
            precision=checked_precision(precision),
            vae_scale_factor=factor,
            image_size=_image_size(native, factor),
            latent_multiple=1,
            latent_channels=4 * config.latent_channels,
            out_channels=config.out_channels,
            scaling_factor=1.0,
        )

    def wrap(self, module: nn.Module) -> nn.Module:
        return _Flux2VAEDecoderForward(module)


class _Flux2VAEDecoderForward(_Wrapper):
    def forward(self, latent):
        norm = self.module.bn
        std = torch.sqrt(norm.running_var + self.module.config.batch_norm_eps)
        latent = latent * std.view(1, -1, 1, 1) + norm.running_mean.view(1, -1, 1, 1)
        batch, channels, height, width = latent.shape
        patches = latent.reshape(batch, channels // 4, 2, 2, height, width)
        unpatched = patches.permute(0, 1, 4, 2, 5, 3).reshape(
            batch, channels // 4, 2 * height, 2 * width)
        return _first(self.module.decode(unpatched, return_dict=False))


# ---------------------------------------------------------------------------------------------
# Wan (text-to-video): video latents carry a frame axis, `sample` [B, C, latent_frames, h, w]
# and the decoder's `images` [B, 3, frames, H, W]; the wrappers are in export/wan.py

LATENT_FRAMES = "latent_frames"
FRAMES = "frames"
# WanPipeline's defaults: 480x832 pixels, 81 frames, 512 text tokens
WAN_DEFAULT_SIZE = (480, 832)
WAN_DEFAULT_FRAMES = 81
WAN_TEXT_TOKENS = 512


@dataclass
class UMT5EncoderSpec(T5EncoderSpec):
    """UMT5EncoderModel (Wan): `input_ids` and `attention_mask` [B, S] int64 -> the last hidden
    state [B, S, d_model], called with the mask as WanPipeline calls it."""

    @property
    def inputs(self) -> list[TensorSpec]:
        tokens = (BATCH, self.sequence_length)
        return [TensorSpec(tensors.INPUT_IDS, "int64", tokens),
                TensorSpec(tensors.ATTENTION_MASK, "int64", tokens)]

    @classmethod
    def from_context(cls, encoder: nn.Module, context: SpecContext, *, precision: str = "fp32",
                     name: str = "text_encoder") -> UMT5EncoderSpec:
        return cls.from_model(encoder, precision=precision, sequence_length=context.t5_tokens,
                              name=name)

    def wrap(self, module: nn.Module) -> nn.Module:
        from export.wan import MaskedT5Forward

        return MaskedT5Forward(module)

    def sample_value(self, tensor, shape, generator):
        if tensor.name == tensors.ATTENTION_MASK:  # a prompt of random length, right-padded
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
            return (torch.arange(shape[1]).unsqueeze(0) < lengths).to(torch.int64)
        return super().sample_value(tensor, shape, generator)


@dataclass
class WanTransformerSpec(NetworkSpec):
    """WanTransformer3DModel (or Wan 2.2's `WanExperts`, export/wan.py): `sample` [B, C, f, h, w], `timestep`
    [B] (the scheduler's timestep) and UMT5 states [B, 512, text_dim] -> `out_sample` (the
    flow prediction) like `sample`."""

    in_channels: int = 16
    out_channels: int = 16
    sequence_length: int = WAN_TEXT_TOKENS
    text_dim: int = 4096
    latent_frames: int = (WAN_DEFAULT_FRAMES - 1) // 4 + 1
    needs_dynamo: ClassVar[bool] = True

    @classmethod
    def from_model(cls, transformer: nn.Module, *, precision: str = "fp32",
                   vae_scale_factor: int = 8, name: str = "transformer") -> WanTransformerSpec:
        config = transformer.config
        return cls(
            name=name, precision=checked_precision(precision), vae_scale_factor=vae_scale_factor,
            image_size=WAN_DEFAULT_SIZE, latent_multiple=config.patch_size[1],
            in_channels=config.in_channels, out_channels=config.out_channels,
            text_dim=config.text_dim)

    @classmethod
    def from_context(cls, transformer: nn.Module, context: SpecContext, *,
                     precision: str = "fp32", name: str = "transformer") -> WanTransformerSpec:
        spec = cls.from_model(transformer, precision=precision,
                              vae_scale_factor=context.vae_scale_factor, name=name)
        spec.sequence_length = context.t5_tokens
        return spec

    def _latents(self, name: str, channels: int) -> TensorSpec:
        return self.activation(name, (BATCH, channels, LATENT_FRAMES, LATENT_HEIGHT,
                                      LATENT_WIDTH))

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._latents(tensors.SAMPLE, self.in_channels),
                TensorSpec(tensors.TIMESTEP, "float32", (BATCH,)),
                self.activation(tensors.ENCODER_HIDDEN_STATES,
                                (BATCH, self.sequence_length, self.text_dim))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._latents(tensors.OUT_SAMPLE, self.out_channels)]

    def dim_ranges(self, batch_range, height=None, width=None):
        ranges = super().dim_ranges(batch_range, height, width)
        return {**ranges, LATENT_FRAMES: (1, self.latent_frames, self.latent_frames)}

    def wrap(self, module: nn.Module) -> nn.Module:
        from export.wan import WanForward

        return WanForward(module)


@dataclass
class WanExpertsSpec(WanTransformerSpec):
    """Wan 2.2's two experts as one denoiser (export/wan.py `WanExperts`), with
    WanTransformerSpec's tensors. Which expert runs depends on each row's timestep: a traced
    graph keeps that branch only by running both experts on every row, so it is served by
    torch on every backend (`torch_only`)."""

    torch_only: ClassVar[bool] = True


@dataclass
class WanVAEDecoderSpec(NetworkSpec):
    """AutoencoderKLWan's decoder: `latent` [B, z, f, h, w] (already de-normalised by
    latents_mean / latents_std) -> `images` [B, 3, 1 + (f - 1) t, H, W] in [-1, 1]. The
    causal cache of earlier frames lives inside one decode call, which runs frame by frame:
    a traced graph unrolls that loop, so an ONNX export fixes f (`latent_frames`; heights and
    widths stay dynamic; validated through the dynamo exporter, the torchscript one has no
    nearest-exact upsampling). Tracing even the tiny test VAE at f = 2 took 6 minutes on a
    2-core CPU, and every served frame count would need its own, so the decoder is served
    by torch (`torch_only`) at any f: `latent_frames` 0, the frame axes symbolic."""

    latent_channels: int = 16
    temporal_scale_factor: int = 4
    latent_frames: int = 0  # 0: any (torch); > 0: fixed, as an ONNX export needs
    needs_dynamo: ClassVar[bool] = True
    torch_only: ClassVar[bool] = True

    @classmethod
    def from_model(cls, vae: nn.Module, *, precision: str = "fp32", latent_frames: int = 0,
                   name: str = "vae_decoder") -> WanVAEDecoderSpec:
        config = vae.config
        factor = 2 ** len(config.temperal_downsample)
        temporal = 2 ** sum(config.temperal_downsample)
        return cls(name=name, precision=checked_precision(precision), vae_scale_factor=factor,
                   image_size=WAN_DEFAULT_SIZE,
                   latent_multiple=1, latent_channels=config.z_dim,
                   temporal_scale_factor=temporal, latent_frames=latent_frames)

    @classmethod
    def from_context(cls, vae: nn.Module, context: SpecContext, *, precision: str = "fp32",
                     name: str = "vae_decoder") -> WanVAEDecoderSpec:
        return cls.from_model(vae, precision=precision, name=name)

    @property
    def frames(self) -> int | str:
        if not self.latent_frames:
            return FRAMES
        return 1 + (self.latent_frames - 1) * self.temporal_scale_factor

    @property
    def inputs(self) -> list[TensorSpec]:
        latent_frames = self.latent_frames or LATENT_FRAMES
        return [self.activation(tensors.LATENT, (BATCH, self.latent_channels, latent_frames,
                                                 LATENT_HEIGHT, LATENT_WIDTH))]

    def dim_ranges(self, batch_range, height=None, width=None):
        ranges = super().dim_ranges(batch_range, height, width)
        if self.latent_frames:
            return ranges
        most = (WAN_DEFAULT_FRAMES - 1) // self.temporal_scale_factor + 1
        return {**ranges, LATENT_FRAMES: (1, most, most),
                FRAMES: (1, WAN_DEFAULT_FRAMES, WAN_DEFAULT_FRAMES)}

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self.activation(tensors.IMAGES,
                                (BATCH, 3, self.frames, IMAGE_HEIGHT, IMAGE_WIDTH))]

    def wrap(self, module: nn.Module) -> nn.Module:
        from export.wan import WanDecoderForward

        return WanDecoderForward(module)


SPEC_BY_CLASS: dict[str, type[NetworkSpec]] = {
    "UNet2DConditionModel": UNetSpec,
    "UNet2DModel": UNet2DSpec,
    "CLIPTextModel": TextEncoderSpec,
    "CLIPTextModelWithProjection": TextEncoderSpec,
    "T5EncoderModel": T5EncoderSpec,
    "AutoencoderKL": VAEDecoderSpec,
    "SD3Transformer2DModel": SD3TransformerSpec,
    "FluxTransformer2DModel": FluxTransformerSpec,
    "Flux2Transformer2DModel": Flux2TransformerSpec,
    "AutoencoderKLFlux2": Flux2VAEDecoderSpec,
    **dict.fromkeys(LLM_ENCODERS, LLMEncoderSpec),
    "QwenImageTransformer2DModel": QwenImageTransformerSpec,
    "AutoencoderKLQwenImage": QwenImageVAEDecoderSpec,
    "ZImageTransformer2DModel": ZImageTransformerSpec,
    "UMT5EncoderModel": UMT5EncoderSpec,
    "WanTransformer3DModel": WanTransformerSpec,
    "WanExperts": WanExpertsSpec,
    "AutoencoderKLWan": WanVAEDecoderSpec,
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

    vae_scale_factor: int = 1
    sequence_length: int = 77  # CLIP tokens
    t5_tokens: int = 256  # the family's max_sequence_length: T5 tokens (SD3: zeros without T5)
    text_embeds_dim: int | None = None
    latent_size: tuple[int, int] | None = None
    # LLM encoders: the hidden states the family stacks, and its max_sequence_length of tokens
    llm_layers: tuple[int, ...] = (-1,)
    llm_tokens: int = 512
    llm_dropped_tokens: int = 0  # Qwen-Image: its template's prefix, dropped from the states


def spec_for(
    module: nn.Module, component: str, context: SpecContext, precision: str = "fp32"
) -> NetworkSpec:
    """Build the spec of one pipeline component (`unet`, `text_encoder`, `vae`, ...)."""
    spec_class = spec_class_for(module, component)
    if hasattr(spec_class, "from_context"):  # a spec that reads the context itself (Wan's)
        return spec_class.from_context(module, context, precision=precision, name=component)
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
    if spec_class is T5EncoderSpec:
        return T5EncoderSpec.from_model(
            module, precision=precision, sequence_length=context.t5_tokens, name=component
        )
    if spec_class is VAEDecoderSpec and component == "vae_encoder":
        return VAEEncoderSpec.from_model(
            module, precision=precision, latent_size=context.latent_size
        )
    if spec_class is VAEDecoderSpec:
        return VAEDecoderSpec.from_model(
            module, precision=precision, latent_size=context.latent_size
        )
    if spec_class is QwenImageTransformerSpec:
        return QwenImageTransformerSpec.from_model(
            module,
            precision=precision,
            max_text_length=context.llm_tokens - context.llm_dropped_tokens,
            vae_scale_factor=context.vae_scale_factor,
            latent_size=context.latent_size,
        )
    if spec_class is QwenImageVAEDecoderSpec:
        vae_spec = QwenImageVAEEncoderSpec if component == "vae_encoder" else spec_class
        return vae_spec.from_model(module, precision=precision, latent_size=context.latent_size)
    if spec_class is LLMEncoderSpec:
        return LLMEncoderSpec.from_model(module, precision=precision, name=component,
                                         sequence_length=context.llm_tokens,
                                         layers=context.llm_layers)
    if spec_class is Flux2VAEDecoderSpec:
        return Flux2VAEDecoderSpec.from_model(module, precision=precision,
                                              latent_size=context.latent_size)
    if spec_class is Flux2TransformerSpec:
        return Flux2TransformerSpec.from_model(
            module, precision=precision, sequence_length=context.llm_tokens,
            vae_scale_factor=context.vae_scale_factor, latent_size=context.latent_size)
    if spec_class is ZImageTransformerSpec:
        return ZImageTransformerSpec.from_model(
            module,
            precision=precision,
            max_text_length=context.llm_tokens,
            vae_scale_factor=context.vae_scale_factor,
            latent_size=context.latent_size,
        )
    if spec_class is FluxTransformerSpec:
        return FluxTransformerSpec.from_model(
            module,
            precision=precision,
            sequence_length=context.t5_tokens,
            vae_scale_factor=context.vae_scale_factor,
            latent_size=context.latent_size,
        )
    # SD3 pipelines concatenate the CLIP tokens with the T5 tokens (zeros without T5)
    return SD3TransformerSpec.from_model(
        module,
        precision=precision,
        sequence_length=context.sequence_length + context.t5_tokens,
        vae_scale_factor=context.vae_scale_factor,
    )
