"""Model sources for export: the `tiny-sd` and `reference` presets and local diffusers folders."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.lora import Lora, fuse_loras, lora_key
from export.precision import UPCAST_VAE_FAMILIES, apply_overrides, network_precision
from export.specs import (
    FLUX_DEFAULT_SAMPLE_SIZE,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    QWEN_IMAGE_DEFAULT_SAMPLE_SIZE,
    QWEN_IMAGE_MAX_TEXT_LENGTH,
    WAN_DEFAULT_FRAMES,
    WAN_DEFAULT_SIZE,
    WAN_TEXT_TOKENS,
    FluxTransformerSpec,
    LabelEncoderSpec,
    NetworkSpec,
    SD3TransformerSpec,
    SpecContext,
    T5EncoderSpec,
    TextEncoderSpec,
    UNet2DSpec,
    UNetSpec,
    UnsupportedModelError,
    VAEDecoderSpec,
    spec_class_named,
    spec_for,
)
from models.pipeline_spec import (
    CHAT_TEMPLATE,
    CHAT_THINKING_TEMPLATE,
    FLUX,
    FLUX2,
    LLM_ENCODERS,
    QWEN_IMAGE,
    SPEC_FILE,
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_3,
    STABLE_DIFFUSION_XL,
    T5_ENCODERS,
    WAN,
    Z_IMAGE,
    PipelineSpec,
    TextEncoder,
)

PRESETS = ("tiny-sd", "reference", "reference-flow")
# the bundled diffusers folders: preset name -> the module that owns the folder
BUNDLED_MODELS = {"reference": "models.reference", "reference-flow": "models.reference_flow"}
# the network name a single-model folder gets, by the spec its model class uses
NETWORK_OF_SPEC: dict[type[NetworkSpec], str] = {
    UNetSpec: "unet",
    UNet2DSpec: "unet",
    TextEncoderSpec: "text_encoder",
    T5EncoderSpec: "text_encoder",
    VAEDecoderSpec: "vae_decoder",
    SD3TransformerSpec: "transformer",
    FluxTransformerSpec: "transformer",
}
# pipeline components that become networks, and the network name each gets
EXPORTED_COMPONENTS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    "unet": "unet",
    "transformer": "transformer",
    "vae": "vae_decoder",
}
# Wan 2.2's low-noise expert: joined with `transformer` into one denoiser (WanExperts)
EXPERT_COMPONENT = "transformer_2"
VAE_NETWORK = EXPORTED_COMPONENTS["vae"]
VAE_ENCODER_NETWORK = "vae_encoder"  # the same VAE, exported a second time: images -> posterior
VAE_NETWORKS = (VAE_NETWORK, VAE_ENCODER_NETWORK)
# the tokenizer that feeds each text encoder
TOKENIZER_OF_ENCODER = {
    "text_encoder": "tokenizer",
    "text_encoder_2": "tokenizer_2",
    "text_encoder_3": "tokenizer_3",
}
# the files a T5 tokenizer folder needs: transformers' fast tokenizer and its settings
T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# the prompt family of a pipeline by its transformer's class (UNet pipelines: SD or SDXL)
FAMILY_OF_TRANSFORMER = {"SD3Transformer2DModel": STABLE_DIFFUSION_3,
                         "FluxTransformer2DModel": FLUX,
                         "Flux2Transformer2DModel": FLUX2,
                         "QwenImageTransformer2DModel": QWEN_IMAGE,
                         "ZImageTransformer2DModel": Z_IMAGE,
                         "WanTransformer3DModel": WAN}
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.check_inputs refuses more T5 tokens
QWEN_IMAGE_MAX_SEQUENCE_LENGTH = 1024  # and QwenImagePipeline.check_inputs more prompt tokens
FLUX_SCHNELL = "flux-schnell"  # the FAMILY_DEFAULTS key of Flux without guidance embedding
FLUX2_KLEIN = "flux2-klein"  # the FAMILY_DEFAULTS key of Flux.2 without guidance embedding
# Flux.2 dev's prompt format: its chat template around Flux2Pipeline's system message and the
# prompt, fixed at export as a format string (models/prompt_tokens.py, system_template)
FLUX2_SYSTEM_CHAT = "flux2-system-chat"
# Flux.2's pipelines condition on reference images, never start from one: no image-to-image is
# served for them, so their VAE is exported as a decoder only
DECODE_ONLY_VAES = ("AutoencoderKLFlux2", "AutoencoderKLWan")  # Wan: text-to-video only
# components a pipeline folder may hold that are not networks to export
IGNORED_COMPONENTS = {
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
    "feature_extractor",
    "safety_checker",
    "image_encoder",
}


@dataclass(frozen=True)
class FamilyDefaults:
    """What diffusers' pipeline of a family defaults to: its __call__'s steps and guidance, and
    its max_sequence_length of T5 tokens (0: no T5); an LLM-conditioned family's token count,
    the hidden states it stacks, its prompt template and whether it cuts the states to the
    prompt's tokens (TextEncoder's fields)."""

    steps: int
    guidance: float
    t5_tokens: int = 0
    llm_tokens: int = 0
    llm_layers: tuple[int, ...] = ()
    template: str = ""
    trim: bool = False
    drop_tokens: int = 0  # the template's prefix tokens the pipeline drops from the states
    true_cfg: float = 1.0  # true_cfg_scale (Qwen-Image), which needs a negative prompt


# QwenImagePipeline's prompt_template_encode: a system message, then the prompt as the user's
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_PREFIX_TOKENS = 34  # its prompt_template_encode_start_idx: the tokens it drops


# the one table of per-family defaults, keyed by family_variant
FAMILY_DEFAULTS = {
    STABLE_DIFFUSION: FamilyDefaults(50, 7.5),
    STABLE_DIFFUSION_XL: FamilyDefaults(50, 5.0),
    STABLE_DIFFUSION_3: FamilyDefaults(28, 7.0, t5_tokens=256),
    FLUX: FamilyDefaults(28, 3.5, t5_tokens=512),  # FluxPipeline.__call__ (Flux-dev)
    # Flux-schnell is timestep-distilled and has no guidance embedding: FluxPipeline's defaults
    # are Flux-dev's, so these are the schnell model card's settings (4 steps, guidance 0,
    # max_sequence_length 256)
    FLUX_SCHNELL: FamilyDefaults(4, 0.0, t5_tokens=256),
    # Flux2Pipeline.__call__ (dev: Mistral3, embedded guidance, a system message)
    FLUX2: FamilyDefaults(50, 4.0, llm_tokens=512, llm_layers=(10, 20, 30),
                          template=FLUX2_SYSTEM_CHAT),
    # Flux2KleinPipeline.__call__ (Qwen3; classifier-free guidance unless is_distilled)
    FLUX2_KLEIN: FamilyDefaults(50, 4.0, llm_tokens=512, llm_layers=(9, 18, 27),
                                template=CHAT_TEMPLATE),
    # ZImagePipeline.__call__ (Qwen3's second-to-last states of the chat template with thinking,
    # cut to the prompt's tokens); Z-Image-Turbo's model card asks for 9 steps at guidance 0
    Z_IMAGE: FamilyDefaults(50, 5.0, llm_tokens=512, llm_layers=(-2,),
                            template=CHAT_THINKING_TEMPLATE, trim=True),
    # QwenImagePipeline.__call__: true CFG at 4.0 with a negative prompt (no guidance embedding),
    # 512 tokens after the template's 34 prefix tokens (the tokenizer gets 512 + 34)
    QWEN_IMAGE: FamilyDefaults(50, 1.0,
                               llm_tokens=QWEN_IMAGE_MAX_TEXT_LENGTH + QWEN_IMAGE_PREFIX_TOKENS,
                               llm_layers=(-1,), template=QWEN_IMAGE_TEMPLATE, trim=True,
                               drop_tokens=QWEN_IMAGE_PREFIX_TOKENS, true_cfg=4.0),
    # WanPipeline.__call__: 50 steps, guidance 5.0, max_sequence_length 512 UMT5 tokens
    WAN: FamilyDefaults(50, 5.0, t5_tokens=WAN_TEXT_TOKENS),
}


def family_variant(family: str | None, guidance_embeds: bool = False) -> str | None:
    """The FAMILY_DEFAULTS key: the family, or flux-schnell for Flux and flux2-klein for Flux.2
    without guidance embedding."""
    if not guidance_embeds and family in (FLUX, FLUX2):
        return FLUX_SCHNELL if family == FLUX else FLUX2_KLEIN
    return family


def family_defaults(family: str | None, guidance_embeds: bool = False) -> FamilyDefaults:
    """A family's defaults (None, a model outside the prompt families: SD's)."""
    return FAMILY_DEFAULTS[family_variant(family, guidance_embeds) or STABLE_DIFFUSION]


def family_of(network_classes: dict[str, str]) -> str | None:
    """The prompt family of a model from its networks' classes: by the transformer's class
    (SD3, Flux), or SDXL / SD for a UNet with / without a second text encoder; None for
    anything else (class-conditional or unconditional UNets, single networks)."""
    transformer = network_classes.get("transformer")
    if transformer is not None:
        return FAMILY_OF_TRANSFORMER.get(transformer)
    if network_classes.get("unet") == "UNet2DConditionModel":
        return STABLE_DIFFUSION_XL if "text_encoder_2" in network_classes else STABLE_DIFFUSION
    return None


class ModelSourceError(ValueError):
    """A model source that is neither a preset nor a loadable diffusers folder."""


@dataclass
class ModelBundle:
    """The networks of one model, ready to export, with the pipeline facts their specs need."""

    name: str
    source: str
    modules: dict[str, nn.Module]
    context: SpecContext
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    label_encoders: frozenset[str] = frozenset()
    selected: bool = False  # True when only some of the model's networks were chosen
    # tokenizer name -> writer of its files into a directory
    tokenizers: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # model_index.json
    folder: str = ""  # the diffusers folder the networks were loaded from
    loras: tuple[Lora, ...] = ()  # fused into the networks' weights
    # every network of the model (loaded or not) -> its model class name
    network_classes: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # a prompt family of models.pipeline_spec, None for the others
    guidance_embeds: bool = False  # Flux-dev: the transformer embeds the guidance scale

    def __post_init__(self) -> None:
        if not self.network_classes:
            self.network_classes = {name: type(m).__name__ for name, m in self.modules.items()}
        if self.family is None:
            self.family = family_of(self.network_classes)

    def precisions(
        self, requested: str = "fp32", overrides: dict[str, str] | None = None
    ) -> dict[str, str]:
        """{network name: precision} of the loaded networks when `requested` is asked, by the
        rule of export/precision.py, then `overrides` (network name -> precision)."""
        rule = {
            name: network_precision(requested, self.network_classes[name],
                                    upcast=self._upcasts(name))
            for name in self.modules
        }
        return apply_overrides(rule, overrides or {}, list(self.network_classes))

    def _upcasts(self, network: str) -> bool:
        """True for a VAE its family's pipeline decodes in fp32 (SDXL with force_upcast)."""
        return (network in VAE_NETWORKS and self.family in UPCAST_VAE_FAMILIES
                and bool(getattr(self.modules[network].config, "force_upcast", False)))

    def t5_tokens(self, max_sequence_length: int | None = None) -> int:
        """T5 tokens: `max_sequence_length` when given, else the family's diffusers default."""
        if max_sequence_length is None:
            return self.context.t5_tokens
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if self.family == FLUX and max_sequence_length > FLUX_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"Flux takes at most {FLUX_MAX_SEQUENCE_LENGTH} T5 tokens "
                             f"(FluxPipeline refuses more); got {max_sequence_length}")
        if self.family == QWEN_IMAGE and max_sequence_length > QWEN_IMAGE_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"Qwen-Image takes at most {QWEN_IMAGE_MAX_SEQUENCE_LENGTH} tokens "
                             f"(QwenImagePipeline refuses more); got {max_sequence_length}")
        return max_sequence_length

    def llm_tokens(self, max_sequence_length: int | None = None) -> int:
        """An LLM encoder's tokens: `max_sequence_length` and the template prefix the family
        drops from the states (Qwen-Image's 34) when given, else the family's default."""
        if max_sequence_length is None:
            return self.context.llm_tokens
        return self.t5_tokens(max_sequence_length) + self.context.llm_dropped_tokens

    def specs(
        self,
        precision: str = "fp32",
        overrides: dict[str, str] | None = None,
        max_sequence_length: int | None = None,
    ) -> dict[str, NetworkSpec]:
        """{network name: spec} in export order, each at its precision (`precisions`), T5 or
        an LLM encoder and the transformer at `max_sequence_length` tokens (default: the
        family's)."""
        precisions = self.precisions(precision, overrides)
        context = replace(self.context, t5_tokens=self.t5_tokens(max_sequence_length),
                          llm_tokens=self.llm_tokens(max_sequence_length))
        specs: dict[str, NetworkSpec] = {}
        for name, module in self.modules.items():
            if name in self.label_encoders:
                spec = LabelEncoderSpec.from_model(module, precision=precisions[name], name=name)
            else:
                spec = spec_for(module, name, context, precisions[name])
                spec.name = name
            spec.model_class = type(module).__name__
            specs[name] = spec
        return specs


