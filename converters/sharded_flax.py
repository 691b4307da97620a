"""Flax parameters loaded from a checkpoint (sharded or not) shard by shard, slice by slice.

:func:`load_flax_sharded` fills a Flax NNX model, even an abstract one (``nnx.eval_shape``),
with arrays built by ``jax.make_array_from_callback``: each device reads only its slice of each
tensor (``safe_open(...).get_slice``), re-laid out from PyTorch's layout by the rules of
:mod:`twinformat.kinds`. In a multi-process JAX program each process therefore reads only the
shards its devices own; peak memory is those shards plus about one tensor.

Imports jax and flax (only when called through :mod:`converters.sharded`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from twinformat import kinds as layout
from twinformat.dtypes import TensorSpec
from twinformat.plan import plan_load, refuse
from twinformat.report import KeyReport
from twinformat.state import FlatState

from .files import ShardedCheckpoint
from .views import module_of

__all__ = ["load_flax_sharded"]


def load_flax_sharded(
    model: Any,
    checkpoint: str | os.PathLike[str],
    *,
    strict: bool = True,
    mesh: Any = None,
) -> KeyReport:
    """Fill the Flax NNX ``model`` in place, each device reading only its slice of each tensor.

    Every variable becomes a ``jax.Array`` with the sharding its current value has (a concrete
    array's, or a ``jax.ShapeDtypeStruct``'s from ``nnx.eval_shape`` + sharding annotations, see
    :func:`flax_impl.sharding.shard_model`), built with ``jax.make_array_from_callback``: the
    callback of each addressable device reads its block with ``safe_open(...).get_slice`` and
    re-lays it out (torch ``(out, in)`` -> Flax ``(in, out)``, etc., by
    :mod:`twinformat.kinds`). A process thus reads only the shards its devices own, and its
    peak memory is those shards plus about one tensor's block, not the checkpoint.

    Keys, shapes and dtypes are checked from the headers before anything is read; a refused load
    leaves the model unchanged. Layer kinds come from the model's module types.

    Parameters
    ----------
    model : flax.nnx.Module
        The model to fill; an abstract one (``nnx.eval_shape``) costs no memory until loaded.
    checkpoint : path
        A sharded checkpoint (folder or index) or one ``.safetensors`` file, in torch layout
        (PyTorch names and layouts) or Flax layout.
    strict : bool
        Refuse on missing or unexpected keys and on dtype differences (the default). With
        ``strict=False`` what fits is loaded (dtypes cast) and the rest reported. Mis-shaped
        keys are refused either way.
    mesh : jax.sharding.Mesh, optional
        The concrete mesh for abstract shardings (default: the one of ``jax.set_mesh``), and
        the mesh to replicate variables on that have no sharding (default: the first device).

    Returns
    -------
    KeyReport

    Raises
    ------
    converters.views.ConversionError
        With the three lists in ``report``.

    Example
    -------
    >>> import tempfile
    >>> from flax import nnx
    >>> from converters import save_sharded
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_sharded(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), folder, max_shard_bytes=16)
    >>> target = nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    >>> load_flax_sharded(target, folder).loaded
    ['weight', 'bias']
    >>> bool((target.kernel[...] == nnx.Linear(3, 2, rngs=nnx.Rngs(0)).kernel[...]).all())
    True
    """
    from flax_impl.interchange import model_state, torch_entries

    with ShardedCheckpoint(checkpoint) as source:  # one file too: read through the same slicer
        entries = {entry.key: entry for entry in torch_entries(model, strict=strict)}
        target = model_state(model)  # shapes and dtypes only: an abstract model costs nothing
        name_of = {key: _source_key(entry, source.layout) for key, entry in entries.items()}
        torch_of = {name: key for key, name in name_of.items()}
        found = FlatState(
            {
                torch_of.get(n, n): _torch_spec(source, n, entries.get(torch_of.get(n, "")))
                for n in source.names
            },
            kinds=dict(target.kinds),
            framework="file",
            layout=source.layout,
        )
        plan = plan_load(found, target, strict=strict)
        report = plan.report
        if report.mismatched or (strict and not report.ok):
            raise refuse(report, f"loading {str(source.path)!r}")
        arrays = [
            (entries[key].variable, _sharded_array(source, name_of[key], entries[key], mesh, cast=not strict))
            for key in report.loaded
        ]
    for variable, array in arrays:  # assign only once every array is built
        variable.set_value(array)
    for field in ("loaded", "missing", "unexpected"):  # report in the checkpoint's own names
        setattr(report, field, [name_of.get(key, key) for key in getattr(report, field)])
    return report


def _torch_spec(source: ShardedCheckpoint, name: str, entry: Any) -> TensorSpec:
    """The spec of tensor ``name`` of ``source`` in PyTorch's layout (shapes only, nothing read)."""
    dtype, shape = source.spec(name)
    if source.layout == "flax" and entry is not None:
        shape = layout.flax_to_torch_shape(entry.kind, entry.flax_name, shape)[1]
    return dtype, tuple(shape)


def _source_key(entry: Any, source_layout: str) -> str:
    """The name of ``entry`` (a Flax variable of a known layer kind) in a file of ``source_layout``."""
    if source_layout == "torch":
        return entry.key
    owner = module_of(entry.key)
    return f"{owner}.{entry.flax_name}" if owner else entry.flax_name


def _sharded_array(source: ShardedCheckpoint, key: str, entry: Any, mesh: Any, *, cast: bool) -> Any:
    import jax

    value = entry.variable.get_value()
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    sharding = _target_sharding(value, mesh, key)
    if source.layout == "torch":
        # Flax axis i is torch axis torch_axis[i]: the layout rule applied to a probe shape.
        probe = tuple(range(1, len(shape) + 1))
        torch_probe = layout.flax_to_torch_shape(entry.kind, entry.flax_name, probe)[1]
        torch_axis = [torch_probe.index(length) for length in probe]
    blocks: dict[tuple, np.ndarray] = {}  # devices holding the same block (replicas) share one read

    def read_block(index: Any) -> np.ndarray:  # a tuple of slices, one per axis
        index = tuple(index)
        bounds = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if bounds not in blocks:
            if source.layout == "torch":
                torch_index = [slice(None)] * len(shape)
                for flax_axis, axis in enumerate(torch_axis):
                    torch_index[axis] = index[flax_axis]
                block = source.read_slice(key, tuple(torch_index))
                block = layout.torch_to_flax(entry.kind, key.rpartition(".")[2], block)[1]
            else:
                block = source.read_slice(key, index)
            blocks[bounds] = block.astype(dtype, copy=False) if cast else block
        return blocks[bounds]

    return jax.make_array_from_callback(shape, sharding, read_block)


def _target_sharding(value: Any, mesh: Any, key: str) -> Any:
    """The concrete sharding a variable's value asks for."""
    import jax
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, AbstractMesh):
        concrete = mesh if mesh is not None else jax.sharding.get_mesh()
        if concrete is None or getattr(concrete, "empty", False) or isinstance(concrete, AbstractMesh):
            raise ValueError(
                f"variable {key!r} is sharded over an abstract mesh {dict(sharding.mesh.shape)}; "
                "pass mesh= (or load inside jax.set_mesh(mesh))"
            )
        return NamedSharding(concrete, sharding.spec)
    if sharding is not None:
        return sharding
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    return SingleDeviceSharding(jax.devices()[0])
