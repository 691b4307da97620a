"""The checkpoint format both twins read and write, and the checks around it.

Framework-free. A checkpoint is a safetensors file with PyTorch names and layouts (the world
pretrained checkpoints and PEFT live in); its header metadata says what the file holds.
Writes are atomic (temporary file in the same folder, then ``os.replace``), so a failure never
leaves a half-written file behind.

Example
-------
>>> meta = adapter_metadata(framework="torch", adapter_class="LoRA",
...                         adapter_kwargs={"rank": 2}, target_layers=["layer1"])
>>> parse_metadata(meta)["adapter_kwargs"]
{'rank': 2}
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .dtypes import DTYPES
from .errors import CheckpointError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "MAX_HEADER_BYTES",
    "adapter_metadata",
    "atomic_write",
    "is_safetensors_path",
    "layer_kinds_from_metadata",
    "library_version",
    "parse_metadata",
    "read_safetensors_header",
]

FORMAT_NAME = "peft-twins"
FORMAT_VERSION = "1"


def library_version() -> str:
    """This library's version, as recorded in the files it writes (``twinformat._version``)."""
    from ._version import __version__

    return __version__


def is_safetensors_path(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a ``.safetensors`` file (the interchange format)."""
    return str(path).endswith(".safetensors")


def adapter_metadata(
    *,
    framework: str,
    adapter_class: str | None = None,
    adapter_kwargs: Mapping[str, Any] | None = None,
    target_layers: Iterable[str] = (),
    unfrozen_layers: Iterable[str] = (),
    content: str = "adapter",
) -> dict[str, str]:
    """Header metadata (all values are strings, as safetensors requires)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "content": content,
        "layout": "torch",
        "framework": framework,
        "adapter_class": adapter_class or "",
        "adapter_kwargs": json.dumps(_jsonable(dict(adapter_kwargs or {})), sort_keys=True),
        "target_layers": json.dumps(list(target_layers)),
        "unfrozen_layers": json.dumps(list(unfrozen_layers)),
        "library_version": library_version(),
    }


