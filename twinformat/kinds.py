"""The layer-kind table: per kind, in one entry, its PyTorch names, its Flax names and the axis
permutation between them.

Framework-free (numpy only). The *kind* of a layer is decided by each twin from the module's
type (``torch_impl.interchange`` and ``flax_impl.interchange`` hold one type table each), never
from a tensor's name or rank: a square Linear weight loaded untransposed has the right shape and
computes the wrong function. A kind that is not in the table is an error, never a default.

=======================  ======================================  ==============================
kind                     PyTorch (name, layout)                  Flax NNX (name, layout)
=======================  ======================================  ==============================
linear                   weight (out, in), bias                  kernel (in, out), bias
conv                     weight (out, in, *k), bias              kernel (*k, in, out), bias
layer_norm               weight, bias                            scale, bias
group_norm               weight, bias                            scale, bias
rms_norm                 weight                                  scale
embedding                weight (num, dim)                       embedding (num, dim)
batch_norm               weight, bias,                           scale, bias,
                         running_mean, running_var               mean, var
                         (num_batches_tracked)                   (none: left out, reported)
conv_weight_norm         parametrizations.weight.original0 (g),  weight_g, weight_v
                         original1 (v), each (out, in, *k)       (*k, in, out)
masked_spec_embed        masked_spec_embed                       masked_spec_embed
gated_relative_position  gru_rel_pos_const                       gru_rel_pos_const
lora                     adapter_magnitude (DoRA)                adapter_magnitude
=======================  ======================================  ==============================

Every kind of :data:`KINDS` is in this table (a test compares them), and the command line's help
and every error that lists kinds print ``KINDS`` itself, so the three never differ.

A layout is written as the axes of the PyTorch tensor, an arrow, and the same axes in Flax's
order: ``"o i -> i o"``; ``*k`` stands for one to three spatial axes. A new kind is one
:func:`register_kind` call (plus one line in each twin's type table).

Every returned array is C-contiguous: ``safetensors.numpy.save_file`` writes wrong values for a
non-contiguous view such as a transposed kernel.

Example
-------
>>> import numpy as np
>>> w = np.arange(6, dtype=np.float32).reshape(2, 3)          # torch Linear(3, 2).weight
>>> name, kernel = torch_to_flax("linear", "weight", w)
>>> name, kernel.shape, bool(kernel.flags["C_CONTIGUOUS"])
('kernel', (3, 2), True)
>>> flax_to_torch("linear", "kernel", kernel)[1].tolist() == w.tolist()
True
>>> permutation("conv", "weight", 4)       # (out, in, kh, kw) -> (kh, kw, in, out)
(2, 3, 1, 0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

import numpy as np

from .errors import LayoutError

__all__ = [
    "BUFFER_NAMES",
    "KINDS",
    "WEIGHT_NORM_SPELLINGS",
    "LayerKind",
    "LayoutError",
    "Param",
    "canonical_kind",
    "flax_name",
    "flax_to_torch",
    "flax_to_torch_shape",
    "flax_to_torch_view",
    "get_kind",
    "is_buffer_name",
    "permutation",
    "register_kind",
    "split_key",
    "torch_name",
    "torch_to_flax",
    "torch_to_flax_shape",
    "torch_to_flax_view",
]


@dataclass(frozen=True)
class Param:
    """One tensor of a layer kind.

    ``torch`` is its name relative to the layer (``'weight'``; a dotted name such as
    ``'parametrizations.weight.original1'`` is allowed), ``flax`` the NNX variable name, and
    ``layout`` the axis permutation (``'o i -> i o'``; ``''``: the same layout on both sides).
    """

    torch: str
    flax: str
    layout: str = ""


@dataclass(frozen=True)
class LayerKind:
    """A layer kind: its tensors, and the PyTorch buffers that have no Flax variable.

    ``aliases`` are other names the kind was known by (files written earlier record them).
    """

    name: str
    params: tuple[Param, ...]
    torch_only: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    _by_torch: dict[str, Param] = field(init=False, repr=False, compare=False)
    _by_flax: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_torch", {p.torch: p for p in self.params})
        object.__setattr__(self, "_by_flax", {p.flax: p for p in self.params})
        for param in self.params:
            if param.layout:
                _parse_layout(param.layout)  # a malformed layout fails at registration

    def by_torch(self, name: str) -> Param:
        """The parameter PyTorch calls ``name``; :class:`LayoutError` naming the kind if none."""
        try:
            return self._by_torch[name]
        except KeyError:
            raise LayoutError(
                f"a {self.name} layer has no PyTorch parameter {name!r}; expected one of {sorted(self._by_torch)}"
            ) from None

    def by_flax(self, name: str) -> Param:
        """The parameter Flax calls ``name``; :class:`LayoutError` naming the kind if none."""
        try:
            return self._by_flax[name]
        except KeyError:
            raise LayoutError(
                f"a {self.name} layer has no Flax variable {name!r}; expected one of {sorted(self._by_flax)}"
            ) from None


KINDS: dict[str, LayerKind] = {}
_ALIASES: dict[str, str] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to the table (the extension point for a new layer kind); returns it.

    Registering a name twice with a different entry is an error: two rules for one kind would
    make files depend on import order.

    Example
    -------
    >>> register_kind(LayerKind("scale_only", (Param("weight", "scale"),)))
    LayerKind(name='scale_only', params=(Param(torch='weight', flax='scale', layout=''),), torch_only=(), aliases=())
    >>> torch_to_flax_shape("scale_only", "weight", (4,))
    ('scale', (4,))
    >>> del KINDS["scale_only"]
    """
    for name in (kind.name, *kind.aliases):
        existing = KINDS.get(_ALIASES.get(name, name))
        if existing is not None and existing != kind:
            raise ValueError(f"layer kind {name!r} is already registered as {existing}")
    KINDS[kind.name] = kind
    for alias in kind.aliases:
        _ALIASES[alias] = kind.name
    return kind


