"""Write a Triton model repository from a model's engines (or for the closed-form sim).

Models written (docs/ARCHITECTURE.md names them):
- `unet_cpu<i>`: python backend running the UNet ONNX with ONNX Runtime (one per device), or
  `unet_gpu<i>`: `platform: "tensorrt_plan"` on `gpus: [i]`, CUDA graphs where the profile allows,
  or with `--backend torch` the python-backend `torch_model` (FP16, or BF16 for a bf16 network, + CUDA graphs on GPU i, FP32
  on a machine without a GPU); a one-GPU server writes one batched device model or several on
  GPU 0 (`gpu_layout`);
- `text_encoder[_2|_3]`, `vae_decoder` and `vae_encoder` where the model has them, on GPU 0 or
  on the encoder GPU (`--encoder-gpu N`, which the devices then leave to them; with
  `--backend torch` the text encoders are `torch_model`s there, eager); an encoder
  server (`--encoders-only`) has only the tokenizers and text encoders, and a front naming
  encoder servers (`--encoder-endpoints`) has none of them (triton_models/encoder_endpoints.py);
- `unet_sim` (with `--model sim`): the closed-form model, one instance per simulated device;
- `driffusion`: the python-backend pipeline model (label/prompt -> image) over the devices;
  `driffusion_stream` beside it (video models, or `--stream-model`): the same model decoupled,
  streaming a progress response per round before the image or video.
The `driffusion` config carries the PipelineSpec (JSON) that gRPC clients read, with the serving
limits (steps, window, prompt length) that the model enforces. Device models batch dynamically
(`max_batch_size` = the batch limit) so that concurrent requests' drafts share calls.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from engines.torch_build import TORCH_SUFFIX, runs_eager_on_gpu
from models import paths, tensors
from models.limits import SERVING_LIMITS, check_limit
from models.pipeline_spec import SPEC_FILE, PipelineSpec, TextEncoder
from models.sim import sim_spec
from runtime.families import family_of
from runtime.pipeline import TOKENIZER_DROPPED, TOKENIZER_TEXT, Pipeline
from triton_models.device_endpoints import (
    ENDPOINTS_PARAMETER,
    SIGNATURE_PARAMETER,
    config_of_file,
    parse_endpoints,
    signature,
)
from triton_models.encoder_endpoints import (
    ENCODER_ENDPOINTS_PARAMETER,
    ENCODER_SIGNATURES_PARAMETER,
)
from triton_models.pipeline_io import (
    DRIFFUSION_IMAGE_INPUTS,
    STREAM_MODEL,
    driffusion_inputs,
    driffusion_outputs,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
MARKER = ".driffusion-repository"
BACKENDS = ("onnxruntime", "tensorrt", "torch")
ENCODER_GPU_BACKENDS = ("tensorrt", "torch")  # the backends whose text encoders run on a GPU
# one-GPU layouts: one device model whose every DRiffusion round is one batched call of
# `devices` items, or `devices` device models all on GPU 0
GPU_LAYOUTS = ("batched", "instances")
MAX_DEVICES = 64
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")



@dataclass
class RepositoryOptions:
    """What to put in the repository (the `triton-repo` and `serve` flags)."""

    model: str = "reference"  # "reference", "sim", or an engines model directory
    devices: int = 2
    backend: str = "onnxruntime"  # engines to serve: CPU ONNX Runtime or TensorRT plans
    gpu_key: str | None = None  # engines/<model>/<gpu_key>; the only TensorRT set if None
    cpu_threads: int = 1  # ONNX Runtime intra-op threads per CPU device
    sim_latency_ms: float = 0.0
    sim_latency_per_item_ms: float = 0.0
    # fault injection for reliability tests: these calls of the first device model raise
    fail_calls: tuple[int, ...] = ()
    cuda_graph_batches: Sequence[int] = (1, 2)
    deadline_s: float = 60.0  # per device call made by the driffusion model
    cfg_parallel: bool = False
    pipeline_model: bool = True  # False: devices and encoders only (e.g. extra per-GPU servers)
    # device servers (HOST:PORT) whose unet_* models join the driffusion model's pool; with
    # them, devices may be 0 (a front server with no device of its own)
    device_endpoints: tuple[str, ...] = ()
    # the GPU of the networks run once per request (text encoders, VAE encoder and decoder),
    # which no denoiser device then uses; None: GPU 0, beside the first device
    encoder_gpu: int | None = None
    # an encoder server: the tokenizers and text encoders alone (no device, VAE or driffusion)
    encoders_only: bool = False
    # encoder servers (HOST:PORT, `encoders_only`) whose tokenizers and text encoders the
    # driffusion model calls instead of its own (several: the first that answers)
    encoder_endpoints: tuple[str, ...] = ()
    pipeline_instances: int = 2  # driffusion instances = requests it serves at once
    # the decoupled `driffusion_stream` model beside `driffusion` (progress responses over a
    # gRPC stream); None: for video models only (each python-backend model is a stub process)
    stream_model: bool | None = None
    # None: one device model per device (unet_gpu<i> on GPU i); "batched" / "instances": the
    # one-GPU layouts of GPU_LAYOUTS (`serve --single-gpu`)
    gpu_layout: str | None = None
    # serving limits, enforced server-side (the driffusion model, Triton's shape checks)
    max_steps: int = SERVING_LIMITS["max_steps"].default
    max_window: int = SERVING_LIMITS["max_window"].default
    max_batch: int = SERVING_LIMITS["max_batch"].default
    max_prompt_bytes: int = SERVING_LIMITS["max_prompt_bytes"].default
    max_resolution: int = SERVING_LIMITS["max_resolution"].default
    max_video_pixels: int = SERVING_LIMITS["max_video_pixels"].default
    dynamic_batching: bool = True  # device models merge concurrent calls into one batch
    batch_delay_us: int = SERVING_LIMITS["batch_delay_us"].default
    max_queue_size: int = SERVING_LIMITS["max_queue_size"].default
    queue_timeout_s: int = SERVING_LIMITS["queue_timeout_s"].default

    def validate(self) -> None:
        least = 0 if parse_endpoints(self.device_endpoints) or self.encoders_only else 1
        if not least <= self.devices <= MAX_DEVICES:
            raise ValueError(f"devices must be in 1..{MAX_DEVICES} (0 only with device "
                             f"endpoints, on a front server); got {self.devices}")
        if parse_endpoints(self.device_endpoints) and not self.pipeline_model:
            raise ValueError("device endpoints feed the driffusion model: they cannot go with "
                             "--no-pipeline-model")
        self._validate_encoder_placement()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.gpu_layout not in (None, *GPU_LAYOUTS):
            raise ValueError(f"gpu layout must be one of {', '.join(GPU_LAYOUTS)}; got "
                             f"{self.gpu_layout!r}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu threads must be >= 1; got {self.cpu_threads}")
        if self.sim_latency_ms < 0 or self.sim_latency_per_item_ms < 0:
            raise ValueError("sim latencies must be >= 0 ms")
        if self.pipeline_instances < 1:
            raise ValueError(f"pipeline instances must be >= 1; got {self.pipeline_instances}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline must be > 0 s; got {self.deadline_s}")
        for name in SERVING_LIMITS:
            check_limit(name, getattr(self, name))

    def _validate_encoder_placement(self) -> None:
        """--encoder-gpu, --encoders-only and --encoder-endpoints: each alone, where it means
        something."""
        if self.encoder_gpu is not None:
            if not 0 <= self.encoder_gpu < MAX_DEVICES:
                raise ValueError(f"encoder gpu must be in 0..{MAX_DEVICES - 1}; got "
                                 f"{self.encoder_gpu}")
            if self.backend not in ENCODER_GPU_BACKENDS or self.model == "sim":
                raise ValueError("--encoder-gpu places the text encoders on a GPU: it needs "
                                 f"--backend {' or '.join(ENCODER_GPU_BACKENDS)} and a model's "
                                 f"engines (got --backend {self.backend}, model {self.model}; "
                                 "the onnxruntime backend runs its encoders on the CPU)")
        if self.encoders_only and (parse_endpoints(self.device_endpoints)
                                   or parse_endpoints(self.encoder_endpoints)):
            raise ValueError("--encoders-only serves no driffusion model: it cannot go with "
                             "--device-endpoints or --encoder-endpoints")
        if parse_endpoints(self.encoder_endpoints) and not self.pipeline_model:
            raise ValueError("encoder endpoints feed the driffusion model: they cannot go with "
                             "--no-pipeline-model")


@dataclass(frozen=True)
class DeviceModel:
    """A device model of the repository: its name, instance count, largest batch and whether
    Triton batches it dynamically (then per-item scalars travel as [N, 1])."""

    name: str
    instances: int = 1
    max_batch: int | None = None
    batching: bool = False
    dtypes: dict[str, str] = field(default_factory=dict)  # input name -> dtype


@dataclass(frozen=True)
class Batching:
    """Batching of a model: Triton's max_batch_size (requests with more rows are refused before
    the model sees them) and, for device models, dynamic batching with a queue delay."""

    max_batch_size: int
    delay_us: int = 0
    dynamic: bool = True


# rows a request of the encoders and tokenizers may hold: a prompt and its negative
ENCODER_ROWS = 2
# rows of a VAE decoder or encoder request: one image
DECODER_ROWS = 1
VAE_NETWORKS = ("vae_decoder", "vae_encoder")


def _batching(options: RepositoryOptions, max_batch: int) -> Batching | None:
    return Batching(max_batch, options.batch_delay_us) if options.dynamic_batching else None


@dataclass
class Repository:
    """A written repository: its directory, the models in it and the pipeline spec."""

    path: Path
    models: list[str] = field(default_factory=list)
    devices: list[DeviceModel] = field(default_factory=list)
    spec: PipelineSpec | None = None
    device_signature: dict | None = None  # what every device takes (set with device endpoints)
    # what each remote tokenizer and text encoder takes and returns (set with encoder endpoints)
    encoder_signatures: dict[str, dict] | None = None


def write_repository(target: str | Path | None = None,
                     options: RepositoryOptions | None = None) -> Repository:
    """(Re)write the model repository at `target` and return what is in it."""
    options = options or RepositoryOptions()
    options.validate()
    target = paths.repository_dir() if target is None else target
    if options.model == "sim":
        spec, engines_dir = sim_spec(), None
    else:
        engines_dir = engines_dir_of(options.model)
        directory, manifest = load_manifest(engines_dir, options.backend, options.gpu_key)
        spec = _engines_spec(directory, manifest)
    spec = with_limits(spec, options)
    repository = Repository(_prepare_target(Path(target)), spec=spec)
    local = replace(options, devices=max(options.devices, 1))  # 0: one, to learn the signature
    if engines_dir is None:
        _write_sim(repository, local)
    else:
        _write_engines(repository, local, directory, manifest)
    if options.encoders_only:
        _keep_only_encoders(repository)
        return repository
    if parse_endpoints(options.device_endpoints):
        _keep_device_signature(repository, options)
    if parse_endpoints(options.encoder_endpoints):
        _keep_encoder_signatures(repository)
    if options.pipeline_model:
        _write_driffusion(repository, options)
        if writes_stream_model(repository.spec, options):
            _write_driffusion(repository, options, stream=True)
    return repository


def writes_stream_model(spec: PipelineSpec, options: RepositoryOptions) -> bool:
    """Whether the repository gets `driffusion_stream`: as asked, else for video models."""
    if options.stream_model is None:
        return family_of(spec).makes_video
    return options.stream_model


def with_limits(spec: PipelineSpec, options: RepositoryOptions) -> PipelineSpec:
    """The spec carrying the serving limits; ValueError if the model's images exceed them."""
    side = max(spec.image_size[0], spec.image_size[1],
               *(spec.height_range or ()), *(spec.width_range or ()))
    if side > options.max_resolution:
        raise ValueError(f"{spec.model} makes {side}-pixel images, above the max resolution "
                         f"{options.max_resolution}; raise --max-resolution to serve it")
    return spec.with_defaults(max_steps=options.max_steps, max_window=options.max_window,
                              max_prompt_bytes=options.max_prompt_bytes,
                              max_video_pixels=options.max_video_pixels)


