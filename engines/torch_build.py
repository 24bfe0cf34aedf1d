"""Torch engines: diffusers denoisers and transformers text encoders served by PyTorch.

`driffusion build-engines --backend torch` writes `engines/<model>/torch-<GPU key|cpu>/`:
- `<denoiser>.safetensors` and `text_encoder*.safetensors` (CLIP with or without projection,
  T5 / UMT5, the LLM encoders Qwen3, Qwen2.5-VL and Mistral3): the fp32 weights; the file's
  metadata says how to rebuild the module (library: diffusers or transformers, class, config
  JSON, rebuilt from the config with no hub access), the export spec's fields (its wrapper: an
  LLM encoder's stacked hidden-state layers) and which inputs run in the compute dtype (the
  spec's activations: `timestep`, `guidance` and SDXL's `time_ids` stay fp32, token ids int64);
- the VAE decoder and encoder (and a class-label encoder) as ONNX Runtime CPU engines
  (`.onnx`), as `--backend onnxruntime` builds them;
- `manifest.json` in the engines' format (engines/manifest.py), one `network_entry` per network:
  inputs, outputs and profile are the export spec's (export/specs.py, as export.json records
  them, shared names from models/tensors.py); a torch network's entry is keyed by the sha256 of
  the ONNX exported from the same weights, its `precision` (on a GPU `torch_precision` for the
  asked precision: export/precision.py's rule, except that T5-family and LLM encoders take bf16
  for fp16 or bf16; fp32 on the CPU) and its `optimization_level` (`cuda-graphs` for the
  denoiser on a GPU; `eager` on the CPU and for text encoders, which run once per request and
  whose attention-mask code reads the mask on the host);
- `pipeline.json` and the tokenizers (engines/build.py copies them, as for every backend).
A network whose spec is `torch_only` (Wan's VAE decoder: a traced graph would fix its frame
count) is saved here on every backend (engines/build.py), eager and with no ONNX to check
against: its export holds its weights.
Every torch network is still exported to ONNX: that export derives the pipeline spec, and the
saved network is checked against it (same names, same outputs) before the manifest records it.

The device model (`triton_models/templates/torch_model`) rebuilds the network with
`load_network`: at the recorded precision (fp16/bf16) on `cuda:<i>` (the denoiser with CUDA
graphs; the encoders on `--encoder-gpu N` or GPU 0), FP32 eager on a machine without a GPU. Its
floating inputs and outputs stay float32 on the wire either way.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.gpu import GpuInfo
from models import tensors
from models.pipeline_spec import LLM_ENCODERS, T5_ENCODERS

if TYPE_CHECKING:
    import torch

    from engines.build_types import BuildOutcome, BuildRequest, ExportedOnnx
    from export.specs import NetworkSpec

TORCH_BACKEND = "torch"
TORCH_SUFFIX = ".safetensors"
FORMAT = "driffusion-torch-network/1"
GPU_LEVEL, CPU_LEVEL = "cuda-graphs", "eager"  # the manifest's optimization_level of a denoiser
LIBRARIES = ("diffusers", "transformers")  # where a torch engine's model class comes from
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", *T5_ENCODERS, *LLM_ENCODERS)


class TorchEngineError(ValueError):
    """A torch engine file that cannot be loaded, or a saved network that computes differently."""


@dataclass(frozen=True)
class TorchBuild:
    path: Path
    seconds: float
    max_abs_difference: float  # against the ONNX export of the same network


@dataclass
class LoadedNetwork:
    """A torch engine rebuilt on a device: `module(**inputs)` takes the inputs by their shared
    names and returns the outputs in the spec's order (a tensor or a tuple)."""

    module: Any  # torch.nn.Module: the export spec's wrapper around the model
    class_name: str
    half_inputs: frozenset[str]  # inputs cast to the compute dtype (the spec's activations)
    device: str
    dtype: str  # compute dtype: float16, bfloat16 or float32


