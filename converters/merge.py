"""Merge a LoRA adapter file into a base checkpoint file: a plain merged base checkpoint.

Framework-free; works on files of either framework's origin (the format is shared) and on a
base file in either layout (the output keeps the base file's layout). For every adapted layer
``<name>``: ``<name>.weight += scaling * up @ down`` computed in float32 and cast back to the
weight's dtype, exactly as ``LoRA.merge`` does (conv too: ``up (out, rank, 1..)``,
``down (rank, in, *k)``); ``scaling = alpha / rank`` from the adapter file's ``adapter_kwargs``.
Layers the adapter file holds in full (its ``unfrozen_layers``) replace the base's. Houlsby
adapters have a nonlinearity between their projections and cannot be merged: refused.

Everything is checked from the two headers before the output is written; the base is streamed
tensor by tensor and the write is atomic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from interchange.errors import MergeError

from .checkpoint import KeyReport, parse_metadata
from .file_convert import file_layer_kinds, progress_bar
from .files import TensorFile, TensorSpec, numpy_dtype, write_safetensors
from .views import ADAPTER_PROJECTIONS, TensorView, file_view, to_flax_layout, to_torch_layout

__all__ = ["MergeError", "merge_adapter_file"]

_PREFIX = "adapted_model."
_WRAPPED = ("pretrained_module", "pretrained_linear")
_LORA_DEFAULTS = {"rank": 16, "alpha": 1.0}  # LoRA's signature defaults, as AdaptedModel uses them


def merge_adapter_file(
    base_path: str | os.PathLike[str],
    adapter_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    adapter_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> KeyReport:
    """Write ``out_path``: the base checkpoint with the LoRA adapter folded into its weights.

    Parameters
    ----------
    base_path : path
        The base model's checkpoint (plain ``state_dict()`` names, e.g. ``layer1.weight``; a whole
        AdaptedModel's file is accepted too and comes out with plain names), either layout.
    adapter_path : path
        An adapter checkpoint as ``AdaptedModel.saver`` writes it (either twin).
    out_path : path
        The merged ``.safetensors`` file, in the base file's layout, with plain names.
    adapter_kwargs : dict, optional
        ``{'rank': ..., 'alpha': ...}`` for an adapter file without metadata (a SpeechBrain
        ``.ckpt``); must agree with the file's metadata when both exist.
    progress : bool
        Show a progress bar on stdout.

    Returns
    -------
    KeyReport
        ``loaded`` lists the written tensors; ``notes`` the merged and replaced layers.

    Example
    -------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from converters.checkpoint import adapter_metadata
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
    with TensorFile(adapter_path) as adapter_file:
        scaling, rank, kwargs = _scaling(adapter_file, adapter_kwargs)
        adapter = to_torch_layout(
            file_view(adapter_file), adapter_file.layout, file_layer_kinds(adapter_file)
        )
        updates, replacements = _split_adapter(adapter, str(adapter_path))
        factors = {name: (adapter.read(down), adapter.read(up)) for name, (down, up) in updates.items()}
        replaced = {key: adapter.read(source) for key, source in replacements.items()}
    with TensorFile(base_path) as base_file:
        kinds = file_layer_kinds(base_file)
        base = to_torch_layout(file_view(base_file, zero_copy=True), base_file.layout, kinds)
        base, kinds = _plain_names(base, kinds, str(base_path))
        notes = _check(base, factors, replaced, rank, scaling, str(base_path))
        merged = _merged_view(base, factors, replaced, scaling)
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