def validate_repository(path: str | Path) -> Path:
    """The resolved path of a Triton model repository with the expected layout, or ValueError.

    Every entry must be a model directory with a plain name, a config.pbtxt and a numeric
    version directory; at least one model must be there.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise ValueError(f"model repository {path} does not exist or is not a directory; write "
                         "one with `driffusion triton-repo`")
    models = [entry for entry in sorted(path.iterdir()) if entry.name != MARKER]
    if not models:
        raise ValueError(f"model repository {path} holds no model")
    for entry in models:
        problem = _model_dir_problem(entry)
        if problem:
            raise ValueError(f"model repository {path}: {entry.name!r} {problem}")
    return path


def _model_dir_problem(entry: Path) -> str | None:
    if not MODEL_NAME.fullmatch(entry.name):
        return "is not a plain model name (letters, digits, _ . -)"
    if not entry.is_dir():
        return "is not a model directory"
    if not (entry / "config.pbtxt").is_file():
        return "has no config.pbtxt"
    if not any(child.is_dir() and child.name.isdigit() for child in entry.iterdir()):
        return "has no numeric version directory (e.g. 1/)"
    return None


def _prepare_target(target: Path) -> Path:
    """Empty `target` if it is a repository we wrote; refuse to clobber anything else."""
    target = target.resolve()
    if target.exists() and any(target.iterdir()) and not (target / MARKER).exists():
        raise FileExistsError(
            f"{target} is not empty and was not written by `driffusion triton-repo`; "
            "choose an empty or new directory"
        )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / MARKER).write_text("written by `driffusion triton-repo`; rewritten on each run\n")
    return target


def engines_dir_of(model: str) -> Path:
    """`reference` -> engines/reference; any other value is an engines model directory."""
    path = paths.engines_dir(model) if model == "reference" else Path(model)
    if not path.is_dir():
        hint = "run `make build-engines`" if model == "reference" else "give an engines model dir"
        raise FileNotFoundError(f"no engines for model {model!r} at {path}: {hint}")
    return path


# ---------------------------------------------------------------------------------------------
# The sim


def _write_sim(repository: Repository, options: RepositoryOptions) -> None:
    from models.sim import NUM_CLASSES, SAMPLE_SHAPE, alphas_cumprod_of

    shape = list(SAMPLE_SHAPE)
    embed = [-1, 1, NUM_CLASSES + 1]
    unet = _model_dir(repository, "unet_sim", "unet_sim")
    np.save(unet / "1" / "alphas_cumprod.npy", alphas_cumprod_of(repository.spec.scheduler_config))
    batching = _batching(options, options.max_batch)
    _write_config(unet, _python_config(
        "unet_sim",
        inputs=[("sample", "TYPE_FP32", [-1, *shape]), ("timestep", "TYPE_FP32", [-1]),
                ("encoder_hidden_states", "TYPE_FP32", embed)],
        outputs=[("out_sample", "TYPE_FP32", [-1, *shape])],
        instances=options.devices, batching=batching,
        parameters={
            "num_classes": NUM_CLASSES,
            "sample_shape": ",".join(map(str, shape)),
            "latency_ms": options.sim_latency_ms,
            "latency_per_item_ms": options.sim_latency_per_item_ms,
            "fail_calls": ",".join(map(str, options.fail_calls)),
            **({} if batching else {"max_batch": options.max_batch}),
        },
    ))
    encoder = _model_dir(repository, "text_encoder", "sim_text_encoder")
    _write_config(encoder, _python_config(
        "text_encoder", inputs=[("label", "TYPE_INT64", [-1])],
        outputs=[("text_embeddings", "TYPE_FP32", embed)], parameters={"num_classes": NUM_CLASSES},
        batching=Batching(ENCODER_ROWS, dynamic=False),
    ))
    repository.devices.append(DeviceModel(
        "unet_sim", options.devices, options.max_batch, batching is not None,
        {tensors.SAMPLE: "float32", tensors.TIMESTEP: "float32",
         tensors.ENCODER_HIDDEN_STATES: "float32"}))


# ---------------------------------------------------------------------------------------------
# Engines (ONNX Runtime on CPU, TensorRT plans on GPUs)


def load_manifest(engines_dir: Path, backend: str, gpu_key: str | None = None) -> tuple[Path, dict]:
    """(directory, manifest) of the engine set for `backend` under an engines model dir."""
    from engines.manifest import load_engines

    found = [engine_set for engine_set in load_engines(engines_dir)
             if engine_set.backend == backend
             and (gpu_key is None or engine_set.device_key == gpu_key)]
    if not found:
        keyed = f" for GPU key {gpu_key!r}" if gpu_key else ""
        raise FileNotFoundError(
            f"no {backend} engines{keyed} under {engines_dir}; run `make build-engines`"
        )
    if len(found) > 1:
        keys = ", ".join(engine_set.device_key for engine_set in found)
        raise ValueError(f"several {backend} engine sets under {engines_dir} ({keys}); pick one "
                         "with --gpu-key")
    return found[0].directory, found[0].manifest


DENOISERS = ("unet", "transformer")  # network names of the denoiser, by model family


def _write_engines(repository: Repository, options: RepositoryOptions, directory: Path,
                   manifest: dict) -> None:
    networks = manifest.get("networks", {})
    denoiser = next((name for name in DENOISERS if name in networks), None)
    if denoiser is None:
        raise ValueError(f"{directory / 'manifest.json'} has no denoiser network "
                         f"({' or '.join(DENOISERS)}; networks: {', '.join(networks) or 'none'})")
    unet = networks[denoiser]
    if repository.spec.height_range is None and repository.spec.width_range is None:
        unet = _with_latent_shape(unet, repository.spec.latent_shape)
    engine_batch = _max_batch(unet)
    max_batch = min(options.max_batch, engine_batch or options.max_batch)
    batching = _batching(options, max_batch) if _batch_is_dynamic(unet) else None
    for index, gpu in enumerate(device_gpus(options)):
        kind = "cpu" if options.backend == "onnxruntime" else "gpu"
        name = f"unet_{kind}{gpu if options.gpu_layout is None else index}"
        _write_network(repository, name, directory, unet, options, gpu=gpu, batching=batching,
                       max_batch=max_batch, fail_calls=options.fail_calls if index == 0 else ())
        dtypes = {tensor["name"]: tensor["dtype"] for tensor in unet["inputs"]}
        repository.devices.append(DeviceModel(name, 1, max_batch, batching is not None, dtypes))
    for network in networks:
        if network.startswith("text_encoder") or network in VAE_NETWORKS:
            rows = DECODER_ROWS if network in VAE_NETWORKS else ENCODER_ROWS
            _write_network(repository, network, directory, networks[network], options,
                           gpu=network_gpu(options),
                           batching=Batching(rows, dynamic=False), max_batch=rows)
    for encoder in repository.spec.text_encoders:
        _write_tokenizer(repository, directory, encoder, options)


def _write_tokenizer(repository: Repository, directory: Path, encoder: TextEncoder,
                     options: RepositoryOptions) -> None:
    """A python-backend `tokenizer` model on the tokenizer files beside the engines, padding and
    truncating to its encoder's token count."""
    name = encoder.tokenizer
    source = directory / name
    if not (source / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{source} holds no tokenizer (tokenizer_config.json); build the "
                                "engines again with `driffusion build-engines`")
    model_dir = _model_dir(repository, name, "tokenizer")
    shutil.copytree(source, model_dir / "1" / "tokenizer")
    _write_config(model_dir, _python_config(
        name, inputs=[(TOKENIZER_TEXT, "TYPE_STRING", [-1, 1])],
        outputs=[(tensors.INPUT_IDS, "TYPE_INT64", [-1, -1]),
                 (tensors.ATTENTION_MASK, "TYPE_INT64", [-1, -1]),
                 (TOKENIZER_DROPPED, "TYPE_INT32", [-1, 1])],
        parameters={"max_prompt_bytes": options.max_prompt_bytes,
                    "max_length": encoder.max_length, "template": encoder.template},
        batching=Batching(ENCODER_ROWS, dynamic=False),
    ))


