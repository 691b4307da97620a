"""Checkpoints split over several safetensors files, and Flax parameters loaded shard by shard.

The pretrained-model world stores large checkpoints as several ``.safetensors`` files plus an
index, ``model.safetensors.index.json``: ``{"metadata": {"total_size": N}, "weight_map":
{tensor name: file name}}``. Here:

- :class:`ShardedCheckpoint` reads one (or a single ``.safetensors`` file) tensor by tensor,
  or a slice of a tensor, opening one file at a time; it has the interface of
  :class:`converters.files.TensorFile`, so the layout views of :mod:`converters.views` apply.
- :func:`write_sharded` writes tensors produced one at a time into files of at most
  ``max_shard_bytes`` each; every file is written atomically and the index last, so a
  checkpoint exists only once it is complete.
- :func:`save_sharded` and :func:`convert_sharded` are the sharded twins of
  :func:`converters.save_torch_layout` / :func:`converters.convert_file` (same metadata, same
  layout rules).
- :func:`load_flax_sharded` fills a Flax NNX model, even an abstract one (``nnx.eval_shape``),
  with arrays built by ``jax.make_array_from_callback``: each device reads only its slice of each
  tensor (``safe_open(...).get_slice``), re-laid out from PyTorch's layout by the rules of
  :mod:`converters.layout`. In a multi-process JAX program each process therefore reads only
  the shards its devices own; peak memory is those shards plus about one tensor.

Framework-free except :func:`load_flax_sharded` (jax, flax) and :func:`save_sharded` (the
model's framework). Command line: ``python -m converters.sharded SOURCE TARGET_FOLDER``.

Example
-------
>>> import os, tempfile
>>> import numpy as np
>>> folder = tempfile.mkdtemp()
>>> tensors = {f"layer{i}.weight": np.full((4, 4), i, np.float32) for i in range(3)}
>>> index = write_sharded(folder, tensors, {"layout": "torch"}, max_shard_bytes=128)
>>> sorted(os.listdir(folder))[:2], index.name
(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], 'model.safetensors.index.json')
>>> with ShardedCheckpoint(folder) as checkpoint:
...     checkpoint.names, checkpoint.file_of("layer2.weight").name, checkpoint.read_slice("layer1.weight", (slice(0, 1),))
(['layer0.weight', 'layer1.weight', 'layer2.weight'], 'model-00002-of-00002.safetensors', array([[1., 1., 1., 1.]], dtype=float32))
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .checkpoint import CheckpointError, KeyReport, atomic_write, compare_keys, read_safetensors_header
from .file_convert import file_layer_kinds, output_metadata, progress_bar
from .files import (
    LAYOUTS,
    TensorFile,
    TensorSpec,
    _nbytes,
    _TensorSpecs,
    numpy_dtype,
    write_safetensors,
)
from .views import ConversionError, TensorView, file_view, module_of, to_flax_layout, to_torch_layout

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "ShardedCheckpoint",
    "convert_sharded",
    "load_flax_sharded",
    "main",
    "open_checkpoint",
    "parse_size",
    "save_sharded",
    "write_sharded",
]

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


class ShardedCheckpoint(_TensorSpecs):
    """A checkpoint split over safetensors files with an index, read one tensor at a time.

    Has the reading interface of :class:`converters.files.TensorFile` (``names``, ``spec``,
    ``shape``, ``dtype``, ``nbytes``, ``total_bytes``, ``get``, ``metadata``, ``layout``,
    ``layer_kinds``, ``path``), plus :meth:`read_slice` and :meth:`file_of`. Only headers are
    read when it opens; the index and every file header are validated first.

    Arguments
    ---------
    path: path
        A folder holding ``model.safetensors.index.json``, the index file itself, or a single
        ``.safetensors`` file (a checkpoint of one file).

    Attributes
    ----------
    path : Path
        The folder of the checkpoint.
    files : list[Path]
        Its safetensors files, in index order.
    metadata : dict[str, str]
        The header metadata of its files (every file of ours carries the same).
    index_total_size : int or None
        ``metadata.total_size`` of the index, as recorded.

    Raises
    ------
    FileNotFoundError
        Naming the missing index or file.
    converters.checkpoint.CheckpointError
        A malformed index, a file name leaving the folder, a tensor the index maps to a file
        that lacks it, a tensor of a file the index does not list, files of different layouts.
    """

    _NO_TENSOR = "checkpoint {path!r} has no tensor {name!r}"
    _UNKNOWN_LAYOUT = "{path!r}: unknown layout {layout!r}; expected one of {layouts}"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        self.index_total_size: int | None = None
        if path.is_dir():
            index = path / INDEX_NAME
            if not index.is_file():
                raise FileNotFoundError(f"{str(path)!r} holds no {INDEX_NAME}")
            weight_map = self._read_index(index)
        elif path.name.endswith(".index.json"):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint index not found: {str(path)!r}")
            weight_map = self._read_index(path)
        else:
            header, _ = read_safetensors_header(path)
            weight_map = {name: path.name for name in header}
        self.path = path if path.is_dir() else path.parent
        self._file_of = {name: self.path / file_name for name, file_name in weight_map.items()}
        self.files = list(dict.fromkeys(sorted(self._file_of.values())))
        self._specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        missing = [str(file) for file in self.files if not file.is_file()]
        if missing:
            raise FileNotFoundError(
                f"checkpoint {str(self.path)!r} lacks the file(s) its index names: {missing[:5]}"
            )
        for file in self.files:
            self._read_file_header(file)
        unlisted = [name for name in weight_map if name not in self._specs]
        if unlisted:
            where = {name: self._file_of[name].name for name in unlisted[:5]}
            raise CheckpointError(
                f"{str(self.path)!r}: the index maps tensors to files that lack them: {where}"
            )
        self.names = list(self._specs)
        self._read_layout()

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a JSON checkpoint index: {exc}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{str(index)!r}: 'weight_map' must be a JSON object {{tensor name: file name}}"
            )
        for name, file_name in weight_map.items():
            if Path(file_name).name != file_name or file_name in ("", ".", ".."):
                raise CheckpointError(
                    f"{str(index)!r}: tensor {name!r} maps to {file_name!r}; expected a file name in the index's folder"
                )
        total = (content.get("metadata") or {}).get("total_size")
        self.index_total_size = (
            int(total) if isinstance(total, (int, float, str)) and str(total).isdigit() else None
        )
        return weight_map

    def _read_file_header(self, file: Path) -> None:
        header, metadata = read_safetensors_header(file)
        listed = {name for name, owner in self._file_of.items() if owner == file}
        extra = sorted(set(header) - listed)
        if extra:
            raise CheckpointError(f"{str(file)!r} holds tensors the index does not list: {extra[:5]}")
        if self.metadata and metadata.get("layout", "torch") != self.metadata.get("layout", "torch"):
            raise CheckpointError(
                f"{str(file)!r} is a {metadata.get('layout', 'torch')}-layout file in a "
                f"{self.metadata.get('layout', 'torch')}-layout checkpoint"
            )
        self.metadata = self.metadata or dict(metadata)
        for name in sorted(listed & set(header), key=lambda n: int(header[n]["data_offsets"][0])):
            info = header[name]
            self._specs[name] = (str(info.get("dtype")), tuple(int(n) for n in info.get("shape", ())))
            numpy_dtype(self._specs[name][0])

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        self.spec(name)
        return self._file_of[name]

    def get(self, name: str) -> np.ndarray:
        """Read tensor ``name`` whole (opening only its file) as a C-contiguous numpy array."""
        return self.read_slice(name, None)

    def read_slice(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
        """Read ``tensor[index]`` (a tuple of slices, one per leading axis; None for all of it),
        touching only those bytes of its file."""
        from safetensors import safe_open

        file = self.file_of(name)
        try:
            with safe_open(str(file), framework="numpy") as handle:
                if index is None or not self.shape(name):
                    return handle.get_tensor(name)
                return np.ascontiguousarray(handle.get_slice(name)[tuple(index)])
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor {name!r} from {str(file)!r}: {exc}") from None

    def close(self) -> None:
        """Nothing stays open between reads; present for the ``TensorFile`` interface."""

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str]) -> ShardedCheckpoint | TensorFile:
    """A :class:`ShardedCheckpoint` for a folder or an index, else a
    :class:`~converters.files.TensorFile` (one safetensors file or a pickled state dict).

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> index = write_sharded(folder, {"w": np.zeros(2, np.float32)})
    >>> type(open_checkpoint(folder)).__name__, type(open_checkpoint(index)).__name__
    ('ShardedCheckpoint', 'ShardedCheckpoint')
    >>> type(open_checkpoint(os.path.join(folder, "model-00001-of-00001.safetensors"))).__name__
    'TensorFile'
    """
    path = Path(path)
    if path.is_dir() or path.name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    return TensorFile(path)


def write_sharded(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    specs: Mapping[str, TensorSpec] | None = None,
    produce: Callable[[str], np.ndarray] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Write tensors into ``folder`` as files of at most ``max_shard_bytes`` plus an index.

    Arguments as in :func:`converters.files.write_safetensors`: either ``tensors``, or
    ``specs`` (in order) with ``produce(name)`` called once per tensor while writing, so only
    one produced tensor is alive at a time. Files fill in order; a tensor larger than
    ``max_shard_bytes`` gets a file of its own. Every file carries ``metadata`` in its header.

    An index already in ``folder`` is removed first and the new one written last (atomically),
    so a failure leaves no index and a reader never sees a mix of old and new files; the files
    of the old index that the new one does not use are removed after.

    Returns
    -------
    Path
        The index file.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if (tensors is None) == (specs is None):
        raise TypeError("give either tensors or specs (with produce), not both")
    if tensors is not None:
        arrays = dict(tensors)
        specs = {name: (_dtype_string(a), tuple(a.shape)) for name, a in arrays.items()}
        produce = arrays.__getitem__
    elif produce is None:
        raise TypeError("specs needs produce(name) -> array")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = _plan_files(specs, max_shard_bytes)
    names = [_SHARD_NAME.format(index=i + 1, count=len(groups)) for i in range(len(groups))]

    index = folder / INDEX_NAME
    old_files = _indexed_files(index)
    if index.exists():
        index.unlink()
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups, strict=True):
        write_safetensors(
            folder / file_name,
            None,
            metadata,
            specs={name: specs[name] for name in group},
            produce=produce,
            progress=progress,
        )
        weight_map.update(dict.fromkeys(group, file_name))
    total = sum(_nbytes(*spec) for spec in specs.values())
    content = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write(
        index, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    )
    for stale in old_files - set(names):
        (folder / stale).unlink(missing_ok=True)
    return index


def save_sharded(
    model: Any,
    folder: str | os.PathLike[str],
    *,
    layout: str = "torch",
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write every weight of ``model`` (PyTorch or Flax NNX) as a sharded checkpoint.

    The same tensors, names, layouts and header metadata as :func:`converters.save_torch_layout`
    (``layout='torch'``) or :func:`converters.save_flax_layout` (``layout='flax'``), split over
    files of at most ``max_shard_bytes``. Returns the index file.

    Example
    -------
    >>> import tempfile, torch
    >>> index = save_sharded(torch.nn.Linear(3, 2), tempfile.mkdtemp(), max_shard_bytes=16)
    >>> json.loads(index.read_text())["weight_map"]
    {'bias': 'model-00002-of-00002.safetensors', 'weight': 'model-00001-of-00002.safetensors'}
    """
    from .saving import model_arrays

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    arrays, header = model_arrays(model, layout, metadata)
    view = TensorView.from_arrays(arrays)
    if layout == "flax":
        view, _ = to_flax_layout(view, json.loads(header["layer_kinds"]))
    return write_sharded(
        folder, None, header, specs=view.specs, produce=view.read, max_shard_bytes=max_shard_bytes
    )


