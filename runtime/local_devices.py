"""In-process devices: a Python callable, an ONNX Runtime CPU session or a torch module."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import tensors
from runtime.device import DenoiserIO, Device, DeviceError

if TYPE_CHECKING:
    import torch


class LocalModel:
    """A Python callable `fn(**inputs) -> {output: array}` run in a worker thread."""

    def __init__(self, name: str, fn: Callable[..., Mapping[str, np.ndarray]]) -> None:
        self.name = name
        self.fn = fn

    async def infer(self, inputs, outputs, timeout_s=None) -> dict[str, np.ndarray]:
        call = asyncio.to_thread(self.fn, **inputs)
        try:
            result = await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError as error:
            raise DeviceError(self.name, f"no answer within {timeout_s} s") from error
        except DeviceError:
            raise
        except Exception as error:
            raise DeviceError(self.name, f"{type(error).__name__}: {error}") from error
        return {name: np.asarray(result[name]) for name in outputs}

    async def is_ready(self) -> bool:
        return True


class LocalDevice(Device):
    """A denoiser evaluated in-process: an ONNX Runtime session, a torch module or a function."""

    @classmethod
    def from_function(cls, name: str, fn: Callable[..., Any], **kwargs) -> LocalDevice:
        """`fn(sample, timestep, *conditioning)` on numpy arrays (e.g. `SimDiffusion.denoise`),
        conditioning in the order the pipeline gives it."""

        def run(**inputs):
            sample, timestep = inputs.pop(tensors.SAMPLE), inputs.pop(tensors.TIMESTEP)
            return {tensors.OUT_SAMPLE: fn(sample, timestep, *inputs.values())}

        return cls(LocalModel(name, run), **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, *, threads: int = 1, name: str | None = None,
                  **kwargs) -> LocalDevice:
        """An ONNX Runtime CPU session on `path` with `threads` intra-op threads."""
        session = ort_session(path, threads)
        name = name or Path(path).stem
        dtypes = {i.name: tensors.dtype_of_onnx(i.type).name for i in session.get_inputs()}
        io = DenoiserIO.from_inputs(name, dtypes, session_output_names(session))

        def run(**inputs):
            return dict(zip(session_output_names(session), session.run(None, inputs)))

        return cls(LocalModel(name, run), io=io, **kwargs)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, name: str = "torch",
                   **kwargs) -> LocalDevice:
        """A diffusers UNet module: `module(sample, timestep, encoder_hidden_states,
        added_cond_kwargs=...)` (SDXL's text_embeds / time_ids go in added_cond_kwargs)."""
        import torch

        @torch.no_grad()
        def run(**inputs):
            given = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
            sample, timestep = given.pop(tensors.SAMPLE), given.pop(tensors.TIMESTEP)
            context = given.pop(tensors.ENCODER_HIDDEN_STATES)
            extra = {"added_cond_kwargs": given} if given else {}
            output = module(sample, timestep, context, **extra)
            return {tensors.OUT_SAMPLE: getattr(output, "sample", output).numpy()}

        return cls(LocalModel(name, run), **kwargs)


def ort_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"intra-op threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own untyped exceptions
        raise ValueError(f"ONNX Runtime cannot load {path}: {error}; rebuild it with "
                         "`driffusion build-engines --force`") from error


def session_output_names(session) -> list[str]:
    return [output.name for output in session.get_outputs()]
