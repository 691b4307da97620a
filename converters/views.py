"""Lazy views of named tensors, and the layout changes between them.

Framework-free. A :class:`TensorView` knows each tensor's name, dtype and shape up front and
reads (and re-lays out) a tensor only when asked, so a file-to-file conversion holds one tensor
at a time. Views compose: a file in either layout becomes a torch-layout view
(:func:`to_torch_layout`), which can be renamed (:func:`renamed`) and turned into a Flax-layout
view (:func:`to_flax_layout`). The layer kind of every tensor comes from module types, recorded
as ``{module: kind}`` (a model's ``named_modules()``, or a file's ``layer_kinds`` metadata
written from one), never guessed from a tensor's name or rank.

Example
-------
>>> import numpy as np
>>> view = TensorView.from_arrays({"fc.weight": np.ones((2, 3), np.float32)})
>>> flax, notes = to_flax_layout(view, {"fc": "linear"})
>>> flax.names, flax.shape("fc.kernel"), to_torch_layout(flax, "flax", {"fc": "linear"}).names
(['fc.kernel'], (3, 2), ['fc.weight'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from twinformat import kinds as layout
from twinformat.adapters import ADAPTERS, implied_kinds
from twinformat.dtypes import TensorSpec, dtype_name
from twinformat.errors import CheckpointError, ConversionError, LayoutError, NoMatchError, UnknownLayerError
from twinformat.kinds import BUFFER_NAMES, KINDS, canonical_kind
from twinformat.kinds import is_buffer_name as is_buffer
from twinformat.names import matches_any

from .files import TensorFile, contiguous
from .rename import RenameRule, rename_keys

__all__ = [
    "BUFFER_NAMES",
    "ConversionError",
    "TensorView",
    "UnknownLayerError",
    "file_layer_kinds",
    "file_view",
    "is_buffer",
    "module_of",
    "renamed",
    "renamed_modules",
    "resolve_kinds",
    "to_flax_layout",
    "to_torch_layout",
]


def module_of(key: str) -> str:
    """The module part of a tensor name: ``'a.b.weight'`` -> ``'a.b'`` (``''`` for a root tensor)."""
    return key.rpartition(".")[0]


@dataclass
class TensorView:
    """Named tensors known by spec, read on demand.

    Attributes
    ----------
    specs : dict[str, tuple[str, tuple[int, ...]]]
        ``name -> (safetensors dtype string, shape)``, in order.
    readers : dict[str, Callable[[], np.ndarray]]
        ``name -> read()``; each call returns a fresh C-contiguous array.
    """

    specs: dict[str, TensorSpec]
    readers: dict[str, Callable[[], np.ndarray]]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TensorView:
        specs = {name: (dtype_name(a.dtype), tuple(a.shape)) for name, a in arrays.items()}
        return cls(specs, {name: _constant(a) for name, a in arrays.items()})

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name][1]

    def read(self, name: str) -> np.ndarray:
        return self.readers[name]()

    def select(self, names: Iterable[str]) -> TensorView:
        keep = list(names)
        return TensorView({n: self.specs[n] for n in keep}, {n: self.readers[n] for n in keep})


def file_view(tensor_file: TensorFile, *, zero_copy: bool = False) -> TensorView:
    """The tensors of an open file under their names in the file.

    ``zero_copy=True`` reads through a memory map (:meth:`TensorFile.view`): read-only arrays
    that stay valid while the file is open, for streaming straight into another file.
    """
    read = tensor_file.view if zero_copy else tensor_file.get
    return TensorView(
        {name: tensor_file.spec(name) for name in tensor_file.names},
        {name: _reader(read, name) for name in tensor_file.names},
    )


def _constant(array: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: array


def _reader(read: Callable[[str], np.ndarray], name: str) -> Callable[[], np.ndarray]:
    return lambda: read(name)


def to_torch_layout(view: TensorView, source_layout: str, kinds: Mapping[str, str]) -> TensorView:
    """A torch-layout view of ``view`` (a no-op for ``'torch'``; Flax names/layouts mapped back).

    Raises :class:`UnknownLayerError` naming the tensors whose module has no recorded kind.
    """
    if source_layout == "torch":
        return view
    if source_layout != "flax":
        raise CheckpointError(f"unknown layout {source_layout!r}; expected 'torch' or 'flax'")
    _require_kinds(view.names, kinds, "convert Flax-layout tensors to PyTorch's")
    return _relaid_out(view, view.names, kinds, layout.flax_to_torch_shape, layout.flax_to_torch_view)


def to_flax_layout(
    view: TensorView, kinds: Mapping[str, str], *, buffers: Sequence[str] = ()
) -> tuple[TensorView, list[str]]:
    """A Flax-layout view of a torch-layout ``view``; returns ``(view, notes)``.

    Buffers Flax has no variable for are left out and named in the notes: those a layer kind
    declares (BatchNorm's ``num_batches_tracked``) and those that are no layer's parameter
    (:func:`is_buffer`: ``position_ids``, ``token_type_ids``, causal masks, and the tensors
    matching the glob patterns ``buffers``). Every other tensor is a parameter and needs a known
    kind: :class:`UnknownLayerError` names those that have none.
    """
    notes = []
    keep = []
    for name in view.names:
        module, _, leaf = name.rpartition(".")
        if module in kinds and leaf in layout.get_kind(kinds[module]).torch_only:
            notes.append(f"{name}: {kinds[module]} buffer without a Flax twin, not converted")
        elif is_buffer(name, kinds, buffers):
            notes.append(f"{name}: buffer (not a parameter), left out of the Flax layout")
        else:
            keep.append(name)
    _require_kinds(keep, kinds, "convert PyTorch-layout tensors to Flax's")
    return _relaid_out(view, keep, kinds, layout.torch_to_flax_shape, layout.torch_to_flax_view), notes


def renamed(
    view: TensorView, rules: Sequence[RenameRule] | None
) -> tuple[TensorView, list[str], dict[str, str]]:
    """``view`` with names mapped by ``rules`` (see :mod:`converters.rename`); returns
    ``(view, notes, {new name: old name})``."""
    if not rules:
        return view, [], {name: name for name in view.names}
    new_names, notes = rename_keys(view.names, rules)
    old_of = dict(zip(new_names, view.names, strict=True))
    specs = {new: view.specs[old] for new, old in old_of.items()}
    readers = {new: view.readers[old] for new, old in old_of.items()}
    return TensorView(specs, readers), notes, old_of


def renamed_modules(by_module: Mapping[str, str], old_of: Mapping[str, str]) -> dict[str, str]:
    """Carry ``{module: value}`` (layer kinds, type names) over a rename of tensor names."""
    out = dict(by_module)
    for new, old in old_of.items():
        if new != old and module_of(old) in by_module:
            out[module_of(new)] = by_module[module_of(old)]
    return out


def _relaid_out(
    view: TensorView,
    names: Sequence[str],
    kinds: Mapping[str, str],
    shape_rule: Callable,
    array_rule: Callable,
) -> TensorView:
    """A view of the tensors ``names`` of ``view``, each renamed and reshaped by ``shape_rule`` and
    re-laid out when read by ``array_rule`` (one direction's pair of :mod:`twinformat.kinds`
    rules), by the kind of its module in ``kinds``."""
    specs, readers = {}, {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        kind = kinds[module]
        new_leaf, shape = shape_rule(kind, leaf, view.shape(name))
        new = f"{module}.{new_leaf}" if module else new_leaf
        specs[new] = (view.specs[name][0], shape)
        readers[new] = _relayout(view.readers[name], array_rule, kind, leaf)
    return TensorView(specs, readers)


def _relayout(
    read: Callable[[], np.ndarray], convert: Callable, kind: str, leaf: str
) -> Callable[[], np.ndarray]:
    def read_converted() -> np.ndarray:
        return contiguous(convert(kind, leaf, read())[1])

    return read_converted


def _require_kinds(names: Sequence[str], kinds: Mapping[str, str], action: str) -> None:
    unknown = sorted({module_of(name) for name in names if module_of(name) not in kinds})
    if unknown:
        shown = ", ".join(repr(m) for m in unknown[:10]) + (
            f" ... ({len(unknown) - 10} more)" if len(unknown) > 10 else ""
        )
        raise UnknownLayerError(
            f"cannot {action}: no layer kind is known for module(s) {shown}. A layer's kind comes from its "
            "module type, never from a tensor's name or rank: convert from the model itself, write the file "
            "with save_torch_layout (which records 'layer_kinds'), or pass the kinds explicitly "
            f"({{module: kind}}; a module may be a glob such as '*.LayerNorm'; kinds: {list(layout.KINDS)}; "
            "on the command line --kinds, or --like a Flax twin of the model)"
        )


_GLOB = set("*?[")


def file_layer_kinds(tensor_file: TensorFile, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The layer kinds known for ``tensor_file``: recorded, implied by its adapter class, and
    ``extra`` (exact names or glob patterns, see :func:`resolve_kinds`); a kind given twice
    must agree."""
    kinds = dict(tensor_file.layer_kinds)
    adapter = ADAPTERS.get(tensor_file.metadata.get("adapter_class", ""))
    if tensor_file.layout == "torch" and adapter is not None:  # the declaration fixes its factors' kinds
        specs = {name: tensor_file.spec(name) for name in tensor_file.names}
        for module, kind in implied_kinds(tensor_file.names, specs, adapter, kinds).items():
            kinds.setdefault(module, kind)
    modules = list(dict.fromkeys(module_of(name) for name in tensor_file.names))
    for module, kind in resolve_kinds(extra or {}, modules).items():
        if module in kinds and _same_kind(kinds[module]) != kind:
            raise ValueError(
                f"module {module!r} is recorded as a {kinds[module]} layer in {str(tensor_file.path)!r}, "
                f"but was given as {kind}"
            )
        kinds[module] = kind
    return kinds


def resolve_kinds(given: Mapping[str, str], modules: Sequence[str]) -> dict[str, str]:
    """``{module: canonical kind}`` from ``given``, whose keys are module names or glob patterns.

    An exact name applies as given (whether or not ``modules`` holds it: a kinds file written
    from a twin names modules a checkpoint may lack); a pattern (``*``, ``?``, ``[``) applies to
    each of ``modules`` it matches that no exact name and no earlier pattern gave. A pattern
    that matches none of ``modules`` raises :class:`~twinformat.errors.NoMatchError`; an
    unknown kind :class:`~twinformat.errors.LayoutError`.

    Example
    -------
    >>> resolve_kinds({"*.LayerNorm": "layernorm", "*": "linear", "head": "conv"},
    ...               ["enc.LayerNorm", "enc.dense", "head"])
    {'head': 'conv', 'enc.LayerNorm': 'layer_norm', 'enc.dense': 'linear'}
    """
    out = {m: _given_kind(m, k) for m, k in given.items() if not _GLOB & set(m)}
    for pattern, kind in given.items():
        if not _GLOB & set(pattern):
            continue
        kind = _given_kind(pattern, kind)
        hits = [m for m in modules if matches_any(m, (pattern,))]
        if not hits:
            shown = ", ".join(repr(m) for m in list(modules)[:8]) or "(none)"
            raise NoMatchError(f"--kinds pattern {pattern!r} matches no module; some modules are: {shown}")
        for module in hits:
            out.setdefault(module, kind)
    return out


def _given_kind(module: str, kind: str) -> str:
    try:
        return canonical_kind(kind)
    except LayoutError:
        raise LayoutError(
            f"layer kind {kind!r} given for module {module!r} is not one of {list(KINDS)} (or their old names)"
        ) from None


def _same_kind(kind: str) -> str:
    try:
        return canonical_kind(kind)
    except KeyError:
        return kind
