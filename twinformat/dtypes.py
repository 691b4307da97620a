"""Tensor dtypes as safetensors names them, and their numpy twins.

Framework-free. numpy has no bfloat16 or float8; ``ml_dtypes`` (a declared dependency, the
package jax, flax and safetensors use) supplies them, so a bf16 tensor stays bf16 bit for bit.

Example
-------
>>> numpy_dtype("BF16").name, dtype_name(np.float32), nbytes(("F16", (2, 3)))
('bfloat16', 'F32', 12)
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

from .errors import CheckpointError

__all__ = ["DTYPES", "TensorSpec", "dtype_name", "nbytes", "numpy_dtype"]

TensorSpec = tuple[str, tuple[int, ...]]
"""``(safetensors dtype string, shape)`` of one tensor, known before reading it."""

# safetensors dtype string -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("uint8"),
    "I8": np.dtype("int8"),
    "U16": np.dtype("uint16"),
    "I16": np.dtype("int16"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype("uint32"),
    "I32": np.dtype("int32"),
    "F32": np.dtype("float32"),
    "U64": np.dtype("uint64"),
    "I64": np.dtype("int64"),
    "F64": np.dtype("float64"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def numpy_dtype(name: str, *, where: str = "") -> np.dtype:
    """The numpy dtype of a safetensors dtype string (``'BF16'`` -> ``ml_dtypes.bfloat16``).

    ``where`` (e.g. ``"'model.safetensors', tensor 'fc.weight'"``) is named in the error.
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        place = f"{where}: " if where else ""
        raise CheckpointError(
            f"{place}unsupported safetensors dtype {name!r}; supported: {sorted(DTYPES)}"
        ) from None


def dtype_name(dtype: np.dtype | type) -> str:
    """The safetensors dtype string of a numpy dtype (``float32`` -> ``'F32'``)."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise CheckpointError(
            f"dtype {np.dtype(dtype).name!r} cannot be stored in safetensors; "
            f"supported: {sorted(d.name for d in DTYPES.values())}"
        ) from None


def nbytes(spec: TensorSpec) -> int:
    """Bytes of a tensor of ``spec``, from its dtype and shape alone."""
    dtype, shape = spec
    return int(np.prod(_dims(shape), dtype=np.int64)) * numpy_dtype(dtype).itemsize


def _dims(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)
