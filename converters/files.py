"""Checkpoint storage, tensor by tensor: read any supported file or sharded folder, write
safetensors streaming. The bottom floor of ``converters`` (with :mod:`converters.sharded`, which
writes sharded folders): it imports no other module of the package.

Framework-free (numpy, safetensors; torch only to read a pickled ``.ckpt``/``.pt``/``.bin``).
A file is never loaded whole: :class:`TensorFile` hands out one tensor at a time and
:func:`write_safetensors` writes them one at a time, so converting a checkpoint needs extra
memory of about its largest tensor. Every write is atomic (:func:`~twinformat.format.atomic_write`)
and every array is made C-contiguous before its bytes are written: ``safetensors.numpy.save_file``
(0.8) writes wrong values for a non-contiguous view such as a transposed kernel.

Two layouts share the file format (header metadata ``layout``):

- ``"torch"`` (the interchange format): PyTorch ``state_dict()`` names and layouts.
- ``"flax"``: the same module paths with Flax variable names and layouts
  (``layer1.kernel`` of shape ``(in, out)``), plus a ``layer_kinds`` metadata entry
  (JSON ``{module: kind}``) so the file converts back without guessing a layer's kind
  from a tensor's name or rank.

A checkpoint split over several safetensors files with an index (``model.safetensors.index.json``:
``{"metadata": {"total_size": N}, "weight_map": {tensor name: file name}}``) opens as a
:class:`ShardedCheckpoint`: ``TensorFile(folder)`` returns one, with the same interface, so every
reader of files reads sharded checkpoints too.

Example
-------
>>> import os, tempfile
>>> import numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> kernel = np.arange(6, dtype=np.float32).reshape(2, 3).T      # a non-contiguous view
>>> write_safetensors(path, {"layer.kernel": kernel}, {"layout": "flax"})
>>> with TensorFile(path) as f:
...     f.names, f.shape("layer.kernel"), f.get("layer.kernel").tolist() == kernel.tolist()
(['layer.kernel'], (3, 2), True)
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinformat.dtypes import TensorSpec, dtype_name, numpy_dtype
from twinformat.dtypes import nbytes as _spec_nbytes
from twinformat.errors import CheckpointError
from twinformat.format import MAX_HEADER_BYTES, atomic_write, is_safetensors_path, read_safetensors_header
from twinformat.format import layer_kinds_from_metadata as _layer_kinds

__all__ = [
    "INDEX_NAME",
    "LAYOUTS",
    "PICKLE_SUFFIXES",
    "ShardedCheckpoint",
    "TensorFile",
    "contiguous",
    "is_sharded_path",
    "layer_kinds_from_metadata",
    "write_safetensors",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # what save_pretrained writes when the model fits one shard
LAYOUTS = ("torch", "flax")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def layer_kinds_from_metadata(metadata: Mapping[str, str], *, where: str = "") -> dict[str, str]:
    """Decode the ``layer_kinds`` metadata entry (``{}`` when the file has none); ``where`` (the
    file) is named in the error for a malformed entry."""
    return _layer_kinds(metadata, where=where)


class _TensorSpecs:
    """What every checkpoint reader answers from its headers alone, without reading tensor data.

    Shared by :class:`TensorFile` and :class:`ShardedCheckpoint`. A subclass
    sets ``path``, ``names`` (file order), ``_specs`` (name -> :data:`TensorSpec`) and
    ``metadata``, and calls :meth:`_read_layout` once they are known. The two message templates
    name the reader in its errors (``path`` is formatted as a string).
    """

    _NO_TENSOR = "{path!r} has no tensor {name!r}"
    _UNKNOWN_LAYOUT = "{path!r}: unknown layout {layout!r} in metadata; expected one of {layouts}"

    path: Path
    names: list[str]
    metadata: dict[str, str]
    _specs: dict[str, TensorSpec]

    def _read_layout(self) -> None:
        """Set ``layout`` and ``layer_kinds`` from ``metadata``, refusing an unknown layout."""
        self.layout = self.metadata.get("layout", "torch")
        if self.layout not in LAYOUTS:
            raise CheckpointError(
                self._UNKNOWN_LAYOUT.format(path=str(self.path), layout=self.layout, layouts=LAYOUTS)
            )
        self.layer_kinds = layer_kinds_from_metadata(self.metadata, where=repr(str(self.path)))

    def spec(self, name: str) -> TensorSpec:
        """``(dtype string, shape)`` of tensor ``name``, without reading it."""
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(self._NO_TENSOR.format(path=str(self.path), name=name)) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.spec(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.spec(name)[0])

    def nbytes(self, name: str) -> int:
        return _nbytes(*self.spec(name))

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(name) for name in self.names)


class TensorFile(_TensorSpecs):
    """A checkpoint opened for reading one tensor at a time: one file, or a sharded folder.

    Reads ``.safetensors`` (through ``safetensors.safe_open``; the header is validated first,
    so a truncated or foreign file fails with a :class:`CheckpointError` naming it) and pickled
    PyTorch state dicts (``.ckpt``/``.pt``/``.pth``/``.bin``, via ``torch.load(weights_only=True,
    mmap=True)``, SpeechBrain's saver format). A folder holding ``model.safetensors.index.json``,
    or such an index itself, opens as a :class:`ShardedCheckpoint` (a
    subclass with the same interface), so every reader of files reads sharded checkpoints too.
    Tensors come back as numpy arrays in the file's dtype (bfloat16 as ``ml_dtypes.bfloat16``,
    bit-exact).

    Attributes
    ----------
    path : Path
    metadata : dict[str, str]
        The safetensors header metadata (``{}`` for pickles).
    names : list[str]
        Tensor names in file order.
    layout : str
        ``'torch'`` or ``'flax'`` (from the metadata; pickles are ``'torch'``).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    CheckpointError
        When it exists but is not a checkpoint we can read; the message names the file (and the
        tensor, for an unsupported dtype).
    """

    def __new__(cls, path: str | os.PathLike[str]) -> TensorFile:
        if cls is TensorFile and is_sharded_path(path):
            return ShardedCheckpoint(path)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {str(self.path)!r}")
        self._handle: Any = None
        self._mmap: mmap.mmap | None = None
        self._pickled: dict[str, Any] | None = None
        if is_safetensors_path(self.path) or not self.path.name.endswith(PICKLE_SUFFIXES):
            self._specs, self._offsets, self.metadata, self._data_start = safetensors_layout(self.path)
            self.names = list(self._specs)
            self._handle = self._open_safetensors()
        else:
            self._pickled = _load_pickle(self.path)
            self.metadata = {}
            self._specs = {name: _tensor_spec(self.path, name, t) for name, t in self._pickled.items()}
            self.names = list(self._pickled)
        self._read_layout()

    def _open_safetensors(self) -> Any:
        from safetensors import safe_open

        try:
            return safe_open(str(self.path), framework="numpy")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read safetensors file {str(self.path)!r}: {exc}") from None

    def get(self, name: str) -> np.ndarray:
        """Read tensor ``name`` as a C-contiguous numpy array (a fresh copy for safetensors)."""
        self.spec(name)
        if self._pickled is not None:
            from torch_impl.interchange import tensor_to_numpy

            return tensor_to_numpy(self._pickled[name])
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {str(self.path)!r}: {exc}") from None

    def view(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array over a memory map of the file: no copy.

        For streaming: a tensor written out unchanged is never copied, and a transposed one is
        copied once, straight from the page cache. Pickled files fall back to :meth:`get`.
        """
        dtype, shape = self.spec(name)
        if self._pickled is not None:
            return self.get(name)
        if self._mmap is None:
            with self.path.open("rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start, end = self._offsets[name]
        dt = numpy_dtype(dtype).newbyteorder("<")
        count = (end - start) // dt.itemsize
        return np.frombuffer(self._mmap, dtype=dt, count=count, offset=self._data_start + start).reshape(
            shape
        )

    def close(self) -> None:
        self._handle = None
        self._pickled = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive: the map closes when they are collected
                pass
            self._mmap = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous array (itself when it already is), bits unchanged.

    A transposed matrix (a Linear weight becoming a Flax kernel) is copied block by block: numpy's
    plain strided copy of a large transposed view misses the cache on nearly every element and
    runs about 5x slower.

    Example
    -------
    >>> a = np.arange(6).reshape(2, 3)
    >>> contiguous(a) is a, contiguous(a.T).tolist() == a.T.tolist()
    (True, True)
    """
    if array.flags.c_contiguous:
        return array
    if array.ndim == 2 and array.size >= _BLOCKED_FROM and array.strides[0] < array.strides[1]:
        out = np.empty(array.shape, array.dtype)
        rows, cols = array.shape
        for i in range(0, rows, _BLOCK):
            for j in range(0, cols, _BLOCK):
                out[i : i + _BLOCK, j : j + _BLOCK] = array[i : i + _BLOCK, j : j + _BLOCK]
        return out
    return np.asarray(array, order="C")


_BLOCK = 64  # 64x64 float32 blocks: source and destination tiles both stay in L1/L2
_BLOCKED_FROM = 1 << 16


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    specs: Mapping[str, TensorSpec] | None = None,
    produce: Callable[[str], np.ndarray] | None = None,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write a safetensors file atomically, one tensor at a time.

    Either give ``tensors`` (arrays in memory), or ``specs`` (name -> ``(dtype string, shape)``,
    in the order to write) with ``produce(name) -> array``, called once per tensor while writing,
    so that only one produced tensor is alive at a time. Each produced array must match its
    spec; it is made C-contiguous and little-endian before its bytes are written. ``progress``
    is called with the number of bytes of each tensor written. On any failure, no file is left.
    """
    if (tensors is None) == (specs is None):
        raise TypeError("give either tensors or specs (with produce), not both")
    plan: Mapping[str, TensorSpec]
    make: Callable[[str], np.ndarray]
    if tensors is not None:
        arrays = dict(tensors)
        plan = {name: (dtype_name(a.dtype), tuple(a.shape)) for name, a in arrays.items()}
        make = arrays.__getitem__
    elif produce is None or specs is None:
        raise TypeError("specs needs produce(name) -> array")
    else:
        plan, make = specs, produce
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    header, total = _header(plan, meta)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            written = 0
            for name, (dtype, shape) in plan.items():
                array = _checked(name, make(name), dtype, shape)
                f.write(array.reshape(-1).view(np.uint8).data)
                written += array.nbytes
                del array
                if progress is not None:
                    progress(_nbytes(dtype, shape))
            if written != total:  # pragma: no cover - guarded by _checked
                raise CheckpointError(f"wrote {written} bytes of tensor data, header promised {total}")

    atomic_write(path, write)


def _header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, (dtype, shape) in specs.items():
        if name == "__metadata__":
            raise CheckpointError("a tensor cannot be named '__metadata__'")
        size = _nbytes(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return raw, offset


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return _spec_nbytes((dtype, tuple(shape)))


def _checked(name: str, array: Any, dtype: str, shape: Sequence[int]) -> np.ndarray:
    array = np.asarray(array)
    if tuple(array.shape) != tuple(shape) or dtype_name(array.dtype) != dtype:
        raise CheckpointError(
            f"tensor {name!r}: expected {dtype} {tuple(shape)}, got {dtype_name(array.dtype)} {tuple(array.shape)}"
        )
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    return contiguous(array)


def _tensor_spec(path: Path, name: str, tensor: Any) -> TensorSpec:
    from torch_impl.interchange import dtype_name as torch_dtype_name

    try:
        dtype = torch_dtype_name(tensor.dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{str(path)!r}, tensor {name!r}: {exc}") from None
    return dtype, tuple(int(n) for n in tensor.shape)


def is_sharded_path(path: str | os.PathLike[str]) -> bool:
    """True for a folder or a ``*.index.json`` file: a sharded checkpoint, not one file."""
    return Path(path).is_dir() or str(path).endswith(".index.json")


def safetensors_layout(
    path: Path,
) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], dict[str, str], int]:
    """``(specs in file order, data offsets, metadata, first data byte)`` of a safetensors file,
    from its validated header (:func:`twinformat.format.read_safetensors_header`)."""
    header, metadata = read_safetensors_header(path)
    order = sorted(header, key=lambda name: tuple(header[name]["data_offsets"]))
    specs = {name: (header[name]["dtype"], tuple(header[name]["shape"])) for name in order}
    offsets = {name: tuple(header[name]["data_offsets"]) for name in order}
    with path.open("rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    return specs, offsets, dict(metadata), data_start


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        from torch_impl.checkpoint import load_pickled_state_dict
    except ImportError:
        raise CheckpointError(
            f"reading the pickled checkpoint {str(path)!r} needs PyTorch installed"
        ) from None
    return load_pickled_state_dict(path)


class ShardedCheckpoint(TensorFile):
    """A checkpoint split over safetensors files with an index, read one tensor at a time.

    A :class:`converters.files.TensorFile` (``names``, ``spec``, ``shape``, ``dtype``,
    ``nbytes``, ``total_bytes``, ``get``, ``view``, ``metadata``, ``layout``, ``layer_kinds``,
    ``path``), plus :meth:`read_slice` and :meth:`file_of`. Only headers are read when it
    opens; the index and every file header are validated first.

    Arguments
    ---------
    path: path
        A folder holding ``model.safetensors.index.json`` (or, without an index, one
        ``model.safetensors``, as ``save_pretrained`` writes a small model), the index file
        itself, or a single ``.safetensors`` file (a checkpoint of one file).

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
    has_index : bool
        Whether it was read through an index (a folder of one ``model.safetensors`` or a single
        file has none).

    Raises
    ------
    FileNotFoundError
        Naming the missing index or file.
    twinformat.errors.CheckpointError
        A malformed index, a file name leaving the folder, a tensor the index maps to a file
        that lacks it, a tensor of a file the index does not list, files of different layouts.
    """

    _NO_TENSOR = "checkpoint {path!r} has no tensor {name!r}"
    _UNKNOWN_LAYOUT = "{path!r}: unknown layout {layout!r}; expected one of {layouts}"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        self.index_total_size: int | None = None
        self._handle = self._pickled = self._mmap = None
        self._open: dict[Path, TensorFile] = {}
        if path.is_dir():
            index, single = path / INDEX_NAME, path / SINGLE_NAME
            self.has_index = index.is_file()
            if self.has_index:
                weight_map = self._read_index(index)
            elif single.is_file():  # save_pretrained below its shard size writes one file, no index
                weight_map = dict.fromkeys(safetensors_layout(single)[0], single.name)
            else:
                raise FileNotFoundError(f"{str(path)!r} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
        elif path.name.endswith(".index.json"):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint index not found: {str(path)!r}")
            self.has_index = True
            weight_map = self._read_index(path)
        else:
            self.has_index = False
            weight_map = dict.fromkeys(safetensors_layout(path)[0], path.name)
        self.path = path if path.is_dir() else path.parent
        self._file_of = {name: self.path / file_name for name, file_name in weight_map.items()}
        self.files = list(dict.fromkeys(sorted(self._file_of.values())))
        self._specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        missing = [str(file) for file in self.files if not _is_file(file)]
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
        where = repr(str(index))
        try:
            if index.stat().st_size > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where} is larger than any checkpoint index ({MAX_HEADER_BYTES} bytes)"
                )
            content = json.loads(index.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the checkpoint index {where}: {exc.strerror or exc}"
            ) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            detail = str(exc)[:200] or type(exc).__name__
            raise CheckpointError(f"{where} is not a JSON checkpoint index: {detail}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{where}: 'weight_map' must be a JSON object {{tensor name: file name}}")
        for name, file_name in weight_map.items():
            if (
                Path(file_name).name != file_name
                or file_name in ("", ".", "..")
                or "\\" in file_name
                or "\x00" in file_name
            ):
                raise CheckpointError(
                    f"{where}: tensor {name!r} maps to {file_name!r}; expected a file name in the index's folder"
                )
        metadata = content.get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        self.index_total_size = total if isinstance(total, int) and not isinstance(total, bool) else None
        return weight_map

    def _read_file_header(self, file: Path) -> None:
        specs, _, metadata, _ = safetensors_layout(file)
        listed = {name for name, owner in self._file_of.items() if owner == file}
        extra = sorted(set(specs) - listed)
        if extra:
            raise CheckpointError(f"{str(file)!r} holds tensors the index does not list: {extra[:5]}")
        if self.metadata and metadata.get("layout", "torch") != self.metadata.get("layout", "torch"):
            raise CheckpointError(
                f"{str(file)!r} is a {metadata.get('layout', 'torch')}-layout file in a "
                f"{self.metadata.get('layout', 'torch')}-layout checkpoint"
            )
        self.metadata = self.metadata or dict(metadata)
        for name, spec in specs.items():  # in offset order
            if name in listed:
                self._specs[name] = spec

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        self.spec(name)
        return self._file_of[name]

    def get(self, name: str) -> np.ndarray:
        """Read tensor ``name`` whole (opening only its file) as a C-contiguous numpy array."""
        return self.read_slice(name, None)

    def view(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array over a memory map of its file (no copy); the
        file stays mapped until :meth:`close`."""
        file = self.file_of(name)
        if file not in self._open:
            self._open[file] = TensorFile(file)
        return self._open[file].view(name)

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
        """Unmap the files :meth:`view` mapped; nothing else stays open between reads."""
        for opened in self._open.values():
            opened.close()
        self._open.clear()

    def __enter__(self) -> ShardedCheckpoint:
        return self


def _is_file(path: Path) -> bool:
    """``path.is_file()``, with a name the file system refuses (too long, ...) reading as absent."""
    try:
        return path.is_file()
    except OSError:
        return False
