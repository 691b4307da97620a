"""Checkpoints split over several safetensors files with an index: reading and writing them.

The pretrained-model world stores large checkpoints as several ``.safetensors`` files plus an
index, ``model.safetensors.index.json``: ``{"metadata": {"total_size": N}, "weight_map":
{tensor name: file name}}``. Here, framework-free:

- :class:`ShardedCheckpoint` reads one (or a single ``.safetensors`` file) tensor by tensor,
  or a slice of a tensor, opening one file at a time. It is a :class:`converters.files.TensorFile`
  (``TensorFile(folder)`` returns one), so every reader of files (conversion, merging, the
  layout views of :mod:`converters.views`, the command line) reads sharded checkpoints too.
- :func:`write_sharded` writes tensors produced one at a time into files of at most
  ``max_shard_bytes`` each; every file is written atomically and the index last, so a
  checkpoint exists only once it is complete.
- :func:`parse_size` reads ``--max-shard-size`` values such as ``'2GB'``.

Elsewhere, and importable from here as before: :func:`convert_sharded`
(:mod:`converters.file_convert`, the one file conversion, writing a sharded target),
:func:`save_sharded` (:mod:`converters.sharded_save`, a model to a sharded checkpoint),
:func:`load_flax_sharded` (:mod:`converters.sharded_flax`, each device reading only its slice).
Command line: ``python -m converters convert SOURCE FOLDER/ --max-shard-size 2GB``
(``python -m converters.sharded`` is a deprecated alias of it).

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

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinformat.errors import CheckpointError
from twinformat.format import MAX_HEADER_BYTES, atomic_write

from .files import TensorFile, TensorSpec, _nbytes, safetensors_layout, write_safetensors

if TYPE_CHECKING:  # imported on first use (see __getattr__): they need the frameworks
    from .file_convert import convert_sharded
    from .sharded_flax import load_flax_sharded
    from .sharded_save import save_sharded

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

# Public names that live in their own modules (one concern each), importable from here as before.
_ELSEWHERE = {
    "convert_sharded": "file_convert",
    "save_sharded": "sharded_save",
    "load_flax_sharded": "sharded_flax",
}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        return getattr(import_module(f"converters.{_ELSEWHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ShardedCheckpoint(TensorFile):
    """A checkpoint split over safetensors files with an index, read one tensor at a time.

    A :class:`converters.files.TensorFile` (``names``, ``spec``, ``shape``, ``dtype``,
    ``nbytes``, ``total_bytes``, ``get``, ``view``, ``metadata``, ``layout``, ``layer_kinds``,
    ``path``), plus :meth:`read_slice` and :meth:`file_of`. Only headers are read when it
    opens; the index and every file header are validated first.

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
            index = path / INDEX_NAME
            if not index.is_file():
                raise FileNotFoundError(f"{str(path)!r} holds no {INDEX_NAME}")
            weight_map = self._read_index(index)
        elif path.name.endswith(".index.json"):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint index not found: {str(path)!r}")
            weight_map = self._read_index(path)
        else:
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


def open_checkpoint(path: str | os.PathLike[str]) -> TensorFile:
    """The checkpoint at ``path`` opened for reading: a :class:`ShardedCheckpoint` for a folder
    or an index, else a :class:`~converters.files.TensorFile` (one safetensors file or a pickled
    state dict). The same as ``TensorFile(path)``.

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
    plan: Mapping[str, TensorSpec]
    if tensors is not None:
        arrays = dict(tensors)
        plan = {name: (_dtype_string(a), tuple(a.shape)) for name, a in arrays.items()}
        produce = arrays.__getitem__
    elif produce is None or specs is None:
        raise TypeError("specs needs produce(name) -> array")
    else:
        plan = specs
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = _plan_files(plan, max_shard_bytes)
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
            specs={name: plan[name] for name in group},
            produce=produce,
            progress=progress,
        )
        weight_map.update(dict.fromkeys(group, file_name))
    total = sum(_nbytes(dtype, shape) for dtype, shape in plan.values())
    content = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def write_index(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    atomic_write(index, write_index)
    for stale in old_files - set(names):
        (folder / stale).unlink(missing_ok=True)
    return index


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
    """Deprecated: ``python -m converters.sharded SOURCE TARGET`` is
    ``python -m converters convert SOURCE TARGET/ --max-shard-size 5GB --to torch``.

    Prints a note saying so on stderr, translates the old flags (``--layout`` is ``--to``,
    ``--layer-kind M=K`` is ``--kinds M=K``) and runs the main command line's ``convert``;
    returns its exit status.
    """
    from .cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    print(
        "note: python -m converters.sharded is deprecated; use "
        "python -m converters convert SOURCE FOLDER/ --max-shard-size SIZE [--to flax|torch] [--kinds M=K]",
        file=sys.stderr,
    )
    translated, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in ("--layout", "--layer-kind"):
            new = "--to" if flag == "--layout" else "--kinds"
            if eq:
                translated += [new, value]
            else:
                translated += [new, *args[i + 1 : i + 2]]
                i += 1
        else:
            translated.append(arg)
        i += 1
    if not any(a == "--max-shard-size" or a.startswith("--max-shard-size=") for a in translated):
        translated += ["--max-shard-size", "5GB"]
    if not any(a == "--to" or a.startswith("--to=") for a in translated) and not {"-h", "--help"} & set(args):
        translated += ["--to", "torch"]  # the old default layout
    return cli_main(["convert", *translated])


if __name__ == "__main__":
    sys.exit(main())
