"""Model sources for export: the `tiny-sd` and `reference` presets and local diffusers folders."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.specs import (
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

PRESETS = ("tiny-sd", "reference")
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
    """Load a preset (`tiny-sd`, `reference`) or a local diffusers pipeline/model folder."""
    if source == "tiny-sd":
        return select_networks(tiny_sd(), networks)
    if source == "reference":
        return select_networks(reference(), networks)
    return load_folder(Path(source).expanduser(), networks)


def source_fingerprint(source: str) -> str:
    """What identifies the weights behind `source`, so an export can tell it is stale."""
    if source == "tiny-sd":
        return "tiny-sd:seed0"
    if source == "reference":
        from models.reference import ASSET_DIR, DIFFUSION_CHECKPOINT

        digest = hashlib.sha256((ASSET_DIR / DIFFUSION_CHECKPOINT).read_bytes()).hexdigest()
        return f"reference:{digest[:16]}"
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

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
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
        scheduler_config=dict(scheduler.config),
    )


def reference() -> ModelBundle:
    """The bundled reference model (digits UNet + label encoder) from models.reference."""
    try:
        module = importlib.import_module("models.reference")
    except ModuleNotFoundError as error:
        if error.name != "models.reference":
            raise
        raise ModelSourceError(
            "the `reference` preset needs models/reference.py (load_reference()), which is not "
            "in this checkout yet; use --model tiny-sd or a diffusers folder"
        ) from error
    loaded = module.load_reference()
    return ModelBundle(
        name="reference",
        source="reference",
        modules={"text_encoder": loaded.text_encoder.eval(), "unet": loaded.unet.eval()},
        context=SpecContext(vae_scale_factor=1, sequence_length=1),
        scheduler_config=dict(loaded.scheduler_config),
        label_encoders=frozenset({"text_encoder"}),
    )


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
    return ModelBundle(
        name=model_name(str(path)),
        source=str(path),
        modules={k: m.eval() for k, m in components.items()},
        context=_pipeline_context(components),
        scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else {},
        selected=bool(networks),
    )


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
