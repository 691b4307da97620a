"""Save a model of either framework to a file in either layout, and load a Flax-layout file.

Two flat safetensors layouts, one file format (:mod:`converters.files`):

- **torch layout** (:func:`save_torch_layout`), the interchange format: the PyTorch twin's
  ``state_dict()`` names and layouts. What pretrained checkpoints and PEFT use, and what both
  twins' ``saver``/``loader`` read.
- **Flax layout** (:func:`save_flax_layout`): the same module paths with Flax variable names and
  layouts (``encoder.0.kernel`` of shape ``(in, out)``, ``bn.mean``), for Flax-only pipelines
  that want arrays they can use as they are. We chose flat safetensors over Orbax: the same
  reader, streaming and atomic writes as the interchange format, no extra dependency, and a file
  the CLI converts back without the model. BatchNorm's ``num_batches_tracked`` has no Flax twin
  and is left out (named in the report).

Both record in the header metadata what the file holds (``content``: ``'base'`` for a plain
model, ``'model'`` for a whole AdaptedModel, with its adapter class, kwargs and patterns), the
source ``framework``, the ``layout``, and ``layer_kinds`` (``{module: kind}`` from the module
types), so that a file converts between layouts without its model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from twinformat.report import KeyReport

from .files import TensorFile, write_safetensors
from .sides import framework_of, model_metadata, model_state
from .views import ConversionError, TensorView, to_flax_layout

__all__ = ["load_flax_layout", "save_flax_layout", "save_torch_layout"]


def save_torch_layout(
    model: Any, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write every weight and buffer of ``model`` (PyTorch or Flax NNX) to a torch-layout file.

    Parameters
    ----------
    model : torch.nn.Module or flax.nnx.Module
        Adapted or not.
    path : path
        A ``.safetensors`` file, written atomically.
    metadata : dict of str to str, optional
        Extra header entries (they override the recorded ones of the same name).

    Example
    -------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "base.safetensors")
    >>> save_torch_layout(torch.nn.Linear(3, 2), path, {"note": "demo"})
    >>> with TensorFile(path) as f:
    ...     f.names, f.metadata["layout"], f.metadata["layer_kinds"], f.metadata["note"]
    (['weight', 'bias'], 'torch', '{"": "linear"}', 'demo')
    """
    arrays, header = model_arrays(model, "torch", metadata)
    write_safetensors(_safetensors_path(path), arrays, header)


def save_flax_layout(
    model: Any, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write every weight of ``model`` (PyTorch or Flax NNX) in Flax names and layouts.

    Every tensor's layer must be of a known kind (see :mod:`twinformat.kinds`); buffers with no
    Flax twin are left out. Arguments as in :func:`save_torch_layout`.

    Example
    -------
    >>> import os, tempfile
    >>> from flax import nnx
    >>> path = os.path.join(tempfile.mkdtemp(), "flax.safetensors")
    >>> save_flax_layout(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), path)
    >>> with TensorFile(path) as f:
    ...     f.names, f.shape("kernel"), f.layout
    (['kernel', 'bias'], (3, 2), 'flax')
    """
    arrays, header = model_arrays(model, "flax", metadata)
    kinds = json.loads(header["layer_kinds"])
    view, _ = to_flax_layout(TensorView.from_arrays(arrays), kinds)
    write_safetensors(_safetensors_path(path), {name: view.read(name) for name in view.names}, header)


def load_flax_layout(
    model: Any,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    rename: list[tuple[str, str]] | None = None,
) -> KeyReport:
    """Fill ``model`` (PyTorch or Flax NNX) in place from a Flax-layout file.

    The file's recorded layer kinds must agree with the model's module types. Same checks and
    report as :func:`~converters.torch_to_flax`; a refused load leaves the model unchanged.

    Example
    -------
    >>> import os, tempfile, torch
    >>> from flax import nnx
    >>> path = os.path.join(tempfile.mkdtemp(), "flax.safetensors")
    >>> save_flax_layout(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), path)
    >>> load_flax_layout(torch.nn.Linear(3, 2), path).loaded
    ['weight', 'bias']
    """
    from .convert import load_into

    with TensorFile(path) as tensor_file:
        if tensor_file.layout != "flax":
            raise ConversionError(
                f"{str(path)!r} is a {tensor_file.layout}-layout file, not a Flax-layout one; "
                "load it with converters.torch_to_flax / flax_to_torch"
            )
    if framework_of(model) is None:
        raise TypeError(f"expected a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}")
    return load_into(path, model, strict=strict, rename=rename)


def model_arrays(model: Any, layout: str, metadata: Mapping[str, str] | None) -> tuple[dict, dict[str, str]]:
    framework = framework_of(model)
    if framework is None:
        raise TypeError(f"expected a torch.nn.Module or a flax.nnx.Module, got {type(model).__name__}")
    state = model_state(model)
    arrays = {key: state.read(key) for key in state.specs}
    kinds, unknown, aliases = state.kinds, state.unknown, state.aliases
    if unknown and layout == "flax":
        listed = ", ".join(f"{m!r} ({t})" for m, t in unknown.items())
        from .views import UnknownLayerError

        raise UnknownLayerError(f"no Flax layout is known for layer(s) {listed}")
    header = model_metadata(model, framework)
    header["layout"] = layout
    header["layer_kinds"] = json.dumps(kinds, sort_keys=True)
    if aliases:
        header["tied_aliases"] = json.dumps(aliases, sort_keys=True)
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return arrays, header


def _safetensors_path(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"converters write .safetensors files, got {str(path)!r}")
    return path
