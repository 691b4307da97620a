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
>>> report = compare_keys({"a": (2, 3), "b": (4,)}, {"a": (2, 3), "c": (1,)})
>>> report.missing, report.unexpected, report.mismatched
(['c'], ['b'], [])
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "KeyReport",
    "adapter_metadata",
    "atomic_write",
    "compare_keys",
    "is_safetensors_path",
    "layer_kinds_from_metadata",
    "library_version",
    "parse_metadata",
    "read_safetensors_header",
]

FORMAT_NAME = "peft-twins"
FORMAT_VERSION = "1"


def library_version() -> str:
    """The installed version of this distribution (``'unknown'`` when run from a bare tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-twins")
    except PackageNotFoundError:
        return "unknown"


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
    """Decode :func:`adapter_metadata`'s JSON fields; foreign metadata passes through as is."""
    out: dict[str, Any] = dict(metadata or {})
    for key in ("adapter_kwargs", "target_layers", "unfrozen_layers"):
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except (TypeError, json.JSONDecodeError):
                pass
    return out


def layer_kinds_from_metadata(metadata: Mapping[str, str], *, where: str = "") -> dict[str, str]:
    """Decode the ``layer_kinds`` metadata entry (``{}`` when the file has none).

    >>> layer_kinds_from_metadata({"layer_kinds": '{"fc": "linear"}'})
    {'fc': 'linear'}
    """
    raw = metadata.get("layer_kinds")
    if not raw:
        return {}
    place = f"{where}: " if where else ""
    try:
        kinds = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{place}metadata 'layer_kinds' is not valid JSON: {exc}") from None
    if not isinstance(kinds, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()
    ):
        raise CheckpointError(f"{place}metadata 'layer_kinds' must be a JSON object {{module: kind}}")
    return kinds


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and validate a safetensors header without loading any tensor.

    Returns ``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Raises
    ``FileNotFoundError`` or :class:`CheckpointError` naming the file when it is missing,
    truncated or not safetensors at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file: only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{str(path)!r} is not a safetensors file or is truncated: "
                f"header length {header_len} does not fit a file of {size} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file: bad header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r} is not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            end = int(info["data_offsets"][1])
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has a malformed header entry") from None
        if end > data_len:
            raise CheckpointError(
                f"{str(path)!r} is truncated: tensor {name!r} ends at byte {end} "
                f"but the file holds {data_len} bytes of data"
            )
    return header, metadata


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``.

    A failing ``write`` leaves no file behind and ``path`` exactly as it was.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class KeyReport:
    """What a load or conversion did with each key: the three lists users ask for."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        """Human-readable summary, each list capped at ``limit`` names."""
        lines = [f"loaded: {len(self.loaded)}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mismatched),
            ("notes", self.notes),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (
                    f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
                )
                lines.append(f"{label} ({len(keys)}): {shown}")
        return "\n".join(lines)


def compare_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> KeyReport:
    """Compare ``{key: shape}`` of a checkpoint with what the model expects.

    ``mismatched`` entries read ``"key: file (a, b) vs model (c, d)"``.
    """
    report = KeyReport()
    for key, shape in found.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(shape) != tuple(expected[key]):
            report.mismatched.append(f"{key}: file {tuple(shape)} vs model {tuple(expected[key])}")
        else:
            report.loaded.append(key)
    report.missing = [key for key in expected if key not in found]
    return report


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
