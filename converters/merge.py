"""Merge an adapter file into a base checkpoint file: a plain merged base checkpoint.

Which adapters merge, and how, is their declaration's (:mod:`twinformat.adapters`: ``merge``);
LoRA's is described here, and a declared adapter of another class merges by its own rule.

Framework-free; works on files of either framework's origin (the format is shared) and on a
base file in either layout (the output keeps the base file's layout). For every adapted layer
``<name>``, the LoRA declaration's merge rule (:func:`twinformat.adapters.lora_merge`, what
``LoRA.merge`` computes): ``<name>.weight += scaling * up @ down`` in float32, cast back to the
weight's dtype (conv too: ``up (out, rank, 1..)``, ``down (rank, in, *k)``; embeddings:
``down (num, rank) @ up (dim, rank).T``), DoRA's magnitude then folded in; ``scaling`` is
``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``) from the adapter file's
``adapter_kwargs``. Layers the adapter file holds in full (its ``unfrozen_layers``) replace the
base's. Houlsby adapters have a nonlinearity between their projections and cannot be merged, and
a weight stored through a parametrization (``weight_norm``'s ``parametrizations.weight.original0/1``)
cannot be written exactly by a file merge: both are refused before anything is written.

Everything is checked from the two headers before the output is written; the base is streamed
tensor by tensor and the write is atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinformat.adapters import LORA, AdapterKind, factor_names, get_adapter, lora_scaling, wrapped_names
from twinformat.errors import MergeError, UnknownAdapterError
from twinformat.format import parse_metadata
from twinformat.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from twinformat.recorded import LAYER_KWARGS_FIELD
from twinformat.report import KeyReport

from .file_convert import progress_bar
from .files import TensorFile, TensorSpec, numpy_dtype, write_safetensors
from .peft import _unfrozen_module, peft_to_adapter_file
from .rename import RenameRule, module_renamer
from .views import (
    TensorView,
    _constant,
    file_layer_kinds,
    file_view,
    module_of,
    to_flax_layout,
    to_torch_layout,
)

__all__ = ["MergeError", "merge_adapter_file"]

_PREFIX = "adapted_model."


def merge_adapter_file(
    base_path: str | os.PathLike[str],
    adapter_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    adapter_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    rename: Sequence[RenameRule] | None = None,
) -> KeyReport:
    """Write ``out_path``: the base checkpoint with the LoRA adapter folded into its weights.

    Parameters
    ----------
    base_path : path
        The base model's checkpoint (plain ``state_dict()`` names, e.g. ``layer1.weight``; a whole
        AdaptedModel's file is accepted too and comes out with plain names), either layout.
    adapter_path : path
        An adapter checkpoint as ``AdaptedModel.saver`` writes it (either twin), or a PEFT LoRA
        adapter: its directory or its ``adapter_model.safetensors`` beside ``adapter_config.json``
        (read as :func:`converters.peft.peft_to_adapter_file` reads it, so merged with PEFT's rank,
        alpha and options).
    out_path : path
        The merged ``.safetensors`` file, in the base file's layout, with plain names.
    adapter_kwargs : dict, optional
        ``{'rank': ..., 'alpha': ...}`` for an adapter file without metadata (a SpeechBrain
        ``.ckpt``); must agree with the file's metadata when both exist.
    progress : bool
        Show a progress bar on stdout.
    rename : list of (pattern, replacement), optional
        Rename the adapter's modules (the layers it adapts and those it holds whole) to the base
        file's names, e.g. ``[("model.language_model.*", "language_model.model.*")]`` for a PEFT
        adapter trained on ``Gemma3ForConditionalGeneration`` merged into a hub file of it: glob or
        ``re:`` rules matched against module names, first match wins, a rule that matches no
        module is refused (:func:`converters.rename.module_renamer`).

    Returns
    -------
    KeyReport
        ``loaded`` lists the written tensors; ``notes`` the merged and replaced layers.

    Example
    -------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from twinformat.format import adapter_metadata
    >>> from converters.files import write_safetensors
    >>> folder = tempfile.mkdtemp()
    >>> base, adapter, out = (os.path.join(folder, n) for n in ("b.safetensors", "a.safetensors", "m.safetensors"))
    >>> write_safetensors(base, {"fc.weight": np.zeros((2, 3), np.float32)})
    >>> meta = adapter_metadata(framework="torch", adapter_class="LoRA", adapter_kwargs={"rank": 1, "alpha": 2.0})
    >>> write_safetensors(adapter, {"adapted_model.fc.adapter_down_proj.weight": np.ones((1, 3), np.float32),
    ...                             "adapted_model.fc.adapter_up_proj.weight": np.ones((2, 1), np.float32)}, meta)
    >>> merge_adapter_file(base, adapter, out).notes
    ['merged the LoRA update into fc.weight (scaling 2.0)']
    >>> TensorFile(out).get("fc.weight").tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    if not str(out_path).endswith(".safetensors"):
        raise ValueError(f"the merged file must be a .safetensors file, got {str(out_path)!r}")
    peft_directory = _peft_directory(adapter_path)
    if peft_directory is not None:
        if adapter_kwargs:
            raise ValueError(
                f"{str(adapter_path)!r} is a PEFT adapter: its adapter_config.json gives rank and alpha; "
                "pass no adapter_kwargs (--rank/--alpha)"
            )
        with tempfile.TemporaryDirectory() as scratch:
            ours = Path(scratch) / "adapter.safetensors"
            imported = peft_to_adapter_file(peft_directory, ours, rename=rename)
            report = merge_adapter_file(base_path, ours, out_path, progress=progress)
        report.notes[:0] = [f"read the PEFT adapter in {str(peft_directory)!r}", *imported.notes]
        return report
    with TensorFile(adapter_path) as adapter_file:
        declared, kwargs = _declaration(adapter_file, adapter_kwargs)
        adapter_kinds = file_layer_kinds(adapter_file)
        adapter = to_torch_layout(file_view(adapter_file), adapter_file.layout, adapter_kinds)
        updates, replacements = _split_adapter(adapter, str(adapter_path), declared)
        rename_notes: list[str] = []
        if rename:
            unfrozen = parse_metadata(adapter_file.metadata).get("unfrozen_layers") or []
            updates, replacements, adapter_kinds, rename_notes = _renamed(
                updates, replacements, adapter_kinds, unfrozen, rename
            )
        factors = {
            name: {leaf: adapter.read(key) for leaf, key in found.items()} for name, found in updates.items()
        }
        replaced = {key: adapter.read(source) for key, source in replacements.items()}
    with TensorFile(base_path) as base_file:
        kinds = file_layer_kinds(base_file)
        base = to_torch_layout(file_view(base_file, zero_copy=True), base_file.layout, kinds)
        base, kinds = _plain_names(base, kinds, str(base_path))
        wrapped_kinds = {layer: _wrapped_kind(layer, kinds, adapter_kinds, declared) for layer in factors}
        if declared is LORA:  # LoRA's factor shapes, rank and DoRA magnitude, from the headers
            notes = _check(base, factors, replaced, kwargs, wrapped_kinds, str(base_path))
        else:  # another declared adapter: its rule's output is checked against the weight's spec
            notes = _check_declared(base, factors, replaced, declared, str(base_path))
        notes[:0] = rename_notes
        merged = _merged_view(base, factors, replaced, kwargs, wrapped_kinds, declared)
        if base_file.layout == "flax":
            merged, dropped = to_flax_layout(merged, kinds)
            notes += dropped
        metadata = _merged_metadata(base_file.metadata, kinds, adapter_path, kwargs)
        total = sum(
            int(np.prod(shape)) * numpy_dtype(dtype).itemsize for dtype, shape in merged.specs.values()
        )
        with progress_bar(total, f"merge {os.path.basename(str(adapter_path))}", enabled=progress) as bar:
            write_safetensors(
                out_path, None, metadata, specs=merged.specs, produce=merged.read, progress=bar.update
            )
    return KeyReport(loaded=merged.names, notes=notes)


