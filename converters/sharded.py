"""Writing checkpoints split over several safetensors files with an index.

The pretrained-model world stores large checkpoints as several ``.safetensors`` files plus an
index, ``model.safetensors.index.json``. Reading one is :class:`converters.files.ShardedCheckpoint`
(``TensorFile(folder)`` returns one); here, framework-free, the writing side, on the storage floor
of ``converters`` beside :mod:`converters.files`:

- :func:`write_sharded` writes tensors produced one at a time into files of at most
  ``max_shard_bytes`` each; every file is written atomically and the index last, so a
  checkpoint exists only once it is complete.
- :func:`parse_size` reads ``--max-shard-size`` values such as ``'2GB'``.

Converting a file into a sharded folder is :func:`converters.convert_sharded`, saving a model as
one :func:`converters.save_sharded`, loading one onto devices :func:`converters.load_flax_sharded`;
on the command line ``python -m converters convert SOURCE FOLDER/ --max-shard-size 2GB``.

Example
-------
>>> import os, tempfile
>>> import numpy as np
>>> from converters.files import ShardedCheckpoint
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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from twinformat.dtypes import TensorSpec, dtype_name
from twinformat.dtypes import nbytes as _spec_nbytes
from twinformat.format import atomic_write

from .files import INDEX_NAME, write_safetensors

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "parse_size",
    "write_sharded",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


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
    total = sum(_spec_nbytes((dtype, tuple(shape))) for dtype, shape in plan.values())
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
        nbytes = _spec_nbytes(spec)
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


if __name__ == "__main__":  # 0.1's `python -m converters.sharded` alias, removed in 0.2: say what replaced it
    raise SystemExit(
        "python -m converters.sharded was removed in 0.2; use "
        "python -m converters convert SOURCE FOLDER/ --max-shard-size SIZE [--to flax|torch] [--kinds M=K]"
    )