def _batch_is_dynamic(network: dict) -> bool:
    """True if every tensor's first dim is the (dynamic) batch, which Triton can batch over."""
    tensors = [*network["inputs"], *network["outputs"]]
    return all(t["shape"] and not (isinstance(t["shape"][0], int) and t["shape"][0] > 0)
               for t in tensors)


def _with_latent_shape(network: dict, latent_shape: tuple[int, ...]) -> dict:
    """The UNet entry with dynamic latent dims fixed to the served latent shape, so that Triton
    itself rejects any other resolution."""
    def fixed(tensor: dict) -> dict:
        shape = list(tensor["shape"])
        if len(shape) != len(latent_shape) + 1:
            return tensor
        dims = [d if isinstance(d, int) and d > 0 else size
                for d, size in zip(shape[1:], latent_shape)]
        return {**tensor, "shape": [shape[0], *dims]}

    return {**network, "inputs": [fixed(t) for t in network["inputs"]],
            "outputs": [fixed(t) for t in network["outputs"]]}


def _engines_spec(directory: Path, manifest: dict) -> PipelineSpec:
    """The pipeline spec the build wrote beside the engines."""
    spec_file = directory / SPEC_FILE
    if spec_file.is_file():
        return PipelineSpec.from_json(spec_file.read_text())
    raise FileNotFoundError(f"{spec_file} is missing: build the engines again with "
                            "`driffusion build-engines --model SOURCE` (it derives the pipeline "
                            "spec from the model)")


