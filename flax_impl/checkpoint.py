"""Reading and writing state-dict files for Flax NNX models, in PyTorch's names and layouts.

:func:`torch_style_state_dict` and :func:`load_torch_style_state_dict` put every variable of a
layer of known kind (see :mod:`flax_impl.interchange`) under the name and layout ``state_dict()``
gives the PyTorch twin (``encoder.0.weight``, ``(out, in)``). Files are safetensors in the format
of :mod:`twinformat.format`; reading PyTorch's pickled ``.ckpt``/``.pt`` files needs torch and is
the converters' job. The twin of ``torch_impl.checkpoint``.

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
from typing import Any

import numpy as np
from flax import nnx

from twinformat.errors import CheckpointError
from twinformat.format import atomic_write, is_safetensors_path, read_safetensors_header
from twinformat.report import KeyReport

from .interchange import TorchEntry, _assign, _plan_load, _torch_arrays, layer_kind, torch_entries

__all__ = [
    "layer_kind",
    "load_state_dict_file",
    "load_torch_style_state_dict",
    "save_state_dict_file",
    "TorchEntry",
    "torch_entries",
    "torch_style_state_dict",
]


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
        :class:`~twinformat.errors.CheckpointError` naming its path; when False, such
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
    twinformat.report.KeyReport
        ``loaded``, ``missing``, ``unexpected``, ``mismatched`` and ``notes``.

    Raises
    ------
    twinformat.errors.CheckpointError
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

    Raises ``FileNotFoundError`` or :class:`~twinformat.errors.CheckpointError` naming the
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
