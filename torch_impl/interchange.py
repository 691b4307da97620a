"""The PyTorch side of the interchange format: layer kinds from module types, tensors <-> numpy,
a model's flat state and the assignment into it.

``state_dict()`` names and layouts *are* the interchange format; what this bridge adds is the
kind of each layer (from ``named_modules()`` types, never from a tensor's name or rank), a
bit-exact bridge to numpy (bfloat16 through a ``uint16`` view, never through float32), and an
assignment that writes only what the caller validated. Its twin is ``flax_impl.interchange``.

Example
-------
>>> state = model_state(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
>>> state.specs, state.kinds
({'0.weight': ('F32', (2, 3)), '0.bias': ('F32', (2,)), '1.weight': ('F32', (2,)), '1.bias': ('F32', (2,))}, {'0': 'linear', '1': 'layer_norm'})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from twinformat.errors import CheckpointError
from twinformat.kinds import WEIGHT_NORM_SPELLINGS, get_kind
from twinformat.state import FlatState

from .lora import LoRA

__all__ = [
    "KIND_OF_TYPE",
    "assign",
    "dtype_name",
    "layer_kind",
    "model_state",
    "numpy_to_tensor",
    "tensor_to_numpy",
]

# The type table: module type (or a predicate on the module) -> layer kind of twinformat.kinds.
# First match wins. Transposed convolutions are deliberately absent: their weight is (in, out, *k).
KIND_OF_TYPE: list[
    tuple[type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool], str]
] = [
    (nn.Linear, "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.RMSNorm, "rms_norm"),
    (nn.Embedding, "embedding"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batch_norm"),
    (LoRA, "lora"),
    (lambda m: _is_weight_norm(m), "conv_weight_norm"),
    (lambda m: _is_rms_norm(m), "rms_norm"),
    (lambda m: "masked_spec_embed" in m._parameters, "masked_spec_embed"),
    (lambda m: "gru_rel_pos_const" in m._parameters, "gated_relative_position"),
]


def _is_rms_norm(module: nn.Module) -> bool:
    """True for an RMS norm written as its own class, as every transformers LLM family does
    (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``Gemma3RMSNorm``, ...: not ``nn.RMSNorm``): a leaf module
    whose only tensor is a 1-d ``weight``, with the epsilon transformers names ``variance_epsilon``
    (Gemma: ``eps``). Its layout is the identity either way (``weight`` <-> ``scale``), so the
    rule can only rename, never re-lay out, a tensor."""
    if next(module.children(), None) is not None or list(module._buffers):
        return False
    params = module._parameters
    if set(params) != {"weight"} or params["weight"] is None or params["weight"].ndim != 1:
        return False
    return isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)


def _is_weight_norm(module: nn.Module) -> bool:
    """True for the ``ParametrizationList`` that ``parametrizations.weight_norm`` puts at
    ``<layer>.parametrizations.weight`` (it holds ``original0``/``original1``)."""
    return isinstance(module, parametrize.ParametrizationList) and any(
        isinstance(p, _WeightNorm) for p in module
    )


# torch.nn.utils.weight_norm (deprecated, still in transformers 4.x speech models built with an older
# torch) keeps g and v on the conv itself as ``weight_g``/``weight_v``; the bridge presents them in
# the spelling of torch.nn.utils.parametrizations.weight_norm (``parametrizations.weight.original0/1``,
# the conv_weight_norm kind; twinformat.kinds.WEIGHT_NORM_SPELLINGS), so both spellings convert,
# and assigns back to the old names.


def _legacy_weight_norm_hook(module: nn.Module) -> object | None:
    """The ``torch.nn.utils.weight_norm`` hook of ``module`` on its ``weight``, or None."""
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook
    return None


def _legacy_weight_norm_keys(model: nn.Module) -> dict[str, str]:
    """``{'<conv>.weight_g': '<conv>.parametrizations.weight.original0', ...}`` for every module
    of ``model`` under the old ``torch.nn.utils.weight_norm``."""
    renamed = {}
    for name, module in model.named_modules():
        if _legacy_weight_norm_hook(module) is not None:
            prefix = f"{name}." if name else ""
            renamed.update({prefix + old: prefix + new for old, new in WEIGHT_NORM_SPELLINGS.items()})
    return renamed


_DTYPES = {
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


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind of ``module`` (``'linear'``, ``'conv'``, ...), or None for other types.

    Example
    -------
    >>> layer_kind(nn.Conv2d(1, 2, 3)), layer_kind(nn.ConvTranspose2d(1, 2, 3))
    ('conv', None)
    """
    for match, kind in KIND_OF_TYPE:
        if isinstance(match, (type, tuple)):
            if isinstance(module, match):
                return kind
        elif match(module):
            return kind
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    try:
        return _DTYPES[dtype]
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


def model_state(model: nn.Module) -> FlatState:
    """``model`` as a :class:`~twinformat.state.FlatState`: its ``state_dict()`` specs, layer
    kinds, layers of unknown type, and tied aliases; tensors are read on demand."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tensors = dict(model.state_dict())
    legacy = _legacy_weight_norm_keys(model)
    tensors = {legacy.get(key, key): tensor for key, tensor in tensors.items()}
    state = FlatState(
        {key: (dtype_name(t.dtype), tuple(t.shape)) for key, t in tensors.items()}, framework="torch"
    )
    state.buffers = {key for key, _ in model.named_buffers() if key in tensors}
    state.read = lambda key: tensor_to_numpy(tensors[key])
    claimed: set[str] = set()
    for name, module in model.named_modules():
        if _legacy_weight_norm_hook(module) is not None:
            state.kinds[f"{name}.parametrizations.weight" if name else "parametrizations.weight"] = (
                "conv_weight_norm"
            )
            claimed.update(new for new in legacy.values() if new.rpartition(".parametrizations.")[0] == name)
        kind = layer_kind(module)
        if kind is None:
            continue
        state.kinds[name] = kind
        for torch_name in (*(p.torch for p in get_kind(kind).params), *get_kind(kind).torch_only):
            claimed.add(f"{name}.{torch_name}" if name else torch_name)
    owners = dict(model.named_modules())
    for key in tensors:
        if key not in claimed:
            owner = key.rpartition(".")[0]
            state.unknown.setdefault(owner, type(owners.get(owner, model)).__name__)
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


def assign(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy validated ``arrays`` (torch names, layouts and dtypes) into ``model`` in place.

    The caller has checked every key, shape and dtype; this only writes. Tied aliases are
    written once.
    """
    tensors = model.state_dict(keep_vars=True)
    for old, new in _legacy_weight_norm_keys(model).items():
        tensors[new] = tensors.pop(old)
    with torch.no_grad():
        for key, array in arrays.items():
            target = tensors[key]
            value = numpy_to_tensor(array)
            if value.shape != target.shape or value.dtype != target.dtype:  # pragma: no cover
                raise CheckpointError(
                    f"internal: {key!r} was not validated ({value.dtype} {tuple(value.shape)})"
                )
            target.copy_(value)
