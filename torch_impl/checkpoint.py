"""Reading and writing state-dict files: SpeechBrain's pickled format and safetensors.

A path ending in ``.safetensors`` uses the checkpoint format of :mod:`twinformat.format`
(PyTorch names and layouts, header metadata); any other path uses ``torch.save``, exactly what
SpeechBrain's ``AdaptedModel.saver`` writes, so files cross between SpeechBrain and us.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from twinformat.format import (
    CheckpointError,
    atomic_write,
    is_safetensors_path,
    read_safetensors_header,
)

__all__ = ["load_pickled_state_dict", "load_state_dict_file", "save_state_dict_file"]


def save_state_dict_file(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` to ``path`` atomically (no half-written file on failure).

    ``metadata`` goes into the safetensors header; ``torch.save`` files carry none.
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    if is_safetensors_path(path):
        from safetensors.torch import save_file

        tensors = _unshared(tensors)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state-dict file; returns ``(tensors, metadata)``.

    Pickled files are read with ``weights_only=True``. Errors name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if is_safetensors_path(path):
        from safetensors.torch import load_file

        _, metadata = read_safetensors_header(path)
        try:
            return load_file(str(path)), metadata
        except Exception as exc:  # safetensors' own error type is no ValueError
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}"
            ) from exc
    return load_pickled_state_dict(path), {}


def load_pickled_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``d state dict (SpeechBrain's ``.ckpt``, ``.pt``, ``.bin``) safely.

    ``weights_only=True`` (no arbitrary code from the pickle), memory-mapped where the file's
    format allows it. Raises :class:`CheckpointError` naming the file when it is unreadable or
    holds anything but named tensors, in one sentence (torch's own multi-paragraph
    ``weights_only`` advice, and its warnings, stay out of it); ``FileNotFoundError`` when it is
    missing.

    Example
    -------
    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/adapters.ckpt"
    >>> torch.save({"adapted_model.layer.weight": torch.ones(2)}, path)
    >>> load_pickled_state_dict(path)
    {'adapted_model.layer.weight': tensor([1., 1.])}
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    where = repr(str(path))
    _check_zip_records(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's load-time warnings are no part of our output
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                with open(path, "rb") as f:
                    data = io.BytesIO(f.read())  # reads past its end return short, never allocate more
                _check_legacy_sizes(data, path)
                loaded = torch.load(data, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        raise CheckpointError(
            f"cannot read checkpoint {where}: it holds more than tensors ({reason}); it is read with "
            "weights_only=True, which never runs code from a file: save only the state_dict()"
        ) from None
    except Exception as exc:  # torch raises many types for a bad pickle/zip
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"cannot read checkpoint {where}: {type(exc).__name__}: {message}") from None
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{where} does not hold a state dict of named tensors (it holds a {type(loaded).__name__})"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where} does not hold a state dict of named tensors: entry {key!r} is a "
                f"{type(value).__name__}"
            )
    return dict(loaded)


def _check_zip_records(path: str | os.PathLike[str]) -> None:
    """Refuse a ``torch.save`` archive whose records claim more bytes than the file holds, or are
    compressed (torch stores them uncompressed): torch allocates a record at its claimed size
    before reading it. Files that are no zip archive are left to the legacy checks."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the central directory, within the file
            records = archive.infolist()
    except Exception as exc:  # zipfile raises several types for a damaged directory
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: a damaged torch.save archive ({' '.join(str(exc).split())[:120]})"
        ) from None
    for record in records:
        if (
            record.compress_type != zipfile.ZIP_STORED
            or record.file_size != record.compress_size
            or record.header_offset + record.compress_size > size
        ):
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: its record {record.filename!r} claims "
                f"{record.file_size} bytes ({record.compress_size} stored from byte {record.header_offset}) "
                f"in a file of {size} bytes: truncated or corrupted"
            )


def _weights_only_reason(message: str) -> str:
    """The one line of torch's ``weights_only`` refusal that says what the file holds."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1]
            return re.sub(r"\x1b\[[0-9;]*m", "", reason).split(" was not an allowed global")[0].strip()[:200]
    return re.sub(r"\x1b\[[0-9;]*m", "", " ".join(message.split()))[:200]


def _check_legacy_sizes(data: io.BytesIO, path: str | os.PathLike[str]) -> None:
    """Refuse a legacy (pre-zip) file whose storages claim more bytes than the file holds: torch
    allocates each storage at its claimed size before reading it."""
    if bytes(data.getbuffer()[:4]) == b"PK\x03\x04":
        return  # a zip archive (torch.save's format) that could not be memory-mapped
    size = len(data.getbuffer())
    claimed = 0

    class Counting(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            nonlocal claimed
            if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[4], int):
                claimed += max(pid[4], 0)
            return None

        def find_class(self, module: str, name: str) -> Any:
            return _Anything

    try:
        # Unpickling allocates each counted string or bytes at its claimed length before reading
        # it; pickletools reads only what is there, so walk the pickles (magic number, protocol,
        # system info, the state, the storage keys) first and refuse lengths past the end.
        for _ in range(5):
            for _op in pickletools.genops(data):
                pass
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: not a torch.save file, or a truncated one "
            f"({' '.join(str(exc).split())[:120]})"
        ) from None
    data.seek(0)
    try:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(data)
        Counting(data).load()
    except Exception:
        return  # torch.load reports a malformed file itself
    finally:
        data.seek(0)
    if claimed > size:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: its storages claim {claimed} elements, "
            f"more than the file's {size} bytes hold (truncated or corrupted)"
        )


class _Anything:
    """Stands for any class while counting a legacy pickle's storages: never instantiated for
    real work, it accepts and ignores every argument."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return self

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on an OrderedDict
        pass

    def append(self, value: Any) -> None:  # APPENDS on a list subclass
        pass

    def extend(self, values: Any) -> None:
        pass


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share memory with an earlier one (tied weights of unfrozen layers):
    safetensors refuses shared storage, and each name must load on its own anyway."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    return out