def torch_device_key(gpu: GpuInfo | None) -> str:
    """`torch-h100-sm90-1a2b3c4d` for a GPU, `torch-cpu` without one."""
    return f"torch-{gpu.key if gpu else 'cpu'}"


def torch_backend_version() -> str:
    """What a torch engine set depends on: torch (denoiser, encoders) and ONNX Runtime (VAE)."""
    import onnxruntime
    import torch

    return f"torch {torch.__version__} + onnxruntime {onnxruntime.__version__}"


def torch_gpus() -> list[GpuInfo]:
    """The GPUs torch sees (used when cuda-python is missing but torch has CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        uuid = str(getattr(properties, "uuid", "") or f"torch-{index}")
        gpus.append(GpuInfo(index, properties.name, properties.major, properties.minor,
                            uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"))
    return gpus


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def is_denoiser(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> bool:
    """A denoiser by its names (sample, timestep in; out_sample out), never by position."""
    names = {tensor["name"] for tensor in inputs}
    return ({tensors.SAMPLE, tensors.TIMESTEP} <= names
            and any(tensor["name"] == tensors.OUT_SAMPLE for tensor in outputs))


def is_text_encoder(model_class: str) -> bool:
    """A transformers text encoder (CLIP, T5 / UMT5, an LLM encoder): a torch engine on the
    torch backend."""
    return model_class in TEXT_ENCODERS


def runs_eager_on_gpu(network: str) -> bool:
    """Whether a torch network runs eager on a GPU rather than in CUDA graphs: a text encoder
    (`text_encoder*`) runs once per request, and transformers' attention-mask code reads the
    mask on the host, which a CUDA graph cannot capture."""
    return network.startswith("text_encoder")


def torch_precision(asked: str, model_class: str) -> str:
    """A torch engine's precision on a GPU: export/precision.py's rule, except that T5-family
    and LLM encoders run in bf16 whenever a reduced precision is asked (T5 overflows fp16;
    LLMs are published and run in bf16)."""
    from export.precision import network_precision

    if asked != "fp32" and model_class in (*T5_ENCODERS, *LLM_ENCODERS):
        return "bf16"
    return network_precision(asked, model_class)


# ---------------------------------------------------------------------------------------------
# The file format


def save_network(module: torch.nn.Module, path: Path, spec: NetworkSpec) -> None:
    """Write a network's fp32 weights and what rebuilds it into one safetensors file: a diffusers
    model (Wan 2.2's WanExperts: both experts' configs and the boundary timestep) or a
    transformers text encoder, its class and config, and `spec`'s fields (its wrapper: an LLM
    encoder's chosen hidden states are the spec's, not the model's)."""
    from safetensors.torch import save_model

    from export.wan import WanExperts

    experts = isinstance(module, WanExperts)
    library = type(module).__module__.split(".")[0]
    if not experts and (library not in LIBRARIES or not hasattr(module, "config")):
        raise TorchEngineError(f"{type(module).__name__} is not a diffusers or transformers "
                               "model; the torch backend serves diffusers denoisers and "
                               "transformers text encoders")
    config = (module.config.to_dict() if library == "transformers" and not experts
              else dict(module.config))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    metadata = {
        "format": FORMAT,
        "library": "diffusers" if experts else library,
        "class_name": type(module).__name__,
        "config": json.dumps(config, default=list),
        "half_inputs": json.dumps(sorted(t.name for t in spec.inputs if t.activation)),
        "spec": json.dumps(dataclasses.asdict(spec), default=list),
    }
    if experts:
        metadata.update(expert_class=type(module.transformer_2).__name__,
                        config_2=json.dumps(dict(module.transformer_2.config), default=list),
                        boundary=repr(module.boundary))
    save_model(module, str(path), metadata=metadata)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a torch engine file; TorchEngineError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own untyped errors
        raise TorchEngineError(f"{path} is not a readable safetensors file ({error}); rebuild "
                               "it with `driffusion build-engines --backend torch --force`") from error
    if metadata.get("format") != FORMAT:
        raise TorchEngineError(f"{path} is not a torch engine ({FORMAT}); rebuild it with "
                               "`driffusion build-engines --backend torch --force`")
    return metadata


