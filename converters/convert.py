"""Model-level conversion: fill a PyTorch or Flax NNX model from the other framework's weights.

``torch_to_flax(source, target)`` and ``flax_to_torch(source, target)`` move base weights,
adapter weights, or both, depending on what the source holds. The source is a model (adapted or
not), a checkpoint path (``.safetensors`` in either layout, or a pickled ``.ckpt``/``.pt``/
``.bin`` read with ``weights_only=True``) or a state dict in torch names and layouts; the target
is a model, filled in place. Every key, shape, dtype and layer kind is checked before anything is
written, so a refused conversion leaves the target exactly as it was.

Rules (strict, the default):

- a key the target lacks is *unexpected*, a key the source lacks is *missing*, a shape, dtype or
  layer-kind difference is *mis-shaped*; any of the three refuses the conversion with a
  :class:`~converters.views.ConversionError` whose ``report`` holds the three lists.
- An adapter checkpoint (metadata ``content='adapter'``, or a bare file of adapter keys only)
  is expected to lack the frozen base weights: only adapter keys and the keys of its
  ``unfrozen_layers`` count as missing.
- Buffers without a twin are named in ``report.notes``, never dropped silently: BatchNorm's
  ``num_batches_tracked`` (not converted to Flax; left as it is in a torch target), and tied
  aliases (two torch keys sharing storage, written once).

``strict=False`` loads what fits and reports the rest (missing and unexpected keys, dtype
differences cast with a note); mis-shaped keys are always refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from twinformat.dtypes import numpy_dtype
from twinformat.plan import Plan, plan_load, refuse
from twinformat.report import KeyReport

from .rename import RenameRule
from .sides import Source, Target, framework_of, read_source, target_of
from .views import renamed, renamed_modules

__all__ = ["flax_to_torch", "load_into", "torch_to_flax"]


def torch_to_flax(
    source: Any, target: Any, *, strict: bool = True, rename: Sequence[RenameRule] | None = None
) -> KeyReport:
    """Fill the Flax NNX model ``target`` in place from PyTorch weights.

    Parameters
    ----------
    source : torch.nn.Module, path or state dict
        A PyTorch model (adapted or not), a checkpoint file, or ``{name: tensor/array}`` in
        PyTorch names and layouts.
    target : flax.nnx.Module
        The twin model (same dotted module names, layers declared with PyTorch semantics).
    strict : bool
        Refuse on any missing, unexpected or mis-shaped key (the default).
    rename : list of (pattern, replacement)
        Maps source names where the twin's names differ (glob, or ``re:``-prefixed regex; see
        :mod:`converters.rename`); each applied rename is listed in ``report.notes``.

    Returns
    -------
    KeyReport
        ``loaded``, ``missing``, ``unexpected``, ``mismatched`` and ``notes``.

    Example
    -------
    >>> import torch
    >>> from flax import nnx
    >>> report = torch_to_flax(torch.nn.Linear(3, 2), nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> report.loaded
    ['weight', 'bias']
    """
    _check_direction(source, target, reads="torch", fills="flax")
    return load_into(source, target, strict=strict, rename=rename)


def flax_to_torch(
    source: Any, target: Any, *, strict: bool = True, rename: Sequence[RenameRule] | None = None
) -> KeyReport:
    """Fill the PyTorch model ``target`` in place from Flax NNX weights.

    Parameters
    ----------
    source : flax.nnx.Module, path or state dict
        A Flax NNX model (adapted or not), a checkpoint file in either layout, or
        ``{name: array}`` in PyTorch names and layouts.
    target : torch.nn.Module
        The twin model.
    strict, rename
        As in :func:`torch_to_flax`.

    Returns
    -------
    KeyReport

    Example
    -------
    >>> import torch
    >>> from flax import nnx
    >>> layer = torch.nn.Linear(3, 2)
    >>> report = flax_to_torch(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), layer)
    >>> report.ok
    True
    """
    _check_direction(source, target, reads="flax", fills="torch")
    return load_into(source, target, strict=strict, rename=rename)


_WEIGHTS = {"torch": "PyTorch", "flax": "Flax"}
_MODULE = {"torch": "torch.nn.Module", "flax": "flax.nnx.Module"}


def _check_direction(source: Any, target: Any, *, reads: str, fills: str) -> None:
    """Refuse a source model of the framework ``fills`` and a target that is not a ``fills`` model,
    naming the public function (``{reads}_to_{fills}``) and the one to use instead."""
    function, reverse = f"{reads}_to_{fills}", f"{fills}_to_{reads}"
    if framework_of(source) == fills:
        raise TypeError(
            f"{function} reads {_WEIGHTS[reads]} weights but the source is a {_MODULE[fills]}; use {reverse}"
        )
    if framework_of(target) != fills:
        raise TypeError(f"{function} fills a {_MODULE[fills]}, got a target of type {type(target).__name__}")


def load_into(
    source: Any, target: Any, *, strict: bool = True, rename: Sequence[RenameRule] | None = None
) -> KeyReport:
    """Fill ``target`` (a model of either framework) from ``source`` (a model of either framework,
    a checkpoint path or a state dict), validating everything before writing anything.

    Planning (:func:`twinformat.plan.plan_load`) reads specs and kinds only; each planned tensor
    is then read once and re-laid out once, on its way into the target.
    """
    src = read_source(source)
    try:
        tgt = target_of(target)
        src.view, rename_notes, old_of = renamed(src.view, rename)
        src.kinds = renamed_modules(src.kinds, old_of)
        src.unknown = renamed_modules(src.unknown, old_of)
        new_of = {old: new for new, old in old_of.items()}
        src.aliases = {new_of.get(a, a): new_of.get(p, p) for a, p in src.aliases.items()}
        src.buffers = {new_of.get(b, b) for b in src.buffers}
        plan = plan_load(src.state(), tgt.state, strict=strict)
        report = plan.report
        report.notes = rename_notes + report.notes
        if report.mismatched or (strict and not report.ok):
            raise refuse(report)
        tgt.assign(_materialize(src, tgt, plan))
        return report
    finally:
        src.close()


def _materialize(src: Source, tgt: Target, plan: Plan) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for key, source_key in plan.reads.items():
        array = src.view.read(source_key)
        if key in plan.casts:  # only with strict=False, noted in the plan
            array = array.astype(numpy_dtype(tgt.specs[key][0]))
        arrays[key] = array
    for alias, primary in plan.alias_checks:
        if not np.array_equal(src.view.read(alias).view(np.uint8), arrays[primary].view(np.uint8)):
            plan.report.mismatched.append(
                f"{alias}: tied to {primary} in the target but holds different values"
            )
            raise refuse(plan.report)
    return arrays