def _peft_directory(path: str | os.PathLike[str]) -> Path | None:
    """The PEFT adapter directory ``path`` names (the directory itself, or its weights file beside
    ``adapter_config.json``), or None for any other adapter checkpoint."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / PEFT_CONFIG_NAME).is_file() and (path.is_dir() or path.name == PEFT_WEIGHTS_NAME):
        return folder
    return None


def _declaration(
    adapter_file: TensorFile, given: Mapping[str, Any] | None
) -> tuple[AdapterKind, dict[str, Any]]:
    """The declaration of the file's adapter class and its kwargs (defaults filled in), refusing
    adapters that do not merge; a file that records no class (SpeechBrain's ``.ckpt``) is LoRA
    with the ``given`` rank and alpha."""
    meta = parse_metadata(adapter_file.metadata)
    adapter_class = meta.get("adapter_class") or ""
    where = str(adapter_file.path)
    try:
        declared = get_adapter(adapter_class) if adapter_class else LORA
    except UnknownAdapterError:
        raise MergeError(
            f"{where!r} holds {adapter_class} adapters, which no declaration describes "
            "(twinformat.adapters.register_adapter): their merge rule is unknown"
        ) from None
    if not declared.merges:
        raise MergeError(
            f"{where!r} holds {_plural(declared)} adapters, which cannot be merged: "
            f"{declared.merge_refusal or 'their declaration has no merge rule'}"
        )
    if adapter_file.metadata.get("named_adapters"):
        raise MergeError(
            f"{where!r} holds several adapters ({', '.join(sorted(json.loads(adapter_file.metadata['named_adapters'])))} "
            "besides its first): a file merge folds one; write the one you want to a file of its own "
            "(python -m converters peft-export --adapter-name NAME, then peft-import) or merge in a model "
            "with AdaptedModel.merge_and_unload(adapter_names=[...])"
        )
    if adapter_file.metadata.get(LAYER_KWARGS_FIELD) not in (None, "", "{}"):
        layers = sorted(json.loads(adapter_file.metadata[LAYER_KWARGS_FIELD]))
        raise MergeError(
            f"{where!r} records per-layer ranks or alphas (PEFT's rank_pattern/alpha_pattern: {layers[:4]}"
            f"{' ...' if len(layers) > 4 else ''}), which a file merge with one scaling would get wrong; "
            "merge in a model: AdaptedModel.from_pretrained(base, peft_dir).merge_and_unload()"
        )
    recorded = meta.get("adapter_kwargs") if adapter_class else None
    if recorded is None and given is None:
        raise MergeError(
            f"{where!r} records no adapter class and kwargs (a SpeechBrain .ckpt?): pass the LoRA "
            "rank and alpha it was trained with (adapter_kwargs={'rank': ..., 'alpha': ...}, CLI --rank/--alpha)"
        )
    kwargs = declared.kwargs(recorded if isinstance(recorded, dict) else {})
    if given is not None:
        for key, value in given.items():
            if recorded is not None and key in recorded and recorded[key] != value:
                raise MergeError(f"{where!r} records {key}={recorded[key]!r}, but {key}={value!r} was given")
            kwargs[key] = value
    if declared is LORA:
        rank = kwargs["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MergeError(f"{where!r}: LoRA rank must be an integer >= 1, got {rank!r}")
    return declared, kwargs


def _plural(declared: AdapterKind) -> str:
    return "Houlsby" if declared.name == "HoulsbyAdapterLinear" else declared.name


def _split_adapter(
    adapter: TensorView, where: str, declared: AdapterKind
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``({layer: {tensor relative to the adapter: adapter key}}, {plain base key: adapter key})``
    with plain layer names (``'adapter_down_proj.weight'``, ``'adapter_magnitude'``, ...).

    A declared factor is either a child layer (``<layer>.<factor>.weight``) or a tensor the
    adapter holds itself (``<layer>.<factor>``, DoRA's magnitude)."""
    factors = set(declared.factors)
    updates: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in adapter.names:
        if not key.startswith(_PREFIX):
            raise MergeError(
                f"{where!r}: key {key!r} does not start with {_PREFIX!r}; expected an AdaptedModel checkpoint"
            )
        module, _, leaf = key.rpartition(".")
        parent, _, child = module.rpartition(".")
        if child in factors:
            if leaf != "weight":
                raise MergeError(
                    f"{where!r}: {key!r} is not part of a {declared.name} adapter (its factor layers have no {leaf})"
                )
            layer = parent[len(_PREFIX) :] if parent != "adapted_model" else ""
            updates.setdefault(layer, {})[f"{child}.weight"] = key
        elif leaf in factors:
            layer = module[len(_PREFIX) :] if module != "adapted_model" else ""
            updates.setdefault(layer, {})[leaf] = key
        else:
            replacements[key[len(_PREFIX) :]] = key
    projections = ("adapter_down_proj", "adapter_up_proj") if declared is LORA else ()
    for layer, found in updates.items():
        missing = [p for p in projections if f"{p}.weight" not in found]
        if missing:
            raise MergeError(
                f"{where!r}: the adapter of layer {layer or '<root>'!r} lacks {missing[0]}.weight"
            )
    if not updates:
        raise MergeError(
            f"{where!r} holds no {declared.name} adapter weights (keys '...{declared.factors[0]}.weight')"
        )
    return updates, replacements


def _renamed(
    updates: dict[str, dict[str, str]],
    replacements: dict[str, str],
    adapter_kinds: Mapping[str, str],
    unfrozen: Sequence[str],
    rules: Sequence[RenameRule],
) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, str], list[str]]:
    """:func:`_split_adapter`'s layers and unfrozen tensors, and the adapter's layer kinds, in the
    names ``rules`` give the adapter's modules: its layers, and the modules holding its unfrozen
    tensors (those its ``unfrozen_layers`` select, else each tensor's own module); plus the notes."""
    held = [_unfrozen_module(source, unfrozen) or module_of(key) for key, source in replacements.items()]
    rename, notes = module_renamer([*updates, *held], rules)
    kinds = {
        _PREFIX + rename(module[len(_PREFIX) :]) if module.startswith(_PREFIX) else module: kind
        for module, kind in adapter_kinds.items()
    }
    return (
        {rename(layer): found for layer, found in updates.items()},
        {rename(key): source for key, source in replacements.items()},
        kinds,
        notes,
    )


