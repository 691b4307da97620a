"""Flax NNX modules seen in PyTorch's names and layouts, and the files that hold them.

The one place that knows which NNX module is which layer kind of :data:`converters.layout.KINDS`
(:func:`layer_kind`). :func:`torch_style_state_dict` and :func:`load_torch_style_state_dict` put
every variable of a supported layer under the name and layout ``state_dict()`` gives the PyTorch
twin (``encoder.0.weight``, ``(out, in)``), with the layout rules of :mod:`converters.layout`.
Files are safetensors in the format of :mod:`converters.checkpoint`; reading PyTorch's pickled
``.ckpt``/``.pt`` files needs torch and is the converters' job.

Example
-------
>>> from flax import nnx
>>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
>>> {k: v.shape for k, v in torch_style_state_dict(layer).items()}
{'weight': (2, 3), 'bias': (2,)}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.checkpoint import (
    CheckpointError,
    KeyReport,
    atomic_write,
    compare_keys,
    is_safetensors_path,
    read_safetensors_header,
)
from converters.layout import (
    BUFFERS_WITHOUT_FLAX_TWIN,
    LayoutError,
    flax_to_torch,
    flax_to_torch_shape,
    torch_name,
    torch_to_flax,
)
from converters.naming import dotted

from .graph import named_modules

__all__ = [
    "layer_kind",
    "load_state_dict_file",
    "load_torch_style_state_dict",
    "save_state_dict_file",
    "TorchEntry",
    "torch_entries",
    "torch_style_state_dict",
]

# Subclasses count as their base (nnx.LoRALinear is an nnx.Linear); nnx.ConvTranspose is not an
# nnx.Conv and has no kind: its PyTorch twin stores its weight as (in, out, *k).
_KIND_OF_TYPE: tuple[tuple[type[nnx.Module], str], ...] = (
    (nnx.Linear, "linear"),
    (nnx.Conv, "conv"),
    (nnx.LayerNorm, "layernorm"),
    (nnx.GroupNorm, "groupnorm"),
    (nnx.RMSNorm, "rmsnorm"),
    (nnx.Embed, "embedding"),
    (nnx.BatchNorm, "batchnorm"),
)
# The order of a layer's entries in PyTorch's state_dict.
_TORCH_ORDER = ("weight", "bias", "running_mean", "running_var")


def layer_kind(module: object) -> str | None:
    """The layer kind of ``module`` (a key of ``converters.layout.KINDS``), or None.

    'linear' (nnx.Linear), 'conv' (nnx.Conv), 'layernorm', 'groupnorm', 'rmsnorm',
    'embedding' (nnx.Embed), 'batchnorm' (nnx.BatchNorm). Decided by the module's type, never
    by a variable's name or shape.

    Example
    -------
    >>> layer_kind(nnx.Embed(10, 4, rngs=nnx.Rngs(0))), layer_kind(nnx.Dropout(0.1))
    ('embedding', None)
    """
    for module_type, kind in _KIND_OF_TYPE:
        if isinstance(module, module_type):
            return kind
    return None


def torch_style_state_dict(module: nnx.Module, *, strict: bool = True) -> dict[str, np.ndarray]:
    """Every variable of every supported layer of ``module``, under its PyTorch name and layout.

    Keys are what ``state_dict()`` gives the PyTorch twin (``encoder.0.weight``; a bare layer
    gives ``weight``); values are C-contiguous numpy arrays of the variable's dtype, bit for bit
    (bfloat16 stays ``ml_dtypes.bfloat16``). Linear kernels ``(in, out)`` become ``(out, in)``,
    conv kernels ``(*k, in, out)`` become ``(out, in, *k)``; BatchNorm ``mean``/``var`` become
    ``running_mean``/``running_var``. RNG state (``nnx.RngState``) is not a weight and is never
    exported.

    Arguments
    ---------
    module: nnx.Module
        The model (or a single layer).
    strict: bool
        When True (default), a variable that sits in a module of no supported kind raises
        :class:`~converters.checkpoint.CheckpointError` naming its path; when False, such
        variables are left out.

    Returns
    -------
    dict of str to numpy.ndarray

    Example
    -------
    >>> conv = nnx.Conv(2, 4, kernel_size=(3,), use_bias=False, rngs=nnx.Rngs(0))
    >>> torch_style_state_dict(conv)["weight"].shape   # Flax kernel is (3, 2, 4)
    (4, 2, 3)
    """
    return _torch_arrays(torch_entries(module, strict=strict))


def load_torch_style_state_dict(
    module: nnx.Module, arrays: Mapping[str, Any], *, strict: bool = True
) -> KeyReport:
    """Load PyTorch-named, PyTorch-layout ``arrays`` into the variables of ``module``.

    Every key and shape is checked before anything is assigned, so a refused load leaves the
    model exactly as it was. Values are cast to the target variable's dtype (bit-exact when the
    dtypes match) and keep the variable's current sharding. PyTorch buffers with no Flax twin
    (BatchNorm's ``num_batches_tracked``) are not loaded and are named in ``report.notes``.

    Arguments
    ---------
    module: nnx.Module
        The model to load into (changed in place).
    arrays: mapping of str to array
        ``{torch_name: array}`` as :func:`torch_style_state_dict` returns.
    strict: bool
        When True (default), a variable of the model missing from ``arrays`` is an error.
        Unexpected and mis-shaped keys are errors either way.

    Returns
    -------
    converters.checkpoint.KeyReport
        ``loaded``, ``missing``, ``unexpected``, ``mismatched`` and ``notes``.

    Raises
    ------
    converters.checkpoint.CheckpointError
        Listing the missing (when strict), unexpected and mis-shaped keys.

    Example
    -------
    >>> src, dst = nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    >>> load_torch_style_state_dict(dst, torch_style_state_dict(src)).loaded
    ['weight', 'bias']
    >>> bool((dst.kernel[...] == src.kernel[...]).all())
    True
    """
    report, assignments = _plan_load(module, arrays, strict=strict)
    if report.unexpected or report.mismatched or (strict and report.missing):
        raise CheckpointError(
            "state dict does not fit the model: "
            f"missing keys {report.missing if strict else []}, unexpected keys {report.unexpected}, "
            f"mis-shaped keys {report.mismatched}"
        )
    _assign(assignments)
    return report


def save_state_dict_file(
    arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``arrays`` to the ``.safetensors`` file ``path`` atomically, with ``metadata``.

    Arrays are made C-contiguous first (``safetensors.numpy`` writes wrong values for a
    non-contiguous view). Any other extension raises before anything is written: PyTorch's
    pickled format needs torch.
    """
    if not is_safetensors_path(path):
        raise CheckpointError(
            f"flax_impl writes .safetensors checkpoints only, got {str(path)!r}; "
            "PyTorch's pickled format needs torch (see converters)"
        )
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a ``.safetensors`` file; returns ``(arrays, metadata)``.

    Raises ``FileNotFoundError`` or :class:`~converters.checkpoint.CheckpointError` naming the
    file when it is missing, truncated, not safetensors, or a PyTorch pickle (``.ckpt``/``.pt``:
    convert it with ``converters`` first).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if not is_safetensors_path(path):
        raise CheckpointError(
            f"flax_impl reads .safetensors checkpoints only, got {str(path)!r}; PyTorch's pickled "
            "files (.ckpt, .pt) need torch: convert them with `python -m converters` first"
        )
    _, metadata = read_safetensors_header(path)
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    return arrays, dict(metadata)


@dataclass(frozen=True)
class TorchEntry:
    """One Flax variable and its PyTorch name."""

    key: str
    path: tuple[Any, ...]
    kind: str
    flax_name: str
    variable: nnx.Variable


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
            f"variables of nnx.{', nnx.'.join(t.__name__ for t, _ in _KIND_OF_TYPE)} layers have "
            "one; pass strict=False to leave the others out"
        )

    def torch_order(entry: TorchEntry) -> tuple[int, int]:
        leaf = entry.key.rpartition(".")[2]
        rank = _TORCH_ORDER.index(leaf) if leaf in _TORCH_ORDER else len(_TORCH_ORDER)
        return order[dotted(entry.path[:-1])], rank

    return sorted(entries, key=torch_order)


