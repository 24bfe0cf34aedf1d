"""Triton's tensor wire format: datatype names of numpy dtypes and back, raw input bytes.

Shared by the gRPC and HTTP clients (runtime/triton_clients.py, runtime/triton_http.py).
"""
from __future__ import annotations

from functools import cache

import numpy as np


def raw_tensor_bytes(value: np.ndarray) -> bytes:
    """The wire bytes of one input: the array's memory, or length-prefixed strings for BYTES."""
    if value.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        return serialize_byte_tensor(value).item()  # one bytes object: the length-prefixed items
    return value.tobytes()


@cache
def triton_datatype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(dtype)
    if datatype is None:
        raise ValueError(f"input dtype {dtype} is not supported: send numeric arrays or bytes")
    return datatype


@cache
def numpy_dtype(datatype: str) -> np.dtype | None:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    return np.dtype(dtype) if dtype not in (None, np.object_) else None
