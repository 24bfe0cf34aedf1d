"""The torch device model's parts that need no Triton: device choice, input checks, CUDA graphs.

`templates/torch_model/1/model.py` serves a torch engine (engines/torch_build.py) as
`unet_gpu<i>` or a text encoder: at its recorded precision (FP16, or BF16 for SD3/Flux
transformers) on `cuda:<i>` with one CUDA graph per (batch, input shapes, dtypes) key,
captured the first time the key is seen and replayed after; eager when the profile lets
non-batch dims vary (a graph per shape would never be reused), when the cache is full, or for a
key whose capture failed. Without any GPU it runs FP32 eager on the CPU, which is what makes the
whole path testable on a CPU machine through a real tritonserver.
Light module: no `triton_python_backend_utils`, tested in-process.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import tensors

LOG = logging.getLogger(__name__)
DEFAULT_MAX_GRAPHS = 32  # CUDA graphs kept per model instance (one per batch size in practice)
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture (cuDNN/cuBLAS pick kernels)

# a torch engine's recorded precision -> the dtype it computes in on a GPU
COMPUTE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

GraphKey = tuple[int, tuple[tuple[str, tuple[int, ...], str], ...], str]


class BadInput(ValueError):
    """A request whose inputs do not fit the model (answered INVALID_ARG, never a device fault)."""


@dataclass(frozen=True)
class Placement:
    """Where and how a torch device model runs."""

    device: str  # "cuda:0" or "cpu"
    dtype: str  # compute dtype: "float16", "bfloat16" or "float32"
    cuda_graphs: bool

    def describe(self) -> str:
        graphs = "CUDA graphs per batch" if self.cuda_graphs else "eager"
        return f"{self.device}, {self.dtype}, {graphs}"


def choose_placement(gpu: int, precision: str, cuda_graphs: bool, *, cuda_available: bool,
                     device_count: int) -> Placement:
    """GPU `gpu` in `precision` (fp16/bf16/fp32) with graphs if asked; FP32 eager on the CPU when
    the machine has no GPU. A GPU index that is not visible is an error (a misconfigured server)."""
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(COMPUTE_DTYPES)}; got {precision!r}")
    if not cuda_available or device_count == 0:
        return Placement("cpu", "float32", False)
    if not 0 <= gpu < device_count:
        raise ValueError(f"GPU {gpu} is not visible: this process sees {device_count} GPU(s) "
                         "(CUDA_VISIBLE_DEVICES); write the repository for the GPUs the server has")
    return Placement(f"cuda:{gpu}", COMPUTE_DTYPES[precision], cuda_graphs)


def graphs_allowed(network: Mapping[str, Any]) -> bool:
    """True if only the batch varies: every input's non-batch dims are fixed by the profile (or
    the shapes). Then one graph per batch size serves every call."""
    profile = network.get("profile") or {}
    if profile:
        return all(list(low[1:]) == list(high[1:]) for low, _, high in profile.values())
    return all(isinstance(d, int) and d > 0 for tensor in network.get("inputs", [])
               for d in tensor["shape"][1:])


def graph_key(feeds: Mapping[str, Any], dtype: str) -> GraphKey:
    """The CUDA-graph cache key of a call: (batch, (name, per-item shape, dtype) by name, the
    compute dtype). Calls with the same key replay the same graph."""
    items = tuple(sorted((name, tuple(int(d) for d in value.shape[1:]), _dtype_name(value))
                         for name, value in feeds.items()))
    batches = {int(value.shape[0]) for value in feeds.values() if len(value.shape)}
    if len(batches) != 1:
        raise BadInput(f"inputs disagree on the batch: {sorted(batches)}")
    return batches.pop(), items, dtype


def _dtype_name(value: Any) -> str:
    dtype = value.dtype
    return str(dtype).removeprefix("torch.") if not isinstance(dtype, np.dtype) else dtype.name


@dataclass(frozen=True)
class TensorIO:
    """One input or output of the model config: numpy dtype name and dims, batch included
    (-1 for any size)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