def _torch_arrays(entries: list[TorchEntry]) -> dict[str, np.ndarray]:
    """``{torch key: C-contiguous array in torch layout}``, bits and dtype unchanged."""
    out = {}
    for entry in entries:
        _, array = flax_to_torch(entry.kind, entry.flax_name, np.asarray(entry.variable.get_value()))
        out[entry.key] = array
    return out


def _torch_shape(entry: TorchEntry) -> tuple[int, ...]:
    """The shape the PyTorch twin gives this variable (layout's rule, no data touched)."""
    return flax_to_torch_shape(entry.kind, entry.flax_name, tuple(np.shape(entry.variable.get_value())))[1]


def _plan_load(
    module: nnx.Module, arrays: Mapping[str, Any], *, strict: bool
) -> tuple[KeyReport, list[tuple[nnx.Variable, np.ndarray]]]:
    """Check ``arrays`` against ``module`` and convert them, assigning nothing.

    Returns the key report and ``(variable, value in Flax layout and the variable's dtype)``
    for every loadable key.
    """
    entries = {entry.key: entry for entry in torch_entries(module, strict=strict)}
    kinds = {name: layer_kind(m) for name, m in named_modules(module)}
    found, notes = {}, []
    for key, array in arrays.items():
        owner, _, leaf = key.rpartition(".")
        if key not in entries and leaf in BUFFERS_WITHOUT_FLAX_TWIN.get(kinds.get(owner) or "", ()):
            notes.append(f"{key}: PyTorch buffer with no Flax twin, not loaded")
            continue
        found[key] = tuple(np.shape(array))
    report = compare_keys(found, {key: _torch_shape(entry) for key, entry in entries.items()})
    report.notes.extend(notes)
    assignments = []
    for key in report.loaded:
        entry = entries[key]
        dtype = np.dtype(entry.variable.get_value().dtype)
        _, value = torch_to_flax(entry.kind, _torch_leaf(key), np.asarray(arrays[key]))
        assignments.append((entry.variable, value.astype(dtype, copy=False)))
    return report, assignments


def _torch_leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _assign(assignments: list[tuple[nnx.Variable, np.ndarray]]) -> None:
    """Set each variable to its new value, on the devices and sharding of its current value."""
    for variable, value in assignments:
        # On CPU, jax may adopt a numpy buffer without copying; a buffer borrowed from a torch
        # tensor (or a memory-mapped file) would then change under the Flax model. Own it.
        value = np.array(value, copy=True)
        sharding = getattr(variable.get_value(), "sharding", None)
        new = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        variable.set_value(new)