def _write_network(repository: Repository, name: str, directory: Path, network: dict,
                   options: RepositoryOptions, gpu: int, batching: Batching | None = None,
                   max_batch: int | None = None, fail_calls: tuple[int, ...] = ()) -> None:
    source = engine_file(directory, network["file"])
    inputs = [_io(tensor) for tensor in network["inputs"]]
    outputs = [_io(tensor) for tensor in network["outputs"]]
    max_batch = max_batch or _max_batch(network)
    if source.suffix == TORCH_SUFFIX:
        _write_torch_network(repository, name, source, network, options, gpu, batching,
                             max_batch, fail_calls)
    elif options.backend in ("onnxruntime", "torch"):  # torch sets keep ORT encoders/decoder
        model_dir = _model_dir(repository, name, "ort_model")
        onnx_name = _link_onnx(source, model_dir / "1")
        parameters = {"onnx_file": onnx_name, "intra_op_threads": options.cpu_threads}
        if fail_calls:
            parameters["fail_calls"] = ",".join(map(str, fail_calls))
        if max_batch and not batching:
            parameters["max_batch"] = max_batch
        _write_config(model_dir, _python_config(name, inputs, outputs, parameters=parameters,
                                                batching=batching))
    else:
        model_dir = repository.path / name
        (model_dir / "1").mkdir(parents=True)
        _link_or_copy(source, model_dir / "1" / "model.plan")
        graphs = _cuda_graph_specs(network, options.cuda_graph_batches)
        _write_config(model_dir, _tensorrt_config(name, inputs, outputs, gpu, graphs, max_batch,
                                                  batching))
        repository.models.append(name)