def canonical_kind(name: str) -> str:
    """The table's name for ``name`` (an alias such as ``'layernorm'`` gives ``'layer_norm'``).

    >>> canonical_kind("layernorm"), canonical_kind("conv")
    ('layer_norm', 'conv')
    """
    return get_kind(name).name


def get_kind(name: str) -> LayerKind:
    """The :class:`LayerKind` called ``name`` (or an alias); :class:`LayoutError` if unknown."""
    try:
        return KINDS[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise LayoutError(f"unknown layer kind {name!r}; known kinds: {sorted(KINDS)}") from None


def __getattr__(name: str) -> object:
    # BUFFERS_WITHOUT_FLAX_TWIN is derived from the table, so it follows every registration.
    if name == "BUFFERS_WITHOUT_FLAX_TWIN":
        return {kind.name: set(kind.torch_only) for kind in KINDS.values() if kind.torch_only}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flax_name(kind: str, torch_param: str) -> str:
    """The Flax variable name of PyTorch's ``torch_param`` in a layer of ``kind``."""
    return get_kind(kind).by_torch(torch_param).flax


def torch_name(kind: str, flax_param: str) -> str:
    """The PyTorch parameter name of Flax's ``flax_param`` in a layer of ``kind``."""
    return get_kind(kind).by_flax(flax_param).torch


def permutation(kind: str, torch_param: str, ndim: int) -> tuple[int, ...]:
    """The axes of the PyTorch tensor in Flax's order: ``flax = np.transpose(torch, perm)``.

    Raises ``ValueError`` when a tensor of ``ndim`` axes cannot have the kind's layout.
    """
    param = get_kind(kind).by_torch(torch_param)
    if not param.layout:
        return tuple(range(ndim))
    return _permutation(param.layout, ndim, f"{kind} {torch_param}")


def torch_to_flax(kind: str, torch_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one PyTorch tensor (as numpy) to its Flax name and layout. Bits are unchanged."""
    name, view = torch_to_flax_view(kind, torch_param, array)
    return name, np.ascontiguousarray(view)


def flax_to_torch(kind: str, flax_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one Flax variable (as numpy) to its PyTorch name and layout. Bits are unchanged."""
    name, view = flax_to_torch_view(kind, flax_param, array)
    return name, np.ascontiguousarray(view)


def torch_to_flax_view(kind: str, torch_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """As :func:`torch_to_flax`, but returns a view in the Flax layout (no copy, possibly not
    contiguous), for callers that copy it in their own way (e.g. a cache-blocked transpose).

    Example
    -------
    >>> name, kernel = torch_to_flax_view("linear", "weight", np.zeros((2, 3), np.float32))
    >>> name, kernel.shape, bool(kernel.flags["C_CONTIGUOUS"])
    ('kernel', (3, 2), False)
    """
    param = get_kind(kind).by_torch(torch_param)
    if param.layout:
        array = np.transpose(array, _permutation(param.layout, np.ndim(array), f"{kind} {torch_param}"))
    return param.flax, array


def flax_to_torch_view(kind: str, flax_param: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """As :func:`flax_to_torch`, but returns a view in the PyTorch layout (no copy)."""
    param = get_kind(kind).by_flax(flax_param)
    if param.layout:
        perm = _permutation(param.layout, np.ndim(array), f"{kind} {param.torch}")
        array = np.transpose(array, np.argsort(perm))
    return param.torch, array


def torch_to_flax_shape(kind: str, torch_param: str, shape: Iterable[int]) -> tuple[str, tuple[int, ...]]:
    """The Flax name and shape of PyTorch's ``torch_param`` of ``shape``, without any data.

    Example
    -------
    >>> torch_to_flax_shape("conv", "weight", (8, 3, 5, 5))
    ('kernel', (5, 5, 3, 8))
    """
    shape = tuple(shape)
    param = get_kind(kind).by_torch(torch_param)
    if param.layout:
        shape = tuple(shape[axis] for axis in _permutation(param.layout, len(shape), f"{kind} {torch_param}"))
    return param.flax, shape


def flax_to_torch_shape(kind: str, flax_param: str, shape: Iterable[int]) -> tuple[str, tuple[int, ...]]:
    """The PyTorch name and shape of Flax's ``flax_param`` of ``shape``, without any data.

    Example
    -------
    >>> flax_to_torch_shape("linear", "kernel", (3, 2))
    ('weight', (2, 3))
    """
    shape = tuple(shape)
    param = get_kind(kind).by_flax(flax_param)
    if param.layout:
        perm = _permutation(param.layout, len(shape), f"{kind} {param.torch}")
        out = [0] * len(shape)
        for flax_axis, torch_axis in enumerate(perm):
            out[torch_axis] = shape[flax_axis]
        shape = tuple(out)
    return param.torch, shape


def split_key(key: str, kinds: Mapping[str, str]) -> tuple[str, str]:
    """``(layer, parameter)`` of a PyTorch tensor name, given the layers' kinds.

    Usually the last dot splits them (``'enc.fc.weight'`` -> ``('enc.fc', 'weight')``); a kind
    whose tensors have dotted names (weight norm's ``parametrizations.weight.original0``) is
    found by walking up to the nearest layer that declares the rest of the name. A key owned by
    no known layer splits at its last dot.

    >>> split_key("fc.weight", {"fc": "linear"})
    ('fc', 'weight')
    >>> split_key("a.b.c", {})
    ('a.b', 'c')
    """
    layer, _, leaf = key.rpartition(".")
    if layer in kinds:
        return layer, leaf
    parts = key.split(".")
    for cut in range(len(parts) - 2, -1, -1):
        owner, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        kind = kinds.get(owner)
        if kind is not None and rest in get_kind(kind)._by_torch:
            return owner, rest
    return layer, leaf


@lru_cache(maxsize=256)
def _parse_layout(layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        left, right = (side.split() for side in layout.split("->"))
    except ValueError:
        raise ValueError(f"layout {layout!r} must read 'torch axes -> flax axes'") from None
    if sorted(left) != sorted(right) or len(set(left)) != len(left):
        raise ValueError(f"layout {layout!r}: both sides must name the same axes once each")
    if sum(axis.startswith("*") for axis in left) > 1:
        raise ValueError(f"layout {layout!r}: at most one '*' group of axes")
    return tuple(left), tuple(right)


_SPATIAL = (1, 2, 3)  # a '*' group stands for 1 to 3 spatial axes (Conv1d/2d/3d)


@lru_cache(maxsize=1024)
def _permutation(layout: str, ndim: int, what: str) -> tuple[int, ...]:
    left, right = _parse_layout(layout)
    fixed = [axis for axis in left if not axis.startswith("*")]
    star = ndim - len(fixed)
    has_star = len(fixed) != len(left)
    if (has_star and star not in _SPATIAL) or (not has_star and star != 0):
        expected = (
            f"{len(fixed) + _SPATIAL[0]} to {len(fixed) + _SPATIAL[-1]}" if has_star else str(len(fixed))
        )
        raise ValueError(f"a {what} tensor has {expected} axes ({layout.split('->')[0].strip()}), got {ndim}")

    def expand(axes: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        for axis in axes:
            out.extend(f"{axis}{n}" for n in range(star)) if axis.startswith("*") else out.append(axis)
        return out

    torch_axes, flax_axes = expand(left), expand(right)
    return tuple(torch_axes.index(axis) for axis in flax_axes)


#: The last parts of tensor names that PyTorch models register as buffers, not parameters:
#: transformers' position and token-type id tables, BatchNorm's step counter, causal masks.
#: Such a tensor of no known layer needs no kind (see :func:`is_buffer_name`).
BUFFER_NAMES = frozenset(
    {"position_ids", "token_type_ids", "num_batches_tracked", "masked_bias", "causal_mask", "attn_mask"}
)


def is_buffer_name(name: str, kinds: Mapping[str, str], buffers: Sequence[str] = ()) -> bool:
    """Whether the tensor ``name`` is a PyTorch buffer that is not a parameter of its layer.

    True when its last part is one of :data:`BUFFER_NAMES` or the whole name matches one of the
    glob patterns ``buffers``, and its module has no known kind or a kind without such a
    parameter (``embeddings.position_ids`` with ``embeddings`` given as an embedding layer is
    still a buffer). A parameter of a known layer is never a buffer, whatever its name.

    Example
    -------
    >>> is_buffer_name("embeddings.position_ids", {}), is_buffer_name("fc.weight", {})
    (True, False)
    >>> is_buffer_name("h.0.attn.bias", {}, ["*.attn.bias"]), is_buffer_name("fc.bias", {"fc": "linear"}, ["*"])
    (True, False)
    """
    module, _, leaf = name.rpartition(".")
    if leaf not in BUFFER_NAMES and not any(fnmatchcase(name, p) for p in buffers):
        return False
    return module not in kinds or leaf not in get_kind(kinds[module])._by_torch


# The table. A new kind is one more call (and one line in each twin's type table).
register_kind(LayerKind("linear", (Param("weight", "kernel", "o i -> i o"), Param("bias", "bias"))))
register_kind(LayerKind("conv", (Param("weight", "kernel", "o i *k -> *k i o"), Param("bias", "bias"))))
register_kind(
    LayerKind("layer_norm", (Param("weight", "scale"), Param("bias", "bias")), aliases=("layernorm",))
)
register_kind(
    LayerKind("group_norm", (Param("weight", "scale"), Param("bias", "bias")), aliases=("groupnorm",))
)
register_kind(LayerKind("rms_norm", (Param("weight", "scale"),), aliases=("rmsnorm",)))
register_kind(LayerKind("embedding", (Param("weight", "embedding"),)))
register_kind(
    LayerKind(
        "batch_norm",
        (
            Param("weight", "scale"),
            Param("bias", "bias"),
            Param("running_mean", "mean"),
            Param("running_var", "var"),
        ),
        torch_only=("num_batches_tracked",),
        aliases=("batchnorm",),
    )
)
# Weight norm of a conv weight (transformers' positional conv of wav2vec2, HuBERT, WavLM): the two
# tensors torch.nn.utils.parametrizations.weight_norm keeps in the layer's ParametrizationList
# (``<conv>.parametrizations.weight``): g (``original0``, ones but PyTorch's ``dim``) and v
# (``original1``, the conv weight's shape), both laid out like the kernel. The older spelling
# (``weight_g``/``weight_v`` on the conv) is renamed to this one where checkpoints are read.
register_kind(
    LayerKind(
        "conv_weight_norm",
        (
            Param("original0", "weight_g", "o i *k -> *k i o"),
            Param("original1", "weight_v", "o i *k -> *k i o"),
        ),
    )
)
#: Weight norm's older spelling -> this kind's: ``torch.nn.utils.weight_norm`` keeps g and v on the
#: layer itself; ``parametrizations.weight_norm`` (the conv_weight_norm kind) under its
#: ``parametrizations.weight``. The one table every reader of either spelling uses.
WEIGHT_NORM_SPELLINGS = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
# Tensors a speech model owns directly rather than through a layer: wav2vec2/HuBERT/WavLM's
# SpecAugment vector (on the model), WavLM's per-head gate constant (on its attention).
register_kind(LayerKind("masked_spec_embed", (Param("masked_spec_embed", "masked_spec_embed"),)))
register_kind(LayerKind("gated_relative_position", (Param("gru_rel_pos_const", "gru_rel_pos_const"),)))
# A LoRA module's own tensors (DoRA's magnitude, one entry per output feature); its factors are
# layers of their own kinds. Registered last: kinds above are in files written earlier.
register_kind(LayerKind("lora", (Param("adapter_magnitude", "adapter_magnitude"),)))