def model_name(source: str, loras: tuple[Lora, ...] = ()) -> str:
    """Directory-safe name of a model source: the preset name or the folder's name, and with
    LoRAs a key of their files and scales (each LoRA set has exports and engines of its own)."""
    suffix = f"-lora-{lora_key(loras)}" if loras else ""
    if source in PRESETS:
        return source + suffix
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).expanduser().resolve().name).strip("-")
    if not name:
        raise ModelSourceError(f"cannot derive a model name from {source!r}; pass --name")
    return name + suffix


def load_bundle(source: str, networks: list[str] | None = None,
                loras: tuple[Lora, ...] = ()) -> ModelBundle:
    """Load a preset (`tiny-sd`, `reference`, `reference-flow`) or a local diffusers
    pipeline/model folder, with `loras` fused into its weights (a pipeline folder or a bundled
    one)."""
    if source == "tiny-sd":
        bundle = select_networks(tiny_sd(), networks)
    elif source in BUNDLED_MODELS:
        bundle = bundled(source, networks)
    else:
        bundle = load_folder(Path(source).expanduser(), networks)
    if loras:
        if not bundle.pipeline_config:
            raise ModelSourceError(f"--lora needs a diffusers pipeline folder (model_index.json)"
                                   f"; {source} is not one")
        fuse_loras(Path(bundle.folder), bundle.modules, loras, bundle.pipeline_config)
        bundle.loras = tuple(loras)
        bundle.name = model_name(source, loras)
    return bundle


