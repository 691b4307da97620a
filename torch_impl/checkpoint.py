"""Reading and writing state-dict files: SpeechBrain's pickled format and safetensors.

A path ending in ``.safetensors`` uses the interchange format of :mod:`converters.checkpoint`
(PyTorch names and layouts, header metadata); any other path uses ``torch.save``, exactly what
SpeechBrain's ``AdaptedModel.saver`` writes, so files cross between SpeechBrain and us.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from interchange.format import (
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
    holds anything but named tensors.

    Example
    -------
    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/adapters.ckpt"
    >>> torch.save({"adapted_model.layer.weight": torch.ones(2)}, path)
    >>> load_pickled_state_dict(path)
    {'adapted_model.layer.weight': tensor([1., 1.])}
    """
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle/zip
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of named tensors")
    return dict(loaded)


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