def convert_sharded(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    layout: str = "flax",
    layer_kinds: Mapping[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> KeyReport:
    """Convert a checkpoint into a sharded one in ``layout``, one tensor at a time.

    Parameters
    ----------
    source : path
        A sharded checkpoint (folder or index), one ``.safetensors`` file in either layout, or a
        pickled ``.ckpt``/``.pt``/``.pth``/``.bin`` state dict.
    target : path
        The folder to write (files, then the index; see :func:`write_sharded`).
    layout : {'flax', 'torch'}
        The layout to write.
    layer_kinds : dict, optional
        ``{module: kind}`` for modules the source does not describe, as in
        :func:`converters.convert_file`.
    max_shard_bytes : int
        The largest file to write (a bigger tensor gets a file of its own).
    progress : bool
        Show a tqdm progress bar (bytes) on stdout.

    Returns
    -------
    KeyReport
        ``loaded`` lists the written tensors; ``notes`` the buffers left out.

    Example
    -------
    >>> import tempfile
    >>> source, target = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = write_sharded(source, {"fc.weight": np.ones((2, 3), np.float32)}, {"layout": "torch"})
    >>> convert_sharded(source, target, layer_kinds={"fc": "linear"}).loaded
    ['fc.kernel']
    >>> ShardedCheckpoint(target).shape("fc.kernel")
    (3, 2)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    with open_checkpoint(source) as checkpoint:
        kinds = file_layer_kinds(checkpoint, layer_kinds)
        view = to_torch_layout(file_view(checkpoint), checkpoint.layout, kinds)
        notes: list[str] = []
        if layout == "flax":
            view, notes = to_flax_layout(view, kinds)
        used = {module_of(name) for name in view.names} | {module_of(name) for name in checkpoint.names}
        metadata = output_metadata(checkpoint, layout, {m: k for m, k in kinds.items() if m in used})
        total = sum(_nbytes(*spec) for spec in view.specs.values())
        with progress_bar(total, f"convert {Path(source).name}", enabled=progress) as bar:
            write_sharded(
                target,
                None,
                metadata,
                specs=view.specs,
                produce=view.read,
                max_shard_bytes=max_shard_bytes,
                progress=bar.update,
            )
    return KeyReport(loaded=view.names, notes=notes)


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
    :mod:`converters.layout`). A process thus reads only the shards its devices own, and its
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
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_sharded(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), folder, max_shard_bytes=16)
    >>> target = nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    >>> load_flax_sharded(target, folder).loaded
    ['weight', 'bias']
    >>> bool((target.kernel[...] == nnx.Linear(3, 2, rngs=nnx.Rngs(0)).kernel[...]).all())
    True
    """
    from flax_impl.checkpoint import torch_entries

    with open_checkpoint(checkpoint) as source:
        if not isinstance(source, ShardedCheckpoint):  # one file: read it through the same slicer
            source = ShardedCheckpoint(source.path)
        entries = {_source_key(entry, source.layout): entry for entry in torch_entries(model, strict=strict)}
        report, notes = _check_flax_load(source, entries, strict=strict)
        arrays = [
            (entries[key].variable, _sharded_array(source, key, entries[key], mesh, cast=not strict))
            for key in report.loaded
        ]
    for variable, array in arrays:  # assign only once every array is built
        variable.set_value(array)
    report.notes = notes
    return report


def _source_key(entry: Any, source_layout: str) -> str:
    """The name of ``entry`` (a Flax variable of a known layer kind) in a file of ``source_layout``."""
    if source_layout == "torch":
        return entry.key
    owner = module_of(entry.key)
    return f"{owner}.{entry.flax_name}" if owner else entry.flax_name


def _check_flax_load(
    source: ShardedCheckpoint, entries: Mapping[str, Any], *, strict: bool
) -> tuple[KeyReport, list[str]]:
    notes: list[str] = []
    expected: dict[str, tuple[int, ...]] = {}
    for key, entry in entries.items():
        shape = tuple(entry.variable.get_value().shape)
        if source.layout == "torch":
            shape = layout.flax_to_torch_shape(entry.kind, entry.flax_name, shape)[1]
        expected[key] = shape
    found = {}
    model_kinds = {module_of(entry.key): entry.kind for entry in entries.values()}
    for name in source.names:
        owner, _, leaf = name.rpartition(".")
        if name not in expected and leaf in layout.BUFFERS_WITHOUT_FLAX_TWIN.get(
            model_kinds.get(owner, ""), ()
        ):
            notes.append(f"{name}: PyTorch buffer with no Flax twin, not loaded")
            continue
        found[name] = source.shape(name)
    report = compare_keys(found, expected)
    for key in list(report.loaded):
        have, want = source.dtype(key), np.dtype(entries[key].variable.get_value().dtype)
        if have != want:
            if strict:
                report.loaded.remove(key)
                report.mismatched.append(
                    f"{key}: dtype {have.name} in the checkpoint vs {want.name} in the model"
                )
            else:
                notes.append(f"{key}: cast from {have.name} to the model's {want.name}")
    if report.mismatched or (strict and not report.ok):
        report.notes = notes
        raise ConversionError(
            f"loading {str(source.path)!r} refused, the model was left unchanged:\n{report.describe()}",
            report,
        )
    return report, notes


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

    def read_block(index: tuple[slice, ...]) -> np.ndarray:
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


def _plan_files(specs: Mapping[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = _nbytes(*spec)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _indexed_files(index: Path) -> set[str]:
    """The file names an existing index refers to (none if it is absent or unreadable)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name for name in weight_map.values() if isinstance(name, str) and Path(name).name == name}
    except (OSError, ValueError, AttributeError):
        return set()


def _dtype_string(array: np.ndarray) -> str:
    from .files import dtype_name

    return dtype_name(np.asarray(array).dtype)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``'5GB'``, ``'500MB'``, ``'2GiB'`` or ``'1000'``.

    Example
    -------
    >>> parse_size("5GB"), parse_size("2MiB"), parse_size("512")
    (5000000000, 2097152, 512)
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower().removesuffix("b") if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r}; expected e.g. '5GB', '500MB', '2GiB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m converters.sharded SOURCE TARGET``: write a sharded checkpoint; returns the
    exit status (1 with a one-line ``error:`` on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.sharded",
        description="Convert a checkpoint (sharded folder, index, .safetensors or pickled state dict) into "
        f"a sharded checkpoint: files of at most --max-shard-size plus {INDEX_NAME}, written last.",
    )
    parser.add_argument(
        "source", help="a sharded checkpoint folder or index, a .safetensors file, or a .ckpt/.pt/.bin"
    )
    parser.add_argument("target", help="the folder to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="torch", help="layout to write (default: torch)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest file, e.g. 5GB, 500MB (default: 5GB)"
    )
    parser.add_argument(
        "--layer-kind",
        action="append",
        default=[],
        metavar="MODULE=KIND",
        help="kind of a module the source does not describe",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    try:
        kinds = dict(item.split("=", 1) for item in args.layer_kind if "=" in item)
        if len(kinds) != len(args.layer_kind):
            raise ValueError(f"--layer-kind takes MODULE=KIND, got {args.layer_kind}")
        report = convert_sharded(
            args.source,
            args.target,
            layout=args.layout,
            layer_kinds=kinds or None,
            max_shard_bytes=parse_size(args.max_shard_size),
            progress=args.progress,
        )
    except (ValueError, TypeError, KeyError, OSError) as exc:
        print(
            f"error: {' | '.join(line.strip() for line in str(exc).splitlines() if line.strip())}",
            file=sys.stderr,
        )
        return 1
    checkpoint = ShardedCheckpoint(args.target)
    print(
        f"wrote {len(report.loaded)} tensors, {checkpoint.total_bytes} bytes, in {len(checkpoint.files)} file(s) to {args.target}"
    )
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
