"""A whole model (PyTorch or Flax NNX) written as a sharded checkpoint.

The sharded twin of :func:`converters.save_torch_layout` / :func:`converters.save_flax_layout`:
the same tensors, names, layouts and header metadata, split over files of at most
``max_shard_bytes`` by :func:`converters.sharded.write_sharded`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import LAYOUTS
from .sharded import DEFAULT_MAX_SHARD_BYTES, write_sharded
from .views import TensorView, to_flax_layout

__all__ = ["save_sharded"]


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