def source_fingerprint(source: str, loras: tuple[Lora, ...] = ()) -> str:
    """What identifies the weights behind `source` (and the LoRAs fused into them), so an
    export can tell it is stale."""
    weights = _weights_fingerprint(source)
    return f"{weights}+lora:{lora_key(loras)}" if loras else weights


def _weights_fingerprint(source: str) -> str:
    if source == "tiny-sd":
        return "tiny-sd:seed0:clip-tokenizer"
    if source in BUNDLED_MODELS:
        # a bundled folder is small: its pipeline files' contents stand for it
        module = importlib.import_module(BUNDLED_MODELS[source])
        digest = hashlib.sha256()
        for path in module.pipeline_files(module.ASSET_DIR):
            digest.update(f"{path.relative_to(module.ASSET_DIR)}:".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return f"{source}:{digest.hexdigest()[:16]}"
    # a diffusers folder may hold gigabytes: its files' names, sizes and mtimes stand for them
    folder = Path(source).expanduser()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"folder:{digest.hexdigest()[:16]}"


def select_networks(bundle: ModelBundle, networks: list[str] | None) -> ModelBundle:
    """Keep only the named networks; an unknown name is an error listing the known ones."""
    if not networks:
        return bundle
    _check_known(networks, list(bundle.modules), bundle.name)
    bundle.modules = {k: v for k, v in bundle.modules.items() if k in networks}
    bundle.selected = True
    return bundle


def _check_known(wanted: list[str], known: list[str], model: str) -> None:
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ModelSourceError(
            f"{model} has no network {', '.join(unknown)}; it has {', '.join(known)}"
        )


def tiny_sd(seed: int = 0) -> ModelBundle:
    """A small Stable-Diffusion-like pipeline from configs with random weights (for tests)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.clip_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, write_clip_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16),
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    modules = {"text_encoder": text_encoder, "unet": unet, VAE_NETWORK: vae, VAE_ENCODER_NETWORK: vae}
    return ModelBundle(
        name="tiny-sd",
        source="tiny-sd",
        modules={k: m.eval() for k, m in modules.items()},
        context=SpecContext(vae_scale_factor=8, sequence_length=77),
        scheduler_config={**scheduler.config, "_class_name": type(scheduler).__name__},
        tokenizers={"tokenizer": write_clip_tokenizer},
    )


def bundled(name: str, networks: list[str] | None = None) -> ModelBundle:
    """A bundled model, `reference` (models/assets/reference/, a StableDiffusionPipeline folder
    of 8x8 digits: CLIP, UNet, one-block VAE, DDIM) or `reference-flow` (reference_flow/, a
    StableDiffusion3Pipeline folder without T5 of the same digits: two CLIP encoders, SD3
    transformer, flow matching), loaded as any other pipeline folder under its preset name."""
    module_name = BUNDLED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ModelSourceError(
            f"the `{name}` preset needs {module_name.replace('.', '/')}.py, which is not in "
            "this checkout; use --model tiny-sd or a diffusers folder"
        ) from error
    module.check_assets(module.ASSET_DIR)
    bundle = _load_pipeline_folder(module.ASSET_DIR, networks)
    bundle.name = bundle.source = name
    return bundle


def load_folder(path: Path, networks: list[str] | None = None) -> ModelBundle:
    """A diffusers pipeline folder (model_index.json) or a single-model folder (config.json)."""
    if not path.is_dir():
        raise ModelSourceError(
            f"model source {str(path)!r} is neither a preset ({', '.join(PRESETS)}) "
            "nor an existing directory"
        )
    if (path / "model_index.json").is_file():
        return _load_pipeline_folder(path, networks)
    if (path / "config.json").is_file():
        return select_networks(_load_model_folder(path), networks)
    raise ModelSourceError(
        f"{path} holds neither model_index.json (a diffusers pipeline) nor config.json "
        "(a single diffusers model)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"cannot read {path}: {error}") from error


def _component_class(library: str, class_name: str, component: str) -> type:
    if library not in ("diffusers", "transformers"):
        raise UnsupportedModelError(
            f"{component}: class {library}.{class_name} is not supported for export"
        )
    model_class = getattr(importlib.import_module(library), class_name, None)
    if model_class is None:
        raise UnsupportedModelError(f"{component}: {library} has no class {class_name}")
    return model_class


def _load_pipeline_folder(path: Path, networks: list[str] | None) -> ModelBundle:
    index = _read_json(path / "model_index.json")
    present = {
        key: value
        for key, value in index.items()
        if not key.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and None not in value
        and key not in IGNORED_COMPONENTS
    }
    network_of = {key: EXPORTED_COMPONENTS.get(key, key) for key in present}
    if networks:
        known = list(network_of.values())
        _check_known(networks, known + ([VAE_ENCODER_NETWORK] if VAE_NETWORK in known else []),
                     path.name)
    else:
        unsupported = [key for key in present
                       if key not in EXPORTED_COMPONENTS and key != EXPERT_COMPONENT]
        if unsupported:
            raise UnsupportedModelError(
                f"{path}: components {', '.join(unsupported)} are not supported for export "
                f"(supported: {', '.join(EXPORTED_COMPONENTS)}); pick networks with --networks"
            )
    components: dict[str, nn.Module] = {}
    for component, (library, class_name) in present.items():
        network = network_of[component]
        if networks and network not in networks and not (
                network == VAE_NETWORK and VAE_ENCODER_NETWORK in networks) and not (
                network == EXPERT_COMPONENT and "transformer" in networks):
            continue
        spec_class_named(class_name, component)
        if class_name in T5_ENCODERS:
            _check_t5_tokenizer(path, component)
        model_class = _component_class(library, class_name, component)
        components[network] = model_class.from_pretrained(str(path / component))
    if not components:
        raise ModelSourceError(f"{path}/model_index.json names no exportable component")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    _join_experts(components, index, scheduler_config)
    decode_only = present.get("vae", ("", ""))[1] in DECODE_ONLY_VAES
    if not decode_only:
        _add_vae_encoder(components, networks)
    tokenizers = {name: functools.partial(_copy_tree, path / name)
                  for name in TOKENIZER_OF_ENCODER.values() if (path / name).is_dir()}
    classes = {network_of[key]: class_name for key, (_, class_name) in present.items()
               if key != EXPERT_COMPONENT}
    if VAE_NETWORK in classes and not decode_only:
        classes[VAE_ENCODER_NETWORK] = classes[VAE_NETWORK]
    configs = {network_of[key]: _read_json(path / key / "config.json") for key in present
               if (path / key / "config.json").is_file()}
    family = family_of(classes)
    guidance_embeds = family in (FLUX, FLUX2) and bool(
        configs.get("transformer", {}).get("guidance_embeds", False))
    return ModelBundle(
        name=model_name(str(path)),
        source=str(path),
        modules={k: m.eval() for k, m in components.items()},
        context=_pipeline_context(classes, configs, family_defaults(family, guidance_embeds)),
        scheduler_config=scheduler_config,
        selected=bool(networks),
        tokenizers=tokenizers,
        pipeline_config=index,
        folder=str(path),
        network_classes=classes,
        family=family,
        guidance_embeds=guidance_embeds,
    )


def _join_experts(components: dict[str, nn.Module], index: dict[str, Any],
                  scheduler_config: dict[str, Any]) -> None:
    """Wan 2.2: `transformer` (high noise) and `transformer_2` (low noise) become one denoiser,
    WanExperts, which runs each row by the expert of its timestep (boundary_ratio x
    num_train_timesteps), so every device holds both and any round's items can go anywhere."""
    low = components.pop(EXPERT_COMPONENT, None)
    if low is None or "transformer" not in components:
        return
    from export.wan import WanExperts

    ratio = index.get("boundary_ratio")
    if ratio is None:
        raise ModelSourceError(f"{EXPERT_COMPONENT} needs boundary_ratio in model_index.json "
                               "(the timestep share where the low-noise expert takes over)")
    boundary = float(ratio) * scheduler_config.get("num_train_timesteps", 1000)
    components["transformer"] = WanExperts(components["transformer"], low, boundary)


def _add_vae_encoder(components: dict[str, nn.Module], networks: list[str] | None) -> None:
    """The VAE serves twice: `vae_decoder` (latents -> images) and `vae_encoder` (images -> the
    posterior, for INIT_IMAGE), unless --networks left the encoder out."""
    vae = components.get(VAE_NETWORK)
    if vae is None:
        return
    if not networks or VAE_ENCODER_NETWORK in networks:
        components[VAE_ENCODER_NETWORK] = vae
    if networks and VAE_NETWORK not in networks:
        del components[VAE_NETWORK]


def _check_t5_tokenizer(path: Path, component: str) -> None:
    """ModelSourceError unless the T5 encoder `component` has its tokenizer folder with the
    files transformers' fast tokenizer loads."""
    tokenizer = TOKENIZER_OF_ENCODER.get(component)
    if tokenizer is None:
        raise UnsupportedModelError(
            f"{path}: {component} is a T5 encoder, which is served only as one of "
            f"{', '.join(TOKENIZER_OF_ENCODER)}"
        )
    missing = [name for name in T5_TOKENIZER_FILES if not (path / tokenizer / name).is_file()]
    if missing:
        raise ModelSourceError(
            f"{path}: {component} (T5EncoderModel) needs its tokenizer in {tokenizer}/ with "
            f"{' and '.join(T5_TOKENIZER_FILES)} (a transformers fast tokenizer); "
            f"{tokenizer}/ lacks {', '.join(missing)}"
        )


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def _pipeline_context(
    classes: dict[str, str], configs: dict[str, dict[str, Any]], defaults: FamilyDefaults
) -> SpecContext:
    """The facts specs need from the other networks' configs (`configs`: every network's, loaded
    or not, so that a partial export's specs are the full export's)."""
    vae = configs.get(VAE_NETWORK)
    vae_scale = _vae_scale_factor(vae) if vae is not None else 1
    encoder = configs.get("text_encoder")
    sequence = encoder.get("max_position_embeddings", 77) if encoder is not None else 77
    second = configs.get("text_encoder_2") or {}
    denoiser = next((n for n in ("unet", "transformer") if n in configs), None)
    latent = configs[denoiser].get("sample_size") if denoiser is not None else None
    if denoiser is not None and classes[denoiser] == "FluxTransformer2DModel":
        latent = FLUX_DEFAULT_SAMPLE_SIZE  # FluxPipeline's default, not a config value
    if denoiser is not None and classes[denoiser] == "Flux2Transformer2DModel":
        # Flux.2's latents are 2x2-patchified: 16 pixels each under its factor-8 VAE
        vae_scale *= 2
        latent = FLUX_DEFAULT_SAMPLE_SIZE // 2  # the pipelines' default_sample_size x 8 pixels
    if denoiser is not None and classes[denoiser] == "WanTransformer3DModel":
        latent = tuple(side // vae_scale for side in WAN_DEFAULT_SIZE)  # WanPipeline's 480x832
    if denoiser is not None and classes[denoiser] == "QwenImageTransformer2DModel":
        latent = QWEN_IMAGE_DEFAULT_SAMPLE_SIZE  # QwenImagePipeline's default_sample_size
    if isinstance(latent, int):
        latent = (latent, latent)
    return SpecContext(
        vae_scale_factor=vae_scale,
        sequence_length=sequence,
        t5_tokens=defaults.t5_tokens or SpecContext.t5_tokens,
        text_embeds_dim=second.get("projection_dim"),
        latent_size=tuple(latent) if latent is not None else None,
        llm_layers=defaults.llm_layers or SpecContext.llm_layers,
        llm_tokens=defaults.llm_tokens or SpecContext.llm_tokens,
        llm_dropped_tokens=defaults.drop_tokens,
    )


def _load_model_folder(path: Path) -> ModelBundle:
    config = _read_json(path / "config.json")
    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not class_name:
        raise ModelSourceError(f"{path}/config.json names no model class (_class_name)")
    library = "diffusers" if "_class_name" in config else "transformers"
    spec_class = spec_class_named(class_name, path.name)
    module = _component_class(library, class_name, path.name).from_pretrained(str(path))
    network = NETWORK_OF_SPEC[spec_class]
    return ModelBundle(
        name=model_name(str(path)),
        source=str(path),
        modules={network: module.eval()},
        context=_pipeline_context({network: class_name}, {network: config}, family_defaults(None)),
    )


# ---------------------------------------------------------------------------------------------
# The pipeline spec of a model


def pipeline_spec(
    bundle: ModelBundle,
    height=None,
    width=None,
    *,
    precisions: dict[str, str] | None = None,
    max_sequence_length: int | None = None,
) -> PipelineSpec | None:
    """The spec that serving `bundle` needs, derived from its networks' configs; None when the
    bundle is not a servable pipeline (a single network, or some networks only).

    `height` / `width` are the export's image-size ranges (pixels), which the engines accept;
    `precisions` each network's exported precision (default: all fp32);
    `max_sequence_length` the T5 tokens (default: the family's).
    """
    if bundle.selected:
        return None
    if bundle.label_encoders:  # class-conditional networks: no prompt pipeline to derive
        return None
    denoiser_name = next((n for n in ("unet", "transformer") if n in bundle.modules), None)
    if denoiser_name is None:
        return None
    t5_tokens = bundle.t5_tokens(max_sequence_length)
    encoders = _text_encoders(bundle, t5_tokens, bundle.llm_tokens(max_sequence_length))
    if not encoders or bundle.family is None:
        raise UnsupportedModelError(
            f"{bundle.name}: a pipeline without a text encoder cannot be served; supported: "
            "SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1, Flux.2 (dev, Klein), Qwen-Image, Z-Image and "
            "Wan pipelines")
    family = bundle.family
    denoiser = bundle.modules[denoiser_name]
    vae = bundle.modules.get(VAE_NETWORK)
    network = bundle.specs("fp32", max_sequence_length=max_sequence_length)[denoiser_name]
    ranges = network.dim_ranges(1, height, width)
    defaults = family_defaults(family, bundle.guidance_embeds)
    sdxl = family == STABLE_DIFFUSION_XL
    forced = bundle.pipeline_config.get("force_zeros_for_empty_prompt", sdxl)
    return PipelineSpec(
        model=bundle.name,
        family=family,
        latent_channels=network.in_channels,
        latent_size=(ranges[LATENT_HEIGHT][1], ranges[LATENT_WIDTH][1]),
        scheduler_config=dict(bundle.scheduler_config),
        vae_scale_factor=network.vae_scale_factor,
        decoder="vae" if vae is not None else "pixels",
        scaling_factor=float(getattr(vae.config, "scaling_factor", 1.0)) if vae else 1.0,
        shift_factor=getattr(vae.config, "shift_factor", None) if vae else None,
        **_latent_statistics(vae),
        text_encoders=tuple(encoders),
        force_zeros_for_empty_prompt=bool(forced) and sdxl,
        image_encoder=VAE_ENCODER_NETWORK in bundle.modules,
        masked_inputs=getattr(network, "masked_inputs", False),
        joint_attention_dim=getattr(denoiser.config, "joint_attention_dim", 0) or 0,
        t5_tokens=t5_tokens,
        guidance_embeds=bundle.guidance_embeds,
        cfg_distilled=family == FLUX2 and bool(bundle.pipeline_config.get("is_distilled")),
        precisions=dict(precisions or dict.fromkeys(bundle.modules, "fp32")),
        height_range=_range(ranges[IMAGE_HEIGHT]),
        width_range=_range(ranges[IMAGE_WIDTH]),
        size_multiple=network.vae_scale_factor * network.latent_multiple,
        default_steps=defaults.steps,
        default_guidance=defaults.guidance,
        default_true_cfg=defaults.true_cfg,
        **_video_fields(bundle, vae),
    )


def _video_fields(bundle: ModelBundle, vae: nn.Module | None) -> dict[str, Any]:
    """A video family's PipelineSpec fields (Wan: the VAE's temporal factor, WanPipeline's 81
    frames, a two-expert folder's boundary_ratio); {} for image families."""
    if bundle.family != WAN or vae is None:
        return {}
    return {"temporal_scale_factor": 2 ** sum(vae.config.temperal_downsample),
            "default_frames": WAN_DEFAULT_FRAMES,
            "boundary_ratio": bundle.pipeline_config.get("boundary_ratio")}


def _latent_statistics(vae: nn.Module | None) -> dict[str, tuple[float, ...]]:
    """latents_mean and latents_std of a VAE whose config has both (SDXL-style VAEs, Qwen-Image's),
    as PipelineSpec fields; {} otherwise."""
    config = vae.config if vae is not None else {}
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        return {}
    return {"latents_mean": tuple(map(float, mean)), "latents_std": tuple(map(float, std))}


def _vae_scale_factor(config: dict[str, Any]) -> int:
    """Image pixels per latent pixel: 2 per temporal-downsample stage of a causal 3-D VAE
    (AutoencoderKLQwenImage), 2 per block after the first of an AutoencoderKL."""
    if "temperal_downsample" in config:
        return 2 ** len(config["temperal_downsample"])
    return 2 ** (len(config["block_out_channels"]) - 1)


def _range(triple: tuple[int, int, int]) -> tuple[int, int] | None:
    """(min, max) of a profile dim, or None when it is fixed."""
    return None if triple[0] == triple[2] else (triple[0], triple[2])


def _text_encoders(bundle: ModelBundle, t5_tokens: int, llm_tokens: int) -> list[TextEncoder]:
    """Every text encoder in component order: CLIP's max_position_embeddings tokens and
    hidden_size, T5's `t5_tokens` and d_model, an LLM's `llm_tokens`, hidden size, layers
    and prompt template (its tokenizer must be able to apply it)."""
    defaults = family_defaults(bundle.family, bundle.guidance_embeds)
    encoders = []
    for network, tokenizer in TOKENIZER_OF_ENCODER.items():
        module = bundle.modules.get(network)
        if module is None:
            continue
        if tokenizer not in bundle.tokenizers:
            raise ModelSourceError(f"{bundle.name}: {network} has no {tokenizer} to feed it")
        kind, config = type(module).__name__, module.config
        if kind in LLM_ENCODERS:
            template = _llm_template(bundle, network, tokenizer, defaults.template)
            encoders.append(TextEncoder(
                network=network, tokenizer=tokenizer, kind=kind,
                max_length=llm_tokens,
                hidden_size=config.get_text_config().hidden_size,
                layers=bundle.context.llm_layers, template=template,
                trim=defaults.trim, drop_tokens=defaults.drop_tokens))
            continue
        t5 = kind in T5_ENCODERS
        encoders.append(TextEncoder(
            network=network, tokenizer=tokenizer, kind=kind,
            max_length=t5_tokens if t5 else config.max_position_embeddings,
            hidden_size=config.d_model if t5 else config.hidden_size,
        ))
    return encoders


def _llm_template(bundle: ModelBundle, network: str, tokenizer: str, template: str) -> str:
    """The LLM encoder's prompt template as served (Flux.2 dev's: fixed from its chat template
    and system message); ModelSourceError naming the component unless the tokenizer folder
    loads with transformers' AutoTokenizer and can apply it."""
    from transformers import AutoTokenizer

    from models.prompt_tokens import check_template, system_template

    folder = Path(bundle.folder) / tokenizer
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelSourceError(f"{bundle.name}: {network} needs its tokenizer in {tokenizer}/ "
                               f"(tokenizer.json and tokenizer_config.json); it does not load: "
                               f"{error}") from error
    try:
        if template == FLUX2_SYSTEM_CHAT:
            from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

            check_template(loaded, CHAT_TEMPLATE, f"{bundle.name}: {tokenizer}")
            template = system_template(loaded, SYSTEM_MESSAGE)
        check_template(loaded, template, f"{bundle.name}: {tokenizer}")
    except ValueError as error:
        raise ModelSourceError(str(error)) from error
    return template


def write_pipeline_files(
    bundle: ModelBundle,
    directory: Path,
    height=None,
    width=None,
    *,
    precisions: dict[str, str] | None = None,
    max_sequence_length: int | None = None,
) -> bool:
    """`pipeline.json` and the tokenizers of a servable bundle into `directory`; False when the
    bundle is not a servable pipeline."""
    spec = pipeline_spec(bundle, height, width, precisions=precisions,
                         max_sequence_length=max_sequence_length)
    if spec is None:
        return False
    for name, write in bundle.tokenizers.items():
        target = directory / name
        if target.exists():
            shutil.rmtree(target)
        write(target)
    (directory / SPEC_FILE).write_text(spec.to_json() + "\n")
    return True