def _write_torch_network(repository: Repository, name: str, source: Path, network: dict,
                         options: RepositoryOptions, gpu: int, batching: Batching | None,
                         max_batch: int | None, fail_calls: tuple[int, ...]) -> None:
    """A python-backend `torch_model` on GPU `gpu` (FP32 on the CPU where there is no GPU)."""
    from triton_models.torch_device import graphs_allowed

    model_dir = _model_dir(repository, name, "torch_model")
    _link_or_copy(source, model_dir / "1" / source.name)
    graphs = graphs_allowed(network) and not runs_eager_on_gpu(name)
    parameters = {"torch_file": source.name, "gpu": gpu, "precision": network["precision"],
                  "cuda_graphs": "true" if graphs else "false",
                  "intra_op_threads": options.cpu_threads}
    if fail_calls:
        parameters["fail_calls"] = ",".join(map(str, fail_calls))
    if max_batch and not batching:
        parameters["max_batch"] = max_batch
    _write_config(model_dir, _python_config(name, [_io(t) for t in network["inputs"]],
                                            [_io(t) for t in network["outputs"]],
                                            parameters=parameters, batching=batching))


def device_gpus(options: RepositoryOptions) -> list[int]:
    """The GPU of each device model to write: one per device on GPU i by default; one model
    for the batched one-GPU layout; `devices` models all on GPU 0 for the instances layout.
    The encoder GPU (`encoder_gpu`) is skipped: the devices take the other GPUs in order."""
    gpus = [gpu for gpu in range(options.devices + 1) if gpu != options.encoder_gpu]
    if options.gpu_layout == "batched":
        return gpus[:1]
    if options.gpu_layout == "instances":
        return gpus[:1] * options.devices
    return gpus[:options.devices]