def load_network(path: Path, device: str = "cpu", dtype: str = "float32") -> LoadedNetwork:
    """Rebuild the network of a torch engine file on `device` in `dtype`, wrapped by its export
    spec's forward (inputs by the shared tensor names).

    The model is built with its parameters on the meta device and cast there, then each weight
    is read from the file and cast once on its way to `device`: the device never holds an fp32
    copy of the model (a 24 B encoder is ~96 GB in fp32, ~48 GB in bf16)."""
    from export.precision import PRECISION_OF_DTYPE, cast_module

    metadata = read_metadata(path)
    library = metadata.get("library", "diffusers")
    if library not in LIBRARIES:
        raise TorchEngineError(f"{path}: library {library!r} is not one of {', '.join(LIBRARIES)}")
    with parameters_on_meta():
        if "expert_class" in metadata:  # Wan 2.2: two experts of one class, picked by timestep
            from export.wan import WanExperts

            module = WanExperts(
                rebuilt_model(path, library, metadata["expert_class"], metadata["config"]),
                rebuilt_model(path, library, metadata["expert_class"], metadata["config_2"]),
                float(metadata["boundary"]))
        else:
            module = rebuilt_model(path, library, metadata["class_name"], metadata["config"])
    if dtype != "float32":  # as diffusers loads it: its fp32 modules stay fp32
        cast_module(module, PRECISION_OF_DTYPE[dtype])
    load_weights(module, path, device)
    module = module.eval()
    wrapped = saved_spec(path, metadata, module).wrap(module).eval()
    return LoadedNetwork(wrapped, metadata["class_name"],
                         frozenset(json.loads(metadata.get("half_inputs", "[]"))), device, dtype)


def rebuilt_model(path: Path, library: str, class_name: str, config: str):
    """A fresh model of `library`'s `class_name` from its config: no hub access, the weights
    come from the engine file."""
    import importlib

    package = importlib.import_module(library)
    model_class = getattr(package, class_name, None)
    if model_class is None:
        raise TorchEngineError(f"{path}: {library} {package.__version__} has no class "
                               f"{class_name}")
    if library == "diffusers":
        return model_class.from_config(json.loads(config))
    return model_class(model_class.config_class.from_dict(json.loads(config)))


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers moves to the meta device (no memory; its
    random initialisation is skipped), while buffers keep the values their modules computed
    (non-persistent ones, such as rotary frequencies, are not in the engine file)."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(
                parameter.to("meta"), requires_grad=parameter.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_weights(module: Any, path: Path, device: str) -> None:
    """Give a model whose parameters are on the meta device its weights from the engine file,
    each cast to its parameter's dtype, on `device` (tied parameters stay one tensor); buffers
    move to `device` too (persistent ones from the file). TorchEngineError if the file and the
    model disagree on the names."""
    import torch
    from safetensors import safe_open

    slots: dict[int, list[tuple[Any, str, str]]] = {}  # one parameter -> every place it sits
    buffers: list[tuple[Any, str, str]] = []
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, parameter in owner._parameters.items():
            if parameter is not None:
                slots.setdefault(id(parameter), []).append((owner, name, _joined(prefix, name)))
        buffers += [(owner, name, _joined(prefix, name))
                    for name, buffer in owner._buffers.items() if buffer is not None]
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        stored = set(handle.keys())
        used = set()
        for places in slots.values():
            key = next((full for _, _, full in places if full in stored), None)
            if key is None:
                raise TorchEngineError(f"{path} has no weights for {places[0][2]}; rebuild it "
                                       "with `driffusion build-engines --backend torch --force`")
            owner, name, _ = places[0]
            value = handle.get_tensor(key).to(device=device, dtype=owner._parameters[name].dtype)
            loaded = torch.nn.Parameter(value, requires_grad=False)
            for owner, name, _ in places:
                owner._parameters[name] = loaded
            used.update(full for _, _, full in places)
        for owner, name, full in buffers:
            buffer = owner._buffers[name]
            value = handle.get_tensor(full) if full in stored else buffer
            owner._buffers[name] = value.to(device=device, dtype=buffer.dtype)
            used.add(full)
    if stored - used:
        raise TorchEngineError(f"{path} holds weights the model does not have: "
                               f"{', '.join(sorted(stored - used)[:5])}")


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def saved_spec(path: Path, metadata: Mapping[str, str], module: Any) -> NetworkSpec:
    """The export spec recorded with the weights (older files: the spec of the model alone)."""
    from export.specs import spec_class_named

    spec_class = spec_class_named(metadata["class_name"], path.stem)
    if "spec" not in metadata:
        return spec_class.from_model(module)
    fields = json.loads(metadata["spec"])
    return spec_class(**{name: tuple(value) if isinstance(value, list) else value
                         for name, value in fields.items()})


