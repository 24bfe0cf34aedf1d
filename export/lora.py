"""LoRA adapters fused into a model's weights before export: `--lora FILE[:SCALE]`.

The result is diffusers' `load_lora_weights(FILE)` + `fuse_lora(lora_scale=SCALE)` on the
folder's own pipeline (so the networks exported are the ones diffusers would run), with the
LoRA layers unloaded afterwards so that plain modules are traced. A model with LoRAs is its
own model: its name and its fingerprint carry each file's sha256 and scale, so its exports and
engines live beside the plain model's, switching LoRA builds once and switching back reuses.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SCALE = 1.0
# network names that are not their pipeline component's name
COMPONENT_OF_NETWORK = {"vae_decoder": "vae", "vae_encoder": "vae"}


class LoraError(ValueError):
    """A LoRA file that cannot be read or applies to no module of the model."""


@dataclass(frozen=True)
class Lora:
    """One LoRA file, its content's sha256 and the scale it is fused at."""

    path: Path
    scale: float = DEFAULT_SCALE

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def parse_lora(text: str) -> Lora:
    """`FILE` or `FILE:SCALE` -> Lora; ValueError says what is wrong."""
    path, scale = text, DEFAULT_SCALE
    head, separator, tail = text.rpartition(":")
    if separator and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = text  # a path with a colon in it, no scale
    lora = Lora(Path(path).expanduser(), scale)
    if lora.path.is_dir():
        raise ValueError(f"--lora {text!r}: {str(lora.path)!r} is a directory; give the LoRA's "
                         f".safetensors file{_files_in(lora.path)}")
    if not lora.path.is_file():
        raise ValueError(f"--lora {text!r}: no such file {str(lora.path)!r} (give FILE or "
                         "FILE:SCALE, e.g. style.safetensors:0.8)")
    if not -10.0 <= scale <= 10.0:
        raise ValueError(f"--lora {text!r}: scale must be in -10..10; got {scale}")
    return lora


def _files_in(directory: Path) -> str:
    """`, e.g. DIR/a.safetensors` naming the directory's own .safetensors files, if any."""
    found = sorted(str(path) for path in directory.glob("*.safetensors"))
    return f", e.g. {' or '.join(found[:3])}" if found else " (this one holds none)"


def lora_key(loras: tuple[Lora, ...]) -> str:
    """12 hex digits naming a set of LoRAs by their files' sha256 and scales, in order."""
    text = json.dumps([(lora.sha256, lora.scale) for lora in loras])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fuse_loras(folder: Path, modules: dict[str, nn.Module], loras: tuple[Lora, ...],
               pipeline_config: dict[str, Any]) -> None:
    """Fuse `loras` into `modules` (network name -> module, loaded from `folder`) in place, as
    the folder's diffusers pipeline fuses them; LoraError names a file that is not finite or
    matches nothing."""
    for lora in loras:
        check_finite(lora.path)
    pipeline = _pipeline(folder, modules, pipeline_config)
    if not hasattr(pipeline, "load_lora_weights"):
        raise LoraError(f"{type(pipeline).__name__} does not load LoRA weights in diffusers")
    for index, lora in enumerate(loras):
        adapter = f"lora{index}"
        try:
            pipeline.load_lora_weights(str(lora.path), adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            raise LoraError(f"--lora {lora.path}: diffusers cannot load it into "
                            f"{folder.name}: {error}") from error
        loaded = {name for names in pipeline.get_list_adapters().values() for name in names}
        if adapter not in loaded:
            raise LoraError(f"--lora {lora.path}: its weights match no module of {folder.name} "
                            f"(a LoRA for another model family?)")
    for index, lora in enumerate(loras):
        pipeline.fuse_lora(lora_scale=lora.scale, adapter_names=[f"lora{index}"])
    pipeline.unload_lora_weights()


def check_finite(path: Path) -> None:
    """LoraError naming the first tensor of the file at `path` with a NaN or an infinity: fused,
    it would make every output NaN (or inf), caught only as a failed ONNX validation."""
    for name, tensor in _tensors(path):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraError(f"--lora {path}: tensor {name!r} holds {bad} NaN/inf value(s) of "
                            f"{tensor.numel()}; a LoRA's weights must be finite (a diverged "
                            "training run or a broken conversion wrote it: use another file)")


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors LoRA file, one tensor in memory at a time. Pickled files
    (pytorch_lora_weights.bin) are refused: this project never unpickles what it is given."""
    from safetensors import SafetensorError, safe_open

    try:
        file = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise LoraError(f"--lora {path}: not a safetensors LoRA file ({error}); a .safetensors "
                        "file is expected (convert a pickled .bin file with safetensors' "
                        "save_file first)") from None
    with file:
        for name in sorted(file.keys()):
            yield name, file.get_tensor(name)


def _pipeline(folder: Path, modules: dict[str, nn.Module], pipeline_config: dict[str, Any]):
    """The folder's pipeline around the modules already loaded (the rest loaded from disk)."""
    import diffusers

    class_name = pipeline_config.get("_class_name", "DiffusionPipeline")
    pipeline_class = getattr(importlib.import_module("diffusers"), class_name,
                             diffusers.DiffusionPipeline)
    components = {COMPONENT_OF_NETWORK.get(name, name): module
                  for name, module in modules.items()}
    absent = {key: None for key, value in pipeline_config.items()
              if not key.startswith("_") and isinstance(value, list) and None in value}
    return pipeline_class.from_pretrained(str(folder), local_files_only=True,
                                          **absent, **components)
