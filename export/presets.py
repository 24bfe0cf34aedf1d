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

from export.specs import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    SD3_T5_TOKENS,
    LabelEncoderSpec,
    NetworkSpec,
    SD3TransformerSpec,
    SpecContext,
    TextEncoderSpec,
    UNet2DSpec,
    UNetSpec,
    UnsupportedModelError,
    VAEDecoderSpec,
    spec_class_named,
    spec_for,
)
from models.pipeline_spec import SPEC_FILE, PipelineSpec, TextEncoder

PRESETS = ("tiny-sd", "reference", "reference-flow")
# the bundled diffusers folders: preset name -> the module that owns the folder
BUNDLED_MODELS = {"reference": "models.reference", "reference-flow": "models.reference_flow"}
# the network name a single-model folder gets, by the spec its model class uses
NETWORK_OF_SPEC: dict[type[NetworkSpec], str] = {
    UNetSpec: "unet",
    UNet2DSpec: "unet",
    TextEncoderSpec: "text_encoder",
    VAEDecoderSpec: "vae_decoder",
    SD3TransformerSpec: "transformer",
}
# pipeline components that become networks, and the network name each gets
EXPORTED_COMPONENTS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "transformer": "transformer",
    "vae": "vae_decoder",
}
# the tokenizer that feeds each text encoder
TOKENIZER_OF_ENCODER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
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

    def specs(self, precision: str) -> dict[str, NetworkSpec]:
        """{network name: spec} at `precision`, in export order."""
        context = replace(self.context, precision=precision)
        specs: dict[str, NetworkSpec] = {}
        for name, module in self.modules.items():
            if name in self.label_encoders:
                specs[name] = LabelEncoderSpec.from_model(module, precision=precision, name=name)
            else:
                spec = spec_for(module, name, context)
                spec.name = name
                specs[name] = spec
        return specs


def model_name(source: str) -> str:
    """Directory-safe name of a model source: the preset name or the folder's name."""
    if source in PRESETS:
        return source
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).expanduser().resolve().name).strip("-")
    if not name:
        raise ModelSourceError(f"cannot derive a model name from {source!r}; pass --name")
    return name


def load_bundle(source: str, networks: list[str] | None = None) -> ModelBundle:
    """Load a preset (`tiny-sd`, `reference`, `reference-flow`) or a local diffusers
    pipeline/model folder."""
    if source == "tiny-sd":
        return select_networks(tiny_sd(), networks)
    if source in BUNDLED_MODELS:
        return bundled(source, networks)
    return load_folder(Path(source).expanduser(), networks)


def source_fingerprint(source: str) -> str:
    """What identifies the weights behind `source`, so an export can tell it is stale."""
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
    modules = {"text_encoder": text_encoder, "unet": unet, "vae_decoder": vae}
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
        _check_known(networks, list(network_of.values()), path.name)
    else:
        unsupported = [key for key in present if key not in EXPORTED_COMPONENTS]
        if unsupported:
            raise UnsupportedModelError(
                f"{path}: components {', '.join(unsupported)} are not supported for export "
                f"(supported: {', '.join(EXPORTED_COMPONENTS)}); pick networks with --networks"
            )
    components: dict[str, nn.Module] = {}
    for component, (library, class_name) in present.items():
        network = network_of[component]
        if networks and network not in networks:
            continue
        spec_class_named(class_name, component)
        model_class = _component_class(library, class_name, component)
        components[network] = model_class.from_pretrained(path / component)
    if not components:
        raise ModelSourceError(f"{path}/model_index.json names no exportable component")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    tokenizers = {name: functools.partial(_copy_tree, path / name)
                  for name in TOKENIZER_OF_ENCODER.values() if (path / name).is_dir()}
    return ModelBundle(
        name=model_name(str(path)),
        source=str(path),
        modules={k: m.eval() for k, m in components.items()},
        context=_pipeline_context(components),
        scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else {},
        selected=bool(networks),
        tokenizers=tokenizers,
        pipeline_config=index,
    )


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def _pipeline_context(components: dict[str, nn.Module]) -> SpecContext:
    vae = components.get("vae_decoder")
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    encoder = components.get("text_encoder")
    sequence = encoder.config.max_position_embeddings if encoder is not None else 77
    second = components.get("text_encoder_2")
    text_embeds_dim = getattr(second.config, "projection_dim", None) if second is not None else None
    denoiser = components.get("unet") or components.get("transformer")
    latent = denoiser.config.sample_size if denoiser is not None else None
    if isinstance(latent, int):
        latent = (latent, latent)
    return SpecContext(
        vae_scale_factor=vae_scale,
        sequence_length=sequence,
        text_embeds_dim=text_embeds_dim,
        latent_size=tuple(latent) if latent is not None else None,
    )