def network_gpu(options: RepositoryOptions) -> int:
    """The GPU of the networks that run once per request (text encoders, VAE encoder and
    decoder): the encoder GPU if given, else GPU 0 beside the first device. With an encoder GPU
    the denoiser GPUs hold denoisers alone: every device alike, and no request's decoding on
    the GPU of a device that another request's rounds are waiting for."""
    return 0 if options.encoder_gpu is None else options.encoder_gpu


def _layout_parameters(options: RepositoryOptions) -> dict[str, str]:
    """The driffusion parameters of the batched layout: each round is one call of `window`."""
    if options.gpu_layout != "batched":
        return {}
    return {"batched_rounds": "true", "window": str(options.devices)}


def engine_file(directory: Path, name: str) -> Path:
    """The engine file a manifest names: a plain name inside its own engines directory."""
    path = (directory / name).resolve()
    if Path(name).name != name or path.parent != directory.resolve():
        raise ValueError(f"manifest in {directory} names engine file {name!r}, which is not a "
                         "plain file name in that directory")
    if not path.is_file():
        raise FileNotFoundError(f"engine file {path} named in the manifest is missing")
    return path


def _io(tensor: dict) -> tuple[str, str, list[int]]:
    try:
        dtype = tensors.dtype_named(tensor["dtype"]).triton_config
    except ValueError as error:
        raise ValueError(f"tensor {tensor['name']}: {error}") from error
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in tensor["shape"]]
    return tensor["name"], dtype, dims


def _max_batch(network: dict) -> int | None:
    """The largest batch the engine's optimisation profile admits (None if unbounded)."""
    profile = network.get("profile") or {}
    batches = [shapes[2][0] for shapes in profile.values() if len(shapes) == 3 and shapes[2]]
    return min(batches) if batches else None


def _cuda_graph_specs(network: dict, batches: Sequence[int]) -> list[dict[str, list[int]]]:
    """One input-shape set per batch for CUDA graphs, or none if non-batch dims are dynamic."""
    profile = network.get("profile") or {}
    if not profile:
        static = [tensor["shape"] for tensor in network["inputs"]]
        if all(isinstance(d, int) and d > 0 for shape in static for d in shape):
            return [{tensor["name"]: list(tensor["shape"]) for tensor in network["inputs"]}]
        return []
    for low, _, high in profile.values():
        if list(low[1:]) != list(high[1:]):
            return []
    specs = []
    for batch in batches:
        if all(low[0] <= batch <= high[0] for low, _, high in profile.values()):
            specs.append({name: [batch, *shapes[0][1:]] for name, shapes in profile.items()})
    return specs