def parse_metadata(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """Decode :func:`adapter_metadata`'s JSON fields; foreign metadata passes through as is.

    Never raises on what a file holds: a field that is not valid JSON (or nested too deeply to
    decode) stays the string it was.

    >>> parse_metadata({"target_layers": '["fc"]', "note": "[not json"})
    {'target_layers': ['fc'], 'note': '[not json'}
    """
    out: dict[str, Any] = dict(metadata or {})
    for key in ("adapter_kwargs", "target_layers", "unfrozen_layers"):
        if key in out:
            try:
                out[key] = _loads(out[key])
            except (TypeError, ValueError, RecursionError):
                pass
    return out


def layer_kinds_from_metadata(metadata: Mapping[str, str], *, where: str = "") -> dict[str, str]:
    """Decode the ``layer_kinds`` metadata entry (``{}`` when the file has none).

    ``where`` (the file) is named in the :class:`CheckpointError` raised for an entry that is
    not a JSON object ``{module: kind}`` of strings.

    >>> layer_kinds_from_metadata({"layer_kinds": '{"fc": "linear"}'})
    {'fc': 'linear'}
    """
    raw = metadata.get("layer_kinds")
    if not raw:
        return {}
    place = f"{where}: " if where else ""
    try:
        kinds = _loads(raw)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{place}metadata 'layer_kinds' is not valid JSON: {_short(exc)}") from None
    if not isinstance(kinds, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()
    ):
        raise CheckpointError(f"{place}metadata 'layer_kinds' must be a JSON object {{module: kind}}")
    return kinds


#: The longest header read (safetensors' own limit): a larger claimed length is refused unread.
MAX_HEADER_BYTES = 100_000_000
_MAX_DEPTH = 8  # a safetensors header nests 3 deep ({name: {"shape": [...]}}); deeper is refused


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and validate a safetensors header without loading any tensor.

    Returns ``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Everything safetensors
    itself checks is checked here first, so that every reader refuses a bad file with one error
    naming it: the header length fits the file; the header is a JSON object (no duplicate
    names); ``__metadata__`` maps strings to strings; each tensor has a known ``dtype``, a
    ``shape`` of non-negative integers and ``data_offsets`` ``[begin, end]`` whose length is the
    shape's size in that dtype; the tensors tile the data exactly (in offset order, no gap, no
    overlap, nothing after the last). Nothing larger than the file is ever allocated.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    CheckpointError
        When the file is truncated, malformed or not safetensors at all; the message names it.

    Example
    -------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "bad.safetensors")
    >>> with open(path, "wb") as f:
    ...     _ = f.write((2**60).to_bytes(8, "little") + b"{}")
    >>> try:
    ...     read_safetensors_header(path)
    ... except CheckpointError as exc:
    ...     print(str(exc).split(": ")[1])
    header length 1152921504606846976 does not fit a file of 10 bytes
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    where = repr(str(path))
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{where} is not a safetensors file: only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where} is not a safetensors file or is truncated: "
                    f"header length {header_len} does not fit a file of {size} bytes"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(raw) != header_len:  # the file shrank while being read
        raise CheckpointError(f"{where} is truncated: header of {header_len} bytes, read {len(raw)}")
    if not raw.lstrip().startswith(b"{"):
        raise CheckpointError(f"{where} is not a safetensors file: the header is not a JSON object")
    if _depth(raw) > _MAX_DEPTH:
        raise CheckpointError(f"{where} is not a safetensors file: the header nests too deeply")
    try:
        header = _loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not a safetensors file: bad header ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: '__metadata__' must be a JSON object of strings")
    spans = []
    for name, info in header.items():
        begin, end = _check_entry(name, info, where)
        spans.append((begin, end, name))
    data_len = size - 8 - header_len
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            what = (
                f"overlaps tensor {previous!r}"
                if begin < position
                else f"leaves a gap of {begin - position} bytes after "
                + (f"tensor {previous!r}" if previous else "the header")
            )
            raise CheckpointError(f"{where}: tensor {name!r} starts at byte {begin} and {what}")
        position, previous = end, name
    if position > data_len:
        raise CheckpointError(
            f"{where} is truncated: tensor {previous!r} ends at byte {position} "
            f"but the file holds {data_len} bytes of data"
        )
    if position != data_len:
        raise CheckpointError(
            f"{where}: {data_len - position} bytes after the last tensor belong to no tensor "
            "(not a safetensors file, or a corrupted one)"
        )
    return header, metadata


def _check_entry(name: str, info: Any, where: str) -> tuple[int, int]:
    """``(begin, end)`` of one header entry once its dtype, shape and offsets agree."""
    bad = f"{where}: tensor {name!r} has a malformed header entry"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{bad}; expected {{'dtype', 'shape', 'data_offsets'}}, got {_clip(info)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{where}: tensor {name!r} has unsupported dtype {_clip(dtype)}; supported: {sorted(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise CheckpointError(f"{bad}: shape {_clip(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise CheckpointError(f"{bad}: data_offsets {_clip(offsets)} is not [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end < begin or end - begin != expected:
        raise CheckpointError(
            f"{bad}: data_offsets {offsets} hold {end - begin} bytes, but {dtype} {shape} needs {expected}"
        )
    return begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _loads(text: str | bytes) -> Any:
    """``json.loads`` refusing duplicate keys (two tensors of one name would shadow each other)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=unique)


def _depth(raw: bytes) -> int:
    """How deep the JSON text ``raw`` nests (brackets outside strings), in one pass."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(raw):
        token = raw[match.start()]  # an int: no copy of a matched string
        if token in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif token in _CLOSE:
            depth -= 1
    return deepest


_OPEN, _CLOSE = b"{[", b"}]"
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.DOTALL)


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(exc: BaseException) -> str:
    return _clip(str(exc) or type(exc).__name__, 200)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``.

    A failing ``write`` leaves no file behind and ``path`` exactly as it was. The file gets the
    mode a new file gets from the user's umask (``0o644`` under the usual ``022``), not the
    ``0o600`` of the temporary file it was written as.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _jsonable(value: Any) -> Any:
    """Adapter kwargs may hold classes (Houlsby's ``activation``): store their dotted name."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)
