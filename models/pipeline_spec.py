"""The pipeline spec: what serving a model needs to know beyond its networks.

Export derives it from the model source (a diffusers folder's model_index.json and component
configs, or a preset), writes it as `pipeline.json` beside the ONNX files, the engine build
copies it beside the engines, the repository generator puts it in the `driffusion` model's
config with the serving limits, and gRPC clients read it from there. Plain JSON data, never
evaluated.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from models.limits import SERVING_LIMITS

SPEC_FILE = "pipeline.json"
# model families: how prompts become the denoiser's conditioning
CLASS_CONDITIONAL = "class"  # LABEL -> label encoder -> encoder_hidden_states
STABLE_DIFFUSION = "sd"  # one CLIP encoder, last hidden state
STABLE_DIFFUSION_XL = "sdxl"  # two CLIP encoders, penultimate states, pooled text_embeds, time_ids
STABLE_DIFFUSION_3 = "sd3"  # two CLIP encoders + T5 (or zeros in its place), pooled projections
FLUX = "flux"  # CLIP pooled projection + T5 states, guidance embedding, 2x2-packed latents
FLUX2 = "flux2"  # one LLM encoder's stacked hidden states, 2x2-patchified batch-normed latents
QWEN_IMAGE = "qwenimage"  # Qwen2.5-VL states after the template prefix, true CFG
Z_IMAGE = "zimage"  # Qwen3's second-to-last states, mask-trimmed
WAN = "wan"  # text-to-video: UMT5 states zeroed past the prompt, 3-D transformer(s), causal VAE
FAMILIES = (CLASS_CONDITIONAL, STABLE_DIFFUSION, STABLE_DIFFUSION_XL, STABLE_DIFFUSION_3, FLUX,
            FLUX2, QWEN_IMAGE, Z_IMAGE, WAN)
# text encoder classes by what they give: CLIP (last/penultimate states, pooled), T5 (states) or
# an LLM (chosen hidden states, with an attention mask)
CLIP_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_ENCODERS = ("T5EncoderModel", "UMT5EncoderModel")
# T5-style encoders that take the tokenizer's attention mask (Wan's UMT5)
MASKED_T5_ENCODERS = ("UMT5EncoderModel",)
LLM_ENCODERS = ("Qwen3ForCausalLM", "Qwen3Model", "Qwen2_5_VLForConditionalGeneration",
                "Mistral3ForConditionalGeneration")
# an LLM encoder's prompt template: none, the tokenizer's chat template (user message, generation
# prompt) without or with thinking, or else a format string with one "{}"
CHAT_TEMPLATE = "chat"
CHAT_THINKING_TEMPLATE = "chat-thinking"
# network precisions: a network's floating-point type inside (bf16 networks keep fp32 inputs
# and outputs, cast at their edges; fp16 networks take and give fp16)
NETWORK_PRECISIONS = ("fp32", "fp16", "bf16")
DECODERS = ("pixels", "vae")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder network and the tokenizer model that feeds it."""

    network: str  # Triton model name, e.g. "text_encoder_2"
    tokenizer: str  # Triton model name of its tokenizer, e.g. "tokenizer_2"
    kind: str  # a class of CLIP_ENCODERS, T5_ENCODERS or LLM_ENCODERS
    max_length: int = 77  # tokens: CLIP's 77, T5's max_sequence_length of the family
    hidden_size: int = 768
    # LLM encoders: indices into transformers' output.hidden_states (negative allowed), stacked
    # as [B, S, len(layers) * hidden] in this order; one index gives that state alone
    layers: tuple[int, ...] = ()
    template: str = ""  # "", CHAT_TEMPLATE, CHAT_THINKING_TEMPLATE or a format string with "{}"
    drop_tokens: int = 0  # prefix tokens dropped from the states (the template's own)
    trim: bool = False  # the family conditions on the prompt's real length (mask-trimmed)

    @property
    def is_t5(self) -> bool:
        return self.kind in T5_ENCODERS

    @property
    def is_llm(self) -> bool:
        return self.kind in LLM_ENCODERS

    @property
    def takes_mask(self) -> bool:
        """The encoder is given the tokenizer's attention mask beside the token ids."""
        return self.is_llm or self.kind in MASKED_T5_ENCODERS