def _load_model_folder(path: Path) -> ModelBundle:
    config = _read_json(path / "config.json")
    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not class_name:
        raise ModelSourceError(f"{path}/config.json names no model class (_class_name)")
    library = "diffusers" if "_class_name" in config else "transformers"
    spec_class = spec_class_named(class_name, path.name)
    module = _component_class(library, class_name, path.name).from_pretrained(path)
    network = NETWORK_OF_SPEC[spec_class]
    return ModelBundle(
        name=model_name(str(path)),
        source=str(path),
        modules={network: module.eval()},
        context=_pipeline_context({network: module}),
    )


# ---------------------------------------------------------------------------------------------
# The pipeline spec of a model


# diffusers' own defaults per family: steps and guidance of their pipelines' __call__
FAMILY_DEFAULTS = {"sd": (50, 7.5), "sdxl": (50, 5.0), "sd3": (28, 7.0)}


def pipeline_spec(bundle: ModelBundle, height=None, width=None) -> PipelineSpec | None:
    """The spec that serving `bundle` needs, derived from its networks' configs; None when the
    bundle is not a servable pipeline (a single network, or some networks only).

    `height` / `width` are the export's image-size ranges (pixels), which the engines accept.
    """
    if bundle.selected:
        return None
    if bundle.label_encoders:  # class-conditional networks: no prompt pipeline to derive
        return None
    denoiser_name = next((n for n in ("unet", "transformer") if n in bundle.modules), None)
    if denoiser_name is None:
        return None
    denoiser = bundle.modules[denoiser_name]
    encoders = _text_encoders(bundle)
    family = _family(denoiser_name, encoders, bundle.name)
    vae = bundle.modules.get("vae_decoder")
    network = bundle.specs("fp32")[denoiser_name]
    ranges = network.dim_ranges(1, height, width)
    steps, guidance = FAMILY_DEFAULTS[family]
    forced = bundle.pipeline_config.get("force_zeros_for_empty_prompt", family == "sdxl")
    return PipelineSpec(
        model=bundle.name,
        family=family,
        latent_channels=denoiser.config.in_channels,
        latent_size=(ranges[LATENT_HEIGHT][1], ranges[LATENT_WIDTH][1]),
        scheduler_config=dict(bundle.scheduler_config),
        vae_scale_factor=network.vae_scale_factor,
        decoder="vae" if vae is not None else "pixels",
        scaling_factor=float(getattr(vae.config, "scaling_factor", 1.0)) if vae else 1.0,
        shift_factor=getattr(vae.config, "shift_factor", None) if vae else None,
        text_encoders=tuple(encoders),
        force_zeros_for_empty_prompt=bool(forced) and family == "sdxl",
        joint_attention_dim=getattr(denoiser.config, "joint_attention_dim", 0) or 0,
        t5_tokens=SD3_T5_TOKENS,
        height_range=_range(ranges[IMAGE_HEIGHT]),
        width_range=_range(ranges[IMAGE_WIDTH]),
        size_multiple=network.vae_scale_factor * network.latent_multiple,
        default_steps=steps,
        default_guidance=guidance,
    )


def _range(triple: tuple[int, int, int]) -> tuple[int, int] | None:
    """(min, max) of a profile dim, or None when it is fixed."""
    return None if triple[0] == triple[2] else (triple[0], triple[2])


def _text_encoders(bundle: ModelBundle) -> list[TextEncoder]:
    encoders = []
    for network, tokenizer in TOKENIZER_OF_ENCODER.items():
        module = bundle.modules.get(network)
        if module is None:
            continue
        if tokenizer not in bundle.tokenizers:
            raise ModelSourceError(f"{bundle.name}: {network} has no {tokenizer} to feed it")
        encoders.append(TextEncoder(
            network=network, tokenizer=tokenizer, kind=type(module).__name__,
            max_length=module.config.max_position_embeddings,
            hidden_size=module.config.hidden_size,
        ))
    return encoders


def _family(denoiser: str, encoders: list[TextEncoder], model: str) -> str:
    if not encoders:
        raise UnsupportedModelError(f"{model}: a pipeline without a text encoder cannot be "
                                    "served; supported: SD 1.x/2.x, SDXL, SD3-style pipelines")
    if denoiser == "transformer":
        return "sd3"
    return "sdxl" if len(encoders) == 2 else "sd"


def write_pipeline_files(bundle: ModelBundle, directory: Path, height=None, width=None) -> bool:
    """`pipeline.json` and the tokenizers of a servable bundle into `directory`; False when the
    bundle is not a servable pipeline."""
    spec = pipeline_spec(bundle, height, width)
    if spec is None:
        return False
    for name, write in bundle.tokenizers.items():
        target = directory / name
        if target.exists():
            shutil.rmtree(target)
        write(target)
    (directory / SPEC_FILE).write_text(spec.to_json() + "\n")
    return True
