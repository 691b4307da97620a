"""File-level conversion: torch layout <-> Flax layout, and pickled ``.ckpt``/``.pt``/``.bin`` ->
safetensors, streaming tensor by tensor.

Framework-free (PyTorch only to read a pickle). The output header is computed from the input's
header before any tensor is read; each tensor is then read, re-laid out and written in turn, so
the extra memory is about one tensor (its copy and its transposed copy), not the model.

A layer's kind comes from the file (``layer_kinds``, recorded by :func:`~converters.save_torch_layout`
and every Flax-layout file; the adapter class of an adapter checkpoint fixes the kind of its
projections), or from ``layer_kinds=`` given by the caller, never from a tensor's name or rank.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

from interchange.kinds import _ALIASES, KINDS

from .checkpoint import FORMAT_NAME, FORMAT_VERSION, KeyReport, library_version
from .files import LAYOUTS, TensorFile, write_safetensors
from .rename import RenameRule
from .views import (
    TensorView,
    adapter_implied_kinds,
    file_view,
    module_of,
    renamed,
    renamed_modules,
    to_flax_layout,
    to_torch_layout,
)

__all__ = ["convert_file", "file_layer_kinds", "progress_bar"]

PROGRESS_THRESHOLD = 256 * 2**20  # show a progress bar from this many bytes on (CLI default)


def convert_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    layout: str = "flax",
    layer_kinds: Mapping[str, str] | None = None,
    rename: Sequence[RenameRule] | None = None,
    progress: bool = False,
) -> KeyReport:
    """Convert the checkpoint ``source`` into a ``.safetensors`` file ``target`` in ``layout``.

    Parameters
    ----------
    source : path
        ``.safetensors`` in either layout, or a pickled ``.ckpt``/``.pt``/``.pth``/``.bin``.
    target : path
        The ``.safetensors`` file to write (atomically; nothing is left behind on failure).
    layout : {'flax', 'torch'}
        The layout to write.
    layer_kinds : dict, optional
        ``{module: kind}`` for modules the file does not describe (kinds in
        :data:`converters.layout.KINDS`); names are those of the source.
    rename : list of (pattern, replacement), optional
        Applied to the torch-layout names (see :mod:`converters.rename`).
    progress : bool
        Show a tqdm progress bar (bytes) on stdout.

    Returns
    -------
    KeyReport
        ``loaded`` lists the written tensors; ``notes`` the renames and the buffers left out.

    Example
    -------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from converters.files import write_safetensors
    >>> folder = tempfile.mkdtemp()
    >>> src, dst = os.path.join(folder, "t.safetensors"), os.path.join(folder, "f.safetensors")
    >>> write_safetensors(src, {"fc.weight": np.ones((2, 3), np.float32)})
    >>> convert_file(src, dst, layout="flax", layer_kinds={"fc": "linear"}).loaded
    ['fc.kernel']
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not str(target).endswith(".safetensors"):
        raise ValueError(f"the converted file must be a .safetensors file, got {str(target)!r}")
    with TensorFile(source) as tensor_file:
        kinds = file_layer_kinds(tensor_file, layer_kinds)
        view = to_torch_layout(file_view(tensor_file, zero_copy=True), tensor_file.layout, kinds)
        view, notes, old_of = renamed(view, rename)
        kinds = renamed_modules(kinds, old_of)
        if layout == "flax":
            view, dropped = to_flax_layout(view, kinds)
            notes += dropped
        used = {module_of(name) for name in view.names} | {module_of(name) for name in old_of}
        metadata = output_metadata(tensor_file, layout, {m: k for m, k in kinds.items() if m in used})
        total = sum(_nbytes(view, name) for name in view.names)
        with progress_bar(total, f"convert {os.path.basename(str(source))}", enabled=progress) as bar:
            write_safetensors(
                target, None, metadata, specs=view.specs, produce=view.read, progress=bar.update
            )
    return KeyReport(loaded=view.names, notes=notes)


def file_layer_kinds(tensor_file: TensorFile, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The layer kinds known for ``tensor_file``: recorded, implied by its adapter class, and
    ``extra``; a kind given twice must agree."""
    kinds = dict(tensor_file.layer_kinds)
    if tensor_file.layout == "torch":
        adapter_class = tensor_file.metadata.get("adapter_class", "")
        specs = {name: tensor_file.spec(name) for name in tensor_file.names}
        for module, kind in adapter_implied_kinds(tensor_file.names, specs, adapter_class).items():
            kinds.setdefault(module, kind)
    for module, kind in (extra or {}).items():
        if kind not in KINDS and kind not in _ALIASES:
            raise ValueError(f"layer kind {kind!r} given for module {module!r} is not one of {list(KINDS)}")
        if module in kinds and kinds[module] != kind:
            raise ValueError(
                f"module {module!r} is recorded as a {kinds[module]} layer in {str(tensor_file.path)!r}, "
                f"but was given as {kind}"
            )
        kinds[module] = kind
    return kinds


class progress_bar:
    """A tqdm bar over bytes on stdout, or a no-op; ``update(n)`` either way."""

    def __init__(self, total: int, description: str, *, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, file=sys.stdout)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> progress_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def output_metadata(tensor_file: TensorFile, layout: str, kinds: Mapping[str, str]) -> dict[str, str]:
    metadata = dict(tensor_file.metadata)
    if metadata.get("format") != FORMAT_NAME:  # a foreign or pickled file: describe what we know
        metadata.update(
            {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": library_version()}
        )
        metadata.setdefault("framework", "torch")
    metadata["layout"] = layout
    metadata["layer_kinds"] = json.dumps(dict(kinds), sort_keys=True)
    metadata["converted_from"] = os.path.basename(str(tensor_file.path))
    return metadata


def _nbytes(view: TensorView, name: str) -> int:
    from .files import numpy_dtype

    dtype, shape = view.specs[name]
    size = numpy_dtype(dtype).itemsize
    for n in shape:
        size *= n
    return size