def _scaling(adapter_file: TensorFile, given: Mapping[str, Any] | None) -> tuple[float, int, dict[str, Any]]:
    meta = parse_metadata(adapter_file.metadata)
    adapter_class = meta.get("adapter_class") or ""
    where = str(adapter_file.path)
    if adapter_class == "HoulsbyAdapterLinear":
        raise MergeError(
            f"{where!r} holds Houlsby adapters, which cannot be merged: the activation between their "
            "projections is not linear"
        )
    if adapter_class not in ("", "LoRA"):
        raise MergeError(f"{where!r} holds {adapter_class} adapters; only LoRA adapters can be merged")
    recorded = meta.get("adapter_kwargs") if adapter_class else None
    if recorded is None and given is None:
        raise MergeError(
            f"{where!r} records no adapter class and kwargs (a SpeechBrain .ckpt?): pass the LoRA "
            "rank and alpha it was trained with (adapter_kwargs={'rank': ..., 'alpha': ...}, CLI --rank/--alpha)"
        )
    kwargs = {**_LORA_DEFAULTS, **(recorded if isinstance(recorded, dict) else {})}
    if given is not None:
        for key, value in given.items():
            if recorded is not None and key in recorded and recorded[key] != value:
                raise MergeError(f"{where!r} records {key}={recorded[key]!r}, but {key}={value!r} was given")
            kwargs[key] = value
    rank, alpha = kwargs["rank"], kwargs["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"{where!r}: LoRA rank must be an integer >= 1, got {rank!r}")
    return alpha / rank, rank, kwargs


def _split_adapter(adapter: TensorView, where: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """``({layer: (down key, up key)}, {plain base key: adapter key})`` with plain layer names."""
    updates: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in adapter.names:
        if not key.startswith(_PREFIX):
            raise MergeError(
                f"{where!r}: key {key!r} does not start with {_PREFIX!r}; expected an AdaptedModel checkpoint"
            )
        module, _, leaf = key.rpartition(".")
        parent, _, child = module.rpartition(".")
        if child in ADAPTER_PROJECTIONS:
            if leaf != "weight":
                raise MergeError(
                    f"{where!r}: {key!r} is not part of a LoRA adapter (LoRA projections have no {leaf})"
                )
            layer = parent[len(_PREFIX) :] if parent != "adapted_model" else ""
            updates.setdefault(layer, {})[child] = key
        else:
            replacements[key[len(_PREFIX) :]] = key
    pairs = {}
    for layer, found in updates.items():
        missing = [p for p in ADAPTER_PROJECTIONS if p not in found]
        if missing:
            raise MergeError(
                f"{where!r}: the adapter of layer {layer or '<root>'!r} lacks {missing[0]}.weight"
            )
        pairs[layer] = (found["adapter_down_proj"], found["adapter_up_proj"])
    if not pairs:
        raise MergeError(f"{where!r} holds no LoRA adapter weights (keys '...adapter_down_proj.weight')")
    return pairs, replacements


def _plain_names(base: TensorView, kinds: dict[str, str], where: str) -> tuple[TensorView, dict[str, str]]:
    """A whole AdaptedModel's base file, renamed to the plain model's names."""
    if not base.names or not all(name.startswith(_PREFIX) for name in base.names):
        return base, kinds
    specs, readers = {}, {}
    for name in base.names:
        parts = name[len(_PREFIX) :].split(".")
        if any(part in ADAPTER_PROJECTIONS for part in parts):
            raise MergeError(
                f"{where!r} holds adapter weights ({name!r}); the base file must be the model without adapters"
            )
        plain = ".".join(part for part in parts if part not in _WRAPPED)
        specs[plain], readers[plain] = base.specs[name], base.readers[name]
    plain_kinds = {}
    for module, kind in kinds.items():
        if module == "adapted_model" or module.startswith(_PREFIX):
            parts = module.split(".")[1:]
            plain_kinds[".".join(p for p in parts if p not in _WRAPPED)] = kind
    return TensorView(specs, readers), plain_kinds


def _check(
    base: TensorView,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    replaced: Mapping[str, np.ndarray],
    rank: int,
    scaling: float,
    where: str,
) -> list[str]:
    notes = []
    for layer, (down, up) in factors.items():
        key = f"{layer}.weight" if layer else "weight"
        if key not in base.specs:
            raise MergeError(f"the adapter adapts layer {layer or '<root>'!r} but {where!r} has no {key!r}")
        if down.shape[0] != rank or up.shape[1] != rank:
            raise MergeError(
                f"layer {layer!r}: adapter factors down {down.shape} / up {up.shape} do not have the recorded rank {rank}"
            )
        delta_shape = (up.shape[0], *down.shape[1:])
        if tuple(base.shape(key)) != delta_shape:
            raise MergeError(
                f"layer {layer!r}: the adapter's update has shape {delta_shape} but {key!r} in {where!r} "
                f"has shape {base.shape(key)}"
            )
        notes.append(f"merged the LoRA update into {key} (scaling {scaling})")
    for key, array in replaced.items():
        if key not in base.specs:
            raise MergeError(
                f"the adapter file holds {key!r} (an unfrozen layer) but {where!r} has no such tensor"
            )
        if base.specs[key] != _spec(array):
            raise MergeError(f"{key!r}: {_spec(array)} in the adapter file vs {base.specs[key]} in {where!r}")
        notes.append(f"{key}: taken from the adapter file (unfrozen layer)")
    return notes


def _merged_view(
    base: TensorView,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    replaced: Mapping[str, np.ndarray],
    scaling: float,
) -> TensorView:
    readers = dict(base.readers)
    for layer, (down, up) in factors.items():
        key = f"{layer}.weight" if layer else "weight"
        readers[key] = _merging_reader(base.readers[key], down, up, scaling)
    for key, array in replaced.items():
        readers[key] = lambda array=array: array
    return TensorView(dict(base.specs), readers)


def _merging_reader(read, down: np.ndarray, up: np.ndarray, scaling: float):
    def read_merged() -> np.ndarray:
        weight = read()
        up32 = up.astype(np.float32).reshape(up.shape[0], -1)  # (out, rank)
        down32 = down.astype(np.float32).reshape(down.shape[0], -1)  # (rank, in * prod(k))
        delta = (up32 @ down32).reshape(weight.shape) * np.float32(scaling)
        return (weight.astype(np.float32) + delta).astype(weight.dtype)

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
