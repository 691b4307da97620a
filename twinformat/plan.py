"""The one load planner: which source tensor fills which target tensor, decided from names,
dtypes, shapes and layer kinds alone, before anything is read or written.

Framework-free. Model conversion (``converters.torch_to_flax``/``flax_to_torch``), both twins'
``AdaptedModel.loader`` and sharded loading describe their two ends as
:class:`~twinformat.state.FlatState` (PyTorch names and layouts) and call :func:`plan_load`;
then they read each planned tensor once, re-lay it out once, and write it.

Rules (``strict=True``, the default):

- a key the target lacks is *unexpected*, a key the source lacks is *missing*, a shape, dtype or
  layer-kind difference is *mis-shaped*; any of the three refuses the load
  (:func:`refuse` raises :class:`~twinformat.errors.ConversionError` with the three lists).
- An adapter checkpoint (``source.adapter_only``) lacks the frozen base weights by design: only
  adapter keys and the keys of its ``unfrozen_layers`` count as missing.
- Buffers are not weights: a buffer one side has and the other lacks (``position_ids``,
  ``token_type_ids``, BatchNorm's ``num_batches_tracked``, causal masks) is named in
  ``report.notes`` and left out, or left as it is in the target; strict stays strict for
  parameters. A buffer is one the side declares (``FlatState.buffers``: a torch model's
  ``named_buffers()``, a kind's ``torch_only`` tensors), one of the well-known buffer names of
  :data:`twinformat.kinds.BUFFER_NAMES` outside a layer that has such a parameter, or an
  integer or boolean tensor, which is never a trained weight.
- Tied aliases (two torch keys sharing storage) are written once; a target alias whose source
  holds both keys is checked equal to its primary.
- Crossing layouts (to or from Flax) needs each tensor's layer kind: a layer of unknown type
  raises :class:`~twinformat.errors.UnknownLayerError` (strict) or is skipped with a note.

``strict=False`` loads what fits and reports the rest (dtype differences cast, with a note);
mis-shaped keys are always refused.

Example
-------
>>> src = FlatState({"fc.weight": ("F32", (2, 3)), "pos": ("I64", (1, 4))}, kinds={"fc": "linear"},
...                 framework="torch")
>>> tgt = FlatState({"fc.weight": ("F32", (2, 3))}, kinds={"fc": "linear"}, framework="flax")
>>> plan = plan_load(src, tgt)
>>> plan.reads, plan.report.notes
({'fc.weight': 'fc.weight'}, ['pos: buffer (I64) the target does not hold, not converted'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapters import is_adapter_key
from .dtypes import TensorSpec
from .errors import ConversionError, UnknownLayerError
from .kinds import KINDS, WEIGHT_NORM_SPELLINGS, get_kind, is_buffer_name, split_key
from .names import matches_any
from .report import KeyReport, compare_keys
from .state import FlatState

__all__ = ["Plan", "is_buffer", "plan_load", "refuse"]

# Integer and boolean dtypes: position ids, token type ids, step counters, masks. No layer
# kind trains such a tensor, so a source's integer tensor the target lacks is a buffer.
_NON_WEIGHT_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


@dataclass
class Plan:
    """What a load will do.

    ``reads`` maps each target key to the source key that fills it; ``alias_checks`` lists
    ``(source alias, primary)`` pairs that must hold equal values; ``casts`` the target keys whose
    dtype differs (only with ``strict=False``).
    """

    report: KeyReport
    reads: dict[str, str] = field(default_factory=dict)
    alias_checks: list[tuple[str, str]] = field(default_factory=list)
    casts: list[str] = field(default_factory=list)


def is_buffer(state: FlatState, key: str) -> bool:
    """Whether ``key`` of ``state`` is a buffer rather than a weight (see the module rules)."""
    if key in state.buffers or state.specs[key][0] in _NON_WEIGHT_DTYPES:
        return True
    if is_buffer_name(key, state.kinds):  # position_ids, causal masks, ... (twinformat.kinds)
        return True
    layer, leaf = split_key(key, state.kinds)
    kind = state.kinds.get(layer)
    return kind is not None and leaf in get_kind(kind).torch_only


def plan_load(source: FlatState, target: FlatState, *, strict: bool = True) -> Plan:
    """Plan filling ``target`` from ``source`` (both in PyTorch names and layouts).

    Reads specs, kinds and flags only. The caller refuses with :func:`refuse` when
    ``plan.report.mismatched`` or (strict) ``not plan.report.ok``.
    """
    notes: list[str] = []
    found = dict(source.specs)
    expected = {k: spec for k, spec in target.specs.items() if k not in target.aliases}
    reads = {key: key for key in found}
    plan = Plan(KeyReport())

    for alias, primary in source.aliases.items():  # tied in the source, held once by the target
        if alias in found and alias not in expected and primary in expected:
            del found[alias]
            notes.append(f"{alias}: tied alias of {primary}, written once")
    for alias, primary in target.aliases.items():  # tied in the target: one write fills both
        if alias not in found:
            notes.append(f"{alias}: tied alias of {primary}, filled through it")
        elif primary in found:
            plan.alias_checks.append((alias, primary))
            notes.append(f"{alias}: tied alias of {primary}, checked equal to it")
            del found[alias]
        else:
            found[primary] = found.pop(alias)
            reads[primary] = alias
            notes.append(f"{alias}: tied alias of {primary}, loaded through it")
    for old, new in _weight_norm_spellings(found, expected):  # the other spelling of the same tensor
        found[new] = found.pop(old)
        reads[new] = reads.pop(old)
        notes.append(f"{old}: weight norm's {_spelling(old)} spelling, loaded as {new}")
    for key in [k for k in found if k not in expected and is_buffer(source, k)]:
        del found[key]
        notes.append(f"{key}: buffer ({source.specs[key][0]}) the target does not hold, not converted")

    report = compare_keys({k: s[1] for k, s in found.items()}, {k: s[1] for k, s in expected.items()})
    errors, skipped = _kind_and_dtype_errors(source, target, report, found, expected, notes, plan, strict)
    report.loaded = [k for k in report.loaded if k not in errors and k not in skipped]
    report.mismatched.extend(errors.values())

    if source.adapter_only and report.missing:  # an adapter checkpoint lacks the frozen base
        required = [k for k in report.missing if is_adapter_key(k) or _under_unfrozen(k, source.unfrozen)]
        if len(report.missing) > len(required):
            notes.append(
                f"{len(report.missing) - len(required)} frozen base tensor(s) absent from the adapter "
                "checkpoint were left as they are"
            )
        report.missing = required
    kept = [k for k in report.missing if is_buffer(target, k)]
    notes.extend(f"{key}: buffer the source does not hold, left as it is" for key in kept)
    report.missing = [k for k in report.missing if k not in kept]
    report.notes = notes
    plan.report = report
    plan.reads = {k: reads[k] for k in report.loaded}
    plan.casts = [k for k in plan.casts if k in plan.reads]
    return plan


def refuse(report: KeyReport, what: str = "conversion") -> ConversionError:
    """The error for a refused plan: its message lists the three lists; the target is unchanged."""
    return ConversionError(f"{what} refused, the target was left unchanged:\n" + report.describe(), report)


def _weight_norm_spellings(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(source key, target key)`` pairs naming the same weight-norm tensor in the two spellings,
    where the target expects the other spelling than the source holds."""
    pairs = []
    for key in found:
        if key in expected:
            continue
        for old, new in WEIGHT_NORM_SPELLINGS.items():
            for have, want in ((f".{old}", f".{new}"), (f".{new}", f".{old}")):
                if key.endswith(have):
                    other = key[: -len(have)] + want
                    if other in expected and other not in found:
                        pairs.append((key, other))
    return pairs


