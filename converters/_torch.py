"""The PyTorch side of a conversion: layer kinds from module types, tensors <-> numpy, loading.

Imported only when a conversion touches PyTorch. The torch side needs no walker of its own:
``state_dict()`` names and layouts *are* the interchange format; what it adds is the kind of
each layer (from ``named_modules()`` types, never from a tensor's name or rank), a bit-exact
bridge to numpy (bfloat16 through a ``uint16`` view, never through float32), and a loader that
validates everything before it writes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError
from .layout import BUFFERS_WITHOUT_FLAX_TWIN

__all__ = [
    "TorchState",
    "assign_torch",
    "numpy_to_tensor",
    "tensor_to_numpy",
    "torch_dtype_name",
    "torch_layer_kind",
    "torch_state",
]

_KIND_TYPES: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str], ...] = (
    (nn.Linear, "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    (nn.LayerNorm, "layernorm"),
    (nn.GroupNorm, "groupnorm"),
    (nn.RMSNorm, "rmsnorm"),
    (nn.Embedding, "embedding"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batchnorm"),
)

_TORCH_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float64: "F64",
}


def torch_layer_kind(module: nn.Module) -> str | None:
    """The layout kind of ``module`` (``'linear'``, ``'conv'``, ...), or None for other types.

    Transposed convolutions are deliberately absent: their weight layout differs.

    Example
    -------
    >>> torch_layer_kind(nn.Conv2d(1, 2, 3)), torch_layer_kind(nn.ConvTranspose2d(1, 2, 3))
    ('conv', None)
    """
    for types, kind in _KIND_TYPES:
        if isinstance(module, types):
            return kind
    return None


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"torch dtype {dtype} has no safetensors equivalent") from None


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array with ``tensor``'s bits and dtype (bf16 as ml_dtypes.bfloat16).

    Shares memory with a contiguous CPU tensor; bfloat16 goes through a ``uint16`` view, never
    through float32.
    """
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`tensor_to_numpy`, bit-exact (bf16 through a ``uint16`` view)."""
    array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    if not array.flags.writeable:  # torch.from_numpy warns on read-only memory
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@dataclass
class TorchState:
    """A torch model seen as the interchange format.

    ``tensors`` holds every ``state_dict()`` entry; ``kinds`` maps each module owning tensors to
    its layout kind; ``unknown`` maps modules owning tensors of an unknown type to the type's
    name; ``aliases`` maps a tied key to the first key sharing its storage; ``no_flax_twin`` are
    buffers Flax has no variable for (``num_batches_tracked``).
    """

    tensors: dict[str, torch.Tensor]
    kinds: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    no_flax_twin: list[str] = field(default_factory=list)


def torch_state(model: nn.Module) -> TorchState:
    """Walk ``model``: its ``state_dict()``, layer kinds, tied aliases and Flax-less buffers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tensors = dict(model.state_dict())
    state = TorchState(tensors)
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if not own:
            continue
        kind = torch_layer_kind(module)
        if kind is None:
            state.unknown[name] = type(module).__name__
        else:
            state.kinds[name] = kind
            for leaf in BUFFERS_WITHOUT_FLAX_TWIN.get(kind, ()):
                key = f"{name}.{leaf}" if name else leaf
                if key in tensors:
                    state.no_flax_twin.append(key)
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if identity in seen:
            state.aliases[key] = seen[identity]
        else:
            seen[identity] = key
    return state


def assign_torch(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy validated ``arrays`` (torch names, layouts and dtypes) into ``model`` in place.

    The caller has checked every key, shape and dtype; this only writes. Tied aliases are
    written once.
    """
    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, array in arrays.items():
            target = tensors[key]
            value = numpy_to_tensor(array)
            if value.shape != target.shape or value.dtype != target.dtype:  # pragma: no cover
                raise CheckpointError(
                    f"internal: {key!r} was not validated ({value.dtype} {tuple(value.shape)})"
                )
            target.copy_(value)
