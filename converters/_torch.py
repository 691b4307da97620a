"""The PyTorch side of a conversion: ``torch_impl.interchange``, imported only when a conversion
touches PyTorch (a Flax-only install converts files without it)."""

from __future__ import annotations

from torch_impl.interchange import (
    assign,
    dtype_name,
    layer_kind,
    model_state,
    numpy_to_tensor,
    tensor_to_numpy,
)

__all__ = ["assign", "dtype_name", "layer_kind", "model_state", "numpy_to_tensor", "tensor_to_numpy"]
