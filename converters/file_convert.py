"""File-level conversion: torch layout <-> Flax layout, pickled ``.ckpt``/``.pt``/``.bin`` ->
safetensors, one file <-> a sharded folder, streaming tensor by tensor.

Framework-free (PyTorch only to read a pickle, jax and flax only to describe a twin). The output
header is computed from the input's header before any tensor is read; each tensor is then read,
re-laid out and written in turn, so the extra memory is about one tensor (its copy and its
transposed copy), not the model.

A layer's kind comes from the file (``layer_kinds``, recorded by :func:`~converters.save_torch_layout`
and every Flax-layout file; the adapter class of an adapter checkpoint fixes the kind of its
projections), from ``layer_kinds=`` given by the caller (exact module names or glob patterns
such as ``'*.LayerNorm'``), or from a Flax twin of the model (:func:`twin_layer_kinds`), never
from a tensor's name or rank. PyTorch buffers that are not parameters (``position_ids``,
``token_type_ids``, ``num_batches_tracked``, ...; see :data:`converters.views.BUFFER_NAMES`)
need no kind: they pass through to a torch-layout output and are left out of a Flax-layout
one, named in the report's notes either way.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from twinformat.errors import CheckpointError
from twinformat.format import FORMAT_NAME, FORMAT_VERSION, library_version
from twinformat.report import KeyReport

from .files import LAYOUTS, TensorFile, write_safetensors
from .rename import RenameRule
from .views import (
    TensorView,
    file_layer_kinds,
    file_view,
    module_of,
    renamed,
    renamed_modules,
    to_flax_layout,
    to_torch_layout,
)

__all__ = [
    "convert_file",
    "convert_sharded",
    "progress_bar",
    "twin_layer_kinds",
]

PROGRESS_THRESHOLD = 256 * 2**20  # show a progress bar from this many bytes on (CLI default)


def convert_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    layout: str = "flax",
    layer_kinds: Mapping[str, str] | None = None,
    rename: Sequence[RenameRule] | None = None,
    progress: bool = False,
    max_shard_bytes: int | None = None,
    buffers: Sequence[str] = (),
) -> KeyReport:
    """Convert the checkpoint ``source`` into ``target`` in ``layout``.

    Parameters
    ----------
    source : path
        ``.safetensors`` in either layout, a pickled ``.ckpt``/``.pt``/``.pth``/``.bin``, or a
        sharded checkpoint (a folder holding ``model.safetensors.index.json``, or the index).
    target : path
        The ``.safetensors`` file to write (atomically; nothing is left behind on failure), or,
        with ``max_shard_bytes``, the folder of a sharded checkpoint (files, then the index; see
        :func:`converters.sharded.write_sharded`).
    layout : {'flax', 'torch'}
        The layout to write.
    layer_kinds : dict, optional
        ``{module: kind}`` for modules the file does not describe (kinds in
        :data:`twinformat.kinds.KINDS`, old names accepted); a key may be a glob pattern
        (``'*.LayerNorm'``) matched against the source's module names: exact names first, then
        patterns in order, first match wins; a pattern that matches no module is an error.
    rename : list of (pattern, replacement), optional
        Applied to the torch-layout names (see :mod:`converters.rename`).
    progress : bool
        Show a tqdm progress bar (bytes) on stderr.
    max_shard_bytes : int, optional
        Write a sharded checkpoint with files of at most this many bytes (a bigger tensor gets a
        file of its own).
    buffers : list of str, optional
        Glob patterns of more tensor names that are buffers, not parameters (e.g.
        ``'*.attn.bias'``, GPT-2's float causal mask), beyond :data:`~converters.views.BUFFER_NAMES`.

    Returns
    -------
    KeyReport
        ``loaded`` lists the written tensors; ``notes`` the renames and the buffers passed
        through or left out.

    Example
    -------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from converters.files import write_safetensors
    >>> folder = tempfile.mkdtemp()
    >>> src, dst = os.path.join(folder, "t.safetensors"), os.path.join(folder, "f.safetensors")
    >>> write_safetensors(src, {"enc.fc.weight": np.ones((2, 3), np.float32),
    ...                         "enc.position_ids": np.arange(4)})
    >>> report = convert_file(src, dst, layout="flax", layer_kinds={"*.fc": "linear"})
    >>> report.loaded, report.notes
    (['enc.fc.kernel'], ['enc.position_ids: buffer (not a parameter), left out of the Flax layout'])
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if max_shard_bytes is None and not str(target).endswith(".safetensors"):
        raise ValueError(
            f"the converted file must be a .safetensors file, got {str(target)!r} "
            "(give max_shard_bytes to write a sharded folder)"
        )
    if max_shard_bytes is not None and str(target).endswith(".safetensors"):
        raise ValueError(f"a sharded checkpoint is a folder, not a .safetensors file: {str(target)!r}")
    with TensorFile(source) as tensor_file:
        kinds = file_layer_kinds(tensor_file, layer_kinds)
        view = to_torch_layout(file_view(tensor_file, zero_copy=True), tensor_file.layout, kinds)
        view, notes, old_of = renamed(view, rename)
        kinds = renamed_modules(kinds, old_of)
        if layout == "flax":
            view, dropped = to_flax_layout(view, kinds, buffers=buffers)
        else:
            dropped = passed_through_buffers(view, kinds, buffers)
        notes += dropped
        used = {module_of(name) for name in view.names} | {module_of(name) for name in old_of}
        metadata = output_metadata(tensor_file, layout, {m: k for m, k in kinds.items() if m in used})
        total = sum(_nbytes(view, name) for name in view.names)
        with progress_bar(total, f"convert {os.path.basename(str(source))}", enabled=progress) as bar:
            if max_shard_bytes is None:
                write_safetensors(
                    target, None, metadata, specs=view.specs, produce=view.read, progress=bar.update
                )
            else:
                from .sharded import write_sharded

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


def convert_sharded(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    layout: str = "flax",
    layer_kinds: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
    progress: bool = False,
    rename: Sequence[RenameRule] | None = None,
) -> KeyReport:
    """Convert a checkpoint into a sharded one in ``layout``: :func:`convert_file` writing a
    folder, files of at most ``max_shard_bytes`` (default Hugging Face's 5 GB) plus the index.

    Example
    -------
    >>> import tempfile
    >>> import numpy as np
    >>> from converters.files import ShardedCheckpoint
    >>> from converters.sharded import write_sharded
    >>> source, target = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = write_sharded(source, {"fc.weight": np.ones((2, 3), np.float32)}, {"layout": "torch"})
    >>> convert_sharded(source, target, layer_kinds={"fc": "linear"}).loaded
    ['fc.kernel']
    >>> ShardedCheckpoint(target).shape("fc.kernel")
    (3, 2)
    """
    from .sharded import DEFAULT_MAX_SHARD_BYTES

    return convert_file(
        source,
        target,
        layout=layout,
        layer_kinds=layer_kinds,
        rename=rename,
        progress=progress,
        max_shard_bytes=DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
    )


def twin_layer_kinds(
    like: str, config: str | os.PathLike[str] | Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``{module: kind}`` of a Flax NNX twin, built abstractly (``nnx.eval_shape``: no memory).

    Parameters
    ----------
    like : str
        ``'package.module:Class'`` (e.g. ``'flax_impl.models:BertModel'``): an ``nnx.Module``
        class constructed as ``Class(config, rngs=nnx.Rngs(0))`` (``Class(rngs=...)`` without a
        config).
    config : path or dict, optional
        A ``config.json`` (as transformers' ``save_pretrained`` writes it) or its content; the
        class reads it by attribute name.

    Returns
    -------
    dict
        The layer kinds of :func:`flax_impl.interchange.model_state`, from the twin's module
        types: the torch names of its modules are those of the PyTorch model it mirrors.

    Example
    -------
    >>> kinds = twin_layer_kinds("flax_impl.models:BertModel", {"vocab_size": 10, "hidden_size": 4,
    ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8})
    >>> kinds["embeddings.LayerNorm"], kinds["encoder.layer.0.attention.self.query"], len(kinds)
    ('layer_norm', 'linear', 13)
    """
    import types
    from importlib import import_module

    module_name, _, class_name = like.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"--like takes 'package.module:Class', got {like!r}")
    try:
        cls = getattr(import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import the twin {like!r}: {exc}") from None
    from flax import nnx

    from flax_impl.interchange import model_state

    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise TypeError(f"--like {like!r} is not a flax.nnx.Module class")
    settings: Any = None
    if config is not None:
        if isinstance(config, Mapping):
            content: Any = dict(config)
        else:
            try:
                content = json.loads(Path(config).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FileNotFoundError(f"config file not found: {str(config)!r}") from None
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise CheckpointError(f"{str(config)!r} is not a JSON config: {str(exc)[:200]}") from None
        if not isinstance(content, dict):
            raise CheckpointError(f"config {str(config)!r} must be a JSON object")
        settings = types.SimpleNamespace(**content)

    def build() -> Any:
        rngs, construct = nnx.Rngs(0), cast(Any, cls)
        return construct(rngs=rngs) if settings is None else construct(settings, rngs=rngs)

    return dict(model_state(nnx.eval_shape(build)).kinds)


def passed_through_buffers(
    view: TensorView, kinds: Mapping[str, str], buffers: Sequence[str] = ()
) -> list[str]:
    """Notes naming the buffers (tensors of no known layer, see
    :func:`converters.views.is_buffer`) a torch-layout output keeps as they are."""
    from .views import is_buffer

    return [
        f"{name}: buffer (not a parameter), passed through"
        for name in view.names
        if module_of(name) not in kinds and is_buffer(name, kinds, buffers)
    ]


class progress_bar:
    """A tqdm bar over bytes on stderr (never mixed into output meant for a file or a pipe), or a
    no-op; ``update(n)`` either way."""

    def __init__(self, total: int, description: str, *, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, file=sys.stderr)

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