def _spelling(key: str) -> str:
    return "older (weight_g/weight_v)" if key.endswith((".weight_g", ".weight_v")) else "parametrizations"


def _kind_and_dtype_errors(
    source: FlatState,
    target: FlatState,
    report: KeyReport,
    found: dict[str, TensorSpec],
    expected: dict[str, TensorSpec],
    notes: list[str],
    plan: Plan,
    strict: bool,
) -> tuple[dict[str, str], set[str]]:
    """``({key: message}, skipped keys)``: loaded keys whose layer kind or dtype does not fit,
    and (not strict) keys of layers of unknown type, which are skipped with a note; raises
    :class:`UnknownLayerError` (strict) for layers of unknown type whose layout would change."""
    crosses = "flax" in (source.framework, target.framework, source.layout)
    errors: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for key in report.loaded:
        layer = split_key(key, target.kinds)[0]
        src_kind, tgt_kind = source.kinds.get(layer), target.kinds.get(layer)
        if src_kind and tgt_kind and get_kind(src_kind) != get_kind(tgt_kind):
            errors[key] = f"{key}: a {src_kind} layer in the source vs a {tgt_kind} layer in the target"
        elif crosses and tgt_kind is None:
            unknown[layer] = target.unknown.get(layer) or source.unknown.get(layer) or "unknown type"
        elif found[key][0] != expected[key][0]:
            if strict:
                errors[key] = (
                    f"{key}: dtype {found[key][0]} in the source vs {expected[key][0]} in the target"
                )
            else:
                plan.casts.append(key)
                notes.append(f"{key}: cast from {found[key][0]} to the target's {expected[key][0]}")
    for key in (*report.unexpected, *report.missing):  # weights of unknown layers the other side lacks
        layer = key.rpartition(".")[0]
        if crosses and (layer in source.unknown or layer in target.unknown):
            unknown[layer] = source.unknown.get(layer) or target.unknown[layer]
    if unknown and strict:
        listed = ", ".join(f"{m!r} ({t})" for m, t in list(unknown.items())[:10])
        raise UnknownLayerError(
            f"no PyTorch<->Flax layout is known for layer(s) {listed}; known layer kinds: {sorted(KINDS)} "
            "(each twin's twinformat.KIND_OF_TYPE says which module types have them)"
        )
    for layer, type_name in unknown.items():
        notes.append(f"{layer}: layer of type {type_name} has no known PyTorch<->Flax layout, skipped")
    skipped = {key for key in report.loaded if split_key(key, target.kinds)[0] in unknown}
    return errors, skipped


def _under_unfrozen(key: str, patterns: Sequence[str]) -> bool:
    """True when ``key`` lies in a layer matched by ``unfrozen_layers`` (names relative to the
    adapted model, as AdaptedModel matches them)."""
    if not patterns:
        return False
    parts = key.rpartition(".")[0].split(".")
    if parts and parts[0] == "adapted_model":
        parts = parts[1:]
    return any(matches_any(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))