@dataclass(frozen=True)
class PipelineSpec:
    """What a client and the `driffusion` model need to know about a served model."""

    model: str
    family: str
    latent_channels: int
    latent_size: tuple[int, int]  # default latent height, width
    scheduler_config: dict[str, Any]
    vae_scale_factor: int = 1  # image pixels per latent pixel
    decoder: str = "pixels"  # "pixels": latents are images in [-1, 1]; "vae": vae_decoder model
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    # per-channel statistics the latents are normalised by, where the VAE's config has them
    # (SDXL-style VAEs, Qwen-Image): decoding takes latents x std / scaling_factor + mean
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    text_encoders: tuple[TextEncoder, ...] = ()
    # SDXL: negative conditioning is zeros when no negative prompt is given
    force_zeros_for_empty_prompt: bool = False
    # SD3: tokens of the T5 encoder (absent: zeros) and the joint attention width
    t5_tokens: int = 256
    joint_attention_dim: int = 0
    # Flux: a guidance-distilled transformer takes GUIDANCE as an input (`guidance` [B])
    guidance_embeds: bool = False
    # Flux.2 Klein: a step-distilled model (model_index.json's is_distilled) runs without
    # classifier-free guidance, whatever GUIDANCE says
    cfg_distilled: bool = False
    # each network's precision (NETWORK_PRECISIONS) as exported, by network name
    precisions: dict[str, str] = field(default_factory=dict)
    # image inputs: a `vae_encoder` network is served (INIT_IMAGE), and the denoiser is a
    # 9-channel inpainting UNet taking `mask` and `masked_image_latents`
    image_encoder: bool = False
    masked_inputs: bool = False
    # class-conditional models
    num_labels: int = 0
    null_label: int = 0  # the "empty prompt" of classifier-free guidance
    label_names: tuple[tuple[str, ...], ...] = ()
    # image sizes the engines accept, in pixels: (min, max) and the grid they must lie on
    height_range: tuple[int, int] | None = None
    width_range: tuple[int, int] | None = None
    size_multiple: int = 1
    default_steps: int = 20
    default_guidance: float = 1.0
    default_true_cfg: float = 1.0  # TRUE_CFG when a request gives none (Qwen-Image: 4.0)
    default_scheduler: str = "default"
    # video models (Wan): the VAE's temporal scale factor (0: an image model), FRAMES when a
    # request gives none, and Wan 2.2's boundary between its experts (a fraction of the
    # training timesteps: `transformer` at or above it, `transformer_2` below; None: one)
    temporal_scale_factor: int = 0
    default_frames: int = 0
    boundary_ratio: float | None = None
    max_video_pixels: int = SERVING_LIMITS["max_video_pixels"].default
    # serving limits (the repository writer sets them from `driffusion serve --max-...`)
    max_steps: int = SERVING_LIMITS["max_steps"].default
    max_window: int = SERVING_LIMITS["max_window"].default
    max_prompt_bytes: int = SERVING_LIMITS["max_prompt_bytes"].default
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if len(self.latents_mean) != len(self.latents_std):
            raise ValueError(f"latents_mean has {len(self.latents_mean)} channels, latents_std "
                             f"{len(self.latents_std)}: both or neither, one per channel")
        for network, precision in self.precisions.items():
            if precision not in NETWORK_PRECISIONS:
                raise ValueError(f"{network}: precision {precision!r} is not one of "
                                 f"{', '.join(NETWORK_PRECISIONS)}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one latent at the default size."""
        return (self.latent_channels, *self.latent_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """Default image height, width in pixels."""
        return (self.latent_size[0] * self.vae_scale_factor,
                self.latent_size[1] * self.vae_scale_factor)

    @property
    def uses_prompts(self) -> bool:
        return self.family != CLASS_CONDITIONAL

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineSpec:
        """Parse a spec (plain JSON data, never evaluated); ValueError says what is wrong."""
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise TypeError(f"unknown fields {', '.join(unknown)}")
            data["latent_size"] = tuple(data["latent_size"])
            data["text_encoders"] = tuple(_text_encoder(e) for e in data.get("text_encoders", ()))
            data["label_names"] = tuple(tuple(names) for names in data.get("label_names", ()))
            for key in ("height_range", "width_range"):
                if data.get(key) is not None:
                    data[key] = tuple(data[key])
            for key in ("latents_mean", "latents_std"):
                data[key] = tuple(data.get(key, ()))
            return cls(**data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a PipelineSpec JSON object: {type(error).__name__}: {error}") \
                from error

    def with_defaults(self, **changes: Any) -> PipelineSpec:
        return replace(self, **changes)


def _text_encoder(data: dict[str, Any]) -> TextEncoder:
    """A TextEncoder from its JSON object (lists back to tuples)."""
    return TextEncoder(**{**data, "layers": tuple(data.get("layers", ()))})


def digit_names(count: int = 10) -> tuple[tuple[str, ...], ...]:
    """Prompt words for digit labels: ("0", "zero"), ("1", "one"), ..."""
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return tuple((str(k), words[k]) for k in range(count))
