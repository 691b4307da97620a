"""The adapter vocabulary: one declaration per adapter class, read by everything that needs to
know what an adapter holds.

Framework-free. Each twin's adapter class points at its declaration (``LoRA.adapter_kind is
LORA``); files record the declaration's ``name`` as ``adapter_class``. Converters, mergers,
PEFT interop and sharding read these declarations instead of matching class names, so a new
adapter class is the class in each twin plus one :func:`register_adapter` call.

Example
-------
>>> LORA.wrapped, LORA.factors, LORA.merges
('pretrained_module', ('adapter_down_proj', 'adapter_up_proj', 'adapter_magnitude'), True)
>>> LORA.factor_kind("adapter_up_proj", "embedding"), LORA.factor_kind("adapter_up_proj", "conv")
('linear', 'conv')
>>> get_adapter("HoulsbyAdapterLinear").merges
False
>>> is_adapter_key("adapted_model.fc.adapter_up_proj.weight"), is_adapter_key("fc.weight")
(True, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dtypes import TensorSpec
from .errors import AdapterError, UnknownAdapterError
from .kinds import get_kind, permutation

__all__ = [
    "ADAPTERS",
    "AdapterKind",
    "HOULSBY",
    "LORA",
    "MergeRule",
    "adapter_class_name",
    "adapter_of",
    "factor_names",
    "get_adapter",
    "implied_kinds",
    "is_adapter_key",
    "lora_merge",
    "lora_scaling",
    "register_adapter",
    "WEIGHTED_COMBINATIONS",
    "weighted_lora_factors",
    "wrapped_names",
]

MergeRule = Callable[..., np.ndarray]
"""``merge(weight, tensors, kwargs) -> merged weight``, all in PyTorch layout: ``weight`` the
wrapped layer's weight, ``tensors`` the adapter's own tensors keyed relative to the adapter
(``'adapter_down_proj.weight'``, ``'adapter_magnitude'``), ``kwargs`` the adapter's arguments with
defaults filled in. A rule for an adapter that wraps kinds of different layouts also takes
``wrapped_kind`` (``'linear'``, ``'conv'``, ``'embedding'``) as a fourth argument with a default,
as :func:`lora_merge` does, so a three-argument call stays valid."""


@dataclass(frozen=True)
class AdapterKind:
    """What an adapter class holds, declared once.

    Attributes
    ----------
    name : str
        The class name, as files record it (``'LoRA'``).
    wrapped : str
        The child holding the pretrained layer (``'pretrained_module'``).
    factors : tuple of str
        The children (or direct parameters) holding the adapter's own, trained tensors.
    defaults : mapping
        The constructor's keyword defaults, so a file recording only some kwargs is complete.
    wraps : tuple of str
        The layer kinds (of :mod:`twinformat.kinds`) the adapter wraps.
    factor_kinds : mapping
        Layer kind of each factor child; ``None`` means "the wrapped layer's kind". For a factor
        that is a parameter of the adapter module itself, the kind the adapter module takes.
    factor_kinds_by_wrapped : mapping
        Per wrapped layer kind, factor kinds that differ from ``factor_kinds`` (an embedding
        LoRA's up factor is a Linear).
    merge : MergeRule or None
        How to fold the adapter into the wrapped weight; ``None`` when it cannot be merged.
    merge_refusal : str
        Why it cannot be merged, for the error (an adapter without ``merge``).
    """

    name: str
    wrapped: str
    factors: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    wraps: tuple[str, ...] = ("linear",)
    factor_kinds: Mapping[str, str | None] = field(default_factory=dict)
    factor_kinds_by_wrapped: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    merge: MergeRule | None = None
    merge_refusal: str = ""

    @property
    def merges(self) -> bool:
        """Whether the adapter folds into the wrapped weight."""
        return self.merge is not None

    def kwargs(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """``given`` with the declaration's defaults filled in."""
        return {**self.defaults, **dict(given or {})}

    def factor_kind(self, factor: str, wrapped_kind: str | None) -> str | None:
        """The layer kind of the factor child ``factor`` around a layer of ``wrapped_kind``."""
        if factor not in self.factors:
            return None
        kind = self.factor_kinds_by_wrapped.get(wrapped_kind or "", {}).get(factor)
        if kind is not None:
            return kind
        kind = self.factor_kinds.get(factor)
        return kind if kind is not None else wrapped_kind


ADAPTERS: dict[str, AdapterKind] = {}


def register_adapter(kind: AdapterKind) -> AdapterKind:
    """Declare an adapter class (the extension point for a new adapter); returns ``kind``."""
    existing = ADAPTERS.get(kind.name)
    if existing is not None and existing != kind:
        raise ValueError(f"adapter {kind.name!r} is already declared as {existing}")
    for layer_kind in kind.wraps:
        get_kind(layer_kind)  # an unknown layer kind fails here, not at the first conversion
    ADAPTERS[kind.name] = kind
    return kind


def get_adapter(name: str) -> AdapterKind:
    """The declaration of the adapter class recorded as ``name``."""
    try:
        return ADAPTERS[name]
    except (KeyError, TypeError):
        raise UnknownAdapterError(
            f"unknown adapter class {name!r}; declared adapters: {sorted(ADAPTERS)}"
        ) from None


def adapter_of(obj: object) -> AdapterKind | None:
    """The declaration of an adapter class or instance (its ``adapter_kind``), else None."""
    kind = getattr(obj, "adapter_kind", None)
    return kind if isinstance(kind, AdapterKind) else None


def adapter_class_name(adapter_class: object) -> str:
    """The name files record for ``adapter_class``: its declaration's, else its class name.

    >>> class Mine: ...
    >>> adapter_class_name(type("X", (), {"adapter_kind": LORA})), adapter_class_name(Mine)
    ('LoRA', 'Mine')
    """
    kind = adapter_of(adapter_class)
    return kind.name if kind is not None else getattr(adapter_class, "__name__", str(adapter_class))


def factor_names() -> frozenset[str]:
    """Names of every declared adapter's factor children."""
    return frozenset(name for kind in ADAPTERS.values() for name in kind.factors)


def wrapped_names() -> frozenset[str]:
    """Names of the child that holds the pretrained layer, over every declared adapter."""
    return frozenset(kind.wrapped for kind in ADAPTERS.values())


def is_adapter_key(key: str) -> bool:
    """True for a tensor held by an adapter itself (``...adapter_down_proj.weight``)."""
    factors = factor_names()
    return any(part in factors for part in key.split("."))


def implied_kinds(
    names: Iterable[str],
    specs: Mapping[str, TensorSpec],
    adapter: AdapterKind,
    known: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Kinds of the factor layers of ``adapter`` in a torch-layout file, from the declaration.

    A factor's kind is its declared kind, or the wrapped layer's: from ``known`` (a file's
    ``layer_kinds``) when recorded, else the one kind of ``adapter.wraps`` whose layout admits
    the weight's number of axes (a LoRA factor of 2 axes is ``'linear'``, of 3 to 5 ``'conv'``).
    An embedding's weight has the same axes in both frameworks, so its number of axes tells
    nothing: a LoRA of 2-axes factors is an embedding's only when the factors' shapes say so
    (``down (num, rank)``, ``up (dim, rank)`` share their last axis, a Linear's ``down (rank,
    in)``, ``up (out, rank)`` do not), and a Linear's when both readings fit (``num == rank``).
    A direct parameter factor (DoRA's ``adapter_magnitude``) gives the adapter module its
    declared kind.

    Example
    -------
    >>> implied_kinds(["m.adapter_down_proj.weight"], {"m.adapter_down_proj.weight": ("F32", (2, 4))}, LORA)
    {'m.adapter_down_proj': 'linear'}
    >>> specs = {"e.adapter_down_proj.weight": ("F32", (100, 4)), "e.adapter_up_proj.weight": ("F32", (8, 4))}
    >>> implied_kinds(specs, specs, LORA)
    {'e.adapter_down_proj': 'embedding', 'e.adapter_up_proj': 'linear'}
    """
    known = dict(known or {})
    names = list(names)
    out: dict[str, str] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        factor_kind = adapter.factor_kinds.get(leaf)
        if leaf in adapter.factors and factor_kind:
            out[module] = factor_kind  # a parameter directly on the adapter
            continue
        parent, _, child = module.rpartition(".")
        if child not in adapter.factors or leaf != "weight":
            continue
        wrapped_module = f"{parent}.{adapter.wrapped}" if parent else adapter.wrapped
        wrapped_kind = known.get(wrapped_module)
        if wrapped_kind is None:
            ndim = len(specs[name][1])
            fits = [kind for kind in adapter.wraps if kind != "embedding" and _admits(kind, ndim)]
            wrapped_kind = fits[0] if len(fits) == 1 else None
            if (
                wrapped_kind == "linear"
                and "embedding" in adapter.wraps
                and _embedding_factors(parent, specs)
            ):
                wrapped_kind = "embedding"
        kind = adapter.factor_kind(child, wrapped_kind)
        if kind is not None:
            out[module] = kind
    return out


def _embedding_factors(parent: str, specs: Mapping[str, TensorSpec]) -> bool:
    """Whether the LoRA factors under ``parent`` can only be an embedding's (see implied_kinds)."""
    prefix = f"{parent}." if parent else ""
    down = specs.get(f"{prefix}adapter_down_proj.weight")
    up = specs.get(f"{prefix}adapter_up_proj.weight")
    if down is None or up is None or len(down[1]) != 2 or len(up[1]) != 2:
        return False
    (d0, d1), (_, u1) = down[1], up[1]
    return d1 == u1 and d0 != u1


def _admits(kind: str, ndim: int) -> bool:
    try:
        permutation(kind, "weight", ndim)
    except (ValueError, KeyError):
        return False
    return True


def lora_scaling(kwargs: Mapping[str, Any]) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``, from LoRA's kwargs.

    >>> lora_scaling({"rank": 4, "alpha": 8.0}), lora_scaling({"rank": 4, "alpha": 8.0, "use_rslora": True})
    (2.0, 4.0)
    """
    rank, alpha = int(kwargs.get("rank", 16)), float(kwargs.get("alpha", 1.0))
    return alpha / math.sqrt(rank) if kwargs.get("use_rslora") else alpha / rank


def lora_merge(
    weight: np.ndarray,
    tensors: Mapping[str, np.ndarray],
    kwargs: Mapping[str, Any],
    wrapped_kind: str = "linear",
) -> np.ndarray:
    """LoRA's merge, as ``LoRA.merge`` does it: ``weight + scaling * up @ down`` in float32, cast
    back to the weight's dtype (conv too: ``up (out, rank, 1..)``, ``down (rank, in, *k)``;
    embedding: ``weight (num, dim) + scaling * down (num, rank) @ up (dim, rank).T``); with
    ``use_dora`` the rows are then rescaled to ``adapter_magnitude / ||row||``."""
    down, up = tensors["adapter_down_proj.weight"], tensors["adapter_up_proj.weight"]
    up32 = up.astype(np.float32).reshape(up.shape[0], -1)  # (out, rank)
    if wrapped_kind == "embedding":
        delta = down.astype(np.float32) @ up32.T  # (num, dim)
    else:
        down32 = down.astype(np.float32).reshape(down.shape[0], -1)  # (rank, in * prod(k))
        delta = (up32 @ down32).reshape(weight.shape)
    combined = weight.astype(np.float32) + delta * np.float32(lora_scaling(kwargs))
    if kwargs.get("use_dora"):
        magnitude = tensors["adapter_magnitude"].astype(np.float32)
        norm = np.sqrt(np.sum(np.square(combined.reshape(combined.shape[0], -1)), axis=1))
        combined = combined * (magnitude / norm).reshape(-1, *(1,) * (combined.ndim - 1))
    return combined.astype(weight.dtype)


LORA = register_adapter(
    AdapterKind(
        name="LoRA",
        wrapped="pretrained_module",
        factors=("adapter_down_proj", "adapter_up_proj", "adapter_magnitude"),
        defaults={"rank": 16, "alpha": 1.0, "dropout": 0.0, "use_rslora": False, "use_dora": False},
        wraps=("linear", "conv", "embedding"),
        # None: the wrapped layer's kind, except an embedding's up factor, a Linear(rank, dim);
        # DoRA's magnitude is a parameter of the LoRA module itself, of layer kind 'lora'.
        factor_kinds={"adapter_down_proj": None, "adapter_up_proj": None, "adapter_magnitude": "lora"},
        factor_kinds_by_wrapped={"embedding": {"adapter_up_proj": "linear"}},
        merge=lora_merge,
    )
)
HOULSBY = register_adapter(
    AdapterKind(
        name="HoulsbyAdapterLinear",
        wrapped="pretrained_linear",
        factors=("adapter_down_proj", "adapter_up_proj"),
        defaults={"bias": True},
        wraps=("linear",),
        factor_kinds={"adapter_down_proj": "linear", "adapter_up_proj": "linear"},
        merge_refusal="the activation between their projections is not linear",
    )
)


#: The ``combination_type`` values of PEFT's ``add_weighted_adapter`` that the twins compute.
WEIGHTED_COMBINATIONS = ("linear", "cat")


def weighted_lora_factors(
    factors: Sequence[Mapping[str, tuple[Any, Any, float]]],
    weights: Sequence[float],
    combination_type: str,
    *,
    embeddings: Collection[str] = (),
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """PEFT's ``add_weighted_adapter`` on the factors of several LoRA adapters: the new rank and,
    per layer, the new ``(down, up)`` in PyTorch's layout (``down (r, in, *k)``, ``up (out, r, 1..)``;
    an embedding's ``down (num, r)``).

    ``factors[i]`` maps each layer adapter ``i`` adapts to ``(down, up, scaling)``; a layer some
    adapters lack takes the others'. ``'linear'`` (every adapter of one rank): ``down =
    sum sign(w s) sqrt(|w s|) down_i``, ``up = sum sqrt(|w s|) up_i``; ``'cat'``: the factors
    stacked along the rank, ``down_i * w_i * s_i`` beside each other, the new rank the sum of the
    ranks (zero-padded where a layer lacks an adapter). PEFT's refusals, by name: another
    combination type; ``'linear'`` over different ranks.

    >>> one = {"fc": (np.ones((2, 3)), np.ones((4, 2)), 0.5)}
    >>> two = {"fc": (np.ones((1, 3)), np.ones((4, 1)), 2.0)}
    >>> rank, out = weighted_lora_factors([one, two], [1.0, 1.0], "cat")
    >>> rank, out["fc"][0][:, 0].tolist(), out["fc"][1].shape
    (3, [0.5, 0.5, 2.0], (4, 3))
    """
    if combination_type not in WEIGHTED_COMBINATIONS:
        raise AdapterError(
            f"combination_type {combination_type!r} is not computed here; the twins compute PEFT's "
            f"{list(WEIGHTED_COMBINATIONS)}"
        )
    if len(factors) != len(weights) or not factors:
        raise AdapterError(f"give one weight per adapter: {len(factors)} adapters, {len(weights)} weights")
    ranks = [max(_rank(down, layer in embeddings) for layer, (down, _, _) in f.items()) for f in factors]
    if len(factors) == 1:
        combination_type = "linear"  # PEFT's rule: one adapter is always combined linearly
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise AdapterError(
            f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}; use 'cat' (as PEFT refuses)"
        )
    new_rank = ranks[0] if combination_type == "linear" else sum(ranks)
    layers = list(dict.fromkeys(layer for f in factors for layer in f))
    out = {}
    for layer in layers:
        embedding = layer in embeddings
        held = [(f[layer], w) for f, w in zip(factors, weights, strict=True) if layer in f]
        down_axis = 1 if embedding else 0
        if combination_type == "linear":
            down = sum(
                np.sign(w * s or 1) * math.sqrt(abs(w * s)) * np.asarray(d, np.float64)
                for (d, _, s), w in held
            )
            up = sum(math.sqrt(abs(w * s)) * np.asarray(u, np.float64) for (_, u, s), w in held)
        else:
            down = np.concatenate(
                [np.asarray(d, np.float64) * (w * s) for (d, _, s), w in held], axis=down_axis
            )
            up = np.concatenate([np.asarray(u, np.float64) for (_, u, _), w in held], axis=1)
            pad = new_rank - up.shape[1]
            if pad:
                down = np.concatenate(
                    [down, np.zeros_like(np.take(down, [0] * pad, axis=down_axis))], axis=down_axis
                )
                up = np.concatenate([up, np.zeros_like(np.take(up, [0] * pad, axis=1))], axis=1)
        dtype = np.asarray(held[0][0][0]).dtype
        out[layer] = (np.asarray(down, dtype), np.asarray(up, dtype))
    return new_rank, out


def _rank(down: Any, embedding: bool) -> int:
    return int(down.shape[1] if embedding else down.shape[0])