def config_tensors(config: Mapping[str, Any], kind: str) -> list[TensorIO]:
    """The `input` or `output` tensors of a model config (the JSON Triton hands `initialize`),
    with the batch dim first whether Triton batches the model or not."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    found = []
    for tensor in config.get(kind, []):
        dims = ([int(d) for d in tensor["reshape"].get("shape", [])] if "reshape" in tensor
                else [int(d) for d in tensor.get("dims", [])])
        dtype = tensors.dtype_of_triton_config(tensor.get("data_type", "TYPE_FP32")).name
        found.append(TensorIO(tensor["name"], dtype, tuple([-1, *dims] if batched else dims)))
    return found


def check_feeds(feeds: Mapping[str, np.ndarray], expected: Sequence[TensorIO]) -> None:
    """BadInput naming the first input that is missing, unknown, or of another dtype or shape."""
    wanted = {tensor.name: tensor for tensor in expected}
    for name in feeds:
        if name not in wanted:
            raise BadInput(f"unknown input {name}; this model takes {', '.join(wanted)}")
    for tensor in expected:
        value = feeds.get(tensor.name)
        if value is None:
            raise BadInput(f"missing input {tensor.name}; this model needs {', '.join(wanted)}")
        if value.dtype.name != tensor.dtype:
            raise BadInput(f"input {tensor.name} is {value.dtype.name}, expected {tensor.dtype}")
        if len(value.shape) != len(tensor.dims) or any(
                want not in (-1, got) for want, got in zip(tensor.dims, value.shape)):
            raise BadInput(f"input {tensor.name} has shape {list(value.shape)}, expected "
                           f"{list(tensor.dims)} (-1: any size)")


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]  # static input tensors
    outputs: tuple[Any, ...]  # static output tensors


@dataclass
class GraphCache:
    """CUDA graphs of `forward` by key: captured on a key's first call, replayed after. A key
    whose capture fails, or any key once `limit` graphs exist, runs eager."""

    forward: Callable[..., Any]
    device: str
    limit: int = DEFAULT_MAX_GRAPHS
    graphs: dict[GraphKey, _Graph] = field(default_factory=dict)
    failed: dict[GraphKey, str] = field(default_factory=dict)
    replays: int = 0
    eager_calls: int = 0
    _pool: Any = None

    def __call__(self, key: GraphKey, inputs: dict[str, Any]) -> tuple[Any, ...]:
        graph = self.graphs.get(key)
        if graph is None and key not in self.failed and len(self.graphs) < self.limit:
            graph = self._capture(key, inputs)
        if graph is None:
            self.eager_calls += 1
            return _as_tuple(self.forward(**inputs))
        for name, value in inputs.items():
            graph.inputs[name].copy_(value)
        graph.graph.replay()
        self.replays += 1
        return graph.outputs

    def _capture(self, key: GraphKey, inputs: dict[str, Any]) -> _Graph | None:
        import torch

        static = {name: value.clone() for name, value in inputs.items()}
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARM_UP_RUNS):
                    self.forward(**static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = _as_tuple(self.forward(**static))
        except Exception as error:  # noqa: BLE001 - this key runs eager from now on
            self.failed[key] = f"{type(error).__name__}: {error}"
            LOG.warning("CUDA graph capture failed for %s; running it eager: %s", key, error)
            return None
        captured = _Graph(graph, static, outputs)
        self.graphs[key] = captured
        return captured


def _as_tuple(outputs: Any) -> tuple[Any, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


class TorchRunner:
    """A loaded torch engine on its placement: numpy inputs by name -> numpy outputs by name."""

    def __init__(self, network: Any, placement: Placement, outputs: Sequence[TensorIO],
                 max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        self.network = network  # engines.torch_build.LoadedNetwork
        self.placement = placement
        self.outputs = list(outputs)
        self.graphs = (GraphCache(network.module, placement.device, max_graphs)
                       if placement.cuda_graphs else None)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        inputs = {name: self._to_device(name, value) for name, value in feeds.items()}
        with torch.no_grad():
            if self.graphs is not None:
                results = self.graphs(graph_key(inputs, self.placement.dtype), inputs)
            else:
                results = _as_tuple(self.network.module(**inputs))
        if len(results) != len(self.outputs):
            raise RuntimeError(f"the network returned {len(results)} outputs, the config names "
                               f"{len(self.outputs)}")
        return {tensor.name: _to_numpy(value).astype(tensor.dtype, copy=False)
                for tensor, value in zip(self.outputs, results)}

    def _to_device(self, name: str, value: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if name in self.network.half_inputs and tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, self.placement.dtype))
        return tensor.to(self.placement.device, non_blocking=True)

    def describe(self) -> str:
        return f"{self.network.class_name} on {self.placement.describe()}"


def _to_numpy(value) -> np.ndarray:
    """A device tensor on the host as numpy (which has no bfloat16: those become float32)."""
    import torch

    value = value.detach().to("cpu")
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def load_runner(path: Path, *, gpu: int, precision: str, cuda_graphs: bool,
                outputs: Sequence[TensorIO], threads: int = 1,
                max_graphs: int = DEFAULT_MAX_GRAPHS) -> TorchRunner:
    """The torch engine at `path` placed by `choose_placement` on this machine."""
    import torch

    from engines.torch_build import load_network

    placement = choose_placement(gpu, precision, cuda_graphs,
                                 cuda_available=torch.cuda.is_available(),
                                 device_count=torch.cuda.device_count())
    if placement.device == "cpu":
        torch.set_num_threads(threads)
    network = load_network(path, placement.device, placement.dtype)
    return TorchRunner(network, placement, outputs, max_graphs)
