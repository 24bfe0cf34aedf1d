"""Shared-memory transport to Triton models on the sampler's own host (system or CUDA regions).

Over gRPC or HTTP every device call copies the latent into a message and back out of one; at
video sizes (a 720p Wan latent is about 20 MB in float32) that is most of a round's transport.
Triton's shared-memory protocol lets a client on the server's host put the inputs in a region
both processes map and ask for the outputs in another: the request then carries only the
regions' names, offsets and sizes. `SharedMemoryModel` wraps a `TritonModel` or
`TritonHttpModel` that way:

- each call in flight holds a *slot*: one region for its inputs (written one after another) and
  one per requested output, sized as the largest input (a denoiser's `out_sample` has its
  `sample`'s shape; a model whose output is larger fails with Triton's size error);
- slots are made and registered on first need, grow (to the next power of two) when a larger
  call comes, and are reused; `close()` unregisters and frees them all;
- with `fallback=True` a server that refuses registration (its shared-memory API closed, as
  `serve` leaves it unless `--allow-shared-memory`), or rejects the first call by region (a
  request guard in front of it), is called over the wrapped transport from then on; a server
  that cannot be reached is an error (the device is lost), not a refusal;
- a failed call drops the slot's registration, so a restarted server gets it anew.

System regions live in /dev/shm (tritonclient.utils.shared_memory). CUDA regions
(tritonclient.utils.cuda_shared_memory, which needs `cuda-python` and a GPU) hold the tensors
in GPU memory that Triton reads through a CUDA IPC handle.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from runtime.device import DeviceError
from runtime.triton_http import HttpError
from runtime.triton_wire import numpy_dtype, triton_datatype

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MIN_REGION_BYTES = 1 << 16
SHARED_MEMORY_MODES = ("auto", "system", "cuda", "off")
_names = itertools.count()
log = logging.getLogger(__name__)


def is_loopback(endpoint: str) -> bool:
    """True for an endpoint on this host (`127.0.0.1:P`, `localhost:P`, `http://[::1]:P`...)."""
    host = endpoint.removeprefix("http://").rpartition(":")[0]
    return host in LOOPBACK_HOSTS


def region_bytes(needed: int) -> int:
    """The size a region for `needed` bytes gets: the next power of two, at least 64 KiB."""
    return max(MIN_REGION_BYTES, 1 << max(0, needed - 1).bit_length())


class Region(Protocol):
    """One shared-memory region this process made."""

    name: str
    byte_size: int

    def write(self, arrays: Sequence[np.ndarray]) -> None: ...  # one after another from 0

    def read(self, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray: ...  # a copy

    def registration(self) -> dict[str, Any]: ...  # what register() needs besides the name

    def destroy(self) -> None: ...


class SystemRegion:
    """A system shared-memory region (a /dev/shm file) named `name`, key `/name`."""

    kind = "system"

    def __init__(self, name: str, byte_size: int) -> None:
        from tritonclient.utils import shared_memory

        self.name = name
        self.key = f"/{name}"
        self.byte_size = byte_size
        self.handle = shared_memory.create_shared_memory_region(name, self.key, byte_size,
                                                                create_only=True)

    def write(self, arrays: Sequence[np.ndarray]) -> None:
        from tritonclient.utils import shared_memory

        shared_memory.set_shared_memory_region(self.handle, list(arrays))

    def read(self, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        from tritonclient.utils import shared_memory

        view = shared_memory.get_contents_as_numpy(self.handle, dtype, list(shape))
        value = view.copy()  # the slot is reused; the view would also block freeing the region
        del view
        return value

    def registration(self) -> dict[str, Any]:
        return {"key": self.key}

    def destroy(self) -> None:
        from tritonclient.utils import shared_memory

        shared_memory.destroy_shared_memory_region(self.handle)


class CudaRegion:
    """A CUDA shared-memory region on GPU `device_id` (needs cuda-python and a GPU)."""

    kind = "cuda"

    def __init__(self, name: str, byte_size: int, device_id: int = 0) -> None:
        from tritonclient.utils import cuda_shared_memory

        self.name = name
        self.byte_size = byte_size
        self.device_id = device_id
        self.handle = cuda_shared_memory.create_shared_memory_region(name, byte_size, device_id)

    def write(self, arrays: Sequence[np.ndarray]) -> None:
        from tritonclient.utils import cuda_shared_memory

        cuda_shared_memory.set_shared_memory_region(self.handle, list(arrays))

    def read(self, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        from tritonclient.utils import cuda_shared_memory

        return cuda_shared_memory.get_contents_as_numpy(self.handle, dtype, list(shape))

    def registration(self) -> dict[str, Any]:
        from tritonclient.utils import cuda_shared_memory

        return {"raw_handle": cuda_shared_memory.get_raw_handle(self.handle),
                "device_id": self.device_id}

    def destroy(self) -> None:
        from tritonclient.utils import cuda_shared_memory

        cuda_shared_memory.destroy_shared_memory_region(self.handle)


class RegisterError(RuntimeError):
    """The server refused to register a region (its shared-memory API closed, or no access)."""


# a gRPC refusal by a restricted API comes as UNAVAILABLE, as a server that is down does
CONNECTION_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
RESTRICTED = "restricted"


class Slot:
    """The regions of one call in flight: its inputs', and one per output name."""

    def __init__(self, inputs: Region, outputs: dict[str, Region]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.registered = False

    @property
    def regions(self) -> list[Region]:
        return [self.inputs, *self.outputs.values()]

    def fits(self, input_bytes: int, output_bytes: int, outputs: Sequence[str]) -> bool:
        return (self.inputs.byte_size >= input_bytes and set(outputs) == set(self.outputs)
                and all(region.byte_size >= output_bytes for region in self.outputs.values()))


class SharedMemoryModel:
    """A Triton model client on this host whose tensors travel through shared memory.

    `model` is a `TritonModel` (gRPC) or `TritonHttpModel`; `kind` is "system" or "cuda" (GPU
    `device_id`). With `fallback`, a server that refuses registration is called over `model`'s
    own transport instead (logged once).
    """

    def __init__(self, model, *, kind: str = "system", device_id: int = 0,
                 fallback: bool = True) -> None:
        if kind not in ("system", "cuda"):
            raise ValueError(f"shared memory kind must be 'system' or 'cuda'; got {kind!r}")
        self.model = model
        self.name = model.name
        self.kind = kind
        self.device_id = device_id
        self.fallback = fallback
        self.refused: str | None = None  # why the server refused shared memory, once it has
        self.proven = False  # a call by region has succeeded
        self._free: list[Slot] = []
        self._slots: list[Slot] = []

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if self.refused is not None or any(value.dtype == np.object_ for value in
                                           inputs.values()):
            return await self.model.infer(inputs, outputs, timeout_s)
        arrays = [np.ascontiguousarray(value) for value in inputs.values()]
        input_bytes = sum(value.nbytes for value in arrays)
        output_bytes = max((value.nbytes for value in arrays), default=0)
        try:
            slot = await self._take_slot(input_bytes, output_bytes, outputs)
        except RegisterError as error:
            if not self.fallback:
                raise DeviceError(self.name, str(error), lost=False) from error
            return await self._refused(error, inputs, outputs, timeout_s)
        try:
            slot.inputs.write(arrays)
            described = await self._infer_by_region(dict(zip(inputs, arrays)), slot, outputs,
                                                    timeout_s)
            answer = {name: slot.outputs[name].read(dtype, shape)
                      for name, (dtype, shape) in described.items()}
        except DeviceError as error:
            slot.registered = False  # a restarted server has lost it: register it again
            if self.fallback and not self.proven and not error.lost:
                return await self._refused(error, inputs, outputs, timeout_s)
            raise
        finally:
            await self._release(slot)
        self.proven = True
        return answer

    async def _refused(self, error: Exception, inputs: Mapping[str, np.ndarray],
                       outputs: Sequence[str], timeout_s: float | None) -> dict[str, np.ndarray]:
        """Call over the network from now on (the server refused shared memory)."""
        self.refused = str(error)
        log.info("%s: shared memory refused (%s); calling over the network", self.name, error)
        return await self.model.infer(inputs, outputs, timeout_s)

    async def _take_slot(self, input_bytes: int, output_bytes: int,
                         outputs: Sequence[str]) -> Slot:
        slot = next((s for s in self._free if s.fits(input_bytes, output_bytes, outputs)), None)
        if slot is None:
            if self._free:  # too small: replace the smallest free one
                await self._drop(min(self._free, key=lambda s: s.inputs.byte_size))
            slot = Slot(self._region(region_bytes(input_bytes)),
                        {name: self._region(region_bytes(output_bytes)) for name in outputs})
            self._slots.append(slot)
        else:
            self._free.remove(slot)
        if not slot.registered:
            try:
                for region in slot.regions:
                    await self._register(region)
            except (RegisterError, DeviceError):
                await self._drop(slot)
                raise
            slot.registered = True
        return slot

    def _region(self, byte_size: int) -> Region:
        name = f"driffusion-{os.getpid()}-{next(_names)}"
        if self.kind == "cuda":
            return CudaRegion(name, byte_size, self.device_id)
        return SystemRegion(name, byte_size)

    async def _release(self, slot: Slot) -> None:
        """A call's slot back for the next call, or freed once the server refused them."""
        if self.refused is None:
            self._free.append(slot)
        else:
            await self._drop(slot)

    async def _drop(self, slot: Slot) -> None:
        """Unregister (best effort) and free a slot's regions."""
        if slot in self._free:
            self._free.remove(slot)
        self._slots.remove(slot)
        for region in slot.regions:
            if slot.registered:
                await self._unregister(region)
            region.destroy()

    async def close(self) -> None:
        """Unregister and free every region (calls in flight must have ended)."""
        for slot in list(self._slots):
            await self._drop(slot)

    async def is_ready(self) -> bool:
        return await self.model.is_ready()

    # -- the two transports' shared-memory calls ---------------------------------------------

    @property
    def _http(self):
        return getattr(self.model, "http", None)

    async def _register(self, region: Region) -> None:
        from tritonclient.utils import InferenceServerException

        extra = region.registration()
        try:
            if self._http is not None:
                await self._http.post_json(
                    f"/v2/{region.kind}sharedmemory/region/{region.name}/register",
                    {**_http_registration(extra), "byte_size": region.byte_size}, 10.0)
            elif region.kind == "cuda":
                await self.model.client.register_cuda_shared_memory(
                    region.name, extra["raw_handle"], extra["device_id"], region.byte_size)
            else:
                await self.model.client.register_system_shared_memory(
                    region.name, extra["key"], region.byte_size)
        except InferenceServerException as error:
            if error.status() in CONNECTION_STATUSES and RESTRICTED not in str(error):
                raise DeviceError(self.name, f"registering {region.name}: {error}") from error
            raise RegisterError(f"registering {region.kind} shared memory region "
                                f"{region.name}: {error}") from error
        except HttpError as error:
            raise RegisterError(f"registering {region.kind} shared memory region "
                                f"{region.name}: {error}") from error
        except (OSError, EOFError, asyncio.TimeoutError) as error:
            raise DeviceError(self.name, f"registering {region.name}: {error!r}") from error

    async def _unregister(self, region: Region) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            if self._http is not None:
                await self._http.post_json(
                    f"/v2/{region.kind}sharedmemory/region/{region.name}/unregister", {}, 10.0)
            elif region.kind == "cuda":
                await self.model.client.unregister_cuda_shared_memory(region.name)
            else:
                await self.model.client.unregister_system_shared_memory(region.name)
        except (InferenceServerException, HttpError, OSError, EOFError,
                asyncio.TimeoutError) as error:
            log.info("%s: unregistering %s: %s", self.name, region.name, error)

    async def _infer_by_region(self, inputs: Mapping[str, np.ndarray], slot: Slot,
                               outputs: Sequence[str], timeout_s: float | None
                               ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Infer with inputs and outputs in `slot`; (dtype, shape) of each output."""
        placed, offset = [], 0
        for name, value in inputs.items():
            placed.append((name, value, offset))
            offset += value.nbytes
        if self._http is not None:
            return await self._infer_http(placed, slot, outputs, timeout_s)
        return await self._infer_grpc(placed, slot, outputs, timeout_s)

    async def _infer_grpc(self, placed, slot: Slot, outputs: Sequence[str],
                          timeout_s: float | None):
        import grpc
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name=self.model.model_name)
        for name, value, offset in placed:
            tensor = request.inputs.add(name=name, datatype=triton_datatype(value.dtype),
                                        shape=value.shape)
            _grpc_region(tensor.parameters, slot.inputs.name, value.nbytes, offset)
        for name in outputs:
            region = slot.outputs[name]
            _grpc_region(request.outputs.add(name=name).parameters, region.name,
                         region.byte_size, 0)
        try:
            response = await self.model.stub.ModelInfer(request, timeout=timeout_s)
        except grpc.RpcError as error:
            lost = error.code() != grpc.StatusCode.INVALID_ARGUMENT
            raise DeviceError(self.name, error.details() or str(error), lost=lost) from error
        return _described(self.name, ((o.name, o.datatype, tuple(o.shape))
                                      for o in response.outputs), outputs)

    async def _infer_http(self, placed, slot: Slot, outputs: Sequence[str],
                          timeout_s: float | None):
        body = {
            "inputs": [{"name": name, "shape": list(value.shape),
                        "datatype": triton_datatype(value.dtype),
                        "parameters": _http_region(slot.inputs.name, value.nbytes, offset)}
                       for name, value, offset in placed],
            "outputs": [{"name": name, "parameters": _http_region(
                slot.outputs[name].name, slot.outputs[name].byte_size, 0)} for name in outputs],
        }
        try:
            answer = await self._http.post_json(f"/v2/models/{self.model.model_name}/infer",
                                                body, timeout_s)
        except HttpError as error:
            raise DeviceError(self.name, error.message, lost=error.status != 400) from error
        except asyncio.TimeoutError as error:
            raise DeviceError(self.name, f"no answer within {timeout_s} s") from error
        except (OSError, EOFError) as error:
            raise DeviceError(self.name, f"connection failed: {error!r}") from error
        return _described(self.name, ((o["name"], o["datatype"], tuple(o["shape"]))
                                      for o in answer.get("outputs", [])), outputs)


def _grpc_region(parameters, region: str, byte_size: int, offset: int) -> None:
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def _http_region(region: str, byte_size: int, offset: int) -> dict[str, Any]:
    parameters = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    return parameters | ({"shared_memory_offset": offset} if offset else {})


def _http_registration(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body fields of an HTTP register call (a CUDA handle as {"b64": ...})."""
    if "raw_handle" in extra:
        handle = extra["raw_handle"]
        return {"raw_handle": {"b64": handle.decode() if isinstance(handle, bytes) else handle},
                "device_id": extra["device_id"]}
    return {"key": extra["key"], "offset": 0}


def _described(model: str, answered, names: Sequence[str]):
    """(dtype, shape) by output name of an answer's output descriptions (DeviceError if one is
    missing or not numeric)."""
    found = {name: (datatype, shape) for name, datatype, shape in answered}
    described = {}
    for name in names:
        if name not in found:
            raise DeviceError(model, f"response has no output {name!r}", lost=False)
        dtype = numpy_dtype(found[name][0])
        if dtype is None:
            raise DeviceError(model, f"output {name!r} has non-numeric type {found[name][0]}",
                              lost=False)
        described[name] = (dtype, found[name][1])
    return described