def _link_onnx(source: Path, destination: Path) -> str:
    """Link (or copy) an ONNX file and its external-data files; returns the file name."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(source), load_external_data=False)
    except (DecodeError, ValueError, OSError) as error:
        raise ValueError(f"{source} is not a readable ONNX model ({error}); rebuild it with "
                         "`driffusion build-engines --force`") from error
    locations = {
        ExternalDataInfo(tensor).location
        for tensor in model.graph.initializer if uses_external_data(tensor)
    }
    _link_or_copy(source, destination / source.name)
    for location in sorted(locations):
        _link_or_copy(engine_file(source.parent, location), destination / location)
    return source.name


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


# ---------------------------------------------------------------------------------------------
# The pipeline model


def _write_driffusion(repository: Repository, options: RepositoryOptions,
                      stream: bool = False) -> None:
    """`driffusion`, or with `stream` the decoupled `driffusion_stream` (the same model.py,
    switched by its `stream` parameter). Triton hands a decoupled python model every request
    at once, so `driffusion_stream` is one instance that runs --pipeline-instances requests
    at once and bounds its own queue: each stub costs ~385 MB (torch and the runtime), and its
    requests mostly wait on device calls."""
    name = STREAM_MODEL if stream else "driffusion"
    model_dir = _model_dir(repository, name, "driffusion")
    inputs, outputs = driffusion_tensors(repository.spec, stream)
    decoupled = "\nmodel_transaction_policy { decoupled: true }" if stream else ""
    streaming = {"stream": "true", "concurrency": options.pipeline_instances,
                 "max_queue_size": options.max_queue_size} if stream else {}
    _write_config(model_dir, _python_config(
        name, inputs, outputs,
        optional_inputs=True,
        instances=1 if stream else options.pipeline_instances,
        extra=_queue_policy(options) + decoupled,
        parameters={
            **streaming,
            "pipeline": repository.spec.to_json(),
            "devices": json.dumps([asdict(device) for device in repository.devices]),
            "deadline_s": options.deadline_s,
            "cfg_parallel": "true" if options.cfg_parallel else "false",
            "max_resolution": options.max_resolution,
            "max_input_dims": json.dumps(_largest_images(repository.spec, options)),
            **_endpoint_parameters(repository, options),
            **_encoder_endpoint_parameters(repository, options),
            **_layout_parameters(options),
        },
    ))


def driffusion_tensors(spec: PipelineSpec, stream: bool = False
                       ) -> tuple[list[Tensor], list[Tensor]]:
    """The `driffusion` model's inputs and outputs: a video model's also take FRAMES and
    GUIDANCE_2 and answer VIDEO where an image model answers IMAGE; `driffusion_stream`'s
    (`stream`) also answer the progress outputs."""
    video = family_of(spec).makes_video
    inputs = [(name, dtype, [1]) for name, (dtype, _) in driffusion_inputs(video).items()]
    inputs += [(name, "TYPE_UINT8", dims) for name, (dims, _) in DRIFFUSION_IMAGE_INPUTS.items()]
    outputs = [(name, dtype, dims)
               for name, (dtype, dims) in driffusion_outputs(video, stream).items()]
    return inputs, outputs


def _largest_images(spec: PipelineSpec, options: RepositoryOptions) -> dict[str, list[int]]:
    """The largest image inputs the engines take, for the request guard to refuse larger ones
    before Triton reads them (triton_models/request_check.py)."""
    default_height, default_width = spec.image_size
    height = spec.height_range[1] if spec.height_range else default_height
    width = spec.width_range[1] if spec.width_range else default_width
    height, width = min(height, options.max_resolution), min(width, options.max_resolution)
    return {name: [height, width, *dims[2:]] for name, (dims, _) in DRIFFUSION_IMAGE_INPUTS.items()}


def _keep_device_signature(repository: Repository, options: RepositoryOptions) -> None:
    """Record what a device of this model takes (remote devices must take the same); a front
    server with no device of its own (devices 0) then drops the device model written for it."""
    if not repository.devices:
        raise ValueError(f"{repository.spec.model}: no device model to take the device "
                         "signature from; device endpoints need a UNet engine")
    first = repository.path / repository.devices[0].name / "config.pbtxt"
    repository.device_signature = signature(config_of_file(first))
    if options.devices == 0:
        for device in repository.devices:
            shutil.rmtree(repository.path / device.name)
            repository.models.remove(device.name)
        repository.devices.clear()


def text_models(spec: PipelineSpec) -> list[str]:
    """The tokenizers and text encoders of `spec` (a class-conditional model: its label
    encoder): what an encoder server serves."""
    return [name for name in Pipeline.needed_models(spec) if name not in VAE_NETWORKS]


def _keep_only_encoders(repository: Repository) -> None:
    """An encoder server: drop every model but the tokenizers and text encoders."""
    keep = text_models(repository.spec)
    for name in [name for name in repository.models if name not in keep]:
        shutil.rmtree(repository.path / name)
        repository.models.remove(name)
    repository.devices.clear()


def _keep_encoder_signatures(repository: Repository) -> None:
    """Record what each tokenizer and text encoder takes and returns (the encoder server's
    must match), then drop them: the driffusion model calls the encoder servers' instead."""
    repository.encoder_signatures = {}
    for name in text_models(repository.spec):
        config = config_of_file(repository.path / name / "config.pbtxt")
        repository.encoder_signatures[name] = signature(config)
        shutil.rmtree(repository.path / name)
        repository.models.remove(name)