def _wrapped_kind(
    layer: str, base_kinds: Mapping[str, str], adapter_kinds: Mapping[str, str], declared: AdapterKind
) -> str | None:
    """The adapted layer's kind, as recorded by the base file, or by the adapter file (its
    wrapped layer or, for an embedding, its down factor)."""
    inside = f"{_PREFIX}{layer}." if layer else _PREFIX
    kind = base_kinds.get(layer) or adapter_kinds.get(f"{inside}{declared.wrapped}")
    if kind is None and len(declared.wraps) == 1:
        kind = declared.wraps[0]
    if kind is None and adapter_kinds.get(f"{inside}adapter_down_proj") == "embedding":
        kind = "embedding"
    return kind


def _plain_names(base: TensorView, kinds: dict[str, str], where: str) -> tuple[TensorView, dict[str, str]]:
    """A whole AdaptedModel's base file, renamed to the plain model's names."""
    if not base.names or not all(name.startswith(_PREFIX) for name in base.names):
        return base, kinds
    specs, readers = {}, {}
    for name in base.names:
        parts = name[len(_PREFIX) :].split(".")
        if any(part in factor_names() for part in parts):
            raise MergeError(
                f"{where!r} holds adapter weights ({name!r}); the base file must be the model without adapters"
            )
        plain = ".".join(part for part in parts if part not in wrapped_names())
        specs[plain], readers[plain] = base.specs[name], base.readers[name]
    plain_kinds = {}
    for module, kind in kinds.items():
        if module == "adapted_model" or module.startswith(_PREFIX):
            parts = module.split(".")[1:]
            plain_kinds[".".join(p for p in parts if p not in wrapped_names())] = kind
    return TensorView(specs, readers), plain_kinds


