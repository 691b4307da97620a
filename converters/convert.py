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
from dataclasses import dataclass
from typing import Any

import numpy as np

from interchange.kinds import get_kind

from .checkpoint import KeyReport, compare_keys, parse_metadata
from .files import TensorSpec, numpy_dtype
from .naming import as_patterns, matches_any
from .rename import RenameRule
from .sides import Source, Target, framework_of, is_adapter_key, read_source, target_of
from .views import ConversionError, UnknownLayerError, module_of, renamed, renamed_modules

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
    a checkpoint path or a state dict), validating everything before writing anything."""
    src = read_source(source)
    try:
        tgt = target_of(target)
        src.view, rename_notes, old_of = renamed(src.view, rename)
        src.kinds = renamed_modules(src.kinds, old_of)
        src.unknown = renamed_modules(src.unknown, old_of)
        new_of = {old: new for new, old in old_of.items()}
        src.aliases = {new_of.get(a, a): new_of.get(p, p) for a, p in src.aliases.items()}
        plan = _plan(src, tgt, strict=strict)
        report = plan.report
        report.notes = rename_notes + report.notes
        if report.mismatched or (strict and not report.ok):
            raise ConversionError(_refusal(report), report)
        tgt.assign(_materialize(src, tgt, plan))
        return report
    finally:
        src.close()


@dataclass
class _Plan:
    report: KeyReport
    reads: dict[str, str]  # target key -> source key
    alias_checks: list[tuple[str, str]]  # (source alias, primary): must hold equal values


def _plan(src: Source, tgt: Target, *, strict: bool) -> _Plan:
    """Decide, from names, shapes, dtypes and kinds only, which source key fills which target key."""
    notes: list[str] = []
    found = dict(src.view.specs)
    expected = {k: spec for k, spec in tgt.specs.items() if k not in tgt.aliases}
    reads = {key: key for key in found}
    alias_checks = []

    if tgt.framework == "flax":  # buffers Flax has no variable for
        for key in list(found):
            module, _, leaf = key.rpartition(".")
            kind = src.kinds.get(module) or tgt.kinds.get(module)
            if key not in expected and leaf in _no_flax_twin(kind):
                del found[key]
                notes.append(f"{key}: {kind} buffer without a Flax twin, not converted")
    for alias, primary in src.aliases.items():  # tied in the source, held once by the target
        if alias in found and alias not in expected and primary in expected:
            del found[alias]
            notes.append(f"{alias}: tied alias of {primary}, written once")
    for alias, primary in tgt.aliases.items():  # tied in the target: one write fills both
        if alias not in found:
            notes.append(f"{alias}: tied alias of {primary}, filled through it")
        elif primary in found:
            alias_checks.append((alias, primary))
            notes.append(f"{alias}: tied alias of {primary}, checked equal to it")
            del found[alias]
        else:
            found[primary] = found.pop(alias)
            reads[primary] = alias
            notes.append(f"{alias}: tied alias of {primary}, loaded through it")

    report = compare_keys(
        {k: spec[1] for k, spec in found.items()}, {k: spec[1] for k, spec in expected.items()}
    )
    errors, skipped = _kind_and_dtype_errors(src, tgt, report, found, expected, notes, strict=strict)
    report.loaded = [k for k in report.loaded if k not in errors and k not in skipped]
    report.mismatched.extend(errors.values())

    if src.adapter_only and report.missing:  # an adapter checkpoint lacks the frozen base by design
        unfrozen = as_patterns(parse_metadata(src.metadata).get("unfrozen_layers") or ())
        required = [k for k in report.missing if is_adapter_key(k) or _under_unfrozen(k, unfrozen)]
        if len(report.missing) > len(required):
            notes.append(
                f"{len(report.missing) - len(required)} frozen base tensor(s) absent from the adapter "
                "checkpoint were left as they are"
            )
        report.missing = required
    if tgt.framework == "torch":  # e.g. num_batches_tracked, which a Flax origin cannot supply
        kept = [
            k for k in report.missing if k.rpartition(".")[2] in _no_flax_twin(tgt.kinds.get(module_of(k)))
        ]
        notes.extend(f"{key}: buffer without a Flax twin, left as it is" for key in kept)
        report.missing = [k for k in report.missing if k not in kept]
    report.notes = notes
    return _Plan(report, {k: reads[k] for k in report.loaded}, alias_checks)


def _kind_and_dtype_errors(
    src: Source,
    tgt: Target,
    report: KeyReport,
    found: dict[str, TensorSpec],
    expected: dict[str, TensorSpec],
    notes: list[str],
    *,
    strict: bool,
) -> tuple[dict[str, str], set[str]]:
    """``({key: message}, skipped keys)``: loaded keys whose layer kind or dtype does not fit,
    and (not strict) keys of layers of unknown type, which are skipped with a note; raises
    :class:`UnknownLayerError` (strict) for layers of unknown type whose layout would change."""
    crosses = not (tgt.framework == "torch" and src.framework != "flax" and src.layout == "torch")
    errors: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for key in report.loaded:
        module = module_of(key)
        src_kind, tgt_kind = src.kinds.get(module), tgt.kinds.get(module)
        if src_kind and tgt_kind and src_kind != tgt_kind:
            errors[key] = f"{key}: a {src_kind} layer in the source vs a {tgt_kind} layer in the target"
        elif crosses and tgt_kind is None:
            unknown[module] = tgt.unknown.get(module) or src.unknown.get(module) or "unknown type"
        elif found[key][0] != expected[key][0]:
            if strict:
                errors[key] = (
                    f"{key}: dtype {found[key][0]} in the source vs {expected[key][0]} in the target"
                )
            else:
                notes.append(f"{key}: cast from {found[key][0]} to the target's {expected[key][0]}")
    for key in (*report.unexpected, *report.missing):  # weights of unknown layers the other side lacks
        module = module_of(key)
        if crosses and (module in src.unknown or module in tgt.unknown):
            unknown[module] = src.unknown.get(module) or tgt.unknown[module]
    if unknown and strict:
        listed = ", ".join(f"{m!r} ({t})" for m, t in list(unknown.items())[:10])
        raise UnknownLayerError(
            f"no PyTorch<->Flax layout is known for layer(s) {listed}; supported layer types: Linear, "
            "Conv1d/2d/3d, LayerNorm, GroupNorm, RMSNorm, Embedding, BatchNorm1d/2d/3d"
        )
    for module, type_name in unknown.items():
        notes.append(f"{module}: layer of type {type_name} has no known PyTorch<->Flax layout, skipped")
    skipped = {key for key in report.loaded if module_of(key) in unknown}
    return errors, skipped


def _materialize(src: Source, tgt: Target, plan: _Plan) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for key, source_key in plan.reads.items():
        array = src.view.read(source_key)
        want = numpy_dtype(tgt.specs[key][0])
        if array.dtype != want:
            array = array.astype(want)  # only with strict=False, noted in the plan
        arrays[key] = array
    for alias, primary in plan.alias_checks:
        if not np.array_equal(src.view.read(alias).view(np.uint8), arrays[primary].view(np.uint8)):
            plan.report.mismatched.append(
                f"{alias}: tied to {primary} in the target but holds different values"
            )
            raise ConversionError(_refusal(plan.report), plan.report)
    return arrays


def _refusal(report: KeyReport) -> str:
    return "conversion refused, the target was left unchanged:\n" + report.describe()


def _no_flax_twin(kind: str | None) -> set[str]:
    return set(get_kind(kind).torch_only) if kind else set()


def _under_unfrozen(key: str, patterns: tuple[str, ...]) -> bool:
    """True when ``key`` lies in a layer matched by ``unfrozen_layers`` (names relative to the
    adapted model, as AdaptedModel matches them)."""
    if not patterns:
        return False
    parts = module_of(key).split(".")
    if parts and parts[0] == "adapted_model":
        parts = parts[1:]
    return any(matches_any(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))
