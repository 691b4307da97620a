"""The Flax NNX side of the interchange format: layer kinds from module types, a model's flat state
in PyTorch names and layouts, and the assignment into it. The twin of ``torch_impl.interchange``.

:func:`torch_entries` puts every variable of a layer of known kind under the name ``state_dict()``
gives the PyTorch twin (``encoder.0.weight``), with the layout rules of :mod:`twinformat.kinds`;
:func:`model_state` describes the model by shapes alone (no array is re-laid out to plan).

Example
-------
>>> from flax import nnx
>>> state = model_state(nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0))))
>>> state.specs, state.kinds
({'layers.0.weight': ('F32', (2, 3)), 'layers.0.bias': ('F32', (2,))}, {'layers.0': 'linear'})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinformat.dtypes import dtype_name
from twinformat.errors import CheckpointError, LayoutError
from twinformat.report import KeyReport
from twinformat.kinds import (
    flax_to_torch_shape,
    flax_to_torch_view,
    get_kind,
    torch_name,
    torch_to_flax,
    torch_to_flax_view,
)
from twinformat.names import dotted
from twinformat.plan import plan_load
from twinformat.state import FlatState

from .graph import named_modules
from .lora import LoRA

__all__ = ["KIND_OF_TYPE", "TorchEntry", "assign", "layer_kind", "model_state", "torch_entries"]

# The type table: module type (or a predicate on the module) -> layer kind of twinformat.kinds.
# First match wins; subclasses count as their base (nnx.LoRALinear is an nnx.Linear).
# nnx.ConvTranspose is not an nnx.Conv and has no kind: its PyTorch twin stores (in, out, *k).
KIND_OF_TYPE: list[
    tuple[type[nnx.Module] | tuple[type[nnx.Module], ...] | Callable[[nnx.Module], bool], str]
] = [
    (nnx.Linear, "linear"),
    (nnx.Conv, "conv"),
    (nnx.LayerNorm, "layer_norm"),
    (nnx.GroupNorm, "group_norm"),
    (nnx.RMSNorm, "rms_norm"),
    (nnx.Embed, "embedding"),
    (nnx.BatchNorm, "batch_norm"),
    (LoRA, "lora"),
    # flax_impl.models appends the lines of its own modules (weight norm, speech models' own
    # tensors) where it defines them: the bridge does not import the models built on it.
]


def layer_kind(module: object) -> str | None:
    """The layer kind of ``module`` (a key of ``twinformat.kinds.KINDS``), or None.

    'linear' (nnx.Linear), 'conv' (nnx.Conv), 'layer_norm', 'group_norm', 'rms_norm',
    'embedding' (nnx.Embed), 'batch_norm' (nnx.BatchNorm), ... Decided by the module's type, never
    by a variable's name or shape.

    Example
    -------
    >>> layer_kind(nnx.Embed(10, 4, rngs=nnx.Rngs(0))), layer_kind(nnx.Dropout(0.1))
    ('embedding', None)
    """
    for match, kind in KIND_OF_TYPE:
        if isinstance(match, (type, tuple)):
            if isinstance(module, match):
                return kind
        elif match(module):  # type: ignore[arg-type]  # a predicate on any module
            return kind
    return None


@dataclass(frozen=True)
class TorchEntry:
    """One Flax variable and its PyTorch name."""

    key: str
    path: tuple[Any, ...]
    kind: str
    flax_name: str
    variable: nnx.Variable

    @property
    def torch_name(self) -> str:
        """The PyTorch name of the variable within its layer (``'weight'``)."""
        return torch_name(self.kind, self.flax_name)


def torch_entries(module: nnx.Module, *, strict: bool) -> list[TorchEntry]:
    """Every exportable variable of ``module`` with its PyTorch name, in ``state_dict`` order.

    The lazy counterpart of :func:`torch_style_state_dict`: each :class:`TorchEntry` holds the
    variable itself, so a caller (the sharded loader, the saver) converts only what it needs.
    ``strict`` raises on variables in modules of no supported layer kind.

    Example
    -------
    >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> [(e.key, e.kind, e.flax_name) for e in torch_entries(layer, strict=True)]
    [('weight', 'linear', 'kernel'), ('bias', 'linear', 'bias')]
    """
    order = {}
    kinds = {}
    for index, (name, submodule) in enumerate(named_modules(module)):
        order[name] = index
        kinds[name] = layer_kind(submodule)
    entries, unsupported = [], []
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        if isinstance(variable, nnx.RngState):
            continue
        owner, flax_name = dotted(path[:-1]), str(path[-1])
        kind = kinds.get(owner)
        if kind is None:
            unsupported.append(f"{dotted(path)} ({type(variable).__name__})")
            continue
        try:
            torch_param = torch_name(kind, flax_name)
        except LayoutError:
            unsupported.append(f"{dotted(path)} ({type(variable).__name__} of a {kind} layer)")
            continue
        key = f"{owner}.{torch_param}" if owner else torch_param
        entries.append(TorchEntry(key, tuple(path), kind, flax_name, variable))
    if unsupported and strict:
        raise CheckpointError(
            f"{len(unsupported)} variable(s) have no PyTorch name: {unsupported}. Only the "
            f"variables of layers whose type has a kind in flax_impl.interchange.KIND_OF_TYPE "
            f"({', '.join(_type_names())}) have one; pass strict=False to leave the others out"
        )

    def torch_order(entry: TorchEntry) -> tuple[int, int]:
        # PyTorch's state_dict order: layers in module order, tensors in the kind table's order.
        params = [param.torch for param in get_kind(entry.kind).params]
        return order[dotted(entry.path[:-1])], params.index(entry.torch_name)

    return sorted(entries, key=torch_order)


def _torch_arrays(entries: list[TorchEntry]) -> dict[str, np.ndarray]:
    """``{torch key: C-contiguous array in torch layout}``, bits and dtype unchanged."""
    out = {}
    for entry in entries:
        _, array = flax_to_torch_view(entry.kind, entry.flax_name, np.asarray(entry.variable.get_value()))
        out[entry.key] = np.ascontiguousarray(array)
    return out


def _torch_shape(entry: TorchEntry) -> tuple[int, ...]:
    """The shape the PyTorch twin gives this variable (layout's rule, no data touched)."""
    return flax_to_torch_shape(entry.kind, entry.flax_name, tuple(np.shape(entry.variable.get_value())))[1]


def _plan_load(
    module: nnx.Module, arrays: Mapping[str, Any], *, strict: bool
) -> tuple[KeyReport, list[tuple[nnx.Variable, np.ndarray]]]:
    """Check ``arrays`` (PyTorch names and layouts) against ``module`` with the one planner
    (:func:`twinformat.plan.plan_load`) and convert them, assigning nothing.

    Values take the target variable's dtype (bit-exact when the dtypes match; a cast is noted).
    Returns the key report and ``(variable, value in Flax layout and the variable's dtype)`` for
    every loadable key.
    """
    torch_entries(module, strict=strict)  # strict: refuse variables that have no PyTorch name
    target = model_state(module)
    source = FlatState(
        {key: (dtype_name(np.asarray(a).dtype), tuple(np.shape(a))) for key, a in arrays.items()},
        framework="dict",
    )
    plan = plan_load(source, target, strict=False)
    entries = {entry.key: entry for entry in torch_entries(module, strict=False)}
    assignments = []
    for key, source_key in plan.reads.items():
        entry = entries[key]
        dtype = np.dtype(entry.variable.get_value().dtype)
        _, value = torch_to_flax_view(entry.kind, entry.torch_name, np.asarray(arrays[source_key]))
        assignments.append((entry.variable, value.astype(dtype, copy=False)))
    return plan.report, assignments


def _assign(assignments: list[tuple[nnx.Variable, np.ndarray]]) -> None:
    """Set each variable to its new value, on the devices and sharding of its current value."""
    for variable, value in assignments:
        # On CPU, jax may adopt a numpy buffer without copying; a buffer borrowed from a torch
        # tensor (or a memory-mapped file) would then change under the Flax model. Own it.
        value = np.array(value, copy=True, order="C")
        sharding = getattr(variable.get_value(), "sharding", None)
        new = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        variable.set_value(new)


def model_state(model: nnx.Module) -> FlatState:
    """``model`` as a :class:`~twinformat.state.FlatState`: every variable of a layer of known
    kind under its PyTorch name, with its PyTorch-layout shape (computed, not transposed), the
    layer kinds, and the modules that own variables but have no known kind."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected a flax.nnx.Module, got {type(model).__name__}")
    entries = {entry.key: entry for entry in torch_entries(model, strict=False)}
    state = FlatState(
        {
            key: (dtype_name(np.dtype(e.variable.get_value().dtype)), _torch_shape(e))
            for key, e in entries.items()
        },
        framework="flax",
    )
    # Non-parameter variables (BatchNorm's running statistics) are PyTorch buffers.
    state.buffers = {key for key, e in entries.items() if not isinstance(e.variable, nnx.Param)}
    for name, module in named_modules(model):
        kind = layer_kind(module)
        if kind is not None:
            state.kinds[name] = kind
        elif any(
            isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState) for v in vars(module).values()
        ):
            state.unknown[name] = type(module).__name__

    def read(key: str) -> np.ndarray:
        entry = entries[key]
        return flax_to_torch_view(entry.kind, entry.flax_name, np.asarray(entry.variable.get_value()))[1]

    state.read = read
    return state


def assign(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write validated PyTorch-named, PyTorch-layout ``arrays`` into ``model`` (all checked by
    the caller); each array is re-laid out once, to the Flax layout, on its way in."""
    entries = {entry.key: entry for entry in torch_entries(model, strict=False)}
    assignments = []
    for key, array in arrays.items():
        entry = entries[key]
        dtype = np.dtype(entry.variable.get_value().dtype)
        value = torch_to_flax(entry.kind, entry.torch_name, np.asarray(array))[1]
        assignments.append((entry.variable, value.astype(dtype, copy=False)))
    _assign(assignments)


def _type_names() -> list[str]:
    """The type names of :data:`KIND_OF_TYPE` (predicates by their function name), for errors."""
    names: list[str] = []
    for match, _ in KIND_OF_TYPE:
        types = match if isinstance(match, tuple) else (match,)
        names.extend(getattr(t, "__qualname__", repr(t)) for t in types)
    return names