def _check(
    base: TensorView,
    factors: Mapping[str, Mapping[str, np.ndarray]],
    replaced: Mapping[str, np.ndarray],
    kwargs: Mapping[str, Any],
    wrapped_kinds: dict[str, str | None],
    where: str,
) -> list[str]:
    notes = []
    rank, scaling, dora = kwargs["rank"], lora_scaling(kwargs), bool(kwargs.get("use_dora"))
    for layer, tensors in factors.items():
        key = f"{layer}.weight" if layer else "weight"
        down, up = tensors["adapter_down_proj.weight"], tensors["adapter_up_proj.weight"]
        if key not in base.specs:
            parametrized = [k for k in base.specs if k.startswith(f"{layer}.parametrizations.weight.")]
            if parametrized:
                raise MergeError(
                    f"layer {layer!r}: its weight is stored through a parametrization in {where!r} "
                    f"({', '.join(sorted(parametrized))}; weight_norm's g and v), which a file merge cannot "
                    "write exactly; merge in the model instead (torch_impl.merge_lora writes through the "
                    "parametrization's right_inverse and checks it) and save that"
                )
            raise MergeError(
                f"the adapter adapts layer {layer or '<root>'!r} but {where!r} has no {key!r}; where the "
                "two name the model differently, rename the adapter's modules (rename=, CLI --rename)"
            )
        weight_shape = tuple(base.shape(key))
        kind = wrapped_kinds.get(layer)
        if (
            kind is None
            and down.ndim == 2
            and weight_shape == (down.shape[0], up.shape[0]) != (up.shape[0], down.shape[1])
        ):
            kind = "embedding"  # only an embedding's factors give this weight's shape
        wrapped_kinds[layer] = kind
        embedding = kind == "embedding"
        down_rank = down.shape[1] if embedding else down.shape[0]
        if down_rank != rank or up.shape[1] != rank:
            raise MergeError(
                f"layer {layer!r}: adapter factors down {down.shape} / up {up.shape} do not have the recorded rank {rank}"
            )
        delta_shape = (down.shape[0], up.shape[0]) if embedding else (up.shape[0], *down.shape[1:])
        if weight_shape != delta_shape:
            raise MergeError(
                f"layer {layer!r}: the adapter's update has shape {delta_shape} but {key!r} in {where!r} "
                f"has shape {base.shape(key)}"
            )
        magnitude = tensors.get("adapter_magnitude")
        if dora != (magnitude is not None):
            raise MergeError(
                f"layer {layer!r}: the adapter file records use_dora={dora} but "
                f"{'has no' if dora else 'holds an'} adapter_magnitude for it"
            )
        if magnitude is not None and magnitude.shape != (weight_shape[0],):
            raise MergeError(
                f"layer {layer!r}: adapter_magnitude has shape {magnitude.shape}, expected ({weight_shape[0]},)"
            )
        extra = ", DoRA magnitude folded in" if dora else ""
        notes.append(f"merged the LoRA update into {key} (scaling {scaling}{extra})")
    for key, array in replaced.items():
        if key not in base.specs:
            raise MergeError(
                f"the adapter file holds {key!r} (an unfrozen layer) but {where!r} has no such tensor"
            )
        if base.specs[key] != _spec(array):
            raise MergeError(f"{key!r}: {_spec(array)} in the adapter file vs {base.specs[key]} in {where!r}")
        notes.append(f"{key}: taken from the adapter file (unfrozen layer)")
    return notes