def _encoder_endpoint_parameters(repository: Repository,
                                 options: RepositoryOptions) -> dict[str, str]:
    """The driffusion parameters naming the encoder servers and what their models take."""
    endpoints = parse_endpoints(options.encoder_endpoints)
    if not endpoints:
        return {}
    return {ENCODER_ENDPOINTS_PARAMETER: ",".join(endpoints),
            ENCODER_SIGNATURES_PARAMETER: json.dumps(repository.encoder_signatures)}


def _endpoint_parameters(repository: Repository, options: RepositoryOptions) -> dict[str, str]:
    """The driffusion parameters naming the device servers and the device signature."""
    endpoints = parse_endpoints(options.device_endpoints)
    if not endpoints:
        return {}
    return {ENDPOINTS_PARAMETER: ",".join(endpoints),
            SIGNATURE_PARAMETER: json.dumps(repository.device_signature)}


# ---------------------------------------------------------------------------------------------
# config.pbtxt


def _model_dir(repository: Repository, name: str, template: str) -> Path:
    model_dir = repository.path / name
    (model_dir / "1").mkdir(parents=True)
    shutil.copy2(TEMPLATES / template / "1" / "model.py", model_dir / "1" / "model.py")
    repository.models.append(name)
    return model_dir


def _write_config(model_dir: Path, text: str) -> None:
    (model_dir / "config.pbtxt").write_text(text)


Tensor = tuple[str, str, list[int]]


def _queue_policy(options: RepositoryOptions) -> str:
    """Admission control: a bounded queue with a timeout; a full queue answers UNAVAILABLE."""
    return ("dynamic_batching { default_queue_policy { "
            f"max_queue_size: {options.max_queue_size} timeout_action: REJECT "
            f"default_timeout_microseconds: {options.queue_timeout_s * 1_000_000} "
            "allow_timeout_override: true } }")


def _python_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
                   instances: int = 1, parameters: dict | None = None,
                   optional_inputs: bool = False, batching: Batching | None = None,
                   extra: str = "") -> str:
    return "\n".join(line for line in [
        f'name: "{name}"',
        'backend: "python"',
        _batch_lines(batching),
        _tensors("input", inputs, optional_inputs, batched=batching is not None),
        _tensors("output", outputs, batched=batching is not None),
        f"instance_group [{{ kind: KIND_CPU count: {instances} }}]",
        _parameters({**(parameters or {}), **({"batching": "true"} if batching else {})}),
        extra,
    ] if line) + "\n"


def _batch_lines(batching: Batching | None) -> str:
    if batching is None:
        return "max_batch_size: 0"
    if not batching.dynamic:
        return f"max_batch_size: {batching.max_batch_size}"
    return (f"max_batch_size: {batching.max_batch_size}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {batching.delay_us} }}")


def _tensorrt_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], gpu: int,
                     graphs: list[dict[str, list[int]]], max_batch: int | None,
                     batching: Batching | None = None) -> str:
    batched = batching is not None
    lines = [
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        _batch_lines(batching),
        _tensors("input", inputs, batched=batched),
        _tensors("output", outputs, batched=batched),
        f"instance_group [{{ kind: KIND_GPU count: 1 gpus: [ {gpu} ] }}]",
    ]
    if graphs:
        lines.append("optimization { cuda { graphs: true graph_spec [\n"
                     + ",\n".join(_graph_spec(spec, batched) for spec in graphs) + "\n] } }")
    if max_batch and not batched:
        lines.append(_parameters({"max_batch": max_batch}))
    return "\n".join(lines) + "\n"


def _graph_spec(shapes: dict[str, list[int]], batched: bool = False) -> str:
    """One CUDA graph's input shapes; with batching the batch size is separate from the dims
    (the engine's shapes, so a per-item scalar has no dims)."""
    batch = next(iter(shapes.values()))[0] if batched else 0
    inputs = " ".join(
        f'input {{ key: "{name}" value {{ dim: [ {", ".join(map(str, dims[batched:]))} ] }} }}'
        for name, dims in shapes.items()
    )
    return f"  {{ batch_size: {batch} {inputs} }}"


def _tensors(kind: str, tensors: Sequence[Tensor], optional: bool = False,
             batched: bool = False) -> str:
    """A config's input/output list. `batched` (max_batch_size > 0): the leading batch dim is
    implicit, and a per-item scalar ([batch] in the engine) is [1] on the wire, reshaped to []."""
    flag = " optional: true" if optional else ""
    rows = []
    for name, dtype, dims in tensors:
        shape = dims[1:] if batched else dims
        extra = " reshape: { shape: [ ] }" if batched and not shape else ""
        shape = shape or ([1] if batched else shape)
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, shape))} ]'
                    f"{extra}{flag} }}")
    return f"{kind} [\n" + ",\n".join(rows) + "\n]"


def _parameters(parameters: dict) -> str:
    return "\n".join(
        f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(str(value))} }} }}"
        for key, value in parameters.items()
    )


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