def run_network(network: LoadedNetwork, feeds: Mapping[str, np.ndarray],
                output_names: list[str]) -> dict[str, np.ndarray]:
    """Eager forward on numpy inputs (the build's check; the device model runs its own)."""
    import torch

    inputs = {}
    for name, value in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(network.device)
        if name in network.half_inputs and tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, network.dtype))
        inputs[name] = tensor
    with torch.no_grad():
        outputs = network.module(**inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return {name: value.float().cpu().numpy() for name, value in zip(output_names, outputs)}


# ---------------------------------------------------------------------------------------------
# The build


def build_torch_engines(request: BuildRequest, exported: list[ExportedOnnx], gpus: list[GpuInfo],
                        log: Callable[[str], None]) -> BuildOutcome:
    """The denoiser and the text encoders as torch engines, the VAE (and a label encoder) as ONNX
    Runtime engines, in one `torch-<GPU key|cpu>` directory (the first GPU's key: the weights
    run on any GPU)."""
    from engines.build_types import GPU_PRECISION, BuildOutcome
    from engines.manifest import (
        manifest_mismatch,
        network_entry,
        new_manifest,
        read_manifest,
        rebuild_reason,
        write_manifest,
    )
    from engines.ort_build import ORT_OPTIMIZATION_LEVEL, build_ort_engine

    gpu = gpus[0] if gpus else None
    asked = request.precision or GPU_PRECISION
    directory = request.engines_root / request.name / torch_device_key(gpu)
    version = torch_backend_version()
    manifest = read_manifest(directory)
    if manifest is None or manifest_mismatch(manifest, backend=TORCH_BACKEND,
                                             backend_version=version, gpu=gpu):
        manifest = new_manifest(request.name, TORCH_BACKEND, version, gpu)
    manifest["gpu"] = gpu.to_json() if gpu else None  # the same GPU, maybe at another index
    outcome = BuildOutcome(TORCH_BACKEND, [directory])
    for onnx in exported:
        by_torch = (onnx.torch_only or is_denoiser(onnx.inputs, onnx.outputs)
                    or is_text_encoder(onnx.model_class))
        if by_torch:
            precision = "fp32"
            if gpu:
                precision = request.export.network_precisions.get(
                    onnx.name, torch_precision(asked, onnx.model_class))
            file = f"{onnx.name}{TORCH_SUFFIX}"
            eager = onnx.torch_only or runs_eager_on_gpu(onnx.name)
            level, what = (GPU_LEVEL if gpu and not eager else CPU_LEVEL), "torch engine"
        else:
            file, precision = f"{onnx.name}.onnx", onnx.precision
            level, what = ORT_OPTIMIZATION_LEVEL, "ONNX Runtime engine"

        def entry(seconds: float, file=file, precision=precision, level=level, onnx=onnx):
            return network_entry(file=file, onnx_sha256=onnx.sha256, precision=precision,
                                 inputs=onnx.inputs, outputs=onnx.outputs, profile=onnx.profile,
                                 build_seconds=seconds, optimization_level=level)

        reason = "--force" if request.force else rebuild_reason(
            manifest, directory, onnx.name, entry(0.0), backend=TORCH_BACKEND,
            backend_version=version, gpu=gpu)
        if reason is None:
            outcome.kept.append(onnx.name)
            log(f"{onnx.name}: {what} is up to date")
            continue
        log(f"{onnx.name}: building {what} ({reason})")
        if by_torch:
            built = build_torch_engine(request.source, onnx, directory / file, request.loras)
            seconds, path, difference = built.seconds, built.path, built.max_abs_difference
        else:
            ort = build_ort_engine(onnx.path, directory / file, onnx.profile, onnx.inputs)
            seconds, path, difference = ort.seconds, ort.engine_path, ort.max_abs_difference
        log(f"{onnx.name}: wrote {path} in {seconds:.1f} s (max difference from the exported "
            f"ONNX {difference:.2g})")
        manifest["networks"][onnx.name] = entry(seconds)
        write_manifest(directory, manifest)
        outcome.built.append(onnx.name)
    write_manifest(directory, manifest)
    return outcome


def build_torch_engine(source: str, onnx: ExportedOnnx, path: Path,
                       loras: tuple = ()) -> TorchBuild:
    """Save the denoiser of `source` (with `loras` fused) to `path` and check it computes what
    its ONNX export does."""
    from export.presets import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(source, [onnx.name], loras)
    module = bundle.modules[onnx.name]
    save_network(module, path, bundle.specs()[onnx.name])
    del bundle, module
    difference = 0.0 if onnx.torch_only else check_against_onnx(path, onnx)
    return TorchBuild(path, time.perf_counter() - started, difference)


def check_against_onnx(path: Path, onnx: ExportedOnnx) -> float:
    """Run the saved network (CPU, fp32) and the ONNX export on the same random inputs at the
    profile's smallest shapes; TorchEngineError unless every output matches, by name."""
    import onnxruntime

    feeds = random_feeds(onnx.profile, onnx.inputs)
    session = onnxruntime.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    names = [tensor["name"] for tensor in onnx.outputs]
    actual = run_network(load_network(path), feeds, names)
    worst = 0.0
    for name in names:
        want, got = expected[name].astype(np.float64), actual[name].astype(np.float64)
        if want.shape != got.shape:
            raise TorchEngineError(f"{path}: output {name} has shape {got.shape}, the ONNX "
                                   f"export's {want.shape}")
        difference = float(np.max(np.abs(want - got), initial=0.0))
        scale = float(np.max(np.abs(want), initial=0.0))
        if not np.isfinite(difference) or difference > 1e-3 * max(scale, 1.0):
            raise TorchEngineError(f"{path}: output {name} differs from the ONNX export by "
                                   f"{difference:.3g} (output scale {scale:.3g})")
        worst = max(worst, difference)
    return worst


def random_feeds(profile: dict[str, Any], inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Random inputs at the profile's smallest shapes: token ids 1..7 (id 0 is often the padding
    id, whose zero embedding would make a T5 or LLM encoder's output zero whatever its weights),
    ones for an attention mask (every token attended), zeros for labels (valid for every
    embedding table)."""
    generator = np.random.default_rng(0)
    feeds = {}
    for tensor in inputs:
        shape = tuple(profile[tensor["name"]][0])
        dtype = np.dtype(tensors.dtype_named(tensor["dtype"]).name)
        if tensor["name"] == tensors.INPUT_IDS:
            feeds[tensor["name"]] = generator.integers(1, 8, shape).astype(dtype)
        elif tensor["name"] == tensors.ATTENTION_MASK:
            feeds[tensor["name"]] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[tensor["name"]] = np.zeros(shape, dtype)
        else:
            feeds[tensor["name"]] = generator.standard_normal(shape).astype(dtype)
    return feeds