def _check_declared(
    base: TensorView,
    factors: Mapping[str, Mapping[str, np.ndarray]],
    replaced: Mapping[str, np.ndarray],
    declared: AdapterKind,
    where: str,
) -> list[str]:
    """For a declared adapter other than LoRA: every adapted layer's weight is in the base file
    and the unfrozen tensors fit it; its merge rule's output is checked against the weight's spec
    as it is written (the write is atomic: a misfit leaves no file)."""
    notes = []
    for layer in factors:
        key = f"{layer}.weight" if layer else "weight"
        if key not in base.specs:
            raise MergeError(f"the adapter adapts layer {layer or '<root>'!r} but {where!r} has no {key!r}")
        notes.append(f"merged the {declared.name} update into {key}")
    for key, array in replaced.items():
        if key not in base.specs or base.specs[key] != _spec(array):
            raise MergeError(f"{key!r}: the adapter file's unfrozen tensor does not fit {where!r}")
        notes.append(f"{key}: taken from the adapter file (unfrozen layer)")
    return notes


def _merged_view(
    base: TensorView,
    factors: Mapping[str, Mapping[str, np.ndarray]],
    replaced: Mapping[str, np.ndarray],
    kwargs: Mapping[str, Any],
    wrapped_kinds: Mapping[str, str | None],
    declared: AdapterKind,
) -> TensorView:
    readers = dict(base.readers)
    for layer, tensors in factors.items():
        key = f"{layer}.weight" if layer else "weight"
        readers[key] = _merging_reader(
            base.readers[key], tensors, kwargs, wrapped_kinds.get(layer) or "linear", declared
        )
    for key, array in replaced.items():
        readers[key] = _constant(array)
    return TensorView(dict(base.specs), readers)


def _merging_reader(
    read: Callable[[], np.ndarray],
    tensors: Mapping[str, np.ndarray],
    kwargs: Mapping[str, Any],
    kind: str,
    declared: AdapterKind,
) -> Callable[[], np.ndarray]:
    rule = declared.merge
    assert rule is not None  # _declaration refused adapters without a rule

    def read_merged() -> np.ndarray:
        # A rule for an adapter wrapping several layouts takes the wrapped layer's kind too.
        if len(declared.wraps) > 1:
            return rule(read(), tensors, kwargs, kind)
        return rule(read(), tensors, kwargs)

    return read_merged


def _spec(array: np.ndarray) -> TensorSpec:
    from .files import dtype_name

    return dtype_name(array.dtype), tuple(array.shape)


def _merged_metadata(
    base_metadata: Mapping[str, str], kinds: Mapping[str, str], adapter_path: Any, kwargs: Mapping[str, Any]
) -> dict[str, str]:
    metadata = {
        k: v
        for k, v in base_metadata.items()
        if k not in ("adapter_class", "target_layers", "unfrozen_layers")
    }
    metadata.update(
        {
            "content": "base",
            "adapter_kwargs": "{}",
            "merged_adapter": os.path.basename(str(adapter_path)),
            "merged_adapter_kwargs": json.dumps(dict(kwargs), sort_keys=True),
        }
    )
    if kinds:
        metadata["layer_kinds"] = json.dumps(dict(kinds), sort_keys=True)
    metadata.setdefault("layout", "torch")
    return metadata
